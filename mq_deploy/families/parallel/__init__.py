"""Parallel blocks of hybrid models (Falcon-H1): an attention block and a Mamba2 mixer read the same
normalised input and their outputs are summed into the residual stream. Everything is the two children's,
declared once by their own families: the quant points and weight sites (the names do not collide), the
states (the Mamba2 states, then the attention's KV cache), the scale groups; see impl for the torch side."""

from mq_deploy.families import Family, register_family
from mq_deploy.families.attention import FAMILY as _ATT
from mq_deploy.families.mamba2 import FAMILY as _M2
from mq_deploy.families.parallel.config import ParallelConfig


def _union(*parts) -> tuple:
    out = []
    for part in parts:
        out += [p for p in part if p not in out]
    return tuple(out)


_clash = set(_ATT.points) & set(_M2.points) or set(_ATT.weight_sites) & set(_M2.weight_sites)
if _clash:             # the flat names below would then be ambiguous
    raise ValueError(f"attention and mamba2 share the names {sorted(_clash)}")


def _tolerances() -> dict:
    """The stricter of the children's verify defaults."""
    out = dict(_M2.tolerances)
    for k, v in _ATT.tolerances.items():
        out[k] = v if k not in out else (max(out[k], v) if k.startswith("min_") else min(out[k], v))
    return out


FAMILY = register_family(Family(
    name="parallel",
    config=ParallelConfig,
    impl="mq_deploy.families.parallel.impl",
    points=_union(_ATT.points, _M2.points),
    heavy_tailed=_union(_ATT.heavy_tailed, _M2.heavy_tailed),
    weight_sites=_union(_ATT.weight_sites, _M2.weight_sites),
    gptq_inputs={**_ATT.gptq_inputs, **_M2.gptq_inputs},
    consumers={**_ATT.consumers, **_M2.consumers},
    inspect=_union(_ATT.inspect, _M2.inspect),
    input_point=_M2.input_point,          # q/k/v's input is the same tensor
    # the mixer's state tuple: the Mamba2 states (stacked over the layers), then the per-layer KV cache
    states=lambda c: list(_M2.states(c.mamba)) + list(_ATT.states(c.attention)),
    tolerances=_tolerances(),
    scale_groups=lambda c, point: _M2.scale_groups(c.mamba, point) if point in _M2.points else 1,
    describe=lambda c: f"parallel [{_ATT.describe(c.attention)}] + [{_M2.describe(c.mamba)}]",
))

__all__ = ["FAMILY", "ParallelConfig"]
