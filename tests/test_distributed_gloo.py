"""rlswift.distributed on 2 (and 4) CPU processes with gloo, launched by torchrun, on the tiny Qwen2.

This file is also the worker: torchrun runs it as a script (`python -m torch.distributed.run ... this_file.py
SCENARIO OUT MODEL`), each rank writes `OUT/result-rank{r}.json`, and the tests assert on those. Three launches
in all (4 ranks: save; 2 ranks: everything else; 2 ranks: SIGTERM to torchrun), ~60 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # three torchrun launches (~60 s of CPU in all)

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
LR = 1e-3
# One AdamW step moves a weight by ~lr * sign(grad); reduction order changes grads in the last bits, which moves
# the weights by far less than lr except where |grad| is near AdamW's eps. Measured max |diff|: ~3e-6 (lr 1e-3).
WEIGHT_ATOL = 2e-5
GRAD_RTOL = 1e-5  # max |grad diff| / max |grad| after the sum over ranks


# =============================================================================================== worker side
def _worker(scenario: str, out: Path, model_dir: str) -> None:
    import torch

    from rlswift.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    torch.manual_seed(0)
    result: dict = {"rank": info.rank, "world_size": info.world_size}
    try:
        {"save4": _scenario_save4, "main": _scenario_main, "loop": _scenario_loop}[scenario](info, out, model_dir,
                                                                                          result)
    finally:
        (out / f"result-rank{info.rank}.json").write_text(json.dumps(result, indent=1))
        destroy_distributed()


def _gathered(model) -> dict:
    """Every parameter as a whole CPU tensor (a collective)."""
    from rlswift.distributed import full_tensor

    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


def _gathered_optim(state) -> dict:
    from rlswift.distributed import full_tensor

    opt = state["optimizer"]["state"]
    return {f"{k}/{n}": full_tensor(v).clone() for k, s in sorted(opt.items()) for n, v in sorted(s.items())}


def _grpo_batch():
    """8 rows (2 prompts x 4 samples) of prompt 5 + completion 6 tokens, ragged completions, fixed advantages."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (8, 11), generator=g)
    attn = torch.ones(8, 11, dtype=torch.long)
    mask = torch.ones(8, 6)
    for i, n in enumerate([6, 3, 5, 1, 6, 2, 4, 6]):
        mask[i, n:] = 0
        attn[i, 5 + n:] = 0
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.8, -0.3])
    return ids, attn, mask, adv


def _fresh(model_dir, info, shard: bool, lora: int = 0):
    import torch

    from rlswift.distributed import shard_model
    from rlswift.models.policy import load_policy

    model = load_policy(model_dir, lora_rank=lora, lora_alpha=8, seed=0)
    if shard:
        shard_model(model, info)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False)
    return model, opt


