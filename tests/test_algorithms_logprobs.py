import math

import pytest
import torch

from rlswift.algorithms.logprobs import completion_logprobs, entropy_from_logits, selective_log_softmax


def _hand_logits():
    # row 0, pos 0: logits (0, ln2, ln3) -> p = (1/6, 2/6, 3/6)
    # row 0, pos 1: (1, 1, 1)            -> p = 1/3 each
    # row 1, pos 0: (0, 0, ln2)          -> p = (1/4, 1/4, 1/2)
    # row 1, pos 1: (ln3, 0, 0)          -> p = (3/5, 1/5, 1/5)
    L2, L3 = math.log(2), math.log(3)
    return torch.tensor([[[0.0, L2, L3], [1.0, 1.0, 1.0]], [[0.0, 0.0, L2], [L3, 0.0, 0.0]]])


def test_selective_log_softmax_hand_values():
    ids = torch.tensor([[2, 0], [1, 0]])
    got = selective_log_softmax(_hand_logits(), ids)
    want = torch.tensor([[math.log(1 / 2), math.log(1 / 3)], [math.log(1 / 4), math.log(3 / 5)]])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_selective_log_softmax_matches_naive_and_is_fp32_for_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 4
    ids = torch.randint(0, 50, (3, 5), generator=g)
    naive = torch.gather(logits.log_softmax(-1), -1, ids.unsqueeze(-1)).squeeze(-1)
    # values reach ~-20, so 1e-5 absolute is a few fp32 ulps
    torch.testing.assert_close(selective_log_softmax(logits, ids), naive, atol=1e-5, rtol=0)
    # bf16 logits: math happens in fp32 on the bf16 values (exact up to fp32 rounding)
    lb = logits.bfloat16()
    naive_b = torch.gather(lb.float().log_softmax(-1), -1, ids.unsqueeze(-1)).squeeze(-1)
    got_b = selective_log_softmax(lb, ids)
    assert got_b.dtype == torch.float32
    torch.testing.assert_close(got_b, naive_b, atol=1e-5, rtol=0)


def test_selective_log_softmax_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    selective_log_softmax(a, ids).sum().backward()
    torch.gather(b.log_softmax(-1), -1, ids.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_selective_log_softmax_shape_error():
    with pytest.raises(ValueError, match="vocab axis"):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_hand_values():
    # H(1/6,1/3,1/2) = ln6/6 + ln3/3 + ln2/2 ; H(uniform 3) = ln3 ; H(1/4,1/4,1/2) = 1.5 ln2 ;
    # H(3/5,1/5,1/5) = 0.6 ln(5/3) + 0.4 ln5
    want = torch.tensor(
        [
            [math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2, math.log(3)],
            [1.5 * math.log(2), 0.6 * math.log(5 / 3) + 0.4 * math.log(5)],
        ]
    )
    torch.testing.assert_close(entropy_from_logits(_hand_logits(), chunk_size=3), want, atol=1e-6, rtol=0)


class _Toy(torch.nn.Module):
    """A 'model' whose logits at position t depend on tokens <= t only (cumsum of embeddings)."""

    def __init__(self, vocab=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 6, generator=g))
        self.out = torch.nn.Parameter(torch.randn(6, vocab, generator=g))
        self.seen_logits_to_keep = None

    def forward(self, input_ids, attention_mask, logits_to_keep=0, use_cache=False):
        self.seen_logits_to_keep = logits_to_keep
        h = (self.emb[input_ids] * attention_mask.unsqueeze(-1)).cumsum(1)
        logits = h @ self.out
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def test_completion_logprobs_alignment_and_temperature():
    model = _Toy()
    ids = torch.tensor([[0, 3, 4, 5, 6, 7], [2, 3, 4, 8, 9, 1]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 prompt left-padded
    T = 3
    full = model(ids, am).logits  # [B, L, V]
    for temp in (1.0, 0.7):
        # Completion token at position L-T+k is predicted by the logit at position L-T+k-1.
        L = ids.shape[1]
        cols = []
        for k in range(T):
            logp = torch.log_softmax(full[:, L - T + k - 1] / temp, -1)
            cols.append(logp.gather(1, ids[:, L - T + k, None])[:, 0])
        want = torch.stack(cols, dim=1)
        lp, ent = completion_logprobs(model, ids, am, T, temperature=temp, return_entropy=True)
        assert model.seen_logits_to_keep == T + 1
        assert lp.shape == (2, T) and ent.shape == (2, T)
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)
        want_ent = entropy_from_logits(full[:, -T - 1 : -1] / temp)
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_logprobs(model, ids, am, 6)


def test_completion_logprobs_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (2, 9), generator=g)
    am = torch.ones_like(ids)
    with torch.no_grad():
        lp = completion_logprobs(model, ids, am, 4)
        logits = model(input_ids=ids, attention_mask=am).logits
    want = torch.gather(logits[:, -5:-1].log_softmax(-1), -1, ids[:, -4:, None])[..., 0]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)


