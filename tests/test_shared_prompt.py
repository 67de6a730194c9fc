"""The shared-prompt training forward equals the plain per-row forward: log-probs, entropies, parameter gradients.

Tolerances (fp32, tiny 2-layer models): log-probs within 2e-6 absolute, entropies (~6 nats, a sum over the vocab)
within 1e-6 relative + 1e-6, every parameter gradient within 1e-5 of that gradient's largest entry. The two forwards
run the same math on other tensor shapes (a prompt batch of U rows, a completion batch attending to cached K/V), so
fp32 reassociation alone moves values a few ulps (measured here: log-probs <= 1e-6, entropies <= 3e-6 = 5e-7
relative, gradients <= 1.2e-6 relative).
"""

import warnings

import pytest
import torch

import rlswift.algorithms.logprobs as logprobs_mod
from rlswift.algorithms.logprobs import completion_logprobs
from rlswift.algorithms.shared_prompt import (
    expand,
    prompt_runs,
    shared_prompt_fallback_reason,
    shared_prompt_logprobs,
)

LP_ATOL = 2e-6
ENT_ATOL, ENT_RTOL = 1e-6, 1e-6
GRAD_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_warnings():
    logprobs_mod._WARNED.clear()  # fallback warnings are issued once per process; each test sees its own
    yield


def make_batch(prompt_lens, group, T, vocab, seed=0, pad=0, lengths=None):
    """GRPO-shaped rows: ``group`` consecutive rows per prompt, prompts left-padded to the longest, completions of
    random lengths 1..T (or ``lengths``, one per row) right-padded. Returns input_ids, attention_mask
    ``[len(prompt_lens) * group, P + T]``."""
    g = torch.Generator().manual_seed(seed)
    P = max(prompt_lens)
    ids, am = [], []
    given = iter(lengths) if lengths is not None else None
    for plen in prompt_lens:
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for _ in range(group):
            clen = int(torch.randint(1, T + 1, (1,), generator=g))
            clen = next(given) if given is not None else clen
            row, mask = torch.full((P + T,), pad), torch.zeros(P + T, dtype=torch.long)
            row[P - plen:P] = prompt
            row[P:P + clen] = torch.randint(3, vocab, (clen,), generator=g)
            mask[P - plen:P + clen] = 1
            ids.append(row)
            am.append(mask)
    return torch.stack(ids), torch.stack(am)


def tiny_config_model(kind: str, seed: int = 0, **overrides):
    """A random 2-layer model of a supported family, from its config (no files)."""
    import transformers

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation="sdpa")
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config_cls(**common)).float()


def run(model, ids, am, T, rows=None, temperature=0.7, upstream_seed=0, masked=False, **kw):
    """Log-probs, entropy and accumulated grads of ``sum(w * logprobs)`` over the micro-batches ``rows``.

    masked: w is 0 at the completions' padding (as in the loss), so padding positions carry no gradient."""
    model.zero_grad(set_to_none=True)
    rows = rows or [slice(0, ids.shape[0])]
    w = torch.randn(ids.shape[0], T, generator=torch.Generator().manual_seed(upstream_seed))
    if masked:
        w = w * am[:, -T:]
    lps, ents = [], []
    for r in rows:
        lp, ent = completion_logprobs(model, ids[r], am[r], T, temperature=temperature, return_entropy=True, **kw)
        (w[r] * lp).sum().backward()
        lps.append(lp.detach())
        ents.append(ent)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(lps), torch.cat(ents), grads