def _step(model, opt, info):
    import torch

    from rlswift.distributed import grad_norm_value

    params = [p for p in model.parameters() if p.requires_grad]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, 1.0))
    from rlswift.distributed import full_tensor

    grads = {n: full_tensor(g).clone() for n, g in grads.items()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, grads


def _compare(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _grpo_step(model, opt, info, loss_type: str, accum: int, sharded: bool):
    """One GRPO optimizer step on this rank's rows of the fixed global batch (recipe-style split + scales)."""
    from rlswift.algorithms.grpo import accumulation_scale, policy_loss
    from rlswift.algorithms.logprobs import completion_logprobs
    from rlswift.distributed import global_sum, grpo_loss_scale, micro_batches, rank_rows, single_process

    ids, attn, mask, adv = _grpo_batch()
    dinfo = info if sharded else single_process()
    rows = rank_rows(ids.shape[0], dinfo, multiple_of=accum)
    num_items = global_sum(mask[rows].sum(), dinfo)  # the whole step's completion tokens
    for mb in micro_batches(rows, accum):
        logps = completion_logprobs(model, ids[mb], attn[mb], 6)
        loss, _ = policy_loss(logps, None, adv[mb], mask[mb], loss_type, num_items_in_batch=num_items.float())
        if sharded:
            scale = grpo_loss_scale(loss_type, dinfo, accum, local_rows=mb.stop - mb.start,
                                    global_rows=ids.shape[0], local_tokens=float(mask[mb].sum()))
        else:
            scale = accumulation_scale(loss_type, accum)
        (loss * scale).backward()
    return _step(model, opt, info)


def _dpo_step(model, opt, info, sharded: bool):
    import torch

    from rlswift.algorithms.dpo import concatenated_batch, dpo_loss, sequence_logps
    from rlswift.distributed import dpo_loss_scale, rank_rows, single_process

    g = torch.Generator().manual_seed(2)
    pairs = [([int(x) for x in torch.randint(3, 500, (4,), generator=g)],
              [int(x) for x in torch.randint(3, 500, (int(n),), generator=g)],
              [int(x) for x in torch.randint(3, 500, (int(m),), generator=g)]) for n, m in [(3, 5), (4, 2), (5, 5), (2, 4)]]
    ref = torch.tensor([[-20.0, -25.0], [-22.0, -18.0], [-30.0, -31.0], [-15.0, -24.0]])
    dinfo = info if sharded else single_process()
    rows = rank_rows(len(pairs), dinfo)
    batch = concatenated_batch(0, *[[p[k] for p in pairs[rows]] for k in range(3)])
    chosen, rejected, _ = sequence_logps(model, batch)
    losses, _, _ = dpo_loss(chosen, rejected, ref[rows, 0], ref[rows, 1], beta=0.1)
    (losses.mean() * dpo_loss_scale(len(losses), len(pairs))).backward()
    return _step(model, opt, info)


def _scenario_save4(info, out: Path, model_dir: str, result: dict) -> None:
    """4 ranks: one GRPO step, save model+optimizer sharded, and rank 0 writes the whole expected state."""
    import safetensors.torch

    from rlswift.distributed import ShardedState, save_sharded

    model, opt = _fresh(model_dir, info, shard=True)
    _grpo_step(model, opt, info, "dapo", 1, sharded=True)
    state = ShardedState(model, opt)
    files = save_sharded(state.state_dict(), out / "ck4", info)
    weights, optim = _gathered(model), _gathered_optim(state.state_dict())
    if info.is_main:
        safetensors.torch.save_file({f"w/{k}": v.contiguous() for k, v in weights.items()}
                                    | {f"o/{k}": v.contiguous() for k, v in optim.items()}, str(out / "expected4.safetensors"))
        result["files"] = files


def _scenario_main(info, out: Path, model_dir: str, result: dict) -> None:
    import hashlib

    import safetensors.torch
    import torch

    from rlswift.distributed import (ConfigMismatchError, ShardedState, agree_config, all_gather_json, any_rank,
                                     barrier, broadcast_json, load_sharded, save_rank_state, save_sharded,
                                     single_process)
    from rlswift.models.policy import make_reference
    from rlswift.algorithms.logprobs import completion_logprobs
    from rlswift.signals import GracefulStop

    # ---- config agreement and JSON collectives ----
    cfg = {"seed": 0, "lora": {"rank": 0, "alpha": 16}, "learning_rate": 1e-5}
    result["agreed"] = agree_config(cfg, info) == json.loads(json.dumps(cfg, sort_keys=True))
    bad = dict(cfg, learning_rate=2e-5 if info.rank == 1 else 1e-5, lora={"rank": 8 if info.rank == 1 else 0,
                                                                          "alpha": 16})
    try:
        agree_config(bad, info)
        result["mismatch_error"] = None
    except ConfigMismatchError as e:
        result["mismatch_error"] = str(e)
    result["broadcast"] = broadcast_json({"from": info.rank, "k": [1, 2]} if info.rank == 0 else None, info)
    result["gathered"] = all_gather_json({"r": info.rank}, info)

    # ---- one optimizer step: N ranks (FSDP2) vs one process on the whole global batch ----
    comparisons = {}
    for name, fn in [("grpo_dapo_accum2", lambda m, o, s: _grpo_step(m, o, info, "dapo", 2, s)),
                     ("grpo_grpo_accum2", lambda m, o, s: _grpo_step(m, o, info, "grpo", 2, s)),
                     ("grpo_bnpo_accum1", lambda m, o, s: _grpo_step(m, o, info, "bnpo", 1, s)),
                     ("dpo_sigmoid", lambda m, o, s: _dpo_step(m, o, info, s))]:
        plain, popt = _fresh(model_dir, info, shard=False)
        pnorm, pgrads = fn(plain, popt, False)
        sharded, sopt = _fresh(model_dir, info, shard=True)
        snorm, sgrads = fn(sharded, sopt, True)
        gmax = max(float(g.abs().max()) for g in pgrads.values())
        comparisons[name] = {"weight_diff": _compare(_gathered(sharded), {n: p.detach() for n, p in
                                                                           plain.named_parameters()}),
                             "grad_rel_diff": _compare(sgrads, pgrads) / gmax, "norms": [snorm, pnorm],
                             "changed": _compare(_gathered(sharded), _gathered(_fresh(model_dir, info, False)[0]))}
    # LoRA: adapter tensors only require grad; the frozen base sits in the same FSDP groups.
    plain, popt = _fresh(model_dir, info, shard=False, lora=4)
    _grpo_step(plain, popt, info, "dapo", 1, False)
    lora, lopt = _fresh(model_dir, info, shard=True, lora=4)
    _grpo_step(lora, lopt, info, "dapo", 1, True)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    lw, pw = _gathered(lora), {n: p.detach() for n, p in plain.named_parameters()}
    comparisons["lora"] = {"weight_diff": _compare({k: lw[k] for k in trainable}, {k: pw[k] for k in trainable}),
                           "frozen_equal": all(torch.equal(lw[k], pw[k]) for k in pw if k not in trainable),
                           "n_trainable": len(trainable)}
    result["comparisons"] = comparisons

    # ---- a sharded frozen reference (full fine-tuning with KL) gives the plain reference's log-probs ----
    ids, attn, _mask, _adv = _grpo_batch()
    base, _ = _fresh(model_dir, info, shard=False)
    ref_sharded = make_reference(_fresh(model_dir, info, shard=False)[0])
    from rlswift.distributed import shard_model

    shard_model(ref_sharded, info)
    with torch.no_grad():
        a = completion_logprobs(ref_sharded, ids, attn, 6)
        b = completion_logprobs(make_reference(base), ids, attn, 6)
    result["reference_diff"] = float((a - b).abs().max())

    # ---- sharded checkpoints: save on 2, load on 1 / 1 -> 2 / 4 -> 2, pickle-free ----
    model, opt = _fresh(model_dir, info, shard=True)
    _grpo_step(model, opt, info, "dapo", 1, True)
    opt.param_groups[0]["lr"] = 0.5e-3  # a non-tensor value that must come back from the skeleton
    state = ShardedState(model, opt)
    files = save_sharded(state.state_dict(), out / "ck2", info)
    want_w, want_o = _gathered(model), _gathered_optim(state.state_dict())
    if info.is_main:
        on_disk = {str(p.relative_to(out / "ck2")) for p in (out / "ck2").rglob("*") if p.is_file()}
        result["table_covers_disk"] = set(files) == on_disk
        result["table_sha_ok"] = all(hashlib.sha256((out / "ck2" / k).read_bytes()).hexdigest() == v["sha256"]
                                     and (out / "ck2" / k).stat().st_size == v["size"] for k, v in files.items())
        result["files"] = sorted(files)
        # 2 -> 1: a plain model in one process reads the 2-rank checkpoint (no process group involved).
        m1, o1 = _fresh(model_dir, info, shard=False)
        s1 = ShardedState(m1, o1)
        s1.load_state_dict(load_sharded(s1.state_dict(), out / "ck2", single_process()))
        w1 = {n: p.detach() for n, p in m1.named_parameters()}
        result["2to1_weights_exact"] = all(torch.equal(w1[k], want_w[k]) for k in want_w) and set(w1) == set(want_w)
        o1s = _gathered_optim(s1.state_dict())
        result["2to1_optim_exact"] = set(o1s) == set(want_o) and all(torch.equal(o1s[k], want_o[k]) for k in want_o)
        result["2to1_lr"] = o1.param_groups[0]["lr"]
        # 1 -> 2: rank 0 alone saves a plain model (what `torchrun --nproc-per-node 1` or one process writes).
        p1, q1 = _fresh(model_dir, info, shard=False)
        _grpo_step(p1, q1, info, "grpo", 1, False)
        s = ShardedState(p1, q1)
        save_sharded(s.state_dict(), out / "ck1", single_process())
        safetensors.torch.save_file({f"w/{k}": v.contiguous() for k, v in _gathered(p1).items()}
                                    | {f"o/{k}": v.contiguous() for k, v in _gathered_optim(s.state_dict()).items()},
                                    str(out / "expected1.safetensors"))
    barrier(info)
    for tag in ("1", "4"):
        m2, o2 = _fresh(model_dir, info, shard=True)
        s2 = ShardedState(m2, o2)
        s2.load_state_dict(load_sharded(s2.state_dict(), out / f"ck{tag}", info))
        got = {f"w/{k}": v for k, v in _gathered(m2).items()} | {f"o/{k}": v for k, v in
                                                                 _gathered_optim(s2.state_dict()).items()}
        want = safetensors.torch.load_file(str(out / f"expected{tag}.safetensors"))
        result[f"{tag}to2_exact"] = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        if tag == "1":  # engine weights from the sharded policy: one gathered tensor at a time, every tied name
            from rlswift.distributed import full_named_parameters
            from rlswift.models.policy import engine_weights

            fw = list(full_named_parameters(m2))
            names = [n for n, _ in engine_weights(_fresh(model_dir, info, shard=False)[0])]
            embed = want["w/model.embed_tokens.weight"]
            result["engine_names_match"] = [n for n, _ in fw] == names
            result["engine_values_exact"] = all(torch.equal(t, want.get(f"w/{n}", embed)) for n, t in fw)
        # Training continues from the resharded state on both ranks.
        _grpo_step(m2, o2, info, "dapo", 1, True)
    # LoRA: only the adapter (and its optimizer state) is in the sharded checkpoint.
    lstate = ShardedState(lora, lopt)
    save_sharded(lstate.state_dict(), out / "ck-lora", info)
    meta = json.loads((out / "ck-lora" / "dcp" / "metadata.json").read_text())
    result["lora_keys_all_adapter"] = all("lora_" in k for k in meta["tensors"] if k.startswith("model/"))
    l2, lo2 = _fresh(model_dir, info, shard=True, lora=4)
    ls2 = ShardedState(l2, lo2)
    ls2.load_state_dict(load_sharded(ls2.state_dict(), out / "ck-lora", info))
    lw2 = _gathered(l2)
    result["lora_roundtrip_exact"] = all(torch.equal(lw2[k], lw[k]) for k in lw)

    # ---- per-rank RNG state ----
    from rlswift.state import RNGState

    rng = RNGState()
    torch.manual_seed(100 + info.rank)
    rfiles = save_rank_state(rng.state_dict(), out / "ck2", "rng", info)
    result["rank_files"] = all_gather_json(sorted(rfiles), info)

    # ---- the manager's protocol: every hook written collectively, rank 0 writes the manifest last, read back ----
    from rlswift.checkpoint.reader import FORMAT_VERSION, read_manifest, verify
    from rlswift.distributed import PerRankState, derived_rng_state, rank_seed, read_hooks, write_hooks
    from rlswift.state import Progress

    def registry(m, o, step):
        r = RNGState()
        return {"train_state": ShardedState(m, o), "progress": Progress(step=step),
                "rng": PerRankState(r, lambda rank, st: derived_rng_state(r.state_dict(), rank_seed(0, rank, st)))}

    ck = out / "ck-hooks"
    torch.manual_seed(200 + info.rank)
    hook_files, files = write_hooks(ck, registry(model, opt, 4), info)
    if info.is_main:
        (ck / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": 4, "world_size": 2,
                                                      "hooks": hook_files, "files": files}))
        result["hooks_verify"] = verify(ck)
        result["hooks_files"] = sorted(files)
    barrier(info)
    expect = torch.rand(3)  # what this rank draws right after the save
    torch.manual_seed(999)
    m3, o3 = _fresh(model_dir, info, shard=True)
    hooks3 = registry(m3, o3, 0)
    read_hooks(ck, read_manifest(ck), hooks3, info)
    result["hooks_rng_restored"] = torch.equal(torch.rand(3), expect)
    got3, want3 = _gathered(m3), _gathered(model)
    result["hooks_weights_exact"] = set(got3) == set(want3) and all(torch.equal(got3[k], want3[k]) for k in want3)
    result["hooks_progress"] = hooks3["progress"].step
    if info.is_main:  # 2 -> 1: one process reads the same checkpoint; it takes rank 0's RNG streams
        torch.manual_seed(999)
        m4, o4 = _fresh(model_dir, info, shard=False)
        read_hooks(ck, read_manifest(ck), registry(m4, o4, 0), single_process())
        result["hooks_2to1_rng_is_rank0s"] = torch.equal(torch.rand(3), expect)
    barrier(info)

    _phase2(info, model_dir, result)

    # ---- a SIGTERM to rank 1 only stops both ranks at the end of the same step ----
    stopped_at = None
    with GracefulStop() as stop:
        for step in range(1, 6):
            _grpo_step(model, opt, info, "dapo", 1, True)
            if info.rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            if any_rank(stop.requested, info):
                stopped_at = step
                save_sharded(ShardedState(model, opt).state_dict(), out / "ck-stop", info)
                break
    result["stop"] = {"step": stopped_at, "local_signal": stop.requested}


