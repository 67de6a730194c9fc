"""OpenMP settings under CPU contention: why the recipes default to a passive wait policy.

A training step's matrix work runs on OpenMP threads. With the default (active) wait policy idle threads spin, so
when other processes compete for the cores, spinning threads steal time from the ones doing work and a step slows
down many times. This script times the same forward+backward (SmolLM2-135M shapes, random weights, fp32) in fresh
processes, alone and beside `--hogs` CPU-bound processes, with OMP_WAIT_POLICY active vs passive, and prints the
ratio. The results are equal bit for bit (the wait policy changes scheduling only); the script checks that too.

    python scripts/bench_threads.py [--hogs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

WORK = r"""
import hashlib, json, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, 49152, (16, 64))
times = []
for _ in range(3):
    t0 = time.perf_counter()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    times.append(time.perf_counter() - t0)
digest = hashlib.sha256(model.model.embed_tokens.weight.grad.numpy().tobytes()).hexdigest()
print(json.dumps({"s": min(times[1:]), "grad": digest}))
"""


def hog(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run(policy: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=policy)
    out = subprocess.run([sys.executable, "-c", WORK], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hogs", type=int, default=2, help="CPU-bound processes running beside the workload")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    threads = len(os.sched_getaffinity(0))
    print(f"{threads} cores available; load average {os.getloadavg()[0]:.1f} before the run", flush=True)
    results: dict[str, list[float]] = {}
    digests = set()
    for contended in (False, True):
        hogs = [mp.Process(target=hog, args=(time.time() + 3600,)) for _ in range(a.hogs if contended else 0)]
        for h in hogs:
            h.start()
        try:
            for _ in range(a.repeats):  # interleave the two policies so drift hits both alike
                for policy in ("active", "passive"):
                    r = run(policy, threads)
                    results.setdefault(f"{'contended' if contended else 'alone'}/{policy}", []).append(r["s"])
                    digests.add(r["grad"])
        finally:
            for h in hogs:
                h.terminate()
    print(f"{'case':<20} {'min s':>8} {'median s':>9}")
    for k, v in results.items():
        v = sorted(v)
        print(f"{k:<20} {v[0]:8.3f} {v[len(v) // 2]:9.3f}")
    for case in ("alone", "contended"):
        act, pas = sorted(results[f"{case}/active"]), sorted(results[f"{case}/passive"])
        print(f"{case}: passive/active median time ratio {pas[len(pas) // 2] / act[len(act) // 2]:.2f}")
    print(f"gradients identical across all runs: {len(digests) == 1}")


if __name__ == "__main__":
    main()
