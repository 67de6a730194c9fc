"""Checkpoint throughput vs the disk, async-save stall, and resume launch-to-first-step (issue #12.2).

1. A SmolLM2-135M full fine-tuning state (fp32 weights + AdamW after one step, ~1.5 GiB), saved by
   `CheckpointManager` sync and async, against the disk's own sequential write+fsync of the same byte count in the
   same folder, interleaved (raw, sync, async, raw, ...) so load on a shared machine hits all alike; medians.
   Targets: sync save >= 0.8x raw disk write; async stall (time save() blocks the caller) <= 0.1x the sync save.
2. Load: `read_checkpoint` (one pass: hash + decode) + load_state_dict, from the page cache and cold (the files
   evicted with posix_fadvise DONTNEED), against a plain cold sequential read of the same files.
3. Resume through the real DPO recipe CLI on the tiny model: launch to the first new line of metrics.jsonl for a
   cold start, a resume at step 5 and a resume at step 500. Target: resume <= 1.2x cold, not growing with steps.

    .venv/bin/python scripts/bench_checkpoint.py [--reps 3] [--dir /path/on/the/disk] [--skip-resume] [--json f]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

REPO = _bench.REPO
GB = 1e9


def build_state(model_hook: str = "clone"):
    """SmolLM2-135M (fp32) + AdamW after one step, as the recipes register them, and a training-step function.

    model_hook "clone": the recipes' ModelHook (policy_state_dict clones every parameter); "view": the parameters
    themselves (detached, no copy): enough now that a sync save writes before returning and an async save copies.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rlswift.models import policy_state_dict, load_policy_state, smollm2_path
    from rlswift.state.rng import RNGState

    from rlswift.models.policy import policy_state_dict_names

    class PolicyHook:  # what recipes/_common.ModelHook does (full fine-tuning: cloned parameters)
        def __init__(self, model):
            self.model = model

        def state_dict(self):
            if model_hook == "view":
                return {n: p.detach() for n, p in policy_state_dict_names(self.model).items()}
            return policy_state_dict(self.model)

        def load_state_dict(self, sd):
            load_policy_state(self.model, sd)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step():  # about one DPO step of the smollm2 preset: 4 pairs = 8 sequences of ~48 tokens
        ids = torch.randint(0, 1000, (8, 48))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    return {"model": PolicyHook(model), "optimizer": opt, "rng": RNGState()}, train_step


