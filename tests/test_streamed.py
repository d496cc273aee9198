"""Layer-streamed quantize (quant.streamed) against the whole-model path: the shipped samples (Mamba1, Mamba2, the
hybrid) and transformers-written checkpoints (a sharded bf16 Nemotron-H with a tied head, a FalconMamba), every
layer-wise recipe, GPTQ, the int8 KV cache; one layer in memory at a time; what cannot stream is one line. A shard
that cannot be written (a full disk) and --resume: tests/test_resume.py.

Tolerances: the two paths run the same batches through the same layers; they differ only where a recipe's own
calibration pass reads the layers before it (whole model: rotated, not yet folded; streamed: folded too, the same
function to float32 rounding). Scales: equal to 1e-4 relative. Rounded weights: within one grid step, on at most
1e-3 of a tensor's entries (a weight on a rounding tie may round the other way, and GPTQ's error feedback carries
such a flip on to the next columns: 2e-4 of the Mamba2 sample's last out_proj under GPTQ); the bits/byte of the two checkpoints
(8 windows of 128 bytes) equal to 1e-3 relative: on these small samples the metric moves that much with
float-rounding-sized changes of the scales (every activation scale of the whole-model Mamba1 checkpoint
multiplied by 1 + 3e-7 moves its bits/byte by 1.6e-4 relative, by 1 - 3e-7 by 4.5e-4).
"""

import contextlib
import json
import os

import pytest
import torch

from mq_deploy.backends import base as backends_base
from mq_deploy.cli.main import main
from mq_deploy.models import loaders
from mq_deploy.quant.qcheckpoint import QuantizedCheckpoint

from conftest import SAMPLES
from helpers import assert_user_error, save_hf

transformers = pytest.importorskip("transformers")


def _quantize(src, out, text, *flags, stream):
    assert main(["quantize", src, "-o", out, "--calib", text, "--calib-samples", "4", "--seq-len", "128",
                 "--stream", stream, *flags]) == 0
    return out


def _same_checkpoint(a, b):
    la, lb = loaders.load_model(a), loaders.load_model(b)
    ca, cb = QuantizedCheckpoint.read(la), QuantizedCheckpoint.read(lb)
    assert ca.quant == cb.quant
    assert set(ca.act_scales) == set(cb.act_scales) and set(ca.weight_scales) == set(cb.weight_scales)
    for k in ca.act_scales:
        torch.testing.assert_close(cb.act_scales[k], ca.act_scales[k], rtol=1e-4, atol=0, msg=k)
    for k in ca.weight_scales:
        torch.testing.assert_close(cb.weight_scales[k], ca.weight_scales[k], rtol=1e-4, atol=0, msg=k)
    sa, sb = la.model.state_dict(), lb.model.state_dict()
    assert set(sa) == set(sb)
    for k, v in sa.items():
        w = sb[k]
        step = ca.weight_scales.get(k)
        if step is not None:          # a rounded weight: within one grid step, and off by one on few entries
            step = step.reshape([-1] + [1] * (v.dim() - 1))
            off = ((w - v).abs() / step).round()
            frac = float((off > 0).float().mean())
            assert off.max() <= 1 and frac <= 1e-3, (k, float(off.max()), frac)
        else:
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-6, msg=k)
    assert la.config.to_dict() == lb.config.to_dict()
    return la, lb


def _bpb(path, data):
    from mq_deploy.evaluate import EvalConfig, evaluate
    from mq_deploy.quant.qcheckpoint import load

    return evaluate(load(path), EvalConfig(data=data, seq_len=128, limit=8, progress=False))["value"]


