"""The Runner protocol every backend implements (Polygraphy's BaseRunner, STYLE.md 13).

    runner.input_specs   {name: TensorSpec(name, dtype, shape)}; shape entries are ints (fixed) or
                         strings / None (dynamic: "batch", "seq", ...)
    runner.output_names  [name, ...]
    runner.infer(feeds)  -> {name: np.ndarray}; feeds are checked once, here, then infer_impl computes

`check_feeds` is the only place that validates names, dtypes, ranks and fixed dimensions, so a wrong
feed is one line naming the input for PyTorch, ONNX Runtime and TensorRT alike.

`parse_metadata` is the only reader of an artifact's mq.* metadata: everything in it is untrusted (a file
can be edited), so the model config goes through config.config_from_dict and every other key is type- and
value-checked; runners expose the result as `runner.artifact` (ArtifactMeta).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mq_deploy.errors import MQUserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple          # ints for fixed dims, str/None for dynamic ones

    def describe(self) -> str:
        return f"{self.name} {np.dtype(self.dtype).name}[{', '.join(str(d) for d in self.shape)}]"


THREADS_PER_CPU = 4      # --threads past this many per CPU only slows ORT / torch (100000 took minutes to start)


def max_threads() -> int:
    """The largest --threads accepted: THREADS_PER_CPU x the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return THREADS_PER_CPU * max(cpus, 1)


def check_threads(threads, flag: str = "--threads") -> int:
    """A thread count for torch or ONNX Runtime: an integer in [1, max_threads()]."""
    top = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= top:
        raise MQUserError(f"{flag} must be an integer from 1 to {top} ({THREADS_PER_CPU} per CPU of the "
                          f"{top // THREADS_PER_CPU} this process may use), got {threads!r}")
    return threads


GRAPHS = ("full", "step")
KINDS = {"lm": "mamba_lm", "vim": "vim"}          # mq.kind -> the config's architecture
TOKENIZERS = ("bytes", "tokenizers")


@dataclass(frozen=True)
class ArtifactMeta:
    """An artifact's mq.* metadata, validated (parse_metadata). All None for a file mq-deploy did not write
    (or a TensorRT engine, which carries none)."""

    kind: str | None = None                 # "lm" | "vim"
    graph: str | None = None                # "full" | "step"
    config: Any = None                      # MambaLMConfig | VimConfig (config.config_from_dict)
    quant: dict | None = None               # {"recipe": str, "wbits": int, "abits": int}
    tokenizer: str | None = None            # "bytes" | "tokenizers" (then tokenizer_json holds it)
    tokenizer_json: str | None = None
    custom_op_library: str | None = None    # build --backend onnxruntime --plugins: the library it needs
    kv_cache: str | None = None             # "sentinel": a Triton repository's copy (serve.kv_sentinel)
    state_layout: str | None = None         # "batch_first": a Triton repository's copy (serve.batch_first)


