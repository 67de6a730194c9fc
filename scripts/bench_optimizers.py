"""Memory-saving optimizers on SmolLM2-135M (CPU, full fine-tuning): state size, checkpoint size and speed, loss.

For each optimizer of `rlswift.optim` (and LoRA r=16 + AdamW for comparison), on one fixed batch of real tokens (the
answers to seeded "What is a + b?" prompts, chat template, loss on the answer tokens only):
  - optimizer-state bytes (live tensors, shared storages counted once) and what the checkpoint stores for it,
  - the whole checkpoint's size (model + optimizer) and its save / load seconds through CheckpointManager,
  - optimizer.step() seconds (first step: GaLore's SVDs; then the median of the rest) and forward+backward seconds,
  - the loss on the batch after N steps, next to AdamW's.
The article's claims it is read against: GaLore ~60% smaller optimizer state (~50% less checkpoint I/O), Q-GaLore
~80% (~70%). The machine is shared: the script prints the load average and a fixed matmul's time at start and end.

    python scripts/bench_optimizers.py                      # 306-336 s at load 4-8 on 2 cores (1 thread)
    python scripts/bench_optimizers.py --steps 3 --optimizers adamw,galore_adamw --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402  (sets nothing at import; setup() fixes OMP_NUM_THREADS before torch is imported)

ALL = ["adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit", "q_galore_adamw_8bit", "lora"]
CLAIMS = {"galore_adamw": "~60% smaller state, ~50% less I/O", "q_galore_adamw_8bit": "~80% smaller, ~70% less I/O"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per optimizer (default 3)")
    ap.add_argument("--optimizers", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or local folder (default smollm2-135m)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate for full fine-tuning (default 1e-4)")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate for LoRA (default 1e-3)")
    ap.add_argument("--rank", type=int, default=128, help="GaLore / Q-GaLore rank (default 128, transformers')")
    ap.add_argument("--rows", type=int, default=8, help="rows in the fixed batch (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1: the machine is shared)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model and optimizer live")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap.parse_args()


def calibrate() -> float:
    """Seconds for a fixed 1024^3 fp32 matmul x4 (best of 3): a yardstick for how busy the machine is."""
    import torch

    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - t0)
    return best


def fixed_batch(tokenizer, rows: int):
    """input_ids, attention_mask, labels (-100 outside the answer) for `rows` seeded additions, right-padded."""
    import torch

    from rlswift.data.arithmetic import arithmetic_rows
    from rlswift.data.prompts import render_prompt

    seqs = []
    for r in arithmetic_rows(rows, seed=0):
        prompt = render_prompt(tokenizer, r["prompt"])
        a, b = r["prompt"][-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        answer = tokenizer(text=f"{a} + {b} = {r['answer']}", add_special_tokens=False)["input_ids"]
        seqs.append((prompt, answer + [tokenizer.eos_token_id]))
    width = max(len(p) + len(c) for p, c in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((rows, width), pad)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), -100)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return ids, mask, labels


def state_bytes(opt) -> int:
    """Bytes of the tensors an optimizer keeps (projector matrices included), each storage counted once."""
    import torch

    seen, total = set(), 0

    def add(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        elif isinstance(v, dict):
            for x in v.values():
                add(x)
        elif hasattr(v, "__dict__"):  # a GaLore projector
            add(vars(v))

    for s in opt.state.values():
        add(s)
    return total


def run_one(name: str, model_path: Path, batch, a: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from rlswift.checkpoint import CheckpointManager, read_manifest
    from rlswift.models import load_policy
    from rlswift.optim import build_optimizer
    from rlswift.recipes._common import ModelHook

    lora = name == "lora"
    model = load_policy(model_path, dtype="float32", lora_rank=16 if lora else 0, seed=0).to(a.device)
    model.train()
    opt = build_optimizer("adamw" if lora else name, model, lr=a.lora_lr if lora else a.lr, weight_decay=0.0,
                          rank=a.rank)
    ids, mask, labels = (t.to(a.device) for t in batch)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    fb, st = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        fb.append(t1 - t0)
        st.append(time.perf_counter() - t1)
    with torch.no_grad():
        loss = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    hooks = {"model": ModelHook(model), "optimizer": opt}
    mgr = CheckpointManager(tmp / name)
    t0 = time.perf_counter()
    path = mgr.save(a.steps, hooks, config={"optimizer": name})
    save_s = time.perf_counter() - t0
    files = read_manifest(path)["files"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    opt_stored = sum(info["size"] for rel, info in files.items() if Path(rel).name.startswith("optimizer."))
    t0 = time.perf_counter()
    mgr.load(path, hooks)
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"name": name, "trainable": trainable, "state_bytes": state_bytes(opt), "stored_opt_bytes": opt_stored,
           "ckpt_bytes": size, "save_s": save_s, "load_s": load_s, "step_first_s": st[0],
           "step_rest_s": statistics.median(st[1:]) if len(st) > 1 else float("nan"),
           "fwd_bwd_s": statistics.median(fb), "loss": loss}
    shutil.rmtree(tmp / name, ignore_errors=True)
    return out


def table(rows: list[dict], base: dict | None, loss0: float) -> str:
    h = _bench.human
    pct = lambda x, y: f"{100 * (x / y - 1):+.0f}%" if y else "n/a"  # noqa: E731  (-60% = 60% smaller)
    lines = ["| optimizer | optimizer state | vs AdamW | stored | checkpoint | vs AdamW | save s | load s | "
             "step s (1st / rest) | fwd+bwd s | loss after N (start %.3f) | article |" % loss0,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "LoRA r16 + adamw" if r["name"] == "lora" else r["name"]
        vs_state = pct(r["state_bytes"], base["state_bytes"]) if base else "n/a"
        vs_ckpt = pct(r["ckpt_bytes"], base["ckpt_bytes"]) if base else "n/a"
        lines.append(f"| {name} | {h(r['state_bytes'])} | {vs_state} | {h(r['stored_opt_bytes'])} | "
                     f"{h(r['ckpt_bytes'])} | {vs_ckpt} | {r['save_s']:.2f} | {r['load_s']:.2f} | "
                     f"{r['step_first_s']:.2f} / {r['step_rest_s']:.2f} | {r['fwd_bwd_s']:.2f} | {r['loss']:.4f} | "
                     f"{CLAIMS.get(r['name'], '')} |")
    return "\n".join(lines)


def main() -> int:
    a = parse()
    _bench.setup(a.threads)
    import torch

    from rlswift.models import load_tokenizer, resolve_model

    names = [n.strip() for n in a.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise SystemExit(f"error: unknown optimizer(s) {bad}; choose from {', '.join(ALL)}")
    try:  # bitsandbytes first through rlswift, which hushes its note about an optional 4-bit kernel package
        from rlswift.optim.galore import import_bitsandbytes

        import_bitsandbytes()
    except ImportError:
        pass
    model_path = resolve_model(a.model)
    batch = fixed_batch(load_tokenizer(model_path), a.rows)
    cal0, load0 = calibrate(), os.getloadavg()
    print(f"{_bench.threads_note()}; load average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} (1/5/15 min) on "
          f"{os.cpu_count()} cores; matmul yardstick {cal0:.3f} s; batch {tuple(batch[0].shape)}, "
          f"{int((batch[2] != -100).sum())} answer tokens; {a.steps} steps, lr {a.lr} (LoRA {a.lora_lr}); {a.device}",
          flush=True)
    from rlswift.models import load_policy

    with torch.no_grad():
        base_model = load_policy(model_path, dtype="float32").to(a.device)
        ids, mask, labels = (t.to(a.device) for t in batch)
        loss0 = float(base_model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        del base_model
    rows, t_all = [], time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-optim-"))
    try:
        for name in names:
            t0 = time.perf_counter()
            r = run_one(name, model_path, batch, a, tmp)
            rows.append(r)
            print(f"  {name}: {time.perf_counter() - t0:.0f} s, loss {r['loss']:.4f}, state "
                  f"{_bench.human(r['state_bytes'])}, checkpoint {_bench.human(r['ckpt_bytes'])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cal1, load1 = calibrate(), os.getloadavg()
    base = next((r for r in rows if r["name"] == "adamw"), None)
    print()
    print(table(rows, base, loss0))
    print(f"\nmachine: load average {load0[0]:.1f} -> {load1[0]:.1f} (1 min), matmul yardstick {cal0:.3f} -> "
          f"{cal1:.3f} s; total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "loss0": loss0, "load": [load0, load1],
                                            "yardstick_s": [cal0, cal1], "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
