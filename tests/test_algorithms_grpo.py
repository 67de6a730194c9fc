import math

import pytest
import torch

from rlswift.algorithms.grpo import LOSS_TYPES, accumulation_scale, group_advantages, policy_loss

# ---- the 2x3 hand example used by the loss-variant tests ---------------------------------------------------
# mask = [[1, 1, 0], [1, 1, 1]], advantages A = [1, -2], eps_low = eps_high = 0.2, ratios r = exp(lp - old):
#   row 0 (A=+1): r = (1.0, 1.5, 1.1*)  -> -min(rA, clip(r)A) = (-1.0, -1.2 [high clip, 1.5 -> 1.2], masked)
#   row 1 (A=-2): r = (0.5, 1.0, 1.1)   -> -min(rA, clip(r)A) = (+1.6 [low clip, 0.5 -> 0.8], +2.0, +2.2)
# masked row sums: row 0 = -2.2 over 2 tokens, row 1 = 5.8 over 3 tokens; total 3.6 over 5 tokens.
#   grpo    = mean(-2.2/2, 5.8/3)   = (-1.1 + 1.933333) / 2 = 0.4166667
#   bnpo    = 3.6 / 5               = 0.72
#   dr_grpo = 3.6 / (2 * 4)         = 0.45   (max_completion_length = 4)
#   dapo    = 3.6 / 12              = 0.30   (num_items_in_batch = 12; falls back to 5 tokens -> 0.72)
# clip metrics over the 5 mask tokens: low 1/5, high 1/5, region 2/5.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -2.0])
RATIOS = torch.tensor([[1.0, 1.5, 1.1], [0.5, 1.0, 1.1]])
OLD = torch.zeros(2, 3)
LP = RATIOS.log()


@pytest.mark.parametrize(
    "loss_type,kwargs,want",
    [
        ("grpo", {}, (-1.1 + 5.8 / 3) / 2),
        ("bnpo", {}, 0.72),
        ("dr_grpo", {"max_completion_length": 4}, 0.45),
        ("dapo", {"num_items_in_batch": 12}, 0.30),
        ("dapo", {"num_items_in_batch": torch.tensor(12.0)}, 0.30),
        ("dapo", {}, 0.72),
    ],
)
def test_loss_variants_hand_values(loss_type, kwargs, want):
    loss, m = policy_loss(LP, OLD, ADV, MASK, loss_type, 0.2, 0.2, **kwargs)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["clip_ratio/low_mean"] == pytest.approx(0.2)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.2)
    assert m["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert "kl" not in m


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(LP, OLD, ADV, MASK, "dr_grpo")


def test_asymmetric_clip_dapo_style():
    # eps_high = 0.6: r = 1.5 is no longer clipped for A > 0 -> row 0 = (-1.0, -1.5); row 1 unchanged.
    loss, m = policy_loss(LP, OLD, ADV, MASK, "bnpo", epsilon_low=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx((-2.5 + 5.8) / 5, abs=1e-6)
    assert m["clip_ratio/high_mean"] == 0.0 and m["clip_ratio/low_mean"] == pytest.approx(0.2)


def _grad(ratio: float, adv: float) -> float:
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), "grpo")
    loss.backward()
    return lp.grad.item()


def test_clip_behaviour_positive_and_negative_advantages():
    # d/dlp of -r*A is -r*A when unclipped; 0 once the clipped branch is the min.
    assert _grad(1.5, 1.0) == 0.0  # A > 0, r above 1+eps: clipped, no push further up
    assert _grad(0.5, 1.0) == pytest.approx(-0.5)  # A > 0, r below 1-eps: NOT clipped (min picks r*A)
    assert _grad(0.5, -1.0) == 0.0  # A < 0, r below 1-eps: clipped
    assert _grad(1.5, -1.0) == pytest.approx(1.5)  # A < 0, r above 1+eps: NOT clipped
    assert _grad(1.1, 1.0) == pytest.approx(-1.1)  # inside the trust region


@pytest.mark.parametrize(
    "loss_type,kwargs,normaliser",
    [
        # per-token gradient at r = 1 is -A * mask / normaliser
        ("grpo", {}, torch.tensor([[2 * 2.0], [2 * 3.0]])),  # B * |o_i|
        ("bnpo", {}, torch.tensor(5.0)),
        ("dr_grpo", {"max_completion_length": 4}, torch.tensor(8.0)),
        ("dapo", {"num_items_in_batch": 10}, torch.tensor(10.0)),
    ],
)
def test_ratio_one_gradient(loss_type, kwargs, normaliser):
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(2, 3, generator=g) - 2).requires_grad_(True)
    loss, m = policy_loss(lp, None, ADV, MASK, loss_type, **kwargs)  # None: on-policy, r = 1
    loss.backward()
    want = -ADV.unsqueeze(1) * MASK / normaliser
    torch.testing.assert_close(lp.grad, want, atol=1e-6, rtol=0)
    assert m["clip_ratio/region_mean"] == 0.0


