"""The lm-eval model "mq-deploy" on a local multiple-choice task built from held-out KJV text (hub
datasets are unreachable here): log-likelihoods equal transformers' (<= 1e-4 relative: float32
forward in a different summation order), the exported ONNX scores the same, and lm-eval's own
`simple_evaluate` gives the same accuracy with our model as with its HF model on the same weights."""

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers import kjv_slices, train_bpe

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")    # the task's data is a local JSON file; no hub here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from mq_deploy.lm_eval_adapter import MQDeployLM  # noqa: E402  (registers "mq-deploy")


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    (d / "hf").mkdir()
    tok = train_bpe(d / "hf" / "tokenizer.json", vocab_size=350)
    cfg = transformers.MambaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   state_size=8, eos_token_id=0)
    m = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(d / "hf")
    # the task: a verse's first half, which of 4 second halves (the true one, 3 from other verses)
    lines = [ln.strip() for ln in kjv_slices()[1].splitlines() if len(ln.split()) >= 10][:8]
    rng = np.random.default_rng(0)
    docs = []
    for i, ln in enumerate(lines):
        words = ln.split()
        half = len(words) // 2
        others = [j for j in rng.permutation(len(lines)) if j != i][:3]
        choices = [" ".join(words[half:])] + [" ".join(lines[j].split()[len(lines[j].split()) // 2:])
                                              for j in others]
        order = rng.permutation(4)
        docs.append({"context": " ".join(words[:half]), "choices": [choices[k] for k in order],
                     "label": int(np.where(order == 0)[0][0])})
    data = d / "kjv_mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "kjv_mc.yaml").write_text(f"""task: kjv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    return d, m, docs, tasks


def _reference_loglik(m, tok, context, continuation):
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(m(ids).logits.double()[0, :-1], -1)
    cont = whole[len(ctx):]
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


def test_loglikelihood_matches_transformers_and_onnx(setup, tmp_path):
    from tokenizers import Tokenizer

    from mq_deploy.export.exporter import export

    d, m, docs, _ = setup
    tok = Tokenizer.from_file(str(d / "hf" / "tokenizer.json"))
    ours = MQDeployLM(path=str(d / "hf"))
    reqs = [Req(doc["context"], " " + c) for doc in docs[:4] for c in doc["choices"]]
    got = ours.loglikelihood(reqs)
    want = [_reference_loglik(m, tok, r.args[0], r.args[1]) for r in reqs]
    err = max(abs(g - w) / abs(w) for (g, _), w in zip(got, want))
    print(f"loglikelihood rel err vs transformers {err:.2e}")
    assert err <= 1e-4
    onnx_path = tmp_path / "m.onnx"
    export(str(d / "hf"), str(onnx_path))
    via_onnx = MQDeployLM(path=str(onnx_path))    # the tokenizer travels inside the artifact
    got_onnx = via_onnx.loglikelihood(reqs)
    err = max(abs(g - w) / abs(w) for (g, _), (w, _) in zip(got_onnx, got))
    print(f"ONNX artifact vs PyTorch rel err {err:.2e}")
    assert err <= 1e-4
    # rolling log-likelihood of a text = the sum over its tokens, whatever max_length cuts it into
    text = kjv_slices()[1][:600]
    short = MQDeployLM(path=str(d / "hf"), max_length=32).loglikelihood_rolling([Req(text)])[0]
    whole = ours.loglikelihood_rolling([Req(text)])[0]
    print(f"rolling loglik: max_length 32 {short:.3f}, 2048 {whole:.3f}")
    assert whole < 0 and abs(short - whole) / abs(whole) < 0.2
    # a continuation longer than max_length is scored whole, after one token of context (not an IndexError)
    ctx = next(w for w in ("And", "The", "I", "A", "a", "t") if len(tok.encode(w).ids) == 1)
    cont = " the beginning God created the heaven and the earth."
    assert len(tok.encode(cont).ids) > 8
    long_cont = MQDeployLM(path=str(d / "hf"), max_length=8).loglikelihood([Req(ctx, cont)])[0][0]
    assert abs(long_cont - _reference_loglik(m, tok, ctx, cont)) <= 1e-4 * abs(long_cont)
    out = ours.generate_until([Req("And God said", {"until": ["\n"], "max_gen_toks": 8})])[0]
    assert isinstance(out, str) and "\n" not in out


def test_simple_evaluate_on_a_local_json_task(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d, m, docs, tasks = setup
    tm = TaskManager(include_path=str(tasks), include_defaults=False)   # (indexing the built-in tasks takes minutes)
    ours = simple_evaluate(model="mq-deploy", model_args=f"path={d / 'hf'}", tasks=["kjv_mc"], task_manager=tm)
    acc = ours["results"]["kjv_mc"]["acc,none"]
    # the same accuracy from our log-likelihoods, choice by choice (lm-eval puts " " between the two)
    lm = MQDeployLM(path=str(d / "hf"))
    correct = [int(np.argmax([lm.loglikelihood([Req(doc["context"], " " + c)])[0][0] for c in doc["choices"]])
                   == doc["label"]) for doc in docs]
    # and from lm-eval's own HF model on the same weights and tokenizer
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "hf" / "tokenizer.json"),
                                                eos_token="<|endoftext|>")
    theirs = simple_evaluate(model=HFLM(pretrained=m, tokenizer=fast, batch_size=1), tasks=["kjv_mc"],
                             task_manager=tm)["results"]["kjv_mc"]["acc,none"]
    print(f"acc: mq-deploy {acc:.4f}, by hand {np.mean(correct):.4f}, lm-eval HF model {theirs:.4f}")
    assert math.isclose(acc, np.mean(correct)) and math.isclose(acc, theirs)


def _family_model(kind, vocab):
    torch.manual_seed(0)
    if kind == "mamba2":
        cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, expand=2, num_heads=8,
                                        head_dim=16, state_size=16, n_groups=2, chunk_size=8, eos_token_id=0)
        m = transformers.Mamba2ForCausalLM(cfg)
    else:   # a Nemotron-H hybrid: Mamba2, MLP and attention with a KV cache
        cfg = transformers.NemotronHConfig(vocab_size=vocab, hidden_size=64, expand=2, chunk_size=8, conv_kernel=4,
                                           hybrid_override_pattern="M-M*", num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                           mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
                                           eos_token_id=0)
        m = transformers.NemotronHForCausalLM(cfg)
    m = m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("kind", ["mamba2", "nemotron_h"])
