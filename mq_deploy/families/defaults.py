"""The recipe and checkpoint hooks of a family that adds nothing to the recipes' shared transforms (the
residual rotation through its readers and writers, the online Hadamard before its output linear)."""


def quarot_fold(mixer) -> None:
    """Nothing beyond the shared residual rotation and online Hadamard."""


def mambaquant_observers(point: str) -> list:
    return []


def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
    """Nothing beyond the shared KLT·H residual rotation and online Hadamard."""


def quant_flags(mixer) -> dict:
    return {}


def add_runtime_buffers(mixer, quant: dict) -> None:
    """No buffers beyond the parameters."""
