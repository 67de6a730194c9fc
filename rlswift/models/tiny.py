"""A tiny random Qwen2 model with a real BPE tokenizer and chat template, built locally in seconds.

Used by tests and `recipes/*_tiny.yaml`. The build is deterministic: the same arguments give the same weights and
tokenizer, so a cache rebuilt on another machine holds the same model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rlswift.models.cache import cache_dir
from rlswift.state.rng import forked_seed

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VERSION = "v1"  # bump when the build changes, so caches of the old build are not reused


def _corpus(n: int = 4000) -> list[str]:
    # Fixed arithmetic-flavoured text so the BPE merges cover digits and the task's words.
    lines = []
    for i in range(n):
        a, b = (i * 37) % 90 + 10, (i * 53) % 90 + 10
        lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        lines.append(f"Compute {a} - {b} and {a} * {b}. Answer: {a - b}, {a * b}")
        lines.append("system user assistant You are a helpful assistant. Think step by step.")
    return lines


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a tiny `Qwen2ForCausalLM` + fast tokenizer (chat template included) to ``out_dir`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(out)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    # Initialise under a forked, seeded CPU stream: the build must not disturb the caller's RNG state.
    with forked_seed(seed):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_model_path(cache: str | Path | None = None, seed: int = 0) -> Path:
    """The cached tiny model folder, built on first use (atomically, so parallel builders don't collide)."""
    root = Path(cache) if cache is not None else cache_dir() / "models"
    target = root / f"tiny-qwen2-{TINY_VERSION}-seed{seed}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        build_tiny_model(tmp, seed=seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
