"""Zyphra's Zamba2 (transformers' Zamba2ForCausalLM, model_type zamba2): a Mamba2 stack in which, at the
`hybrid` layers, one of num_mem_blocks shared transformer blocks (attention over [h, embeddings], then a gated
MLP) is applied, with per-depth LoRA adapters and a per-depth linear whose output joins the Mamba2 input.

Every layer of such a model is one block of this family (a plain Mamba2 layer is one without the shared
block), so the Mamba2 states of every layer stack into one conv_state and one ssm_state; each application of
a shared block is an attention layer with its own KV cache. Since each application has its own adapters,
the loader merges W_shared + B_i A_i into per-depth weights (exact): our model holds a copy of the shared
block per application (the file grows by that; each depth is then quantized on its own). Quant points and
weight sites are the children's, with flat names (they do not collide), plus `linear`."""

from mq_deploy.families import CheckpointFormat, Family, register_family
from mq_deploy.families.attention import FAMILY as _ATT
from mq_deploy.families.mamba2 import FAMILY as _M2
from mq_deploy.families.mlp import FAMILY as _MLP
from mq_deploy.families.zamba2.config import Zamba2LayerConfig

_LINEAR = "linear"       # the per-depth linear after the shared block: its input point and its weight site


def _union(*parts) -> tuple:
    out = []
    for part in parts:
        out += [p for p in part if p not in out]
    return tuple(out)


_names = [set(f.points) for f in (_ATT, _MLP, _M2)] + [{_LINEAR}]
_sites = [set(f.weight_sites) for f in (_ATT, _MLP, _M2)] + [{_LINEAR}]
if sum(map(len, _names)) != len(set().union(*_names)) or sum(map(len, _sites)) != len(set().union(*_sites)):
    raise ValueError("attention, mlp and mamba2 share point or site names: zamba2's flat names would be ambiguous")


def _tolerances() -> dict:
    """The strictest of the children's verify defaults."""
    out = dict(_M2.tolerances)
    for fam in (_ATT, _MLP):
        for k, v in fam.tolerances.items():
            out[k] = v if k not in out else (max(out[k], v) if k.startswith("min_") else min(out[k], v))
    return out


def _describe(c) -> str:
    m = _M2.describe(c.mamba)
    if not c.shared:
        return f"zamba2 [{m}]"
    return f"zamba2 [shared {_ATT.describe(c.attention)}; {_MLP.describe(c.mlp)}] + [{m}]"


FAMILY = register_family(Family(
    name="zamba2",
    config=Zamba2LayerConfig,
    impl="mq_deploy.families.zamba2.impl",
    points=_union(_ATT.points, _MLP.points, (_LINEAR,), _M2.points),
    heavy_tailed=_union(_ATT.heavy_tailed, _MLP.heavy_tailed, _M2.heavy_tailed),
    weight_sites=_union(_ATT.weight_sites, _MLP.weight_sites, (_LINEAR,), _M2.weight_sites),
    gptq_inputs={**_ATT.gptq_inputs, **_MLP.gptq_inputs, _LINEAR: _LINEAR, **_M2.gptq_inputs},
    consumers={**_ATT.consumers, **_MLP.consumers, _LINEAR: _LINEAR, **_M2.consumers},
    inspect=_M2.inspect,                  # every layer has them (a plain layer has no q/k/v to plot)
    input_point=_M2.input_point,          # the block norm's output: the Mamba2 input (on the residual stream)
    # the layer's state tuple: the Mamba2 states (stacked over every layer), then the shared block's KV cache
    states=lambda c: list(_M2.states(c.mamba)) + (list(_ATT.states(c.attention)) if c.shared else []),
    tolerances=_tolerances(),
    scale_groups=lambda c, point: _M2.scale_groups(c.mamba, point) if point in _M2.points else 1,
    describe=_describe,
    formats=(CheckpointFormat("hf-zamba2", "zamba2", "mq_deploy.families.zamba2.checkpoints:load_hf",
                              hf_model_types=("zamba2",), hf_architectures=("Zamba2ForCausalLM",),
                              not_streamable="its shared attention blocks are read into every depth that uses "
                                             "them"),),
))

__all__ = ["FAMILY", "Zamba2LayerConfig"]
