import math

import pytest
import torch

from rlswift.algorithms.dpo import (
    DPO_LOSS_TYPES,
    completion_lengths,
    concatenated_batch,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
)

# Two pairs, beta = 0.1.
#   pair 0: logratios chosen = -5 - (-6) = +1, rejected = -8 - (-7) = -1 -> delta 2, beta*delta = 0.2
#   pair 1: policy == reference                                         -> delta 0
CH, RJ = torch.tensor([-5.0, -3.0]), torch.tensor([-8.0, -2.0])
RCH, RRJ = torch.tensor([-6.0, -3.0]), torch.tensor([-7.0, -2.0])


def test_sigmoid_hinge_robust_hand_values():
    losses, cr, rr = dpo_loss(CH, RJ, RCH, RRJ, beta=0.1, loss_type="sigmoid")
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-0.2)), math.log(2)]))
    torch.testing.assert_close(cr, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rr, torch.tensor([-0.1, 0.0]))
    losses, _, _ = dpo_loss(CH, RJ, RCH, RRJ, beta=0.1, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.8, 1.0]))
    # robust, eps = 0.1: (-(0.9) log s(z) + 0.1 log s(-z)) / 0.8
    ls = lambda z: -math.log1p(math.exp(-z))  # noqa: E731  log sigmoid
    want = [(-0.9 * ls(z) + 0.1 * ls(-z)) / 0.8 for z in (0.2, 0.0)]
    losses, _, _ = dpo_loss(CH, RJ, RCH, RRJ, beta=0.1, loss_type="robust", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor(want))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(CH, RJ, RCH, RRJ, loss_type="robust", label_smoothing=0.5)


def test_ipo_hand_values_length_normalised():
    # chosen 2 tokens, rejected 4: delta = 1/2 - (-1/4) = 0.75 ; (0.75 - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625
    # pair 1: (0 - 5)^2 = 25
    losses, _, _ = dpo_loss(
        CH, RJ, RCH, RRJ, beta=0.1, loss_type="ipo",
        chosen_lengths=torch.tensor([2.0, 3.0]), rejected_lengths=torch.tensor([4.0, 1.0]),
    )
    torch.testing.assert_close(losses, torch.tensor([18.0625, 25.0]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(CH, RJ, RCH, RRJ, loss_type="ipo")


def test_sigmoid_gradient_and_custom_type():
    c = CH.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(c, RJ, RCH, RRJ, beta=0.1)
    losses.sum().backward()
    # d/dc -log s(beta*delta) = -beta * (1 - s(beta*delta))
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    torch.testing.assert_close(c.grad, torch.tensor([-0.1 * (1 - s(0.2)), -0.1 * 0.5]))
    DPO_LOSS_TYPES.register("test_linear", lambda c, r, ctx: -(c - r) * ctx.beta)
    try:
        losses, _, _ = dpo_loss(CH, RJ, RCH, RRJ, beta=0.5, loss_type="test_linear")
        torch.testing.assert_close(losses, torch.tensor([-1.0, 0.0]))
    finally:
        DPO_LOSS_TYPES.unregister("test_linear")
    with pytest.raises(KeyError, match="sigmoid"):
        dpo_loss(CH, RJ, RCH, RRJ, loss_type="sigmoud")


def test_concatenated_batch_matches_trl_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ex = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    got = concatenated_batch(0, [e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex],
                             [e["rejected_ids"] for e in ex])
    # TRL's documented example
    assert got["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert got["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    for max_length in (None, 4):
        want = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(ex)
        got = concatenated_batch(0, [e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex],
                                 [e["rejected_ids"] for e in ex], max_length=max_length)
        for k in ("input_ids", "attention_mask", "completion_mask"):
            assert got[k].tolist() == want[k].tolist(), k
    cl, rl = completion_lengths(got)
    assert cl.tolist() == [1.0, 1.0] and rl.tolist() == [1.0, 2.0]  # truncated at 4: chosen 0 loses token 5


class _Toy(torch.nn.Module):
    def __init__(self, vocab=12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 5, generator=g))
        self.out = torch.nn.Parameter(torch.randn(5, vocab, generator=g))

    def forward(self, input_ids, attention_mask, use_cache=False):
        logits = (self.emb[input_ids] * attention_mask.unsqueeze(-1)).cumsum(1) @ self.out
        return type("Out", (), {"logits": logits})()


def test_sequence_logps_sums_completion_tokens_only():
    model = _Toy()
    batch = concatenated_batch(0, [[1, 2, 3], [7, 8]], [[4, 5], [9]], [[6], [10, 11]])
    ch, rj, m = sequence_logps(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"]).logits.detach()
    logp = logits.log_softmax(-1)

    def manual(row, positions):
        ids = batch["input_ids"][row]
        return sum(logp[row, t - 1, ids[t]] for t in positions)

    # completion tokens sit at: row0 3,4 ; row1 2 ; row2 3 ; row3 2,3
    want = torch.stack([manual(0, [3, 4]), manual(1, [2]), manual(2, [3]), manual(3, [2, 3])])
    torch.testing.assert_close(torch.cat([ch, rj]), want, atol=1e-5, rtol=0)
    mean = logits.mean(-1)
    want_c = float((mean[0, 2] + mean[0, 3] + mean[1, 1]) / 3)
    want_r = float((mean[2, 2] + mean[3, 1] + mean[3, 2]) / 3)
    assert m["logits/chosen"] == pytest.approx(want_c, abs=1e-5)
    assert m["logits/rejected"] == pytest.approx(want_r, abs=1e-5)


def test_dpo_metrics_names_and_values():
    losses, cr, rr = dpo_loss(CH, RJ, RCH, RRJ, beta=0.1)
    m = dpo_metrics(cr, rr, CH, RJ, {"logits/chosen": 1.5, "logits/rejected": 2.5})
    assert m["rewards/chosen"] == pytest.approx(0.05)
    assert m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/accuracies"] == pytest.approx(0.5)  # pair 1 ties: not counted as correct
    assert m["rewards/margins"] == pytest.approx(0.1)
    assert m["logps/chosen"] == pytest.approx(-4.0) and m["logps/rejected"] == pytest.approx(-5.0)
    assert m["logits/chosen"] == 1.5 and m["logits/rejected"] == 2.5