def assert_same(got, want):
    lp, ent, grads = got
    lp0, ent0, grads0 = want
    torch.testing.assert_close(lp, lp0, atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(ent, ent0, atol=ENT_ATOL, rtol=ENT_RTOL)
    assert grads.keys() == grads0.keys() and grads0
    for name, g0 in grads0.items():
        scale = g0.abs().max()
        assert scale > 0, f"{name}: zero gradient proves nothing"
        assert (grads[name] - g0).abs().max() <= GRAD_RTOL * scale, name


# ---- pieces ------------------------------------------------------------------------------------------------------


def test_prompt_runs_hand_example():
    # prefix columns: rows 0-1 prompt A, rows 2-4 prompt B, row 5 prompt A again (not adjacent: its own run),
    # row 6 has A's ids but another mask (a different padding): its own run too.
    A, B = [0, 5, 6], [7, 8, 9]
    ids = torch.tensor([A, A, B, B, B, A, A])
    am = torch.tensor([[0, 1, 1]] * 6 + [[1, 1, 1]])
    ids = torch.cat([ids, torch.arange(7)[:, None]], 1)  # a differing completion column after the prefix
    am = torch.cat([am, torch.ones(7, 1, dtype=torch.long)], 1)
    assert prompt_runs(ids, am, 3) == ([0, 2, 5, 6], [2, 3, 1, 1])
    assert prompt_runs(ids, am, 4) == (list(range(7)), [1] * 7)  # the completion column differs everywhere
    assert prompt_runs(ids[:0], am[:0], 3) == ([], [])


def test_expand_hand_example_and_gradient():
    x = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    y = expand(x, [2, 1, 3])
    assert y.flatten().tolist() == [1, 1, 2, 3, 3, 3]
    (y.flatten() * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad.flatten().tolist() == [1 + 2, 3, 4 + 5 + 6]  # each prompt gets the sum of its rows' gradients
    x.grad = None
    z = expand(x, [2, 2, 2])  # the equal-groups path
    assert z.flatten().tolist() == [1, 1, 2, 2, 3, 3]
    (z.flatten() * torch.arange(1.0, 7.0)).sum().backward()
    assert x.grad.flatten().tolist() == [3, 7, 11]


# ---- equal to the plain forward ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_tied(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", ["qwen2-tied", "llama-untied", "llama-eager", "qwen3"])
def test_shared_matches_plain(kind, chunk_size, qwen2_tied):
    if kind == "qwen2-tied":
        model, vocab = qwen2_tied, 500
    else:
        family = kind.split("-")[0]
        extra = {"tie_word_embeddings": kind != "llama-untied"}
        if kind == "llama-eager":
            extra["attn_implementation"] = "eager"
        model, vocab = tiny_config_model(family, **extra).train(), 300
    assert shared_prompt_fallback_reason(model) is None
    # prompts of 5, 7 and 1 tokens (the last is all padding in the shared prefix), 3 samples each, completions <= 4
    ids, am = make_batch([5, 7, 1], group=3, T=4, vocab=vocab, seed=1)
    want = run(model, ids, am, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = run(model, ids, am, 4, shared_prompt=True, chunk_size=chunk_size)
    assert_same(got, want)


def test_temperature_one_and_full_length_rows(qwen2_tied):
    # No padding at all (every prompt 6 tokens, every completion full): the mask is all ones in both passes.
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, 500, (2, 6), generator=g).repeat_interleave(4, 0)
    ids = torch.cat([prompts, torch.randint(3, 500, (8, 5), generator=g)], 1)
    am = torch.ones_like(ids)
    assert_same(run(qwen2_tied, ids, am, 5, temperature=1.0, shared_prompt=True),
                run(qwen2_tied, ids, am, 5, temperature=1.0))


def test_gradient_accumulation_with_cut_groups(qwen2_tied):
    # 4 prompts x 3 samples in micro-batches of 5 rows: the cuts fall inside groups (runs of 3, 2 | 1, 3, 1 | 2).
    ids, am = make_batch([4, 6, 3, 6], group=3, T=5, vocab=500, seed=3)
    rows = [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert prompt_runs(ids[rows[1]], am[rows[1]], ids.shape[1] - 6)[1] == [1, 3, 1]
    assert_same(run(qwen2_tied, ids, am, 5, rows=rows, shared_prompt=True), run(qwen2_tied, ids, am, 5, rows=rows))


def lora_policy(tiny_model_dir):
    """A LoRA policy on every linear layer, in train mode, with random lora_B (it starts at zero, which would make
    every lora_A gradient zero)."""
    from rlswift.models import load_policy

    model = load_policy(tiny_model_dir, lora_rank=4, lora_alpha=8, lora_target_modules="all-linear", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def test_lora_adapter_gradients(tiny_model_dir):
    model = lora_policy(tiny_model_dir)
    assert shared_prompt_fallback_reason(model) is None
    ids, am = make_batch([5, 3], group=4, T=4, vocab=500, seed=5)
    want = run(model, ids, am, 4)
    assert want[2] and all("lora_" in name for name in want[2])  # only the adapters train
    assert_same(run(model, ids, am, 4, shared_prompt=True), want)
    assert_same(run(model, ids, am, 4, shared_prompt=True, chunk_size=3), want)
    # The reference log-probs of a LoRA policy (adapters disabled) go through the same path.
    from rlswift.models import reference_logprobs_context

    with torch.no_grad(), reference_logprobs_context(model):
        ref_plain = completion_logprobs(model, ids, am, 4, temperature=0.7)
        ref_shared = completion_logprobs(model, ids, am, 4, temperature=0.7, shared_prompt=True)
    torch.testing.assert_close(ref_shared, ref_plain, atol=LP_ATOL, rtol=0)
    assert (ref_plain - want[0]).abs().max() > 1e-3  # the adapters really were off


def test_gradient_checkpointing(tiny_model_dir):
    # transformers drops the KV cache inside checkpointed layers unless the layer allows it; our cache layers are
    # replay-safe, so non-reentrant checkpointing keeps the shared path (and its exact gradients).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    ids, am = make_batch([5, 2], group=3, T=4, vocab=500, seed=6)
    want = run(model, ids, am, 4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert shared_prompt_fallback_reason(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(run(model, ids, am, 4, shared_prompt=True), want)
    layer = model.model.layers[0]
    assert "_can_checkpoint_with_cache" not in vars(layer)  # the model is left as it was
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert "reentrant" in shared_prompt_fallback_reason(model)
    with pytest.warns(RuntimeWarning, match="shared-prompt forward is off: reentrant"):
        got = run(model, ids, am, 4, shared_prompt=True)
    assert_same(got, want)


def test_bf16_autocast():
    # The GPU default (fp32 master weights, bf16 autocast), on CPU: the shared K/V are bf16 like the plain path's, so
    # the two agree at bf16 level (measured: log-probs equal, gradients within 0.7% of their largest entry).
    model = tiny_config_model("llama", tie_word_embeddings=False).train()
    ids, am = make_batch([5, 7, 1], group=3, T=4, vocab=300, seed=1)
    out = {}
    for name, kw in {"plain": {}, "shared": {"shared_prompt": True}, "chunked": {"shared_prompt": True,
                                                                                  "chunk_size": 3}}.items():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = completion_logprobs(model, ids, am, 4, temperature=0.7, **kw)
        lp.sum().backward()
        out[name] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    with torch.no_grad():
        fp32 = completion_logprobs(model, ids, am, 4, temperature=0.7)
    lp0, g0 = out["plain"]
    assert lp0.dtype == torch.float32 and (lp0 - fp32).abs().max() > 1e-3  # bf16 really ran
    for name in ("shared", "chunked"):
        lp, g = out[name]
        torch.testing.assert_close(lp, lp0, atol=1e-2, rtol=0)
        for k in g0:
            assert (g[k] - g0[k]).abs().max() <= 3e-2 * g0[k].abs().max(), (name, k)


def test_each_prompt_is_computed_once(qwen2_tied):
    # What the decoder sees: one pass over the U distinct prompts' prefix, one over the N rows' completion tokens.
    seen = []
    hook = qwen2_tied.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        ids, am = make_batch([5, 7, 4], group=4, T=3, vocab=500, seed=7)  # P = 7, L = 10, prefix p = 6
        with torch.no_grad():
            shared_prompt_logprobs(qwen2_tied, ids, am, 3)
    finally:
        hook.remove()
    assert seen == [(3, 6), (12, 3)]


# ---- fallbacks ---------------------------------------------------------------------------------------------------


def test_no_shared_prompt_uses_the_plain_forward(qwen2_tied):
    ids, am = make_batch([5, 6, 4], group=1, T=3, vocab=500, seed=8)  # three distinct prompts
    with torch.no_grad():
        got = shared_prompt_logprobs(qwen2_tied, ids, am, 3)
        want = completion_logprobs(qwen2_tied, ids, am, 3)
    assert torch.equal(got, want)


def test_unsupported_models_fall_back_with_a_reason():
    sliding = tiny_config_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding" in shared_prompt_fallback_reason(sliding)
    ids, am = make_batch([4, 3], group=2, T=3, vocab=300, seed=9)
    with pytest.warns(RuntimeWarning, match="shared-prompt forward is off: layer types"), torch.no_grad():
        got = shared_prompt_logprobs(sliding, ids, am, 3)
    with torch.no_grad():
        assert torch.equal(got, completion_logprobs(sliding, ids, am, 3))
    flash = tiny_config_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert "attention implementation 'flash_attention_2'" in shared_prompt_fallback_reason(flash)
    with pytest.raises(ValueError, match="logits_to_keep"):
        shared_prompt_logprobs(sliding, ids, am, ids.shape[1])


# ---- packed (padding-free) completions ---------------------------------------------------------------------------


def assert_same_packed(got, want, am, T):
    """``assert_same`` on the real completion positions; the packed path's padding positions are exactly 0."""
    real = am[:, -T:].bool()
    lp, ent, grads = got
    assert torch.equal(lp[~real], torch.zeros_like(lp[~real])) and torch.equal(ent[~real], torch.zeros_like(ent[~real]))
    assert_same((lp * real, ent * real, grads), (want[0] * real, want[1] * real, want[2]))


def decoder_inputs(model, fn):
    """The shapes of the token batches the decoder embeds while ``fn()`` runs (one per decoder pass)."""
    from rlswift.algorithms.logprobs import unwrap_peft

    seen = []
    embed = unwrap_peft(model).get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        out = fn()
    finally:
        hook.remove()
    return seen, out


def test_pack_layout_hand_example():
    from rlswift.algorithms.packed import PackedMask, flat_prompt_cache, pack_layout, packed_mask, unpack_rows

    # L = 6, T = 3, p = 2. Run 0: rows 0-1, prompt [_, 7] + last prompt token 8 (left-padded); completions [11, 12]
    # and [13]. Run 1: row 2, prompt [5, 6] + 9, completion [14, 15, 16] (full length).
    ids = torch.tensor([[0, 7, 8, 11, 12, 0], [0, 7, 8, 13, 0, 0], [5, 6, 9, 14, 15, 16]])
    am = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    lay = pack_layout(ids, am, 3, [2, 1])
    # Packed inputs: row 0 -> columns 2, 3 (tokens 8, 11); row 1 -> column 2 (8); row 2 -> columns 2..4.
    assert lay.input_ids.tolist() == [[8, 11, 8, 9, 14, 15]]
    assert lay.position_ids.tolist() == [[2, 3, 2, 2, 3, 4]]  # each completion restarts at p, as in its row
    assert lay.targets.tolist() == [11, 12, 13, 14, 15, 16]
    assert lay.flat.tolist() == [0, 1, 3, 6, 7, 8] and lay.counts == [2, 1] and lay.prefix == 2
    assert lay.unpack.tolist() == [[0, 1, 6], [2, 6, 6], [3, 4, 5]]
    mask = packed_mask(am, lay)
    assert isinstance(mask, PackedMask) and mask.shape == (3, 1, 3, 5) and mask.packing is lay
    # keys: columns 0..4; query t is column 2 + t and sees the valid columns up to itself
    assert mask[1, 0].int().tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert mask[2, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    x = torch.arange(1.0, 7.0, requires_grad=True)
    y = unpack_rows(x, lay)
    assert y.tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6]]
    (y * torch.arange(9.0).view(3, 3)).sum().backward()
    assert x.grad.tolist() == [0, 1, 3, 6, 7, 8]
    k = torch.arange(2 * 3 * 2 * 1.0).view(2, 3, 2, 1)  # [U, h, p, d]
    assert flat_prompt_cache(k)[0, 1, :, 0].tolist() == [2, 3, 8, 9]  # head 1: run 0's p keys, then run 1's


def test_packed_mask_matches_transformers_sdpa_mask():
    # The mask the unpacked pass gets from transformers (2-D mask [B, L - 1], cache of p positions, T queries).
    from transformers.masking_utils import sdpa_mask

    from rlswift.algorithms.packed import pack_layout, packed_mask

    ids, am = make_batch([5, 3], group=3, T=4, vocab=300, seed=1, lengths=[1, 4, 2, 3, 3, 1])
    T, L = 4, ids.shape[1]
    p = L - T - 1
    want = sdpa_mask(batch_size=6, q_length=T, kv_length=L - 1, q_offset=p, kv_offset=0,
                     attention_mask=am[:, :L - 1].bool(), allow_is_causal_skip=False)
    got = packed_mask(am, pack_layout(ids, am, T, [3, 3]))
    assert torch.equal(got.as_subclass(torch.Tensor), want)


def test_pack_layout_refuses():
    from rlswift.algorithms.packed import pack_layout

    ids, am = make_batch([5, 3], group=3, T=4, vocab=300, seed=1, lengths=[1, 4, 2, 3, 3, 1])
    assert pack_layout(ids, am, 4, [3, 3]).input_ids.shape == (1, 14)
    full = am.clone()
    full[:, -4:] = 1
    assert pack_layout(ids, full, 4, [3, 3]) is None  # no padding: nothing to save
    hole = am.clone()
    hole[0, -3] = 0
    hole[0, -2] = 1  # completion mask 1 0 1 0: not right-padded
    assert pack_layout(ids, hole, 4, [3, 3]) is None
    empty = am.clone()
    empty[:, -4:] = 0
    assert pack_layout(ids, empty, 4, [3, 3]) is None  # nothing to score


PACKED_KINDS = ["qwen2-tied", "llama-untied", "qwen3"]  # sdpa; eager attention is not packed (below)


def kind_model(kind, qwen2_tied):
    if kind == "qwen2-tied":
        return qwen2_tied, 500
    family = kind.split("-")[0]
    extra = {"tie_word_embeddings": kind != "llama-untied"}
    if kind == "llama-eager":
        extra["attn_implementation"] = "eager"
    return tiny_config_model(family, **extra).train(), 300


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_packed_matches_plain(kind, chunk_size, qwen2_tied):
    model, vocab = kind_model(kind, qwen2_tied)
    # prompts of 5, 7 and 1 tokens, 3 samples each; completions of 1..5 tokens (5 = T), one empty row
    lengths = [1, 5, 2, 3, 1, 0, 4, 1, 2]
    ids, am = make_batch([5, 7, 1], group=3, T=5, vocab=vocab, seed=1, lengths=lengths)
    want = run(model, ids, am, 5, masked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        seen, got = decoder_inputs(model, lambda: run(model, ids, am, 5, masked=True, shared_prompt=True,
                                                      pack_completions=True, chunk_size=chunk_size))
    assert seen == [(3, 6), (1, 19)]  # the 3 prefixes (p = 6), then the 19 real tokens as one sequence
    assert_same_packed(got, want, am, 5)


def test_eager_attention_is_not_packed():
    model, _ = kind_model("llama-eager", None)
    ids, am = make_batch([5, 7, 1], group=3, T=5, vocab=300, seed=1, lengths=[1, 5, 2, 3, 1, 0, 4, 1, 2])
    want = run(model, ids, am, 5, masked=True)
    seen, got = decoder_inputs(model, lambda: run(model, ids, am, 5, masked=True, shared_prompt=True,
                                                  pack_completions=True))
    assert seen == [(3, 6), (9, 5)]  # the padded [B, T] pass
    assert_same(got, want)


def test_packed_temperature_one_and_cut_groups(qwen2_tied):
    # 4 prompts x 3 samples in micro-batches of 5 rows (runs of 3, 2 | 1, 3, 1 | 2), temperature 1.
    ids, am = make_batch([4, 6, 3, 6], group=3, T=5, vocab=500, seed=3, lengths=[1, 5, 2, 1, 2, 1, 3, 1, 1, 2, 1, 5])
    rows = [slice(0, 5), slice(5, 10), slice(10, 12)]
    seen, got = decoder_inputs(qwen2_tied, lambda: run(qwen2_tied, ids, am, 5, rows=rows, temperature=1.0,
                                                       masked=True, shared_prompt=True, pack_completions=True))
    assert seen == [(2, 5), (1, 11), (3, 5), (1, 8), (1, 5), (1, 6)]  # every micro-batch: prefixes, then packed
    assert_same_packed(got, run(qwen2_tied, ids, am, 5, rows=rows, temperature=1.0, masked=True), am, 5)


def test_packed_lora_and_reference(tiny_model_dir):
    from rlswift.models import reference_logprobs_context

    model = lora_policy(tiny_model_dir)
    ids, am = make_batch([5, 3], group=4, T=4, vocab=500, seed=5)
    want = run(model, ids, am, 4, masked=True)
    assert want[2] and all("lora_" in name for name in want[2])
    packed = dict(shared_prompt=True, pack_completions=True)
    seen, got = decoder_inputs(model, lambda: run(model, ids, am, 4, masked=True, **packed))
    assert seen[1][0] == 1
    assert_same_packed(got, want, am, 4)
    assert_same_packed(run(model, ids, am, 4, masked=True, chunk_size=3, **packed), want, am, 4)
    real = am[:, -4:].bool()
    with torch.no_grad(), reference_logprobs_context(model):
        ref_plain = completion_logprobs(model, ids, am, 4, temperature=0.7)
        ref_packed = completion_logprobs(model, ids, am, 4, temperature=0.7, **packed)
    torch.testing.assert_close(ref_packed[real], ref_plain[real], atol=LP_ATOL, rtol=0)
    assert (ref_plain - want[0])[real].abs().max() > 1e-3  # the adapters really were off


def test_packed_gradient_checkpointing(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    ids, am = make_batch([5, 2], group=3, T=4, vocab=500, seed=6, lengths=[4, 1, 2, 1, 3, 2])
    want = run(model, ids, am, 4, masked=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen, got = decoder_inputs(model, lambda: run(model, ids, am, 4, masked=True, shared_prompt=True,
                                                      pack_completions=True))
    assert seen == [(2, 4), (1, 13)]
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        run(model, ids, am, 4, masked=True, shared_prompt=True, pack_completions=True)
    finally:
        hook.remove()
    assert len(calls) == 4  # the two passes, each replayed in backward: checkpointing really ran
    assert_same_packed(got, want, am, 4)


def test_packed_bf16_autocast():
    # As test_bf16_autocast: packed and plain agree at bf16 level on the real positions (loss masked as in GRPO).
    model = tiny_config_model("llama", tie_word_embeddings=False).train()
    ids, am = make_batch([5, 7, 1], group=3, T=4, vocab=300, seed=1)
    real = am[:, -4:].float()
    out = {}
    for name, kw in {"plain": {}, "packed": {"shared_prompt": True, "pack_completions": True}}.items():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = completion_logprobs(model, ids, am, 4, temperature=0.7, **kw)
        (lp * real).sum().backward()
        out[name] = (lp.detach() * real, {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp0, g0), (lp, g) = out["plain"], out["packed"]
    torch.testing.assert_close(lp, lp0, atol=1e-2, rtol=0)
    for k in g0:
        assert (g[k] - g0[k]).abs().max() <= 3e-2 * g0[k].abs().max(), k


def test_packed_falls_back_to_the_padded_pass(qwen2_tied):
    # No padding to save (every completion full): the unpacked shared pass runs, with its exact values.
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, 500, (2, 6), generator=g).repeat_interleave(4, 0)
    ids = torch.cat([prompts, torch.randint(3, 500, (8, 5), generator=g)], 1)
    am = torch.ones_like(ids)
    with torch.no_grad():
        seen, got = decoder_inputs(qwen2_tied, lambda: completion_logprobs(
            qwen2_tied, ids, am, 5, shared_prompt=True, pack_completions=True))
        assert seen == [(2, 5), (8, 5)]
        assert torch.equal(got, completion_logprobs(qwen2_tied, ids, am, 5, shared_prompt=True))