@pytest.mark.parametrize("sample,flags", [
    ("mamba-byte-lm", ()),
    ("mamba2-byte-lm", ("--weight-rounding", "gptq")),
    ("hybrid-byte-lm", ("--wbits", "4")),
])
def test_streamed_equals_whole_model_on_the_samples(tmp_path, sample, flags):
    src = os.path.join(SAMPLES, sample)
    text = os.path.join(src, "data", "calib.txt")
    whole = _quantize(src, str(tmp_path / "whole"), text, *flags, stream="off")
    streamed = _quantize(src, str(tmp_path / "streamed"), text, *flags, stream="on")
    assert os.path.isfile(os.path.join(streamed, loaders.SHARD_INDEX))
    assert not os.path.exists(os.path.join(streamed, "model.safetensors"))
    _same_checkpoint(whole, streamed)
    data = os.path.join(src, "data", "eval.txt")
    a, b = _bpb(whole, data), _bpb(streamed, data)
    assert abs(a - b) <= 1e-3 * a, (a, b)


@pytest.mark.parametrize("recipe", ["rtn", "smoothquant", "quarot"])
def test_every_layerwise_recipe_streams(tmp_path, recipe):
    src = os.path.join(SAMPLES, "mamba-byte-lm")
    text = os.path.join(src, "data", "calib.txt")
    whole = _quantize(src, str(tmp_path / "w"), text, "--recipe", recipe, stream="off")
    streamed = _quantize(src, str(tmp_path / "s"), text, "--recipe", recipe, stream="on")
    _same_checkpoint(whole, streamed)


