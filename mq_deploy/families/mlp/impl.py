"""The torch side of the MLP block (what mq_deploy.families.Family.module() returns): its folds are the
recipes' shared ones (the residual rotation through up/gate and down_proj, the online Hadamard before
down_proj)."""

from mq_deploy.families.defaults import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)
from mq_deploy.families.mlp.export import FUSED_STEP, emit, functions
from mq_deploy.families.mlp.mixer import MLP as Mixer

__all__ = ["FUSED_STEP", "Mixer", "add_runtime_buffers", "emit", "functions", "mambaquant_fold",
           "mambaquant_observers", "quant_flags", "quarot_fold"]
