"""The torch side of the Mamba2 family (what mq_deploy.families.Family.module() returns)."""

from mq_deploy.families.mamba2.export import FUSED_STEP, emit, functions, fused_int8_state
from mq_deploy.families.mamba2.folds import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)
from mq_deploy.families.mamba2.mixer import Mamba2Mixer as Mixer

__all__ = ["FUSED_STEP", "Mixer", "add_runtime_buffers", "emit", "functions", "fused_int8_state", "mambaquant_fold",
           "mambaquant_observers", "quant_flags", "quarot_fold"]