def _nemotron_bf16(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(vocab_size=256, hidden_size=64, expand=2, chunk_size=8, conv_kernel=4,
                                       hybrid_override_pattern="M*-M", num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
                                       ssm_state_size=16, n_groups=2, tie_word_embeddings=True)
    m = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_hf(m, str(tmp_path / "nemotron"), torch.bfloat16)[1]


def test_streamed_sharded_bf16_hybrid_with_int8_kv_cache(tmp_path, monkeypatch):
    """A transformers-written Nemotron-H (Mamba2, attention, MLP; tied head), bf16 in several shards: streamed
    equals whole, int8 KV scales included, and never more than one layer is in memory."""
    import mq_deploy.quant.streamed as streamed_mod

    src = _nemotron_bf16(tmp_path)
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1
    text = os.path.join(SAMPLES, "hybrid-byte-lm", "data", "calib.txt")
    whole = _quantize(src, str(tmp_path / "w"), text, "--kv-cache", "int8", stream="off")
    live, most = {}, [0]

    def materialize(model, name):
        module = loaders.materialize(model, name)
        if name.startswith("layers."):
            live[id(module)] = name
            most[0] = max(most[0], len(live))
        return module

    def release(module):
        live.pop(id(module), None)
        loaders.release(module)

    monkeypatch.setattr(streamed_mod, "materialize", materialize)
    monkeypatch.setattr(streamed_mod, "release", release)
    streamed = _quantize(src, str(tmp_path / "s"), text, "--kv-cache", "int8", stream="on")
    assert most[0] == 1 and not live, (most, live)
    _same_checkpoint(whole, streamed)


def test_streamed_int8_kv_cache_with_two_attention_layers(tmp_path):
    """Two attention layers with identical configs share one config object: the first one's int8 KV cache must
    not switch the second one's calibration pass to an int8 cache it has no scales for yet (the whole-model path
    calibrates every layer with the float cache)."""
    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(vocab_size=256, hidden_size=64, expand=2, chunk_size=8, conv_kernel=4,
                                       hybrid_override_pattern="M*M*", num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
                                       ssm_state_size=16, n_groups=2)
    src = save_hf(transformers.NemotronHForCausalLM(cfg).eval(), str(tmp_path / "nemotron"))[1]
    text = os.path.join(SAMPLES, "hybrid-byte-lm", "data", "calib.txt")
    whole = _quantize(src, str(tmp_path / "w"), text, "--kv-cache", "int8", stream="off")
    streamed = _quantize(src, str(tmp_path / "s"), text, "--kv-cache", "int8", stream="on")
    la, _ = _same_checkpoint(whole, streamed)
    assert [c.kv_cache for c in la.config.layer_configs() if hasattr(c, "kv_cache")] == ["int8", "int8"]


@pytest.mark.parametrize("kind", ["nemotron-bf16-sharded", "falcon-tied", "granite-muP"])
def test_ends_are_written_a_block_of_vocabulary_rows_at_a_time(tmp_path, monkeypatch, kind):
    """The embedding and head go through their transforms a block of rows at a time (quant.streamed._write_ends): with
    blocks of 24 of the 256 rows (the last one short) the checkpoint is the one a single block gives, tensor for tensor
    and scale for scale, on a bf16 sharded Nemotron-H with its own head, a FalconMamba whose tied head the recipe
    unties, and a Granite-4.0-H with an embedding multiplier (also held to the whole-model quantize); at most one block
    of each end is read from the checkpoint at a time, the statistics pass's embedding included."""
    import mq_deploy.quant.streamed as streamed_mod
    from mq_deploy.transforms import fold

    if kind == "falcon-tied":
        src, text = _falcon(tmp_path, 2)
    elif kind == "granite-muP":
        from test_hybrids import _granite

        src, text = _granite(tmp_path, "rope-muP", vocab=256)[1], os.path.join(SAMPLES, "hybrid-byte-lm", "data",
                                                                                 "calib.txt")
        assert loaders.load_model(src, lazy=True).model.cfg.embedding_multiplier == 12.0
    else:
        src, text = _nemotron_bf16(tmp_path), os.path.join(SAMPLES, "hybrid-byte-lm", "data", "calib.txt")
    assert loaders.load_model(src, lazy=True).model.cfg.tie_embeddings == (kind == "falcon-tied")
    width = 48 if kind == "falcon-tied" else 64
    monkeypatch.setattr(fold, "_ROW_BLOCK_BYTES", 8 * width * 24)     # fold's float64 blocks: 24 rows
    reads, read_rows = [], loaders.read_rows

    def recorded(model, name, start, stop):
        reads.append((name, start, stop))
        return read_rows(model, name, start, stop)

    monkeypatch.setattr(streamed_mod, "read_rows", recorded)        # the statistics pass's and the ends' reads
    whole, materialize = [], streamed_mod.materialize

    def materialize_recorded(model, name):
        whole.append(name)
        return materialize(model, name)

    monkeypatch.setattr(streamed_mod, "materialize", materialize_recorded)
    out = {}
    for blocks in (1, 1000):
        monkeypatch.setattr(streamed_mod, "ENDS_ROW_BLOCKS", blocks)
        reads.clear()
        out[blocks] = _quantize(src, str(tmp_path / f"b{blocks}"), text, stream="on")
        assert max(stop - start for _, start, stop in reads) == min(256, 24 * blocks), reads
        assert {n for n, _, _ in reads} == ({"embedding.weight"} if kind == "falcon-tied"      # (its rows, once)
                                            else {"embedding.weight", "lm_head.weight"})
        assert not {"embedding", "lm_head"} & set(whole), whole        # never read whole
    a, b = loaders.load_model(out[1]), loaders.load_model(out[1000])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and "lm_head.weight" in sa and not a.model.cfg.tie_embeddings
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ca, cb = QuantizedCheckpoint.read(a), QuantizedCheckpoint.read(b)
    assert ca.act_scales.keys() == cb.act_scales.keys() and ca.weight_scales.keys() == cb.weight_scales.keys()
    assert all(torch.equal(torch.as_tensor(ca.act_scales[k]), torch.as_tensor(cb.act_scales[k])) for k in ca.act_scales)
    assert all(torch.equal(ca.weight_scales[k], cb.weight_scales[k]) for k in ca.weight_scales)
    if kind == "granite-muP":      # the stream's first input scaled as MambaLM._embed scales it
        _same_checkpoint(_quantize(src, str(tmp_path / "whole"), text, stream="off"), out[1])


def _falcon(tmp_path, layers):
    """A small FalconMamba written by transformers (save_hf), and the calibration text: (folder, text)."""
    torch.manual_seed(0)
    m = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=256, hidden_size=48, num_hidden_layers=layers, state_size=8, expand=2, conv_kernel=4,
        time_step_rank=8)).eval()
    return save_hf(m, str(tmp_path / "falcon"))[1], os.path.join(SAMPLES, "mamba-byte-lm", "data", "calib.txt")


