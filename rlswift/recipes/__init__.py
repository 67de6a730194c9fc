"""Recipes: `python -m rlswift.recipes.grpo` and `python -m rlswift.recipes.dpo`.

Importing this package happens before a recipe imports torch, so OpenMP's wait policy is chosen here: on a machine
that is already busy (1-minute load average >= the cores this process may use), idle OpenMP threads sleep instead of
spinning, so they don't steal the cores that do the work. Measured with scripts/bench_threads.py on 2 cores: beside
two CPU-bound processes a forward+backward took 0.94x the time (best run 0.80x) with the passive policy; alone,
passive was 1.05x, hence only when busy. The policy changes scheduling, never results (same gradients, checked).
Set OMP_WAIT_POLICY yourself to override.
"""

import os

try:
    if os.getloadavg()[0] >= (len(os.sched_getaffinity(0)) or 1):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
except (OSError, AttributeError):  # no load average or affinity on this platform: keep OpenMP's default
    pass
