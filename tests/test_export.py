"""`rlswift export` on checkpoints of real tiny GRPO and DPO runs (full fine-tuning and LoRA rank 4).

Each exported folder is loaded the way a user would (transformers, PEFT, vLLM) and compared with the policy rebuilt
from the checkpoint the way a resume rebuilds it (base folder + the `model` hook's tensors): fp32 logits within 1e-6,
and the vLLM engine on the exported folder samples the same tokens as an engine that got the run's weights through
`update_weights(engine_weights(policy))`, for the same seeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from e2e import env_for, run_cli

pytestmark = pytest.mark.slow

# Digit reward: the random tiny model gets a gradient at every step, so the exported weights really moved.
GRPO = ["-m", "rlswift.recipes.grpo", "--config", "recipes/grpo_tiny.yaml", "max_steps=3", "engine=hf",
        "reward_funcs=[accuracy,userland.custom.digit_reward]"]
DPO = ["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml", "max_steps=3"]
IDS = torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(0))


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rlswift_cache):
    """Four 3-step runs (checkpoint-3 each): grpo / dpo x full / LoRA rank 4."""
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, base in (("grpo", GRPO), ("dpo", DPO)):
        for kind, extra in (("full", []), ("lora", ["lora.rank=4"])):
            out[f"{name}-{kind}"] = root / f"{name}-{kind}"
            ok(run_cli([*base, f"output_dir={out[f'{name}-{kind}']}", *extra], rlswift_cache))
    return out


def export_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    return run_cli(["-m", "rlswift", "export", *map(str, args)], cache)


def export_here(args: list, cache: Path) -> str:
    """`rlswift export ARGS` in this process (the CLI's own main), returning its stdout."""
    from rlswift.cli import main

    out = io.StringIO()
    with mock.patch.dict(os.environ, RLSWIFT_CACHE=str(cache)), contextlib.redirect_stdout(out):
        assert main(["export", *map(str, args)]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory, rlswift_cache):
    """Every export the tests load, made once: a run folder, the `latest` pointer file and a checkpoint folder."""
    root = tmp_path_factory.mktemp("exports")
    made = {"grpo-full": root / "grpo-full"}
    proc = ok(export_cli([runs["grpo-full"], made["grpo-full"]], rlswift_cache))  # the real CLI, once
    assert "step 3, full" in proc.stdout
    made["dpo-full"] = root / "dpo-full"
    assert "step 3, full" in export_here([runs["dpo-full"], made["dpo-full"]], rlswift_cache)
    for run in ("grpo-lora", "dpo-lora"):
        made[f"{run}-adapter"], made[f"{run}-merged"] = root / f"{run}-adapter", root / f"{run}-merged"
        assert "lora-adapter" in export_here([runs[run] / "latest", made[f"{run}-adapter"]], rlswift_cache)
        assert "lora-merged" in export_here([runs[run] / "checkpoint-3", made[f"{run}-merged"], "--merge"],
                                            rlswift_cache)
    return made


def checkpoint_policy(ckpt: Path, cache: Path):
    """The run's policy as a resume rebuilds it: base folder + the `model` hook (read without unpickling)."""
    from rlswift.checkpoint.reader import load_hook_state, read_manifest
    from rlswift.models import resolve_model
    from rlswift.models.policy import load_policy, load_policy_state

    manifest = read_manifest(ckpt)
    cfg = manifest["config"]
    with mock.patch.dict(os.environ, RLSWIFT_CACHE=str(cache)):
        base = resolve_model(cfg["model"])
    policy = load_policy(base, dtype="float32", lora_rank=cfg["lora"]["rank"], lora_alpha=cfg["lora"]["alpha"])
    load_policy_state(policy, load_hook_state(ckpt, "model", manifest))
    return policy.eval(), base


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("run", ["grpo-full", "dpo-full"])
def test_full_export_is_a_transformers_folder_with_the_policy_logits(runs, exports, run, rlswift_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exports[run]  # exported from the run folder: its `latest` checkpoint
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "rlswift_export.json"} <= {p.name for p in out.iterdir()}
    policy, base = checkpoint_policy(runs[run] / "checkpoint-3", rlswift_cache)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = (logits(exported) - logits(policy)).abs().max().item()
    moved = (logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)) - logits(policy)).abs().max()
    assert diff <= 1e-6, diff
    assert moved > 1e-3, "the run did not change the weights: the comparison would prove nothing"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("12 + 30 =")["input_ids"] == AutoTokenizer.from_pretrained(base)("12 + 30 =")["input_ids"]
    info = json.loads((out / "rlswift_export.json").read_text())
    assert info["step"] == 3 and info["kind"] == "full" and info["config"]["model"] == "tiny"


@pytest.mark.parametrize("run", ["grpo-lora", "dpo-lora"])
def test_lora_exports_adapter_and_merged(runs, exports, run, rlswift_cache):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    policy, base = checkpoint_policy(runs[run] / "checkpoint-3", rlswift_cache)
    ref = logits(policy)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    assert (ref - base_logits).abs().max() > 1e-4, "the adapter is still zero: the comparison would prove nothing"

    adapter = exports[f"{run}-adapter"]  # exported from the `latest` pointer file
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and Path(cfg["base_model_name_or_path"]) == base.resolve()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    assert (logits(loaded.eval()) - ref).abs().max().item() <= 1e-6

    merged = exports[f"{run}-merged"]  # exported from the checkpoint folder, --merge
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    full = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    # W + B @ A in one tensor vs x @ W + (x @ A) @ B: the same math, summed in another order. Measured 6.6e-7.
    assert (logits(full) - ref).abs().max().item() <= 1e-6