# ---- chunked LM head (chunk_size=n): exact vs the plain logits path ------------------------------------------


def _plain_head(h, w, b, ids, temp):
    """The reference: full logits, then the plain path's math."""
    logits = torch.nn.functional.linear(h, w, b)
    if temp != 1.0:
        logits = logits.float() / temp
    return selective_log_softmax(logits, ids), entropy_from_logits(logits)


def test_chunked_head_hand_values_and_gradient():
    # weight = identity, so the logits are the hidden states: the hand example above.
    # d logp[target] / d logits = onehot(target) - p; row 0 pos 0: p = (1/6, 1/3, 1/2), target 2 -> (-1/6, -1/3, 1/2).
    from rlswift.algorithms.logprobs import chunked_linear_logprobs

    h = _hand_logits().requires_grad_(True)
    ids = torch.tensor([[2, 0], [1, 0]])
    lp, ent = chunked_linear_logprobs(h, torch.eye(3), None, ids, chunk_size=3, return_entropy=True)
    want = torch.tensor([[math.log(1 / 2), math.log(1 / 3)], [math.log(1 / 4), math.log(3 / 5)]])
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, entropy_from_logits(_hand_logits()), atol=1e-6, rtol=0)
    assert not ent.requires_grad
    lp[0, 0].backward()
    torch.testing.assert_close(h.grad[0, 0], torch.tensor([-1 / 6, -1 / 3, 1 / 2]), atol=1e-6, rtol=0)
    assert h.grad[0, 1:].abs().sum() == 0 and h.grad[1].abs().sum() == 0


def _grid(shape, gen, scale=0.25):
    # Values k * 0.25 with |k| <= 4: every product and sum of a small matmul is exact in fp32 (and bf16), so the
    # logits are bit-identical whatever the matmul's blocking and only the log-softmax math is compared.
    return torch.randint(-4, 5, shape, generator=gen).float() * scale


@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_matches_plain_exactly(temp, chunk, with_bias):
    from rlswift.algorithms.logprobs import chunked_linear_logprobs

    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 5, 8, 40
    h0, w0 = _grid((B, T, H), g), _grid((V, H), g)
    b0 = _grid((V,), g) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)  # a generic loss: sum(upstream * logprobs)

    leaves = [t.clone().requires_grad_(True) for t in (h0, w0) + ((b0,) if with_bias else ())]
    lp, ent = chunked_linear_logprobs(leaves[0], leaves[1], leaves[2] if with_bias else None, ids, temp, chunk, True)
    (upstream * lp).sum().backward()
    refs = [t.clone().requires_grad_(True) for t in (h0, w0) + ((b0,) if with_bias else ())]
    want_lp, want_ent = _plain_head(refs[0], refs[1], refs[2] if with_bias else None, ids, temp)
    (upstream * want_lp).sum().backward()

    assert lp.dtype == torch.float32 and lp.shape == (B, T)
    torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-6, rtol=0)
    for got, want in zip(leaves, refs):  # hidden, weight, (bias): fp32 rounding of the same sums
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-5)


