"""Sample feeds for an mq-deploy graph (numpy only): what `build --backend onnxruntime` verifies its
output with, and what the Polygraphy data loader gives `polygraphy run`."""

from __future__ import annotations

import numpy as np

from mq_deploy.errors import MQUserError

MAX_FEED_BYTES = 1 << 30     # larger sample feeds are a typo in a shape, not a test


def sample_feeds(specs: dict, meta, shapes: dict | None = None, seed: int = 0, what: str = "the model") -> dict:
    """specs: {name: TensorSpec}; meta: the export's ArtifactMeta, or its raw mq.* metadata (validated here);
    shapes: {name: tuple} overrides (dynamic dims default to batch 2 and length 64). Token ids lie in the
    vocabulary, states are zero, images standard normal."""
    from mq_deploy.backends.base import ArtifactMeta, parse_metadata

    art = meta if isinstance(meta, ArtifactMeta) else parse_metadata(meta or {}, what)
    vocab = getattr(art.config, "vocab_size", 2)
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(specs))
    if unknown:
        raise MQUserError(f"--optShapes names {', '.join(unknown)}, not an input of {what}; inputs are "
                          f"{', '.join(specs)}")
    planned, batch = {}, 2
    for name, spec in specs.items():
        shape = shapes.get(name)
        if shape is None:
            shape = [d if isinstance(d, int) and d >= 0 else batch if d == "batch" else 64 for d in spec.shape]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(spec.shape) or any(isinstance(w, int) and w >= 0 and g != w
                                                for g, w in zip(shape, spec.shape)):
            raise MQUserError(f"--optShapes {name}:{'x'.join(map(str, shape))} does not fit the input "
                              f"{spec.describe()}")
        planned[name] = shape
        batch = shape[0] if name in ("input_ids", "images") else batch
    nbytes = sum(int(np.prod(s, dtype=np.float64)) * np.dtype(specs[n].dtype or np.float32).itemsize
                 for n, s in planned.items())
    if nbytes > MAX_FEED_BYTES:
        raise MQUserError(f"the sample feeds of --optShapes would take {nbytes / 2 ** 30:.1f} GiB (limit "
                          f"{MAX_FEED_BYTES / 2 ** 30:.0f} GiB); give smaller shapes, e.g. "
                          + ",".join(f"{n}:{'x'.join(map(str, (min(s[0], 8),) + s[1:]))}" for n, s in planned.items()))
    feeds = {}
    for name, shape in planned.items():
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(np.int64)
        elif name.endswith("_state"):
            feeds[name] = np.zeros(shape, np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(specs[name].dtype or np.float32)
    return feeds