def test_mamba2_and_hybrid_loglikelihoods_match_transformers_and_onnx(setup, tmp_path, kind):
    """The adapter on a Mamba2 and a hybrid folder written by transformers, and on their ONNX exports."""
    from tokenizers import Tokenizer

    from mq_deploy.export.exporter import export

    d, _, docs, _ = setup
    tok = Tokenizer.from_file(str(d / "hf" / "tokenizer.json"))
    m = _family_model(kind, tok.get_vocab_size())
    path = tmp_path / kind
    m.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    reqs = [Req(doc["context"], " " + c) for doc in docs[:2] for c in doc["choices"]]
    got = MQDeployLM(path=str(path)).loglikelihood(reqs)
    want = [_reference_loglik(m, tok, r.args[0], r.args[1]) for r in reqs]
    err = max(abs(g - w) / abs(w) for (g, _), w in zip(got, want))
    print(f"{kind}: loglikelihood rel err vs transformers {err:.2e}")
    assert err <= 1e-4
    onnx_path = tmp_path / f"{kind}.onnx"
    export(str(path), str(onnx_path))
    got_onnx = MQDeployLM(path=str(onnx_path)).loglikelihood(reqs)
    err = max(abs(g - w) / abs(w) for (g, _), (w, _) in zip(got_onnx, got))
    print(f"{kind}: ONNX artifact vs PyTorch rel err {err:.2e}")
    assert err <= 1e-4
