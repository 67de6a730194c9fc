"""Helpers for end-to-end tests: run the real CLI in fresh processes and compare runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def env_for(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RLSWIFT_CACHE=str(cache), PYTHONPATH=f"{TESTS}{os.pathsep}{env.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_cli(args: list[str], cache: Path, fault: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python <args>`` in a fresh process (cwd = repo), output captured."""
    extra = {"RLSWIFT_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env_for(cache, **extra), capture_output=True,
                          text=True, timeout=timeout)


def compare_runs(ref: Path, res: Path, steps: int) -> None:
    """Assert trajectories, metrics and the final state of every hook are identical."""
    from rlswift.verify import _compare_final_state, _first_jsonl_divergence

    checks = [
        _first_jsonl_divergence(ref / "trajectories.jsonl", res / "trajectories.jsonl", "trajectories"),
        _first_jsonl_divergence(ref / "metrics.jsonl", res / "metrics.jsonl", "metrics"),
        _compare_final_state(ref / f"checkpoint-{steps}", res / f"checkpoint-{steps}"),
    ]
    bad = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not bad, "resume diverged:\n" + "\n".join(bad)