def _phase2(info, model_dir: str, result: dict) -> None:
    """What the recipes use on several ranks: runner + shared-prompt forward, engine weight chunks (LoRA merged on
    the shards), and a one-process checkpoint loaded into a sharded model and optimizer."""
    import torch

    from rlswift.algorithms.logprobs import completion_logprobs
    from rlswift.distributed import (ShardedState, engine_weight_chunks, full_tensor, grad_norm_value, micro_batches,
                                     rank_rows, shard_for_calls)
    from rlswift.models.policy import engine_weights, load_policy

    # ---- shared-prompt forward through the runner (layers stay gathered until release), 2 micro-batches ----
    ids, attn, _mask, adv = _grpo_batch()
    ids[1:4, :5] = ids[0, :5]  # two groups of 4 rows sharing their prompt
    ids[5:8, :5] = ids[4, :5]
    plain = load_policy(model_dir, seed=0).train()
    popt = torch.optim.AdamW(plain.parameters(), lr=LR, fused=True)
    model = load_policy(model_dir, seed=0).train()
    run = shard_for_calls(model, info, keep_gathered=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    diffs = []
    for _ in range(2):  # two optimizer steps: the second runs on the weights the first updated
        for mb in micro_batches(rank_rows(8, info, 2), 2):
            lp = run(completion_logprobs, ids[mb], attn[mb], 6, shared_prompt=True)
            ((lp * adv[mb, None]).sum() / 8).backward()
        run.release()
        ((completion_logprobs(plain, ids, attn, 6) * adv[:, None]).sum() / 8).backward()
        gmax = max(float(p.grad.abs().max()) for p in plain.parameters())
        gdiff = max(float((full_tensor(a.grad) - b.grad).abs().max()) for a, b in zip(model.parameters(),
                                                                                      plain.parameters()))
        norms = (grad_norm_value(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)),
                 float(torch.nn.utils.clip_grad_norm_(list(plain.parameters()), 1.0)))
        opt.step()
        popt.step()
        opt.zero_grad()
        popt.zero_grad()
        diffs.append({"grad_rel_diff": gdiff / gmax, "norms": norms})
    wdiff = max(float((full_tensor(a.detach()) - b.detach()).abs().max()) for a, b in zip(model.parameters(),
                                                                                          plain.parameters()))
    result["shared_runner"] = {"steps": diffs, "weight_diff": wdiff}

    # ---- engine weights of a sharded LoRA policy, one decoder layer at a time, merged on the shards ----
    def lora_policy():
        m = load_policy(model_dir, seed=0, lora_rank=4, lora_alpha=8)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.02, 0.03, p.numel()).view_as(p))  # a non-zero adapter
        return m

    lplain, lsharded = lora_policy(), lora_policy()
    shard_for_calls(lsharded, info)
    want = dict(engine_weights(lplain))
    chunks = list(engine_weight_chunks(lsharded))
    got = [x for c in chunks for x in c]
    result["engine_chunks"] = {
        "names": [n for n, _ in got] == [n for n in want if n != "lm_head.weight"],
        "exact": all(torch.equal(t, want[n]) for n, t in got),
        "max_diff": max(float((t - want[n]).abs().max()) for n, t in got),
        "merged_moved": any(float((want[n] - p.detach()).abs().max()) > 0 for n, p in load_policy(
            model_dir, seed=0).named_parameters() if n in want and "q_proj.weight" in n),
        "chunks": len(chunks)}

    # ---- a one-process checkpoint (ModelHook + optimizer.state_dict()) into a sharded model: bit for bit ----
    src = load_policy(model_dir, seed=0).train()
    sopt = torch.optim.AdamW(src.parameters(), lr=LR, fused=True)
    (completion_logprobs(src, ids, attn, 6) * adv[:, None]).sum().backward()
    sopt.step()
    dst = load_policy(model_dir, seed=3).train()
    shard_for_calls(dst, info)
    dopt = torch.optim.AdamW(dst.parameters(), lr=LR * 2, fused=True)
    state = ShardedState(dst, dopt)
    state.load_one_process({n: p.detach() for n, p in src.named_parameters()}, sopt.state_dict())
    gathered = state.state_dict()
    ok_model = all(torch.equal(full_tensor(gathered["model"][n]), p.detach()) for n, p in src.named_parameters())
    names = state.optimizer_names()
    ok_optim = all(torch.equal(full_tensor(gathered["optimizer"]["state"][names[i]][k]), v)
                   for i, st in sopt.state_dict()["state"].items() for k, v in st.items())
    result["one_to_sharded"] = {"model": ok_model, "optimizer": ok_optim, "lr": dopt.param_groups[0]["lr"],
                                "betas_tuple": isinstance(dopt.param_groups[0]["betas"], tuple)}


