"""The `rlswift` command: `verify-resume`, `ckpt inspect`, `ckpt diff`, and the recipes by name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _recipe_of(config: str | None, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "dpo" if config and "dpo" in Path(config).name else "grpo"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("grpo", "dpo"):
        import importlib

        return importlib.import_module(f"rlswift.recipes.{argv[0]}").main(argv[1:])

    parser = argparse.ArgumentParser(prog="rlswift", description="RL post-training with exact, verifiable resume.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("grpo", help="run the GRPO recipe (python -m rlswift.recipes.grpo)")
    sub.add_parser("dpo", help="run the DPO recipe (python -m rlswift.recipes.dpo)")

    v = sub.add_parser("verify-resume", help="prove that a recipe resumes exactly (uninterrupted vs stopped+resumed)")
    v.add_argument("--config", help="recipe preset, e.g. recipes/grpo_tiny.yaml")
    v.add_argument("--recipe", choices=["grpo", "dpo"], help="default: dpo if the config file name says dpo, else grpo")
    v.add_argument("--steps", type=int, required=True, help="steps of the uninterrupted run (N)")
    v.add_argument("--kill-at", default="random", help="step K at which the first run is stopped, or 'random'")
    v.add_argument("--kill-seed", type=int, default=0, help="seed for --kill-at random")
    v.add_argument("--signal", choices=["KILL", "TERM"], default="KILL",
                   help="KILL: SIGKILL mid-step, resume from the last checkpoint; TERM: graceful stop and save")
    v.add_argument("--during-save", action="store_true", help="SIGKILL while a checkpoint is being written")
    v.add_argument("--workdir", default=None, help="where both runs go (default: runs/verify-<recipe>)")
    v.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")

    c = sub.add_parser("ckpt", help="inspect or compare checkpoints")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    ci = csub.add_parser("inspect", help="hooks, files, sizes, versions, config, checksum status")
    ci.add_argument("path")
    cd = csub.add_parser("diff", help="which hooks and tensors differ, and by how much")
    cd.add_argument("a")
    cd.add_argument("b")

    args = parser.parse_args(argv)
    if args.command == "verify-resume":
        from rlswift.verify import verify_resume

        recipe = _recipe_of(args.config, args.recipe)
        workdir = Path(args.workdir or f"runs/verify-{recipe}")
        return verify_resume(recipe, args.config, args.overrides, args.steps, args.kill_at, args.kill_seed,
                             args.signal, args.during_save, workdir)
    if args.command == "ckpt":
        from rlswift.checkpoint.inspect import diff_checkpoints, inspect_checkpoint

        if args.ckpt_command == "inspect":
            print(inspect_checkpoint(args.path))
            return 0
        report, identical = diff_checkpoints(args.a, args.b)
        print(report)
        return 0 if identical else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
