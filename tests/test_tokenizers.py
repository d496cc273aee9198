"""BPE tokenizers (HF `tokenizers`, trained here on KJV text) end to end: eval bits per byte against
transformers, byte LMs unchanged, the errors a user meets, streaming decode of split characters."""

import math

import numpy as np
import pytest
import torch

from mq_deploy.data.tokenizer import ByteCodec, read_tokenizer, tokenizer_for
from mq_deploy.errors import MQUserError
from mq_deploy.evaluate import EvalConfig, evaluate
from mq_deploy.models.loaders import load_model

from helpers import kjv_slices, small_lm, train_bpe

transformers = pytest.importorskip("transformers")

MULTIBYTE = "Naïve café — 日本語 text, emoji 🙂 and Ångström; "


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """An HF MambaForCausalLM folder (save_pretrained) with its own tokenizer.json beside the weights."""
    d = tmp_path_factory.mktemp("bpe_lm")
    tok = train_bpe(d / "tokenizer.json", vocab_size=400, text=kjv_slices()[0] + MULTIBYTE * 20)
    cfg = transformers.MambaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   state_size=8, eos_token_id=0)
    m = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(d)
    text = d / "heldout.txt"
    text.write_text(kjv_slices()[1][:20000] + MULTIBYTE * 5, encoding="utf-8")
    return d, m, text


def test_bits_per_byte_matches_transformers(bpe_dir):
    d, m, text = bpe_dir
    loaded = load_model(str(d))
    assert loaded.tokenizer_path == str(d / "tokenizer.json")
    res = evaluate(loaded, EvalConfig(data=str(text), seq_len=128, limit=6))
    # the reference: transformers' logits, the tokenizer's own decode for the bytes
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = tok.encode(text.read_text(encoding="utf-8")).ids
    w = np.asarray(ids[:6 * 128 + 1])
    windows = np.stack([w[k * 128:k * 128 + 129] for k in range(6)])
    t = torch.from_numpy(windows)
    with torch.no_grad():
        logits = m(t[:, :-1]).logits.double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                                            reduction="sum").item()
    nbytes = sum(len(tok.decode(list(row[1:])).encode("utf-8")) for row in windows)
    want = nll / math.log(2) / nbytes
    print(f"bits/byte ours {res['value']:.6f} transformers {want:.6f} ({res['bytes']} vs {nbytes} bytes); "
          f"perplexity {res['perplexity']:.3f}")
    assert abs(res["value"] - want) / want < 0.005
    assert res["samples"] == 6 * 128
    assert math.isclose(res["perplexity"], math.exp(nll / (6 * 128)), rel_tol=1e-6)


def test_covered_bytes_partition_the_text(tmp_path):
    tok = train_bpe(tmp_path / "t.json", vocab_size=300, text=MULTIBYTE * 30)
    codec = read_tokenizer(str(tmp_path / "t.json"))
    for text in (MULTIBYTE, " leading space", "x🙂🙂y", kjv_slices()[1][:3000]):
        ids, nb = codec.encode(text)
        assert nb.sum() == len(text.encode("utf-8")) and (nb >= 0).all()
        assert codec.decode(ids) == text
    assert tok.get_vocab_size() == codec.vocab_size


