"""The shipped samples' artifacts stay byte-identical across refactors (issue 18: the model-family
registry must not change what Mamba1 / Vim export).

tests/golden/sample_artifacts.json holds the sha256 of every file `quantize` and `export` write for
the two samples, made by `python tests/test_artifacts_stable.py` at the commit named in it. Quantized
weights depend on torch's version and thread count (the manifest's depends_on) and on the CPU (cpu()),
so the comparison runs only where those match the golden's; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "sample_artifacts.json")
LM = os.path.join(ROOT, "samples", "mamba-byte-lm")
VIM = os.path.join(ROOT, "samples", "vim-fashion-mnist")
# what the hashed files are made of: the bytes written, not when or where (the manifest's time and
# paths, and the folder marker, vary by run)
QUANTIZED_FILES = ("model.safetensors", "scales.safetensors", "config.json")

JOBS = {   # name: (sample, quantize flags or None for the float model, export flags)
    "lm-w8a8": (LM, [], []),
    "lm-w8a8-step": (LM, [], ["--decode-step"]),
    "lm-w4a8": (LM, ["--wbits", "4"], []),
    "lm-fp32-step": (LM, None, ["--decode-step"]),
    "vim-w8a8": (VIM, [], []),
}


def _sha(path: str, source: str | None = None) -> str:
    """sha256 of a file; a quantized config.json's extra.source (the source model's path relative to the
    output, which depends on where both lie) is first replaced by `source`, the golden run's."""
    with open(path, "rb") as f:
        data = f.read()
    if source is not None:
        own = json.loads(data).get("extra", {}).get("source")
        data = data.replace(json.dumps(own).encode(), json.dumps(source).encode())
    return hashlib.sha256(data).hexdigest()


def _source(path: str) -> str:
    with open(path) as f:
        return json.load(f)["extra"]["source"]


def cpu() -> str:
    """The CPU's vendor, family and model (/proc/cpuinfo): torch picks its float kernels by the CPU (its vector ISA,
    torch.backends.cpu.get_cpu_capability(), among others), and the results move with them (seen: the Vim sample's
    quantized weights and export differ between an earlier machine's AVX2-only EPYC and an AVX-512 one of family 26,
    same torch and threads; the LM samples' do not)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        return "unknown"
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def environment() -> dict:
    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu()}


def artifact_hashes(work: str, sources: dict | None = None) -> tuple:
    """({artifact: sha256}, {quantized job: its config's extra.source}); `sources` (the golden's) replaces
    each config's own source path before hashing."""
    from mq_deploy.cli.main import main

    out, quantized, seen = {}, {}, {}
    for name, (sample, qflags, eflags) in JOBS.items():
        src = sample
        if qflags is not None:
            key = (sample, tuple(qflags))
            if key not in quantized:
                qdir = os.path.join(work, f"q{len(quantized)}")
                assert main(["quantize", sample, "-o", qdir, *qflags]) == 0
                quantized[key] = qdir
                seen[name] = _source(os.path.join(qdir, "config.json"))
                for f in QUANTIZED_FILES:
                    src = (sources or {}).get(name) if f == "config.json" else None
                    out[f"{name}/{f}"] = _sha(os.path.join(qdir, f), src)
            src = quantized[key]
        onnx_path = os.path.join(work, f"{name}.onnx")
        assert main(["export", src, "-o", onnx_path, *eflags]) == 0
        out[f"{name}/model.onnx"] = _sha(onnx_path)
    return out, seen


def test_sample_artifacts_are_byte_identical(tmp_path):
    with open(GOLDEN) as f:
        golden = json.load(f)
    env = environment()
    if env != golden["environment"]:
        pytest.skip(f"golden hashes were made with {golden['environment']}, this run has {env}")
    got, _ = artifact_hashes(str(tmp_path), golden["sources"])
    diff = {k: (golden["sha256"].get(k), v) for k, v in got.items() if golden["sha256"].get(k) != v}
    print(json.dumps(diff, indent=1))
    assert set(got) == set(golden["sha256"])
    assert not diff, f"{len(diff)} artifacts changed since {golden['commit']}: {sorted(diff)}"


if __name__ == "__main__":      # regenerate the golden file (only when an artifact is meant to change)
    import subprocess
    import tempfile

    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as d:
        hashes, sources = artifact_hashes(d)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump({"commit": commit, "environment": environment(), "sha256": hashes, "sources": sources}, f, indent=1,
                  sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN}: {len(hashes)} hashes at {commit}")