def _scenario_loop(info, out: Path, model_dir: str, result: dict) -> None:
    """Steps until any rank is asked to stop (torchrun forwards its SIGTERM), then one save; records the step.

    A small pure-torch model (no transformers import) keeps this launch cheap."""
    import torch

    from rlswift.distributed import ShardedState, any_rank, save_sharded, shard_model
    from rlswift.signals import GracefulStop

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    model = shard_model(Net(), info)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(info.rank))
    with GracefulStop(stream=open(os.devnull, "w")) as stop:
        step = 0
        while True:
            step += 1
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            (out / f"progress-rank{info.rank}").write_text(str(step))
            time.sleep(0.05 * (1 + info.rank))  # ranks run at different speeds: the signal lands mid-step
            if any_rank(stop.requested, info):
                break
            if step >= 2000:
                raise RuntimeError("no stop signal arrived")
    t0 = time.time()
    save_sharded(ShardedState(model, opt).state_dict(), out / "ck-term", info)
    result["stop"] = {"step": step, "signum": stop.signum, "save_s": round(time.time() - t0, 3)}


# =============================================================================================== test side
GLOO_ABORT = "terminate called without an active exception"


def _launch(nproc: int, scenario: str, out: Path, model_dir: Path, wait: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(HERE), scenario, str(out), str(model_dir)]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=400)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        # A known intermittent crash inside gloo itself (std::terminate in a rank on a loaded machine; seen once in
        # CI with 4 ranks on 2 cores, pytorch/pytorch#65231 is the same signature), not a result of ours: one retry.
        print(f"torchrun {scenario}: a rank aborted inside gloo ({GLOO_ABORT!r}); retrying once", file=sys.stderr)
        proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun {scenario} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("dist")
    save4 = _launch(4, "save4", out, tiny_model_dir)
    main = _launch(2, "main", out, tiny_model_dir)
    return {"out": out, "save4": save4, "main": main}