def test_streamed_falcon_mamba_and_auto(tmp_path):
    """A transformers FalconMamba (its own mixer norms) streams; --stream auto keeps a small model whole."""
    src, text = _falcon(tmp_path, 3)
    whole = _quantize(src, str(tmp_path / "w"), text, stream="off")
    streamed = _quantize(src, str(tmp_path / "s"), text, stream="on")
    _same_checkpoint(whole, streamed)
    auto = _quantize(src, str(tmp_path / "a"), text, stream="auto")
    assert os.path.isfile(os.path.join(auto, "model.safetensors"))


def test_what_cannot_stream_is_one_line(tmp_path, capsys):
    text = os.path.join(SAMPLES, "mamba-byte-lm", "data", "calib.txt")
    vim = os.path.join(SAMPLES, "vim-fashion-mnist")
    assert_user_error(capsys, ["quantize", vim, "-o", str(tmp_path / "v"), "--stream", "on"],
                      "--stream on", "Vision Mamba")
    torch.manual_seed(0)
    m = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"],
        num_attention_heads=2, num_key_value_heads=2, attention_head_dim=16, mamba_d_state=8, mamba_headdim=8,
        n_mamba_heads=4, mamba_ngroups=1, intermediate_size=32, use_mem_rope=False)).eval()
    z = save_hf(m, str(tmp_path / "zamba"))[1]
    assert_user_error(capsys, ["quantize", z, "-o", str(tmp_path / "z"), "--calib", text, "--stream", "on"],
                      "--stream on", "layer by layer")
    assert not os.path.exists(tmp_path / "z")


