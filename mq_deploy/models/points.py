"""Names of the quant points and quantized weights: one definition shared by the model (the names
its act_hook sees), calibration, the quantized checkpoint's scales and the ONNX exporter."""


def mixer_prefix(layer: int) -> str:
    """`layers.{i}.mixer.`: the prefix of every point and weight of layer i's mixer."""
    return f"layers.{layer}.mixer."


def act_point(prefix: str, name: str, branch: str = "") -> str:
    """Activation quant point `name` (MambaMixer.QUANT_POINTS) of a mixer; branch "_b" is Vim's backward scan."""
    return f"{prefix}{name}{branch}"


def weight_key(prefix: str, site: str, branch: str = "") -> str:
    """The parameter name (and scales key) of a quantized weight: in_proj, conv1d, x_proj, dt_proj, out_proj."""
    return f"{prefix}{site}{branch}.weight"
