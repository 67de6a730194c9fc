"""Rollout throughput: VLLMEngine vs HFEngine vs plain model.generate on the same prompts, plus weight-sync time.

    OMP_NUM_THREADS=2 python scripts/bench_rollout.py [--prompts 16] [--samples 4] [--tokens 32] [--smollm2 DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rollout.seeds import sample_seed
from rollout.types import Request, SamplingSpec


def make_requests(n: int, k: int, t: int, vocab: int) -> list[Request]:
    """n prompts of 24 tokens, k seeds each, at most t new tokens each."""
    spec = SamplingSpec(temperature=1.0, max_tokens=t)
    return [Request([(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(24)],
                    [sample_seed(0, 0, i, s) for s in range(k)], spec) for i in range(n)]


def timed(fn, reps: int = 2) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_model(path: Path, a: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.hf_engine import HFEngine
    from rollout.vllm_engine import VLLMEngine

    print(f"\n== {path.name}: {a.prompts} prompts x {a.samples} samples x <= {a.tokens} tokens, fp32")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reqs = make_requests(a.prompts, a.samples, a.tokens, hf_model.config.vocab_size)
    rows = []

    # First: VLLMEngine sets vLLM's environment (in-process core, no usage stats) before vllm is imported.
    eng = VLLMEngine(path, max_model_len=512, kv_cache_gib=2)
    dt, outs = timed(lambda: eng.generate(reqs))
    rows.append(("vllm (seeded)", sum(len(o.completion_ids) for o in outs), dt))
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in reqs for _ in r.seeds]
    sp = SamplingParams(temperature=1.0, max_tokens=a.tokens, logprobs=0)
    dt, outs2 = timed(lambda: eng.llm.generate(prompts, sp, use_tqdm=False))
    rows.append(("vllm (unseeded)", sum(len(o.outputs[0].token_ids) for o in outs2), dt))
    params = list(hf_model.state_dict().items())
    sync, _ = timed(lambda: eng.update_weights(params), reps=3)
    eng.close()

    hf = HFEngine(hf_model, tokenizer=AutoTokenizer.from_pretrained(path))
    dt, outs = timed(lambda: hf.generate(reqs), reps=1)
    rows.append(("hf engine (exact, batch 1)", sum(len(o.completion_ids) for o in outs), dt))
    hsync, _ = timed(lambda: hf.update_weights(params), reps=3)

    ids = torch.tensor([r.prompt_ids for r in reqs for _ in r.seeds])

    def plain():
        with torch.inference_mode():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=a.tokens,
                                     min_new_tokens=a.tokens, top_k=0, top_p=1.0, pad_token_id=0)

    dt, g = timed(plain, reps=1)
    rows.append(("model.generate (batched, unseeded)", (g.shape[1] - ids.shape[1]) * g.shape[0], dt))

    base = rows[0][1] / rows[0][2]
    print(f"{'engine':38s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>9s} {'vs vllm':>8s}")
    for name, n, dt in rows:
        print(f"{name:38s} {n:7d} {dt:8.3f} {n / dt:9.0f} {n / dt / base:8.2f}")
    print(f"weight sync (all {len(params)} tensors): vllm {sync * 1e3:.1f} ms, hf {hsync * 1e3:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--tiny", default=None, help="tiny model folder (default: built by rlswift.models.tiny_model_path)")
    p.add_argument("--smollm2", default=None, help="SmolLM2-135M safetensors folder (\"none\" to skip)")
    a = p.parse_args()
    from rlswift.models import resolve_model, tiny_model_path  # scripts may import rlswift; rollout/ never does

    bench_model(Path(a.tiny) if a.tiny else tiny_model_path(), a)
    smol = a.smollm2
    if smol == "none":
        smol = None
    elif smol is None:
        try:
            smol = resolve_model("smollm2-135m")
        except Exception:  # noqa: BLE001 - optional: not built or not available
            smol = None
    if smol:
        bench_model(Path(smol), a)


if __name__ == "__main__":
    main()
