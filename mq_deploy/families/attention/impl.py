"""The torch side of the attention block (what mq_deploy.families.Family.module() returns): its folds are
the recipes' shared ones (the residual rotation through q/k/v and o_proj, the online Hadamard before
o_proj, QuaRot's R4)."""

from mq_deploy.families.attention.export import FUSED_STEP, emit, functions
from mq_deploy.families.attention.mixer import Attention as Mixer
from mq_deploy.families.defaults import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)

__all__ = ["FUSED_STEP", "Mixer", "add_runtime_buffers", "emit", "functions", "mambaquant_fold",
           "mambaquant_observers", "quant_flags", "quarot_fold"]
