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