def test_config_agreement_and_json_collectives(runs):
    for r in runs["main"]:
        assert r["agreed"] is True
        err = r["mismatch_error"]
        # Every rank raises, and the message names the rank and both differing keys with their values.
        assert err is not None and "rank 1" in err and "learning_rate: 1e-05 -> 2e-05" in err
        assert "lora.rank: 0 -> 8" in err and "rank 0:" not in err
        assert r["broadcast"] == {"from": 0, "k": [1, 2]}
        assert r["gathered"] == [{"r": 0}, {"r": 1}]


@pytest.mark.parametrize("name", ["grpo_dapo_accum2", "grpo_grpo_accum2", "grpo_bnpo_accum1", "dpo_sigmoid"])
def test_two_ranks_take_the_one_process_step(runs, name):
    for r in runs["main"]:
        c = r["comparisons"][name]
        assert c["changed"] > 0.5 * LR  # the step did move the weights (else equality would prove nothing)
        assert c["weight_diff"] <= WEIGHT_ATOL, c
        assert c["grad_rel_diff"] <= GRAD_RTOL, c
        assert abs(c["norms"][0] - c["norms"][1]) <= 1e-5 * c["norms"][1]


def test_lora_sharded_step_matches_and_base_stays_frozen(runs):
    c = runs["main"][0]["comparisons"]["lora"]
    assert c["n_trainable"] > 0 and c["frozen_equal"] is True
    assert c["weight_diff"] <= WEIGHT_ATOL


