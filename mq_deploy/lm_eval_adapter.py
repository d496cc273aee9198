"""An lm-evaluation-harness model ("mq-deploy") that scores what you deploy: the fake-quantized PyTorch
model of a quantized checkpoint (or any checkpoint mq-deploy loads), or the exported ONNX artifact in
ONNX Runtime. lm-eval is an optional extra: `pip install "mq-deploy[lm-eval]"`.

    lm_eval --model mq-deploy --model_args path=QDIR --tasks lambada_openai,hellaswag,piqa,arc_easy,\\
        arc_challenge,winogrande --include_path mq_deploy/lm_eval_tasks   # (any task folder of yours)
    lm_eval --model mq-deploy --model_args path=model.onnx,max_length=2048 --tasks ...

`import mq_deploy.lm_eval_adapter` registers the model (the `lm_eval` command needs it imported: run
`python -m mq_deploy.lm_eval_adapter ...`, which is the lm_eval CLI with this model registered).

Text is encoded with the model's own tokenizer (the checkpoint's tokenizer.json, the artifact's
metadata, or `tokenizer=FILE_OR_DIR`); context/continuation pairs are split as lm-eval's HF model
does (trailing context spaces move to the continuation, the pair is encoded whole and split at the
context's length; an empty context is the EOS token).
"""

from __future__ import annotations

import numpy as np

from mq_deploy.errors import MQUserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:      # lm-eval not installed: the module still imports; MQDeployLM explains the install
    LM = object

    def register_model(*_names):
        return lambda cls: cls


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _int_arg(name: str, value, lo: int) -> int:
    """A model_args integer (lm-eval passes strings or numbers): one line when it is not one >= lo."""
    try:
        v = int(str(value).strip())
    except ValueError:
        raise MQUserError(f"model_args {name} must be an integer, got {value!r}") from None
    if v < lo:
        raise MQUserError(f"model_args {name} must be at least {lo}, got {v}")
    return v


@register_model("mq-deploy", "mq_deploy")
class MQDeployLM(LM):
    """path: a checkpoint folder (quantized ones run with fake quantization) or an exported .onnx
    (the full graph: input_ids -> logits). max_length: the longest window scored in one call."""

    def __init__(self, path: str, tokenizer: str | None = None, max_length: int = 2048, batch_size: int = 1,
                 threads: int | None = None, custom_op_lib: str | None = None, **_ignored):
        if LM is object:
            raise MQUserError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval")
        super().__init__()
        self.path, self.max_length = path, _int_arg("max_length", max_length, 2)
        threads = None if threads is None else _int_arg("threads", threads, 1)
        if str(path).endswith(".onnx"):
            from mq_deploy.backends.ort.runner import OrtRunner
            from mq_deploy.data.tokenizer import tokenizer_for_artifact

            runner = OrtRunner(path, custom_op_library=custom_op_lib, threads=threads)
            if runner.artifact.kind != "lm":
                raise MQUserError(f"{path}: not an exported language model")
            if "conv_state" in runner.input_specs:
                raise MQUserError(f"{path}: a decode-step graph; lm-eval scores the full graph (export without "
                                  "--decode-step)")
            self.codec = tokenizer_for_artifact(runner.artifact, tokenizer, path)
            if self.codec is None:
                raise MQUserError(f"{path}: no tokenizer came with the artifact; pass tokenizer=FILE_OR_DIR")
            self.vocab_size = runner.artifact.config.vocab_size
            self._forward = lambda ids: runner.infer({"input_ids": ids})["logits"]
        else:
            import torch

            from mq_deploy.data.tokenizer import tokenizer_for
            from mq_deploy.quant.qcheckpoint import load

            if threads:
                from mq_deploy.backends.base import check_threads

                torch.set_num_threads(check_threads(threads, "model_args threads"))
            loaded = load(path)
            if loaded.architecture != "mamba_lm":
                raise MQUserError(f"{path}: not a language model")
            self.codec = tokenizer_for(loaded, tokenizer)
            self.vocab_size = loaded.config.vocab_size
            model = loaded.model

            def forward(ids):
                with torch.no_grad():
                    return model(torch.from_numpy(ids)).numpy()
            self._forward = forward
        self.eot_token_id = self.codec.eos_id if self.codec.eos_id is not None else 0

    # -- tokenization as lm-eval's HF model does it ----------------------------------------------------
    def tok_encode(self, text: str) -> list:
        return [int(i) for i in self.codec.encode(text)[0]]

    def _encode_pair(self, context: str, continuation: str):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, context_ids: list, continuation_ids: list):
        """(sum of log p(continuation | context), is the continuation the greedy one)."""
        if not continuation_ids:
            return 0.0, True
        # context cut to max_length from the left; a longer continuation is scored whole (a recurrent model
        # has no position limit), with at least one token of context before it
        seq = (context_ids + continuation_ids)[-(max(self.max_length, len(continuation_ids)) + 1):]
        inp = np.asarray([seq[:-1]], np.int64)
        logp = _log_softmax(self._forward(inp)[0])[-len(continuation_ids):]
        cont = np.asarray(continuation_ids)
        return float(logp[np.arange(len(cont)), cont].sum()), bool((logp.argmax(-1) == cont).all())

    # -- the three request types ---------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx, cont = [self.eot_token_id], self.tok_encode(continuation)
            else:
                ctx, cont = self._encode_pair(context, continuation)
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval import utils

        out = []
        for req in requests:
            (text,) = req.args
            total = 0.0
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                total += self._score(list(ctx), list(cont))[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy continuation until a stop string (`until`), EOS or max_gen_toks (default 256)."""
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context) or [self.eot_token_id]
            new = []
            text = ""
            for _ in range(max_new):
                seq = (ids + new)[-self.max_length:]
                tok = int(self._forward(np.asarray([seq], np.int64))[0, -1].argmax())
                if tok == self.codec.eos_id:
                    break
                new.append(tok)
                text = self.codec.decode(new)
                if any(u and u in text for u in until):
                    break
            for u in until:
                if u and u in text:
                    text = text[:text.index(u)]
            out.append(text)
        return out


def main(argv=None):
    """The lm_eval command line with the mq-deploy model registered."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("mq-deploy lm-eval: error: pip install lm-eval", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except MQUserError as e:
        print(f"mq-deploy lm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
