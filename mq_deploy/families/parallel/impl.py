"""The torch side of the parallel block (what mq_deploy.families.Family.module() returns)."""

from mq_deploy.families.parallel.export import FUSED_STEP, emit, functions
from mq_deploy.families.parallel.folds import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)
from mq_deploy.families.parallel.mixer import ParallelMixer as Mixer

__all__ = ["FUSED_STEP", "Mixer", "add_runtime_buffers", "emit", "functions", "mambaquant_fold",
           "mambaquant_observers", "quant_flags", "quarot_fold"]