def test_sharded_reference_logprobs_match_plain(runs):
    assert runs["main"][0]["reference_diff"] <= 1e-5


def test_save_sharded_returns_every_file_with_checksums_on_rank_0(runs):
    r0 = runs["main"][0]
    assert r0["table_covers_disk"] is True and r0["table_sha_ok"] is True
    assert r0["files"] == ["dcp/metadata.json", "dcp/rank00000.safetensors", "dcp/rank00001.safetensors",
                           "dcp/skeleton.json"]
    assert sorted(runs["save4"][0]["files"]) == ["dcp/metadata.json"] + [f"dcp/rank0000{i}.safetensors"
                                                                        for i in range(4)] + ["dcp/skeleton.json"]
    # Other ranks report only their own files.
    assert list(runs["main"][1].get("files", [])) == []


def test_resharding_is_bit_exact(runs):
    r0 = runs["main"][0]
    assert r0["2to1_weights_exact"] is True and r0["2to1_optim_exact"] is True
    assert r0["2to1_lr"] == 0.5e-3  # non-tensor optimizer values come from the checkpoint
    for r in runs["main"]:
        assert r["1to2_exact"] is True
        assert r["4to2_exact"] is True


def test_engine_weights_gathered_from_shards_match_the_plain_export(runs):
    for r in runs["main"]:
        assert r["engine_names_match"] is True and r["engine_values_exact"] is True


