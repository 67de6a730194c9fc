import os
from pathlib import Path

import pytest

# Tests never download: keep every hub client offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 model folder (config, safetensors, tokenizer with chat template), built once per session."""
    from rlswift.models import tiny_model_path

    cache = os.environ.get("RLSWIFT_TEST_MODEL_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return tiny_model_path(root)


@pytest.fixture(scope="session")
def rlswift_cache(tmp_path_factory) -> Path:
    """An RLSWIFT_CACHE folder for subprocess runs, with the tiny model already built in it."""
    from rlswift.models import tiny_model_path

    root = tmp_path_factory.mktemp("rlswift-cache")
    tiny_model_path(root / "models")
    return root
