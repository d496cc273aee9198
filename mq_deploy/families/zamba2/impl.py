"""The torch side of the Zamba2 family (what mq_deploy.families.Family.module() returns); `Block` is the
layer MambaLM builds for it (mixer.py)."""

from mq_deploy.families.zamba2.export import FUSED_STEP, emit, emit_block, functions
from mq_deploy.families.zamba2.folds import (
    add_runtime_buffers,
    mambaquant_fold,
    mambaquant_observers,
    quant_flags,
    quarot_fold,
)
from mq_deploy.families.zamba2.mixer import Zamba2Block as Block
from mq_deploy.families.zamba2.mixer import Zamba2Mixer as Mixer

__all__ = ["FUSED_STEP", "Block", "Mixer", "add_runtime_buffers", "emit", "emit_block", "functions",
           "mambaquant_fold", "mambaquant_observers", "quant_flags", "quarot_fold"]