def test_lora_checkpoint_holds_only_the_adapter(runs):
    for r in runs["main"]:
        assert r["lora_keys_all_adapter"] is True and r["lora_roundtrip_exact"] is True


def test_per_rank_files_are_named_by_rank_and_world(runs):
    # The RNG state holds torch tensors (the generator states): a .json tree plus a .safetensors file per rank.
    assert runs["main"][0]["rank_files"] == [[f"hooks/rng.rank0000{r}-of-00002.{ext}" for ext in ("json", "safetensors")]
                                             for r in range(2)]


def test_manager_protocol_writes_one_verifiable_manifest_and_reads_back(runs):
    r0, r1 = runs["main"]
    assert r0["hooks_verify"] == []  # every rank's files are listed, with sizes and sha256 that match
    files = r0["hooks_files"]
    assert "hooks/progress.json" in files and "hooks/train_state.dcp/skeleton.json" in files
    assert {"hooks/train_state.dcp/rank00000.safetensors", "hooks/train_state.dcp/rank00001.safetensors",
            "hooks/rng.rank00000-of-00002.json", "hooks/rng.rank00001-of-00002.json"} <= set(files)
    for r in (r0, r1):
        assert r["hooks_rng_restored"] is True and r["hooks_weights_exact"] is True and r["hooks_progress"] == 4
    assert r0["hooks_2to1_rng_is_rank0s"] is True