def test_chunked_head_bf16_autocast():
    # Under autocast the head runs in bf16 (as nn.Linear would) and the softmax in fp32; the grads come back in the
    # leaves' dtype (fp32 master weights).
    from rlswift.algorithms.logprobs import chunked_linear_logprobs

    g = torch.Generator().manual_seed(6)
    h0, w0, ids = _grid((2, 6, 8), g), _grid((30, 8), g), torch.randint(0, 30, (2, 6), generator=g)
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    hr, wr = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked_linear_logprobs(h, w, None, ids, 0.7, chunk_size=5)
        want, _ = _plain_head(hr, wr, None, ids, 0.7)
    lp.sum().backward()
    want.sum().backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)
    # bf16 matmuls in backward (as autograd does for the plain path): bf16-level agreement
    torch.testing.assert_close(h.grad, hr.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-2, rtol=1e-2)
    # and random (inexact) inputs: still the same bf16 logits up to bf16 rounding of different matmul shapes
    hx, wx = torch.randn(4, 7, 8, generator=g), torch.randn(50, 8, generator=g)
    idx = torch.randint(0, 50, (4, 7), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = chunked_linear_logprobs(hx, wx, None, idx, 1.0, chunk_size=3)
        b, _ = _plain_head(hx, wx, None, idx, 1.0)
    fp32 = _plain_head(hx, wx, None, idx, 1.0)[0]
    assert (a - b).abs().max() < 0.1 and (a - fp32).abs().max() > 1e-4  # it did compute in bf16


def test_chunked_head_saves_no_logits():
    # The point of chunking: autograd keeps no [B*T, V] tensor. Record every tensor saved for backward.
    from rlswift.algorithms.logprobs import chunked_linear_logprobs

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 4, 8, 16, 1000
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)

    def saved_numels(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sizes

    plain = saved_numels(lambda: _plain_head(h, w, None, ids, 0.7))
    chunked = saved_numels(lambda: chunked_linear_logprobs(h, w, None, ids, 0.7, chunk_size=8))
    assert max(plain) >= B * T * V  # the fp32 logits
    assert max(chunked) == V * H  # the weight itself; nothing of size [*, V] beyond it
    assert sum(chunked) <= V * H + B * T * (H + 2)


def test_chunked_head_errors_and_fallback():
    from rlswift.algorithms.logprobs import chunked_linear_logprobs

    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_logprobs(torch.zeros(2, 3), torch.zeros(5, 3), None, torch.zeros(2, dtype=torch.long),
                                chunk_size=0)
    with pytest.raises(ValueError, match="head's input size"):
        chunked_linear_logprobs(torch.zeros(2, 3), torch.zeros(5, 4), None, torch.zeros(2, dtype=torch.long))
    # A model that is not a transformers causal LM: the plain path with a warning naming why.
    model = _Toy()
    ids = torch.tensor([[0, 3, 4, 5, 6, 7]])
    am = torch.ones_like(ids)
    with pytest.warns(RuntimeWarning, match="chunked log-probs is off: _Toy is not a transformers causal LM"):
        got = completion_logprobs(model, ids, am, 3, chunk_size=2)
    torch.testing.assert_close(got, completion_logprobs(model, ids, am, 3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        completion_logprobs(model, ids, am, 3, chunk_size=0)


def _tiny_llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).float()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["qwen2-tied", "llama-untied"])
def test_completion_logprobs_chunked_matches_plain_on_models(which, tiny_model_dir):
    # Whole-model check: the same decoder, the LM head chunked vs not. Logits of a matmul differ with its row count
    # by fp32 reassociation alone (~1e-6 here, measured), so log-probs are compared at 2e-6 and grads at 1e-5 rel.
    from transformers import AutoModelForCausalLM

    if which == "qwen2-tied":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        vocab = 500
    else:
        model, vocab = _tiny_llama(tie=False), 300
    model.train()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0  # a left-padded prompt
    am[2, -2:] = 0  # a right-padded completion
    upstream = torch.randn(3, 4, generator=g)
    out = {}
    for name, kw in {"plain": {}, "chunked": {"chunk_size": 5}}.items():
        model.zero_grad(set_to_none=True)
        lp, ent = completion_logprobs(model, ids, am, 4, temperature=0.8, return_entropy=True, **kw)
        (upstream * lp).sum().backward()
        out[name] = (lp.detach(), ent, _grads(model))
    (lp_p, ent_p, g_p), (lp_c, ent_c, g_c) = out["plain"], out["chunked"]
    torch.testing.assert_close(lp_c, lp_p, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent_c, ent_p, atol=5e-6, rtol=0)
    assert g_c.keys() == g_p.keys() and ("lm_head.weight" in g_p) == (which == "llama-untied")
    for name in g_p:
        scale = g_p[name].abs().max().clamp(min=1e-12)
        assert (g_c[name] - g_p[name]).abs().max() / scale < 1e-5, name