def parse_metadata(meta: dict, path: str) -> ArtifactMeta:
    """The mq.* metadata of the ONNX file `path` (as export.onnx_file.metadata decodes it) -> ArtifactMeta,
    or one line naming the file and the key whose value is invalid."""
    def bad(key, why):
        raise MQUserError(f"{path}: its ONNX metadata is invalid ({key}: {why}); was the file edited? "
                          "Export it again with `mq-deploy export`")

    def text(key, choices=None):
        v = meta.get(key)
        if v is None or v == "":
            return None
        if not isinstance(v, str):
            bad(key, f"expected a string, got {type(v).__name__}")
        if choices is not None and v not in choices:
            bad(key, f"{v[:40]!r} is not one of {', '.join(choices)}")
        return v

    from mq_deploy.config import config_from_dict

    kind = text("mq.kind", tuple(KINDS))
    graph = text("mq.graph", GRAPHS)
    cfg = meta.get("mq.config")
    config = None
    if cfg not in (None, ""):
        if not isinstance(cfg, dict):
            bad("mq.config", f"expected a JSON object, got {type(cfg).__name__}")
        try:
            config = config_from_dict(cfg)
        except MQUserError as e:
            bad("mq.config", str(e))
        except (TypeError, ValueError, OverflowError) as e:    # a value of the wrong type deep inside
            bad("mq.config", f"{type(e).__name__}: {str(e)[:200]}")
    if kind is not None and config is None:
        bad("mq.config", f"missing (mq.kind is {kind!r})")
    if config is not None and kind is not None and KINDS[kind] != config.architecture:
        bad("mq.kind", f"{kind!r} but mq.config describes a {config.architecture}")
    if graph == "step" and config is not None and config.architecture != "mamba_lm":
        bad("mq.graph", "a decode-step graph of a model that is not a language model")
    quant = meta.get("mq.quant")
    if quant in (None, ""):
        quant = None
    elif not (isinstance(quant, dict) and isinstance(quant.get("recipe"), str)
              and all(isinstance(quant.get(k), int) and not isinstance(quant.get(k), bool)
                      and 1 <= quant.get(k) <= 16 for k in ("wbits", "abits"))):
        bad("mq.quant", f"expected {{\"recipe\": str, \"wbits\": int, \"abits\": int}}, got {str(quant)[:80]}")
    tokenizer = text("mq.tokenizer", TOKENIZERS)
    tokenizer_json = text("mq.tokenizer_json")
    if tokenizer == "bytes" and config is not None and getattr(config, "vocab_size", 256) != 256:
        bad("mq.tokenizer", f"bytes, but the vocabulary has {config.vocab_size} entries")
    if tokenizer == "tokenizers" and not tokenizer_json:
        bad("mq.tokenizer", "tokenizers, but mq.tokenizer_json is missing")
    if tokenizer_json and config is not None and config.architecture != "mamba_lm":
        bad("mq.tokenizer_json", "a tokenizer in an image model")
    lib = text("mq.custom_op_library")
    kv_cache = text("mq.kv_cache", ("sentinel",))
    if kv_cache is not None and graph != "step":
        bad("mq.kv_cache", "a KV-cache layout on a graph that is not a decode step")
    state_layout = text("mq.state_layout", ("batch_first",))
    if state_layout is not None and graph != "step":
        bad("mq.state_layout", "a state layout on a graph that is not a decode step")
    return ArtifactMeta(kind=kind, graph=graph, config=config, quant=quant, tokenizer=tokenizer,
                        tokenizer_json=tokenizer_json, custom_op_library=lib, kv_cache=kv_cache,
                        state_layout=state_layout)


def expected_io(config, graph: str | None) -> dict:
    """{name: shape} of the inputs and outputs an export of `config` has (ints fixed, None dynamic): what
    runners check the graph against, so metadata and graph cannot disagree."""
    if config is None:
        return {}
    if config.architecture == "vim":
        return {"images": (None, config.in_chans, config.img_size, config.img_size),
                "logits": (None, config.num_classes)}
    from mq_deploy.families import state_inputs

    out = {"input_ids": (None, None), "logits": (None, None, config.vocab_size)}
    if graph == "step":            # the states' layout (mq_deploy.families.state_inputs)
        for si in state_inputs(config):
            dims = tuple(d if isinstance(d, int) else None for d in si.dims)
            out[si.name] = out[si.output] = dims
    return out


def _state_names(config) -> set:
    from mq_deploy.families import state_inputs

    return {si.name for si in state_inputs(config)} if config is not None and config.architecture != "vim" else set()