def test_shared_prompt_runner_matches_one_process_over_two_steps(runs):
    for r in runs["main"]:
        c = r["shared_runner"]
        for step in c["steps"]:
            assert step["grad_rel_diff"] <= GRAD_RTOL, c
            assert abs(step["norms"][0] - step["norms"][1]) <= 1e-5 * step["norms"][1], c
        assert c["weight_diff"] <= 2 * WEIGHT_ATOL, c  # two AdamW steps


def test_engine_weight_chunks_of_a_sharded_lora_policy_are_the_merged_weights(runs):
    for r in runs["main"]:
        c = r["engine_chunks"]
        assert c["names"] is True and c["merged_moved"] is True and c["chunks"] == 4
        assert c["max_diff"] <= 1e-6, c  # the merge runs on shards (DTensor matmul): equal up to rounding


def test_one_process_checkpoint_loads_into_a_sharded_model_bit_for_bit(runs):
    for r in runs["main"]:
        assert r["one_to_sharded"] == {"model": True, "optimizer": True, "lr": LR, "betas_tuple": True}


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(runs):
    r0, r1 = runs["main"]
    assert r0["stop"] == {"step": 3, "local_signal": False}
    assert r1["stop"] == {"step": 3, "local_signal": True}
    assert (runs["out"] / "ck-stop" / "dcp" / "metadata.json").is_file()


def test_torchrun_termination_stops_all_ranks_at_one_step_and_saves(tmp_path, tiny_model_dir):
    proc = _launch(2, "loop", tmp_path, tiny_model_dir, wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            steps = [int((tmp_path / f"progress-rank{r}").read_text() or 0)
                     if (tmp_path / f"progress-rank{r}").exists() else 0 for r in range(2)]
            if min(steps) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what a scheduler does to the launcher
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    results = [json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["stop"]["step"] == results[1]["stop"]["step"] >= 2, output[-3000:]
    assert all(r["stop"]["signum"] == signal.SIGTERM for r in results)  # torchrun forwarded it to each rank
    assert (tmp_path / "ck-term" / "dcp" / "metadata.json").is_file()
    # Workers exited on their own (no worker failure reported); torchrun itself re-raises the signal it got.
    assert "failed (exitcode" not in output and "[rank" not in output, output[-3000:]
    assert proc.returncode != 0 and "got signal: 15" in output


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
