"""Protobuf text format for Triton's `config.pbtxt`, written from plain dicts.

We write the text ourselves so `mq-deploy triton` needs no tritonclient; the tests parse every file
we generate with `google.protobuf.text_format` into tritonclient's own `ModelConfig` message.

    {"name": "m", "max_batch_size": 8, "data_type": Enum("TYPE_FP32"), "dims": [1, -1],
     "input": [{...}, {...}], "dynamic_batching": {}}
dict -> message, list of dicts -> repeated message, list of scalars -> repeated scalar, str -> string,
Enum -> enum symbol, bool -> true/false.
"""

from __future__ import annotations

import json


class Enum(str):
    """An enum value: written bare (TYPE_FP32), not quoted."""


def _scalar(v) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)      # a JSON string literal is a valid protobuf text string literal
    raise TypeError(f"pbtxt: unsupported value {v!r}")


def _lines(msg: dict, indent: int) -> list:
    pad = "  " * indent
    out = []
    for key, v in msg.items():
        if v is None:
            continue
        if isinstance(v, dict):
            if not v:
                out.append(f"{pad}{key} {{ }}")
            else:
                out += [f"{pad}{key} {{", *_lines(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, (list, tuple)):
            if v and all(isinstance(x, dict) for x in v):
                out.append(f"{pad}{key} [")
                for i, item in enumerate(v):
                    out += [f"{pad}  {{", *_lines(item, indent + 2), f"{pad}  }}" + ("," if i < len(v) - 1 else "")]
                out.append(f"{pad}]")
            elif v:
                out.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            out.append(f"{pad}{key}: {_scalar(v)}")
    return out


def dumps(config: dict) -> str:
    return "\n".join(_lines(config, 0)) + "\n"