def drop_cache(paths) -> None:
    """Evict these files' pages from the page cache (clean pages only: call after fsync)."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(folder: Path, nbytes: int, early_writeback: bool = False) -> float:
    """Seconds for a plain sequential write of `nbytes` (16 MiB write() calls of random bytes) + fsync."""
    import torch

    from rlswift.checkpoint.tensorfile import CHUNK, start_writeback, write_all

    buf = memoryview(torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy())
    path = folder / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < nbytes:
            n = min(CHUNK, nbytes - done)
            write_all(f, buf[:n])
            if early_writeback:
                start_writeback(f.fileno(), done, n)
            done += n
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def raw_read_cold(files: list[Path]) -> float:
    drop_cache(files)
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def bench_save_load(folder: Path, reps: int, model_hook: str) -> dict:
    import hashlib

    import torch

    from rlswift.checkpoint import CheckpointManager, read_checkpoint
    from rlswift.checkpoint.writer import encode_hooks

    hooks, train_step = build_state(model_hook)
    sync_root, async_root = folder / "sync", folder / "async"
    async_mgr = CheckpointManager(async_root, async_save=True)
    raw, raw_wb, sync, stall, bg_write, snapshot, during, alone = [], [], [], [], [], [], [], []
    nbytes = 0
    for rep in range(reps):
        step = rep + 1
        t0 = time.perf_counter()
        out = CheckpointManager(sync_root).save(step, hooks, config={}, blocking=True)
        sync.append(time.perf_counter() - t0)
        files = [f for f in out.rglob("*") if f.is_file()]
        nbytes = sum(f.stat().st_size for f in files)
        shutil.rmtree(out)
        raw.append(raw_write(folder, nbytes))
        raw_wb.append(raw_write(folder, nbytes, early_writeback=True))
        # Async: the caller is blocked by the snapshot, then by the optimizer fence in the next step if the
        # background writer has not written the parameters and moments by then.
        t0 = time.perf_counter()
        async_mgr.save(step, hooks, config={})
        snap = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_step()
        during.append(time.perf_counter() - t0)
        stall.append(snap + async_mgr.last_save["fence_wait"])
        async_mgr.wait()
        bg_write.append(async_mgr.last_save["write"])
        snapshot.append(snap)
        if rep < reps - 1:
            shutil.rmtree(async_root / f"checkpoint-{step}")
        t0 = time.perf_counter()
        train_step()
        alone.append(time.perf_counter() - t0)
        print(f"  rep {rep + 1}: raw {raw[-1]:.2f} s, sync save {sync[-1]:.2f} s, async stall {stall[-1]:.3f} s "
              f"(snapshot {snap:.3f} s, fence {async_mgr.last_save['fence_wait']:.3f} s; background write "
              f"{bg_write[-1]:.2f} s); training step {alone[-1]:.2f} s alone, {during[-1]:.2f} s beside the write",
              flush=True)
        copied = async_mgr.last_save["copied_bytes"]

    # Where a sync save's time goes: state_dict + encode (incl. the model hook's clone), sha256 alone.
    t0 = time.perf_counter()
    encoded = list(encode_hooks(hooks.items()))
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for e in encoded:
        for t in e.tensors.values():
            hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).digest()
    t_hash = time.perf_counter() - t0
    del encoded

    async_mgr.save(reps + 1, hooks, config={})
    async_mgr.close()

    # Load: one pass (hash + decode) + load_state_dict; warm page cache, then cold.
    ckpt = async_root / f"checkpoint-{reps + 1}"
    files = [f for f in ckpt.rglob("*") if f.is_file()]
    warm, cold, raw_read = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        loaded = read_checkpoint(ckpt)
        async_mgr.apply(loaded, hooks)
        warm.append(time.perf_counter() - t0)
        del loaded
        drop_cache(files)
        t0 = time.perf_counter()
        loaded = read_checkpoint(ckpt)
        async_mgr.apply(loaded, hooks)
        cold.append(time.perf_counter() - t0)
        del loaded
        raw_read.append(raw_read_cold(files))
    shutil.rmtree(folder / "async", ignore_errors=True)
    shutil.rmtree(folder / "sync", ignore_errors=True)
    return {"model_hook": model_hook, "bytes": nbytes, "raw_write_s": raw, "raw_write_early_writeback_s": raw_wb,
            "sync_save_s": sync,
            "async_stall_s": stall, "async_snapshot_s": snapshot, "async_write_s": bg_write,
            "async_copied_bytes": copied, "encode_s": t_encode, "sha256_s": t_hash,
            "step_alone_s": alone, "step_beside_async_write_s": during,
            "load_warm_s": warm, "load_cold_s": cold, "raw_read_cold_s": raw_read}


# ------------------------------------------------------------------------------------------------ resume timing


def dpo_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml", f"output_dir={out}",
            "progress_bar=false", "plot=false", *overrides]


def first_line_seconds(out: Path, overrides: list[str], expect_step: int, timeout: float = 300) -> float:
    """Launch the recipe; seconds until metrics.jsonl holds a line for `expect_step`; then kill it."""
    metrics = out / "metrics.jsonl"
    if metrics.exists():  # drop the line a previous (killed) launch wrote, as the resume itself would
        keep = [ln for ln in metrics.read_bytes().splitlines(keepends=True)
                if json.loads(ln)["step"] < expect_step]
        metrics.write_bytes(b"".join(keep))
    t0 = time.perf_counter()
    proc = subprocess.Popen(dpo_cmd(out, *overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    needle = f'"step":{expect_step},'.encode()
    try:
        while time.perf_counter() - t0 < timeout:
            if metrics.exists():
                with open(metrics, "rb") as fh:
                    fh.seek(max(0, metrics.stat().st_size - 4096))
                    if needle in fh.read():
                        return time.perf_counter() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"recipe exited with {proc.returncode} before step {expect_step}:\n"
                                   + proc.stderr.read().decode()[-3000:])
            time.sleep(0.005)
        raise RuntimeError(f"no step {expect_step} line within {timeout} s")
    finally:
        proc.kill()
        proc.wait()


def bench_resume(folder: Path, reps: int) -> dict:
    runs = {}
    for n in (5, 500):
        out = folder / f"resume-{n}"
        t0 = time.perf_counter()
        r = subprocess.run(dpo_cmd(out, f"max_steps={n}", f"save_steps={n}"), cwd=REPO, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"preparing the step-{n} run failed:\n{r.stderr[-3000:]}")
        print(f"  prepared a run stopped at step {n} ({time.perf_counter() - t0:.1f} s)", flush=True)
        runs[n] = out
    cold, res = [], {5: [], 500: []}
    # No save before the kill (save_steps large, max_steps beyond the first new step): every repetition resumes
    # from the same checkpoint; the killed run's extra line is cut off by the next resume.
    for rep in range(reps):
        out = folder / f"cold-{rep}"
        cold.append(first_line_seconds(out, ["max_steps=20", "save_steps=1000"], 1))
        for n, run in runs.items():
            res[n].append(first_line_seconds(run, ["resume=auto", f"max_steps={n + 20}", "save_steps=1000"], n + 1))
        print(f"  rep {rep + 1}: cold {cold[-1]:.2f} s, resume@5 {res[5][-1]:.2f} s, resume@500 {res[500][-1]:.2f} s",
              flush=True)
    return {"cold_s": cold, "resume_5_s": res[5], "resume_500_s": res[500]}


def report(s: dict | None, r: dict | None) -> None:
    from rlswift.checkpoint.tensorfile import WORKERS

    print("\n== checkpoint bench ==", _bench.threads_note())
    if s:
        n = s["bytes"]
        raw, sync, stall = med(s["raw_write_s"]), med(s["sync_save_s"]), med(s["async_stall_s"])
        print(f"state: SmolLM2-135M full FT + AdamW, {n / GB:.3f} GB ({_bench.human(n)}) per checkpoint; model "
              f"hook: {s['model_hook']}")
        print(f"raw disk write+fsync     {raw:6.2f} s  {n / GB / raw:5.2f} GB/s   [{fmt(s['raw_write_s'])}]")
        rw = med(s["raw_write_early_writeback_s"])
        print(f"  (with early writeback  {rw:6.2f} s  {n / GB / rw:5.2f} GB/s)")
        print(f"sync save                {sync:6.2f} s  {n / GB / sync:5.2f} GB/s   [{fmt(s['sync_save_s'])}]")
        print(f"async save: stall        {stall:6.3f} s  [{fmt(s['async_stall_s'])}] = snapshot "
              f"{med(s['async_snapshot_s']):.3f} s ({_bench.human(int(s['async_copied_bytes']))} copied) + optimizer "
              f"fence; background write {med(s['async_write_s']):.2f} s")
        print(f"  where a sync save goes: state_dict+encode {s['encode_s']:.2f} s (incl. the model hook's clone, if "
              f"any), sha256 of the bytes on one core {s['sha256_s']:.2f} s (spread over {WORKERS} threads, "
              "overlapped with the writes)")
        print(f"  training step alone {med(s['step_alone_s']):.2f} s, beside a background write "
              f"{med(s['step_beside_async_write_s']):.2f} s (incl. the fence; 2 cores shared with the writer)")
        lw, lc, rr = med(s["load_warm_s"]), med(s["load_cold_s"]), med(s["raw_read_cold_s"])
        print(f"load (verify+decode+load_state_dict): page cache {lw:.2f} s {n / GB / lw:.2f} GB/s; cold {lc:.2f} s "
              f"{n / GB / lc:.2f} GB/s; plain cold read {rr:.2f} s {n / GB / rr:.2f} GB/s")
        ok1, ok2 = raw / sync >= 0.8, stall / sync <= 0.1
        print(f"RATIO sync save speed / raw disk write = {raw / sync:.2f}x   (target >= 0.8x)  "
              f"{'MET' if ok1 else 'MISSED'}")
        print(f"RATIO async stall / sync save          = {stall / sync:.3f}x  (target <= 0.1x)  "
              f"{'MET' if ok2 else 'MISSED'}")
    if r:
        c, a, b = med(r["cold_s"]), med(r["resume_5_s"]), med(r["resume_500_s"])
        print(f"DPO tiny launch -> first metrics line: cold {c:.2f} s [{fmt(r['cold_s'])}], resume@5 {a:.2f} s "
              f"[{fmt(r['resume_5_s'])}], resume@500 {b:.2f} s [{fmt(r['resume_500_s'])}]")
        print(f"RATIO resume@5 / cold   = {a / c:.2f}x  (target <= 1.2x)  {'MET' if a / c <= 1.2 else 'MISSED'}")
        print(f"RATIO resume@500 / cold = {b / c:.2f}x  (target <= 1.2x)  {'MET' if b / c <= 1.2 else 'MISSED'}; "
              f"resume@500 / resume@5 = {b / a:.2f}x (should be ~1: no growth with the step count)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (medians are reported)")
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: the temp folder; put it on "
                                                "the disk your runs write to)")
    ap.add_argument("--threads", type=int, default=None, help=_bench.THREADS_HELP)
    ap.add_argument("--model-hook", choices=["clone", "view"], default="clone",
                    help="clone: the recipes' model hook (clones the weights in state_dict); view: no clone")
    ap.add_argument("--skip-save", action="store_true", help="skip the SmolLM2 save/load part")
    ap.add_argument("--skip-resume", action="store_true", help="skip the DPO resume timing")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = ap.parse_args()
    _bench.setup(a.threads)
    folder = Path(tempfile.mkdtemp(prefix="rlswift-bench-ckpt-", dir=a.dir))
    try:
        s = r = None
        if not a.skip_save:
            print(f"save/load in {folder}", flush=True)
            s = bench_save_load(folder, a.reps, a.model_hook)
        if not a.skip_resume:
            print("resume timing (DPO, tiny model)", flush=True)
            r = bench_resume(folder, a.reps)
        report(s, r)
        if a.json:
            Path(a.json).write_text(json.dumps({"save_load": s, "resume": r}, indent=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
