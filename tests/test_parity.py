"""scripts/parity.py on the tiny model: rlswift's DPO and GRPO learning curves equal TRL 1.16's on the same rows
(loss, margins, log-probs, grad norm, lr of each step; GRPO: TRL trains on rlswift's rollouts). A change in
rlswift's loss math, schedule or batching that TRL doesn't share fails here."""

import json
import subprocess
import sys

import pytest

from e2e import REPO, env_for

pytest.importorskip("trl")


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [("dpo", []), ("grpo", ["--no-free-run"])])
def test_parity_with_trl_on_the_same_rows(algo, extra, tmp_path, rlswift_cache):
    out = tmp_path / "parity.json"
    env = env_for(rlswift_cache, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/parity.py", algo, "--model", "tiny", "--steps", "3",
                           "--lr-scheduler", "linear", *extra, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(out.read_text())["results"][algo]
    verdicts = result["verdicts"] if algo == "dpo" else result["replay"]["verdicts"]
    names = {v["metric"] for v in verdicts}
    assert {"loss", "lr of the step"} <= names and all(v["ok"] for v in verdicts), verdicts