def test_k3_kl_hand_values():
    # kl = exp(d) - d - 1 with d = ref - lp:  d = ln2 -> 1 - ln2 ; d = -ln2 -> ln2 - 1/2 ; d = 0 -> 0
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2), -math.log(2), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    kl = [1 - math.log(2), math.log(2) - 0.5, 0.0]
    beta = 0.1
    loss, m = policy_loss(lp, lp, torch.tensor([0.0]), mask, "bnpo", ref_logprobs=ref, beta=beta)
    assert m["kl"] == pytest.approx(sum(kl) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(beta * sum(kl) / 3, abs=1e-6)  # A = 0: only the KL term remains
    # masked tokens are left out of the kl metric
    first_only = torch.tensor([[1.0, 0.0, 0.0]])
    _, m2 = policy_loss(lp, lp, torch.tensor([0.0]), first_only, "bnpo", ref_logprobs=ref, beta=beta)
    assert m2["kl"] == pytest.approx(kl[0], abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp, torch.tensor([0.0]), mask, "bnpo", beta=0.1)


def test_custom_loss_type_by_name_and_dotted_path():
    def total_sum(per_token_loss, mask, ctx):
        return (per_token_loss * mask).sum()

    LOSS_TYPES.register("test_total_sum", total_sum)
    try:
        loss, _ = policy_loss(LP, OLD, ADV, MASK, "test_total_sum")
        assert loss.item() == pytest.approx(3.6, abs=1e-6)
        assert accumulation_scale("test_total_sum", 4) == 0.25
    finally:
        LOSS_TYPES.unregister("test_total_sum")
    loss, _ = policy_loss(LP, OLD, ADV, MASK, "rlswift.algorithms.grpo._bnpo")
    assert loss.item() == pytest.approx(0.72, abs=1e-6)
    with pytest.raises(KeyError, match="bnpo"):
        policy_loss(LP, OLD, ADV, MASK, "bnp0")
    assert accumulation_scale("dapo", 4) == 1.0 and accumulation_scale("grpo", 4) == 0.25


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: constant -> advantage 0
    s = math.sqrt(1 / 3)
    a = 0.5 / (s + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    # batch: centred per group, scaled by the std of all 8 (sum of squares 5.5 / 7)
    b = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    got = group_advantages(r, 4, scale_rewards="batch")
    torch.testing.assert_close(got, torch.tensor([b, -b, -b, b, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    got = group_advantages(r.tolist(), 4, scale_rewards="none")
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_nan_and_errors():
    # NaN (unscorable) is left out: mean 3, std sqrt(8/2) = 2; its own advantage is 0.
    got = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 5.0]), 4)
    torch.testing.assert_close(got, torch.tensor([-2 / 2.0001, 0.0, 0.0, 2 / 2.0001]), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 2.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="grp")


def test_group_advantages_match_trl():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (24,), generator=g).float()
    mean = r.view(-1, 6).mean(1).repeat_interleave(6)
    std = nanstd(r.view(-1, 6), dim=1).repeat_interleave(6)
    torch.testing.assert_close(group_advantages(r, 6), (r - mean) / (std + 1e-4), atol=0, rtol=0)


class _FakeAccelerator:
    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x


@pytest.mark.slow  # importing GRPOTrainer pulls in vLLM: ~20 s once
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_trl_compute_loss(loss_type, beta):
    """Run TRL 1.16's GRPOTrainer._compute_loss on a stand-in trainer whose log-prob function returns our tensor."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(7)
    B, T = 3, 5
    lp = (torch.randn(B, T, generator=g) * 0.3 - 1.5).requires_grad_(True)
    old = lp.detach() + torch.randn(B, T, generator=g) * 0.3
    ref = lp.detach() + torch.randn(B, T, generator=g) * 0.2
    adv = torch.tensor([1.3, -0.7, 0.4])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    n_items = torch.tensor(11.0)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros(B, T), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_FakeAccelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, max_completion_length=T,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": n_items,
    }
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, lp)
    loss, m = policy_loss(lp, old, adv, mask, loss_type, 0.2, 0.28, ref_logprobs=ref, beta=beta,
                          max_completion_length=T, num_items_in_batch=n_items)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=1e-7, rtol=0)
    trl_m = fake._metrics["train"]
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert m[k] == pytest.approx(trl_m[k][-1], abs=1e-7), k
    assert m["clip_ratio/region_mean"] > 0  # the example does exercise clipping
