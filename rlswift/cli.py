"""The `rlswift` command: the recipes by name, `verify-resume`, `ckpt inspect|diff`, `export`, `plot`."""

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
    v.add_argument("--nproc", type=int, default=1,
                   help="processes per run: >1 runs the recipe under torchrun (python -m torch.distributed.run "
                        "--standalone --nproc-per-node N)")
    v.add_argument("--resume-nproc", type=int, default=None,
                   help="processes of the resumed run (default: --nproc); another world size compares weights and "
                        "metrics within tolerance instead of bit for bit")
    v.add_argument("--rank", type=int, default=None,
                   help="with --nproc > 1: stop only this rank (default: every rank)")
    v.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")

    c = sub.add_parser("ckpt", help="inspect or compare checkpoints")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    ci = csub.add_parser("inspect", help="hooks, files, sizes, versions, config, checksum status")
    ci.add_argument("path")
    cd = csub.add_parser("diff", help="which hooks and tensors differ, and by how much")
    cd.add_argument("a")
    cd.add_argument("b")

    e = sub.add_parser("export", help="write a checkpoint as a transformers folder or a PEFT adapter (vLLM loads "
                                      "the transformers folder)",
                       description="Full fine-tuning -> a transformers folder; LoRA -> a PEFT adapter folder, or with "
                                   "--merge a transformers folder with the adapter folded in. OUT must not exist or "
                                   "be empty.")
    e.add_argument("checkpoint", help="a checkpoint-N folder, a run folder (see --which), or RUN/latest, RUN/best")
    e.add_argument("out", help="the folder to create (refused when it exists and is not empty)")
    e.add_argument("--merge", action="store_true",
                   help="LoRA: fold the adapter into the base weights and write a plain transformers folder")
    e.add_argument("--which", choices=["latest", "best"], default=None,
                   help="for a run folder: the checkpoint its 'latest' (default) or 'best' pointer names")
    e.add_argument("--base-model", default=None,
                   help="the base model folder, when the run's `model` is not where it was during training")

    pl = sub.add_parser("plot", help="reward, loss, KL, completion length and step time of runs, overlaid, as a PNG")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each holds metrics.jsonl)")
    pl.add_argument("--out", default="rlswift-plot.png", help="PNG to write (default: rlswift-plot.png)")
    pl.add_argument("--metrics", default=None,
                    help="comma-separated metric names; nested fields with '/' (default: "
                         "reward,loss,kl,completion_length,timing/step)")
    pl.add_argument("--smooth", type=int, default=1, help="add a moving average over this many steps")

    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "verify-resume":
        from rlswift.verify import verify_resume

        recipe = _recipe_of(args.config, args.recipe)
        workdir = Path(args.workdir or f"runs/verify-{recipe}")
        return verify_resume(recipe, args.config, args.overrides, args.steps, args.kill_at, args.kill_seed,
                             args.signal, args.during_save, workdir, nproc=args.nproc,
                             resume_nproc=args.resume_nproc, rank=args.rank)
    if args.command == "ckpt":
        from rlswift.checkpoint.inspect import diff_checkpoints, inspect_checkpoint

        if args.ckpt_command == "inspect":
            print(inspect_checkpoint(args.path))
            return 0
        report, identical = diff_checkpoints(args.a, args.b)
        print(report)
        return 0 if identical else 1
    return 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _export(args) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlswift.export import ExportError, export_checkpoint

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one summary line is enough for a command-line export
        result = export_checkpoint(args.checkpoint, args.out, merge=args.merge, which=args.which,
                                   base_model=args.base_model)
    except ExportError as err:
        return _fail(str(err))
    if args.merge and result.kind == "full":
        print("note: --merge ignored: a full fine-tuning checkpoint exports as a complete model already",
              file=sys.stderr)
    print(f"exported {result.checkpoint} (step {result.step}, {result.kind}) to {result.out}\n"
          f"load it with: {result.how_to_load()}")
    return 0


def _plot(args) -> int:
    from rlswift.plot import DEFAULT_METRICS, PlotError, plot_runs

    metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    try:
        result = plot_runs(args.runs, args.out, metrics=metrics, smooth=args.smooth)
    except PlotError as err:
        return _fail(str(err))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}: {', '.join(result.panels)} for {len(args.runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