def test_byte_lm_metric_unchanged(tmp_path):
    """A vocab-256 model without a tokenizer scores bytes exactly as before (token = byte)."""
    from mq_deploy.data.text import windows
    from mq_deploy.models.io import save_model
    from mq_deploy.verify.metrics import bits_per_byte

    m = small_lm(vocab=256)
    save_model(m, tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_bytes(MULTIBYTE.encode() * 20)
    loaded = load_model(str(tmp_path / "m"))
    assert isinstance(tokenizer_for(loaded), ByteCodec)
    res = evaluate(loaded, EvalConfig(data=str(text), seq_len=64, limit=4))
    w = windows(np.frombuffer(text.read_bytes(), np.uint8), 64)[:4]
    old = bits_per_byte(loaded.model, w)     # float32 cross-entropy; eval now sums in float64
    print(f"byte LM: eval {res['value']:.8f}, the byte metric {old:.8f}")
    assert abs(res["value"] - old) / old < 1e-5
    assert res["bytes"] == res["samples"] == 4 * 64


def test_non_byte_lm_without_tokenizer_is_an_error(tmp_path, bpe_dir):
    d, m, text = bpe_dir
    m.save_pretrained(tmp_path / "bare")       # the weights without tokenizer.json (a mamba-ssm habit)
    loaded = load_model(str(tmp_path / "bare"))
    with pytest.raises(MQUserError, match="no tokenizer came with it; pass --tokenizer"):
        evaluate(loaded, EvalConfig(data=str(text), seq_len=64, limit=2))
    # --tokenizer takes the file or its folder
    for tok in (str(d / "tokenizer.json"), str(d)):
        res = evaluate(loaded, EvalConfig(data=str(text), seq_len=64, limit=2, tokenizer=tok))
        assert 0 < res["value"] < 20


def test_tokenizer_errors(tmp_path, bpe_dir):
    d, m, text = bpe_dir
    loaded = load_model(str(d))
    big = train_bpe(tmp_path / "big.json", vocab_size=600, text=kjv_slices()[0])
    assert big.get_vocab_size() > loaded.config.vocab_size
    with pytest.raises(MQUserError, match="embeds only"):
        tokenizer_for(loaded, str(tmp_path / "big.json"))
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(MQUserError, match="not a valid `tokenizers` tokenizer.json"):
        tokenizer_for(loaded, str(bad))
    with pytest.raises(MQUserError, match="no tokenizer.json in this folder"):
        tokenizer_for(loaded, str(tmp_path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    with pytest.raises(MQUserError, match="not valid UTF-8"):
        evaluate(loaded, EvalConfig(data=str(latin1), seq_len=16, limit=1))


def test_stream_decode_never_splits_a_character(tmp_path):
    train_bpe(tmp_path / "t.json", vocab_size=270, text=MULTIBYTE * 5)   # few merges: characters split over tokens
    codec = read_tokenizer(str(tmp_path / "t.json"))
    text = MULTIBYTE * 6
    ids, _ = codec.encode(text)
    assert any("\ufffd" in codec.decode([i]) for i in ids), "the test needs tokens that split a character"
    for c in (codec, ByteCodec()):
        ids_c = c.encode(text)[0]
        s = c.stream()
        pieces = [s.push(int(i)) for i in ids_c] + [s.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_export_carries_the_tokenizer_and_generate_streams_text(bpe_dir, tmp_path, capsys):
    """`generate model_step.onnx --prompt TEXT` needs nothing but the artifact: the tokenizer.json rides in
    its metadata; the printed text equals the tokenizer's decode of the new ids; EOS stops the loop."""
    import json

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.cli.main import main
    from mq_deploy.runtime.apps import generate

    d, m, text = bpe_dir
    step = tmp_path / "step.onnx"
    assert main(["export", str(d), "-o", str(step), "--decode-step"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "g.json"
    assert main(["generate", str(step), "--prompt", "And God said", "--max-new-tokens", "12",
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert res["prompt_ids"] == tok.encode("And God said").ids
    assert printed == "And God said" + tok.decode(res["new_ids"]) + "\n"
    # transformers' greedy continuation of the same prompt gives the same ids
    with torch.no_grad():
        want = m.generate(torch.tensor([res["prompt_ids"]]), max_new_tokens=len(res["new_ids"]), do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(res["prompt_ids"]):].tolist()
    assert res["new_ids"] == want[:len(res["new_ids"])]
    # EOS: the loop ends at it
    runner = OrtRunner(str(step))
    first = generate(runner, res["prompt_ids"], 5)[0]
    assert generate(runner, res["prompt_ids"], 5, eos_id=first) == [first]


def test_quantized_folder_carries_its_tokenizer_and_calibration_window(bpe_dir, tmp_path, capsys):
    """quantize --seq-len counts tokens; the quantized folder holds a copy of the tokenizer.json, so it
    still evaluates and exports when moved away from its source; the manifest records window and tokenizer."""
    import json
    import shutil

    from mq_deploy.cli.main import main

    from helpers import assert_user_error

    d, m, text = bpe_dir
    short = tmp_path / "short.txt"
    short.write_text(kjv_slices()[0][:1500], encoding="utf-8")
    from mq_deploy.data.tokenizer import encode_file

    n_tokens = len(encode_file(read_tokenizer(str(d)), str(short))[0])
    q = tmp_path / "q"
    assert main(["quantize", str(d), "-o", str(q), "--calib", str(short), "--seq-len", "64",
                 "--calib-samples", "1000"]) == 0
    err = capsys.readouterr().err
    have = (n_tokens - 1) // 64
    assert f"holds {have} windows of 64 tokens: calibrating on {have}, not 1000" in err
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["calibration"]["seq_len"] == 64 and manifest["calibration"]["samples"] == have
    assert manifest["calibration"]["tokenizer"] == str(d / "tokenizer.json")
    assert (q / "tokenizer.json").read_text(encoding="utf-8") == (d / "tokenizer.json").read_text(encoding="utf-8")
    moved = tmp_path / "elsewhere" / "q"
    shutil.copytree(q, moved)
    shutil.rmtree(q)
    want = evaluate(load_model(str(d)), EvalConfig(data=str(text), limit=2, seq_len=128))["value"]
    got = evaluate(load_model(str(moved)), EvalConfig(data=str(text), limit=2, seq_len=128))["value"]
    assert abs(got - want) / want < 0.02       # W8A8 of the same model, same tokens
    assert main(["export", str(moved), "-o", str(tmp_path / "m.onnx")]) == 0
    # too short for one window: the file and the remedy are named
    assert_user_error(capsys, ["quantize", str(d), "-o", str(tmp_path / "q2"), "--calib", str(short),
                               "--seq-len", "4096"], "lower --seq-len")
    assert not (tmp_path / "q2").exists()


def test_a_checkpoint_whose_tokenizer_is_gone_names_the_remedy(bpe_dir, tmp_path):
    """A folder written before quantize copied the tokenizer (extra.tokenizer a relative path), moved."""
    import shutil

    d, _, _ = bpe_dir
    src = tmp_path / "src"
    shutil.copytree(d, src)
    (src / "tokenizer.json").unlink()
    loaded = load_model(str(src))
    loaded.extra = {**(loaded.extra or {}), "tokenizer": "tokenizer.json"}
    with pytest.raises(MQUserError, match="pass --tokenizer"):
        tokenizer_for(loaded)
    loaded.extra = {**(loaded.extra or {}), "tokenizer": "../hf/tokenizer.json"}   # paths stay inside the folder
    with pytest.raises(MQUserError, match="lies outside the model's folder"):
        tokenizer_for(loaded)


def test_verify_reports_bits_per_byte_as_eval_does(bpe_dir, tmp_path, capsys):
    """verify scores text as eval does: bits per byte over the bytes the tokens cover (same value as eval of
    the reference, same data and windows); token ids from a .npy have no text, so it says bits per token.
    The artifact's tokenizer (what generate uses) must encode the data as the reference's does."""
    import json

    import onnx

    from mq_deploy.cli.main import main
    from mq_deploy.evaluate import lm_token_windows

    d, _, text = bpe_dir
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(d), "-o", str(onnx_path)]) == 0
    rep = tmp_path / "v.json"
    assert main(["verify", str(onnx_path), "--reference", str(d), "--data", str(text), "--seq-len", "128",
                 "--limit", "6", "--json", str(rep)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(rep.read_text())
    want = evaluate(load_model(str(d)), EvalConfig(data=str(text), seq_len=128, limit=6))
    m = r["metrics"]
    print(m, want["value"], want["bytes"])
    assert m["metric"] == "bits_per_byte" and "bits per byte" in printed
    assert m["bytes"] == want["bytes"] and abs(m["reference"] - want["value"]) <= 1e-9 * want["value"]
    assert m["bytes"] > m["samples"]           # a BPE token covers more than one byte: not bits per token
    # token ids: no text, bits per token, and the report says so
    w, _ = lm_token_windows(str(text), 128, 6, read_tokenizer(str(d / "tokenizer.json")))
    np.save(tmp_path / "ids.npy", w)
    assert main(["verify", str(onnx_path), "--reference", str(d), "--data", str(tmp_path / "ids.npy"),
                 "--json", str(rep), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(rep.read_text())
    assert r["metrics"]["metric"] == "bits_per_token" and "no text to count bytes in" in printed
    # an artifact carrying another tokenizer: generate would encode differently; verify fails that check
    other = train_bpe(tmp_path / "other.json", vocab_size=300, text=kjv_slices()[0][:50000])
    model = onnx.load(str(onnx_path))
    next(p for p in model.metadata_props if p.key == "mq.tokenizer_json").value = other.to_str()
    onnx.save(model, str(tmp_path / "other_tok.onnx"))
    assert main(["verify", str(tmp_path / "other_tok.onnx"), "--reference", str(d), "--data", str(text),
                 "--seq-len", "128", "--limit", "6", "--json", str(rep), "--overwrite"]) == 1
    r = json.loads(rep.read_text())
    assert [c["kind"] for c in r["checks"] if not c["passed"]] == ["preprocessing"]
