"""rlswift's DPO loss and metrics equal TRL 1.16 DPOTrainer's on one batch (tiny model, no training).

How: build a DPOTrainer (offline, report_to="none") with a policy and a *different* reference model (the policy's
weights perturbed by a seeded generator, so log-ratios are not zero), put it in eval mode and call
``trainer.compute_loss(model, collated_batch)``; TRL appends its metrics to ``trainer._metrics["eval"]``.
On the rlswift side the same rows are tokenized with ``tokenize_preference`` (TRL's recipe: eos appended to
standard-format completions, completion = tokens after the common prefix of prompt and prompt+completion) and
the test checks the token ids equal TRL's tokenized dataset before comparing numbers.
"""

import pytest
import torch

from rlswift.data.preference import tokenize_preference
from rlswift.algorithms.dpo import (
    completion_lengths,
    concatenated_batch,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
)

ROWS_STANDARD = [
    {"prompt": "What is 12 + 30?", "chosen": " The answer is 42.", "rejected": " The answer is 32."},
    {"prompt": "Compute 45 - 17.", "chosen": " Answer: 28", "rejected": " Answer: 62, 765"},
    {"prompt": "What is 10 + 21?", "chosen": " 31", "rejected": " The answer is 10 + 21 = 32."},
]
ROWS_CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }
    for r in ROWS_STANDARD
]


def _models(path):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy, ref


def _trl(path, rows, loss_type, beta, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    policy, ref = _models(path)
    args = DPOConfig(
        output_dir=str(tmp_path / f"trl-{loss_type}"),
        report_to="none",
        beta=beta,
        loss_type=[loss_type],
        per_device_train_batch_size=len(rows),
        max_length=None,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_strategy="no",
    )
    ds = Dataset.from_list(rows)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.eval()
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(
        [{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for t in tokenized]
    )
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return tok, float(loss), metrics, tokenized


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(tiny_model_dir, tmp_path, loss_type, fmt):
    rows = ROWS_STANDARD if fmt == "standard" else ROWS_CONVERSATIONAL
    if fmt == "conversational" and loss_type == "hinge":
        pytest.skip("hinge is covered in the standard format")
    beta = 0.1
    tok, trl_loss, trl_m, trl_tok = _trl(tiny_model_dir, rows, loss_type, beta, tmp_path)

    ids = [tokenize_preference(tok, r) for r in rows]
    for mine, theirs in zip(ids, trl_tok):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert mine[k] == list(theirs[k]), k
    if fmt == "standard":
        assert all(i["chosen_ids"][-1] == tok.eos_token_id for i in ids)  # TRL appends eos

    policy, ref = _models(tiny_model_dir)
    policy.eval()
    batch = concatenated_batch(
        tok, [i["prompt_ids"] for i in ids], [i["chosen_ids"] for i in ids], [i["rejected_ids"] for i in ids]
    )
    with torch.no_grad():
        ch, rj, logit_m = sequence_logps(policy, batch)
        rch, rrj, _ = sequence_logps(ref, batch)
    cl, rl = completion_lengths(batch)
    losses, cr, rr = dpo_loss(ch, rj, rch, rrj, beta=beta, loss_type=loss_type, chosen_lengths=cl, rejected_lengths=rl)
    mine = dpo_metrics(cr, rr, ch, rj, logit_m)

    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-5)
    names = [
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    ]
    for k in names:
        assert mine[k] == pytest.approx(trl_m[k], abs=1e-5), (k, mine[k], trl_m[k])
    # the logits metrics are ~1e-2 on a random tiny model: hold them to a relative tolerance as well
    for k in ("logits/chosen", "logits/rejected"):
        assert mine[k] == pytest.approx(trl_m[k], rel=1e-4, abs=1e-8), (k, mine[k], trl_m[k])
    # the policy differs from the reference, so the comparison is not the trivial log(2) case
    assert abs(mine["rewards/margins"]) > 1e-4
