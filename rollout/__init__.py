"""rollout: generation engines for RL post-training (vLLM in-process, transformers, remote over HTTP + gloo/NCCL).

Never imports rlswift. Engines import their heavy dependencies lazily, so ``import rollout`` is cheap.
"""

from rollout.engine import RolloutEngine, WeightValidator, make_engine
from rollout.seeds import sample_seed
from rollout.types import Request, Rollout, SamplingSpec

__all__ = ["Request", "Rollout", "RolloutEngine", "SamplingSpec", "WeightValidator", "make_engine", "sample_seed"]