def test_streamed_export_writes_the_same_graph(tmp_path, capsys, monkeypatch):
    """export --stream on (a block at a time, tensors into MODEL.onnx.data as they are made) writes the graph
    --stream off writes, tensor for tensor; verify passes on it; a shard that vanishes mid-run is one line and
    leaves nothing behind."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    src = os.path.join(SAMPLES, "mamba2-byte-lm")
    text = os.path.join(src, "data", "calib.txt")
    q = _quantize(src, str(tmp_path / "q"), text, stream="on")
    on, off = str(tmp_path / "on.onnx"), str(tmp_path / "off.onnx")
    assert main(["export", q, "-o", on, "--stream", "on"]) == 0
    assert main(["export", q, "-o", off, "--stream", "off"]) == 0
    assert os.path.isfile(on + ".data") and not os.path.exists(off + ".data")
    a, b = onnx.load(on), onnx.load(off)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    ta = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
    assert list(a.metadata_props) == list(b.metadata_props)
    capsys.readouterr()
    reports, prepacked = {}, []
    opened = backends_base.open_runner

    def open_runner(*a, **kw):        # a streamed verify maps the artifact's weights without packed copies
        prepacked.append(kw.get("prepack", True))
        return opened(*a, **kw)

    monkeypatch.setattr(backends_base, "open_runner", open_runner)
    for mode in ("on", "off"):        # the reference read layer by layer as it runs, or held whole: the same numbers
        out = tmp_path / f"verify-{mode}.json"
        assert main(["verify", on, "--reference", q, "--data", os.path.join(src, "data", "eval.txt"), "--seq-len",
                     "128", "--limit", "4", "--stream", mode, "--json", str(out)]) == 0
        assert "PASSED" in capsys.readouterr().out
        reports[mode] = json.loads(out.read_text())
    assert prepacked == [False, True]
    # ONNX Runtime's float MatMuls round differently with and without a packed weight (measured: 1e-7 relative)
    on_, off_ = reports["on"], reports["off"]
    for name, stats in off_["outputs"].items():
        for k, v in stats.items():
            print(name, k, on_["outputs"][name][k], v)
            assert on_["outputs"][name][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, k)
    assert on_["metrics"]["reference"] == off_["metrics"]["reference"]      # the same PyTorch numbers
    assert on_["metrics"]["artifact"] == pytest.approx(off_["metrics"]["artifact"], rel=1e-6)


def test_a_shard_that_vanishes_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    """Two of the checkpoint's shards removed when the layer loop reads layer 2 in (after the statistics pass and
    two finished layers): one line naming a shard, and no partial folder is kept (it could not be resumed)."""
    import mq_deploy.quant.streamed as streamed_mod

    src = _nemotron_bf16(tmp_path)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    text = os.path.join(SAMPLES, "hybrid-byte-lm", "data", "calib.txt")
    calls = []

    def materialize(model, name):
        calls.append(name)
        if calls.count("layers.2") == 2:
            os.remove(os.path.join(src, shards[-1]))
            os.remove(os.path.join(src, shards[len(shards) // 2]))
        return loaders.materialize(model, name)

    monkeypatch.setattr(streamed_mod, "materialize", materialize)
    out = tmp_path / "q"
    assert_user_error(capsys, ["quantize", src, "-o", out, "--calib", text, "--calib-samples", "2", "--seq-len", "64",
                               "--stream", "on"], ".safetensors")
    assert calls.count("layers.2") == 2 and not out.exists() and not (tmp_path / "q.partial").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".q")], os.listdir(tmp_path)


def test_a_model_larger_than_memory_streams_and_is_refused_whole(tmp_path, capsys, monkeypatch):
    """Past this machine's memory (here: memory patched to 64 KiB) the whole-model load is one line, and the
    layer-streamed paths, which build the model on the meta device, are not refused (the falcon-mamba-7b
    scale row: `info` refused a 26 GiB model that it never allocates)."""
    from mq_deploy.models import io

    src, text = _falcon(tmp_path, 2)
    monkeypatch.setattr(io, "_memory_bytes", lambda: 1 << 16)
    monkeypatch.setattr(loaders, "STREAM_AUTO_BYTES", 1 << 10)      # `auto` streams this model
    assert main(["info", src]) == 0
    assert "parameters:" in capsys.readouterr().out
    _quantize(src, str(tmp_path / "s"), text, stream="on")
    assert_user_error(capsys, ["quantize", src, "-o", tmp_path / "w", "--calib", text, "--stream", "off"],
                      "more than this machine's")


def test_written_blocks_are_freed_before_the_next_layer(tmp_path, monkeypatch):
    """Nothing keeps a written block's float32 tensors alive once it is written: when the layer loop reads a layer
    in, every tensor of the ends' shard and of the layers before is gone (a 7B's embedding and untied head held
    2 GiB through all 64 layers)."""
    import gc
    import weakref

    import mq_deploy.quant.streamed as streamed_mod
    from mq_deploy.quant.partial import Partial

    src, text = _falcon(tmp_path, 3)
    written, alive_at = [], {}
    write, write_rows = Partial.write, Partial.write_rows

    def record(self, name, tensors, metadata=None):
        write(self, name, tensors, metadata)
        if name.startswith("model-"):
            written.extend((name, weakref.ref(v)) for v in tensors.values())

    @contextlib.contextmanager
    def record_rows(self, name, shapes, metadata=None):     # the ends' shard, a block of rows at a time
        with write_rows(self, name, shapes, metadata) as put:
            def put_recorded(k, start, rows):
                put(k, start, rows)
                written.append((name, weakref.ref(rows)))
            yield put_recorded

    def materialize(model, name):
        if name.startswith("layers.") and written:
            gc.collect()
            alive_at[name] = sorted({n for n, ref in written if ref() is not None})
        return loaders.materialize(model, name)

    monkeypatch.setattr(Partial, "write", record)
    monkeypatch.setattr(Partial, "write_rows", record_rows)
    monkeypatch.setattr(streamed_mod, "materialize", materialize)
    _quantize(src, str(tmp_path / "s"), text, stream="on")
    assert {f"layers.{i}" for i in range(3)} <= set(alive_at), alive_at      # the layer loop's reads were seen
    assert any(n == "model-00001-of-00004.safetensors" for n, _ in written), written    # the ends were seen
    assert all(not names for names in alive_at.values()), alive_at
