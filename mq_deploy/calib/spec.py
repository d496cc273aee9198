"""Which observer calibrates which activation quant point: the `--observer` syntax.

A spec is a comma-separated list. An item without `=` sets the default for every point; `POINT=KIND`
overrides it at one point of every layer. Points are the mixer families' quant points (Mamba1: in_proj,
conv1d, x, dt_low, dt, B, C, z, out_proj; mq_deploy.families); `x` also covers the Vim's backward branch
`x_b`, which `x_b=...` overrides alone; `heavy` names the heavy-tailed points each family declares (Mamba1:
the scan inputs x, dt, B, C and out_proj's input, both branches). Later items win over earlier ones at
the same specificity.

    minmax                                 min-max everywhere
    minmax,heavy=percentile:99.9999        MambaQuant's own observers (see PERCENTILE_DEFAULT)
    mse,out_proj=entropy,dt_b=minmax

Kinds: `minmax`; `percentile[:P]` (P in [90, 100]; without P the recipe's --percentile);
`mse` (clip ratio minimising the quantization MSE of the tensor); `mse-out` (clip ratio minimising the
MSE of the consumer's output: the next linear, or the depthwise conv; points whose only consumer is
the scan fall back to `mse`); `entropy` (TensorRT's KL-divergence calibrator).

Torch-free, so the CLI can validate a spec before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from mq_deploy.errors import MQUserError
from mq_deploy.families import all_points, heavy_tailed_points

KINDS = ("minmax", "percentile", "mse", "mse-out", "entropy")

# MambaQuant's own calibration clips activations at the 99.9999th percentile of |x| (MambaQuant/MambaQuant,
# quantize/quantizer.py). Quamba uses 99.999-99.9995 on the SSM input.
PERCENTILE_DEFAULT = 99.9999


@dataclass(frozen=True)
class ObserverChoice:
    kind: str
    percentile: float | None = None     # percentile kind only; None: the recipe's --percentile

    def __str__(self):
        return self.kind if self.percentile is None else f"{self.kind}:{self.percentile:g}"


def _parse_choice(text: str, spec: str) -> ObserverChoice:
    kind, _, param = text.strip().partition(":")
    if kind not in KINDS:
        raise MQUserError(f"--observer {spec!r}: unknown observer {kind!r} (choose from {', '.join(KINDS)})")
    if not param:
        return ObserverChoice(kind)
    if kind != "percentile":
        raise MQUserError(f"--observer {spec!r}: {kind} takes no parameter (only percentile:P does)")
    try:
        p = float(param)
    except ValueError:
        raise MQUserError(f"--observer {spec!r}: percentile {param!r} is not a number") from None
    if not 90.0 <= p <= 100.0:
        raise MQUserError(f"--observer {spec!r}: percentile must be in [90, 100], got {p:g}")
    return ObserverChoice(kind, p)


@dataclass(frozen=True)
class ObserverSpec:
    default: ObserverChoice
    overrides: tuple = ()               # ((point, ObserverChoice), ...) in the order given

    @classmethod
    def parse(cls, text: str) -> "ObserverSpec":
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise MQUserError("--observer: empty spec (e.g. minmax, or minmax,heavy=percentile:99.9999)")
        default, overrides = None, []
        for item in items:
            point, eq, choice = item.partition("=")
            if not eq:
                default = _parse_choice(item, text)
                continue
            point = point.strip()
            base = point[:-2] if point.endswith("_b") else point
            points = all_points()
            if point != "heavy" and base not in points:
                raise MQUserError(f"--observer {text!r}: unknown quant point {point!r} (choose from "
                                  f"{', '.join(points)}, their _b twins, or heavy)")
            overrides.append((point, _parse_choice(choice, text)))
        return cls(default or ObserverChoice("minmax"), tuple(overrides))

    def choice_for(self, point: str) -> ObserverChoice:
        """The observer of one point ("x", "x_b", "out_proj", ...): exact name > base name > heavy > default."""
        base = point[:-2] if point.endswith("_b") else point
        heavy = base in heavy_tailed_points()
        rank, best = 0, self.default
        for name, choice in self.overrides:
            r = 3 if name == point else 2 if name == base else 1 if name == "heavy" and heavy else 0
            if r and r >= rank:
                rank, best = r, choice
        return best

    def kinds(self) -> set:
        return {self.default.kind} | {c.kind for _, c in self.overrides}

    def __str__(self):
        return ",".join([str(self.default)] + [f"{p}={c}" for p, c in self.overrides])


__all__ = ["KINDS", "PERCENTILE_DEFAULT", "ObserverChoice", "ObserverSpec"]