def check_io(artifact: ArtifactMeta, inputs: Mapping[str, tuple], outputs: Mapping[str, tuple], path: str) -> None:
    """The graph's inputs must be those its metadata implies (mq.config and mq.graph), and the fixed
    dimensions of its inputs and outputs ({name: dims}, str/None for dynamic ones) those of the config."""
    expected = expected_io(artifact.config, artifact.graph)
    if not expected:
        return
    want_inputs = {n for n in expected if n in ("input_ids", "images") or n in _state_names(artifact.config)}
    if set(inputs) != want_inputs:
        raise MQUserError(f"{path}: its metadata (mq.kind {artifact.kind}, mq.graph {artifact.graph}) and its graph "
                          f"disagree: the graph takes {', '.join(sorted(inputs))}, the metadata implies "
                          f"{', '.join(sorted(want_inputs))}; export it again")
    shapes = {**outputs, **inputs}
    for name, want in expected.items():
        got = shapes.get(name)
        if got is None:
            raise MQUserError(f"{path}: its graph has no output {name!r}, which its metadata (mq.config) implies; "
                              "export it again with `mq-deploy export`")
        fixed = [g if isinstance(g, int) and g >= 0 else None for g in got]
        if len(fixed) != len(want) or any(w is not None and g is not None and g != w for g, w in zip(fixed, want)):
            raise MQUserError(f"{path}: its metadata (mq.config) and its graph disagree: {name} is "
                              f"{[g if g is not None else '?' for g in fixed]} in the graph, "
                              f"{[w if w is not None else '?' for w in want]} by the config; export it again")


class Runner:
    """Base: subclasses set `name`, `input_specs`, `output_names` and implement `infer_impl`; `meta` (the
    raw mq.* metadata, {} when none) and `artifact` (the same, validated) where the format carries it."""

    name = "runner"
    input_specs: dict
    output_names: list
    meta: dict = {}
    artifact: ArtifactMeta = ArtifactMeta()

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict:
        specs = self.input_specs
        unknown = sorted(set(feeds) - set(specs))
        missing = sorted(set(specs) - set(feeds))
        if unknown or missing:
            parts = [f"missing {', '.join(missing)}"] if missing else []
            parts += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise MQUserError(f"{self.name}: inputs are {', '.join(sorted(specs))}; " + "; ".join(parts))
        out = {}
        named = {}      # a named dimension ('batch', a cache's 'past') is one size across every input
        for name, value in feeds.items():
            spec = specs[name]
            arr = np.asarray(value)
            if spec.dtype is not None and arr.dtype != np.dtype(spec.dtype):
                raise MQUserError(f"{self.name}: input {name} must be {np.dtype(spec.dtype).name}, "
                                  f"got {arr.dtype.name}")
            if arr.ndim != len(spec.shape):
                raise MQUserError(f"{self.name}: input {name} must have rank {len(spec.shape)} "
                                  f"{list(spec.shape)}, got shape {list(arr.shape)}")
            for dim, (got, want) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise MQUserError(f"{self.name}: input {name} dimension {dim} must be {want} "
                                      f"({list(spec.shape)}), got shape {list(arr.shape)}")
                if isinstance(want, str) and want:
                    first = named.setdefault(want, (got, name))
                    if first[0] != got:
                        raise MQUserError(f"{self.name}: dimension '{want}' is {first[0]} in input {first[1]} but "
                                          f"{got} in input {name} (shape {list(arr.shape)}); every input must agree")
            out[name] = np.ascontiguousarray(arr)
        return out

    def infer(self, feeds: Mapping[str, np.ndarray], check_inputs: bool = True) -> dict:
        return self.infer_impl(self.check_feeds(feeds) if check_inputs else dict(feeds))

    def infer_impl(self, feeds: dict) -> dict:
        raise NotImplementedError


def open_runner(path: str, custom_op_library: str | None = None, plugins=(), threads: int | None = None,
                prepack: bool = True) -> Runner:
    """OrtRunner for an ONNX file, TensorRTRunner for an engine (.engine / .plan / .trt). prepack=False (ONNX
    Runtime): no packed copy of each weight beside the memory-mapped original (see OrtRunner)."""
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    if path.endswith(ENGINE_SUFFIXES):
        from mq_deploy.backends.trt.runner import TensorRTRunner

        return TensorRTRunner(path, plugins=plugins)
    from mq_deploy.backends.ort.runner import OrtRunner

    return OrtRunner(path, custom_op_library=custom_op_library, threads=threads, prepack=prepack)