def test_merged_and_full_exports_sample_like_the_runs_engine(runs, exports, rlswift_cache):
    """vLLM on the exported folder vs vLLM on the base folder + update_weights(engine_weights(policy))."""
    pytest.importorskip("vllm")
    full, merged = exports["grpo-full"], exports["grpo-lora-merged"]
    code = f"""
import json
from rlswift.export import load_checkpoint_policy
from rlswift.models.policy import engine_weights
from rollout.types import Request, SamplingSpec
from rollout.vllm_engine import VLLMEngine
spec = SamplingSpec(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16)
reqs = [Request([5 + i, 17, 40 + 3 * i, 9], [100 + i, 7 + i], spec) for i in range(6)]
res = {{}}
pairs = [("full", {str(runs["grpo-full"] / "checkpoint-3")!r}, {str(full)!r}),
         ("merged", {str(runs["grpo-lora"] / "checkpoint-3")!r}, {str(merged)!r})]
policies = {{name: load_checkpoint_policy(ckpt) for name, ckpt, _ in pairs}}
base = policies["full"][1]
e = VLLMEngine(base, max_model_len=256, kv_cache_gib=1)
untrained = e.generate(reqs)
runs_engine = {{}}
for name, _, _ in pairs:
    e.update_weights(engine_weights(policies[name][0]))
    runs_engine[name] = e.generate(reqs)
e.close()
for name, _, folder in pairs:
    e = VLLMEngine(folder, max_model_len=256, kv_cache_gib=1)
    outs = e.generate(reqs)
    e.close()
    ref = runs_engine[name]
    res[name] = {{"same_tokens": [o.completion_ids for o in outs] == [o.completion_ids for o in ref],
                 "max_logprob_diff": max(abs(a - b) for o, r in zip(outs, ref) for a, b in zip(o.logprobs, r.logprobs)),
                 "moved_from_base": max((abs(a - b) for o, r in zip(outs, untrained)
                                         if o.completion_ids == r.completion_ids
                                         for a, b in zip(o.logprobs, r.logprobs)), default=float("inf"))}}
print("RESULT" + json.dumps(res))
"""
    env = env_for(rlswift_cache, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("full", "merged"):
        assert res[name]["same_tokens"] and res[name]["max_logprob_diff"] == 0.0, res  # the same weights, twice
        assert res[name]["moved_from_base"] > 1e-4, res  # ... and not the base model's


def test_bad_input_is_one_clear_error_line(runs, tmp_path, rlswift_cache):
    full = runs["grpo-full"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("keep me")
    broken = tmp_path / "broken" / "checkpoint-3"
    shutil.copytree(full / "checkpoint-3", broken)
    with open(broken / "hooks" / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest").write_text("checkpoint-99\n")
    cases = {
        "not empty": ([full, taken], "is a folder that is not empty"),
        "missing": ([tmp_path / "nope", tmp_path / "o1"], "does not exist"),
        "not a checkpoint": ([tmp_path, tmp_path / "o2"], "neither a checkpoint"),
        "no best": ([full, tmp_path / "o3", "--which", "best"], "has no 'best' pointer"),
        "which on a checkpoint": ([full / "checkpoint-3", tmp_path / "o4", "--which", "latest"],
                                  "--which only applies to a run folder"),
        "dangling pointer": ([tmp_path / "dangling" / "latest", tmp_path / "o5"], "names checkpoint-99"),
        "corrupted": ([broken, tmp_path / "o6"], "sha256 does not match"),
    }
    from rlswift.cli import main

    for name, (args, message) in cases.items():
        proc = export_cli(args, rlswift_cache) if name in ("not empty", "corrupted") else None
        if proc is not None:  # through the real CLI: exit 2, one line on stderr, nothing on stdout
            assert proc.returncode == 2 and proc.stdout == "", (name, proc.stdout, proc.stderr[-2000:])
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        else:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                assert main(["export", *map(str, args)]) == 2, name
            assert err.getvalue().count("\n") == 1 and message in err.getvalue(), (name, err.getvalue())
    assert (taken / "x.txt").read_text() == "keep me" and sorted(p.name for p in taken.iterdir()) == ["x.txt"]
    assert not list(tmp_path.glob(".*tmp-export*")), "a failed export left its temporary folder behind"


def test_best_pointer_and_empty_out_folder(runs, tmp_path, rlswift_cache):
    """`--which best` and RUN/best follow the `best` pointer (written by retention; simulated here)."""
    from rlswift.export import export_checkpoint, resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs["dpo-full"], run)
    (run / "best").write_text("checkpoint-3\n")
    assert resolve_checkpoint(run, "best") == run / "checkpoint-3" == resolve_checkpoint(run / "best")
    empty = tmp_path / "empty-out"
    empty.mkdir()
    with mock.patch.dict(os.environ, RLSWIFT_CACHE=str(rlswift_cache)):
        result = export_checkpoint(run, empty, which="best")
    assert result.kind == "full" and result.step == 3 and (empty / "model.safetensors").is_file()
