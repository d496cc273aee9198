"""The torch side of the MoE block (what mq_deploy.families.Family.module() returns)."""

from mq_deploy.families.moe.export import FUSED_STEP, emit, functions
from mq_deploy.families.moe.folds import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)
from mq_deploy.families.moe.mixer import MoE as Mixer

__all__ = ["FUSED_STEP", "Mixer", "add_runtime_buffers", "emit", "functions", "mambaquant_fold",
           "mambaquant_observers", "quant_flags", "quarot_fold"]
