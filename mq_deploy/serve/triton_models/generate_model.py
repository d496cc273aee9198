"""Triton Python-backend model written by `mq-deploy triton`: streaming generation as a decoupled model.
Each request is one sequence: the prompt is prefilled in one step (sequence START), then each new token
is one step. This is exactly `mq-deploy generate` (mq_deploy.runtime.apps.generate) greedy: the same calls
on the same graph. The steps run one of two ways (the `step_inline` parameter, `mq-deploy triton
--generate-step`):

- inline (the default when the step model is the Python backend's): this model opens the step model's
  ONNX graph itself, from the step model's folder beside its own, and one DecodeEngine (mq_batch.py) runs
  the steps of all its running generations on one thread: one ONNX Runtime call per round for all of
  them, states kept here, no BLS request, no step-model process and no thread per generation;
- bls: a thread per generation, each step a BLS request to the decode-step model named by the
  `step_model` parameter (any backend: Python with its per-CORRID states, or ONNX Runtime / TensorRT with
  Triton's implicit state), whose sequence batcher batches the steps of concurrent generations.

Either way the tokens go into an Outbox (mq_batch.py) and one sender thread streams them: each response
holds every token of its generation made since that generation's last response, at most
max_tokens_per_response (`mq-deploy triton --max-tokens-per-response`; a generation that far ahead waits
for the sender). While the sender keeps up that is one token per response; under load a response carries
several, so the per-response costs (the IPC to tritonserver, gRPC, the client) stop growing with the tokens;
past response_streams streams (`--response-streams`) the interval grows with the streams, so that those
costs stop growing with the streams too.
A generation's first token goes out before other generations' later ones.

Inputs: text (BYTES [1]; for byte-level LMs, and for LMs whose tokenizer.json came with the export,
encoded with the `tokenizers` package) or prompt_ids (INT64 [n]); max_new_tokens (INT32 [1],
optional). Outputs per response: token_id (INT64 [k], the response's new tokens in order, k >= 1) and,
where there is a tokenizer, text: their new characters as UTF-8, held back while they end inside a
multi-byte character (a byte-level LM: an incremental UTF-8 decoder, bytes that no character can hold
become U+FFFD; a BPE tokenizer: the decoded suffix), as `mq-deploy generate` prints them; never a lone
byte of a character, which would make the JSON response invalid). Generation stops after max_new_tokens or
at the EOS id (sent as the last token, adding no text), as generate does. Then an empty response with the
final flag. A client that cancels or disconnects is noticed within CANCEL_CHECK_S (or at its next
failed send); its generation stops and its sequence is ended (its state released).

At most max_generations run at once per instance; up to max_generations more wait, in arrival order; a
request beyond those is answered at once with an error that says so (retry later). Every request gets its
final flag exactly once, from the sender thread; every response of this model goes out from that thread,
one at a time (sent side by side from many threads while clients cancelled, tritonserver's Python backend
died now and then: SIGSEGV, or boost::interprocess::lock_exception in libtriton_python.so).
"""

import codecs
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # our helpers are copied beside us
from mq_batch import DecodeEngine, Generation, Outbox, StateBatcher, greedy, not_finite  # noqa: E402

METRICS_EVERY_S = 0.5
METRICS_IDLE_S = 0.1      # ... and once the sender has had nothing to send for this long
CANCEL_CHECK_S = 0.1      # how often the sender asks the server whether a running stream's client is gone


class _Stream:
    """Text of the new ids as it becomes whole characters: decode the ids so far and send the new suffix
    unless it ends in U+FFFD (a byte-level piece that splits a UTF-8 sequence). The same rule as
    mq_deploy.data.tokenizer's stream, so the served text equals `mq-deploy generate`'s."""

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], 0
        self._prefix_ids, self._prefix_len = [], 0

    def _text(self):
        return self.tok.decode(self._prefix_ids + self.ids, skip_special_tokens=False)[self._prefix_len:]

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.sent:]
        self.sent = len(text)
        if len(self.ids) > 64:   # bounded decoding cost: restart from a short context
            keep = self.ids[-4:]
            self._prefix_ids = keep
            self._prefix_len = len(self.tok.decode(keep, skip_special_tokens=False))
            self.ids, self.sent = [], 0
        return piece

    def flush(self):
        text = self._text()
        piece, self.sent = text[self.sent:], len(text)
        return piece


class _ByteStream:
    """A byte-level LM's text: each id is one byte, decoded incrementally as mq_deploy.data.tokenizer's
    byte stream does."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._dec.decode(bytes([int(token_id)]))

    def flush(self):
        return self._dec.decode(b"", final=True)


class _Client:
    """What the sender keeps of one request: its response sender, its text stream, whether it counts against
    max_generations, when its cancellation was last asked, and whether its client is gone."""

    __slots__ = ("sender", "text", "counted", "checked", "gone")

    def __init__(self, sender, text=None, counted=False):
        self.sender, self.text, self.counted = sender, text, counted
        self.checked, self.gone = time.monotonic(), False


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        p = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.step_model = p["step_model"]
        self.vocab = int(p["vocab_size"])
        self.tokenizer = p.get("tokenizer", "ids")
        self.text = self.tokenizer in ("bytes", "tokenizers")
        self.eos = int(p["eos_id"]) if p.get("eos_id") else None
        self.tok = None
        if self.tokenizer == "tokenizers":
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise pb_utils.TritonModelException(
                    f"{self.name}: the server's Python cannot import tokenizers (pip install tokenizers), "
                    "which encodes this LM's text") from None
            self.tok = Tokenizer.from_file(os.path.join(args["model_repository"], args["model_version"],
                                                        "tokenizer.json"))
        self.default_n = int(p.get("default_max_new_tokens", "64"))
        self.limit = int(p.get("max_new_tokens_limit", "4096"))
        self._lock = threading.Lock()
        self.max_generations = int(p.get("max_generations", "64"))
        self._active = 0         # accepted and not finished: running or waiting
        try:        # the config is read back from disk: an edited value is one line, the model does not load
            self.outbox = Outbox(int(p["max_tokens_per_response"]), int(p["response_interval_us"]) / 1e6,
                                 int(p["response_streams"]))
        except (KeyError, ValueError) as e:
            raise pb_utils.TritonModelException(f"{self.name}: parameters max_tokens_per_response, "
                                                f"response_interval_us and response_streams must be integers in "
                                                f"range ({e})") from None
        # sequence ids of this model: high bit set and the process id in them, so they cannot collide
        # with ids chosen by clients talking to the step model directly (those are usually small)
        self._next = (1 << 63) | (os.getpid() & 0xFFFF) << 40 | int.from_bytes(os.urandom(4), "little")
        self._flush = lambda: None          # the inline engine's metrics, when the server has them
        self._pool = self.engine = None
        if p.get("step_inline") == "1":
            self.engine = self._inline_engine(args, p)
        else:
            self._pool = ThreadPoolExecutor(max_workers=self.max_generations, thread_name_prefix=self.name)
        self._sender = threading.Thread(target=self._send_loop, name=f"{self.name}-sender", daemon=True)
        self._sender.start()

    def _inline_engine(self, args, p):
        """The step model's graph run here (parameter step_inline): its session, opened from the step model's
        version folder beside this model's, and a DecodeEngine that runs the steps of every running generation
        of this instance, one call per round."""
        from mq_ort_session import make_session

        # the step model's version folder beside this model's folder in the repository (a repository that
        # Triton copies model by model, from cloud storage, has no sibling: serve it with --generate-step bls)
        step_dir = os.path.join(os.path.dirname(os.path.normpath(args["model_repository"])), self.step_model, "1")
        if not os.path.isfile(os.path.join(step_dir, p.get("onnx_file", ""))):
            raise pb_utils.TritonModelException(
                f"{self.name}: no step graph {p.get('onnx_file')} in {step_dir} (the step model's folder beside "
                "this one); write the repository again, or with `mq-deploy triton --generate-step bls`")
        session = make_session(step_dir, p, self.name)
        try:
            batcher = StateBatcher.of_session(session, json.loads(p["states"]))
        except ValueError as e:
            raise pb_utils.TritonModelException(f"{self.name}: {e}") from None
        outputs = batcher.outputs()

        def run(feeds):
            return dict(zip(outputs, session.run(outputs, feeds)))

        return DecodeEngine(run, batcher, self.outbox, self.max_generations, on_call=self._metrics())

    def _metrics(self):
        """Prometheus counters on the server's metrics endpoint (when it has one): mq_generate_steps_total
        (sequence steps run) and mq_generate_step_calls_total (ONNX Runtime calls that ran them); their
        ratio is the mean batch. Each update is a message to the server process, so they are summed here
        and sent at most every METRICS_EVERY_S, and when the sender idles (self._flush: not when a generation
        ends, where its IPC would hold back the next generation's first token)."""
        try:
            fams = [pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.COUNTER) for n, d in (
                ("mq_generate_steps_total", "decode steps run by the inline generate model"),
                ("mq_generate_step_calls_total", "ONNX Runtime calls of the step graph that ran them"))]
            metrics = [f.Metric(labels={"model": self.name}) for f in fams]
        except Exception:       # a server without metrics, or without the custom-metrics API
            return None
        self._metric_families = fams      # kept alive with the model
        pending = [0, 0, time.monotonic()]        # steps, calls not sent yet; when last sent

        def flush():
            with self._lock:
                steps, calls, pending[:] = pending[0], pending[1], [0, 0, time.monotonic()]
            if calls:
                metrics[0].increment(float(steps))
                metrics[1].increment(float(calls))

        def count(n):
            with self._lock:
                pending[0] += n
                pending[1] += 1
                due = time.monotonic() - pending[2] > METRICS_EVERY_S
            if due:
                flush()

        self._flush = flush
        return count

    def _corrid(self):
        with self._lock:
            self._next += 1
            return self._next

    def _prompt(self, request):
        t = pb_utils.get_input_tensor_by_name(request, "text") if self.text else None
        ids = pb_utils.get_input_tensor_by_name(request, "prompt_ids")
        if t is not None and ids is not None:
            raise ValueError("give text or prompt_ids, not both")
        if t is not None:
            v = t.as_numpy().reshape(-1)
            raw = v[0] if len(v) else b""
            raw = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
            if self.tok is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"text is not valid UTF-8 ({e})") from None
                prompt = list(self.tok.encode(text, add_special_tokens=False).ids)
            else:
                prompt = list(raw)
        elif ids is not None:
            prompt = [int(x) for x in ids.as_numpy().reshape(-1)]
        else:
            raise ValueError("no prompt: give " + ("text or " if self.text else "") + "prompt_ids")
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ValueError(f"prompt ids must lie in [0, {self.vocab})")
        n = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        n = self.default_n if n is None else int(n.as_numpy().reshape(-1)[0])
        if not 0 <= n <= self.limit:
            raise ValueError(f"max_new_tokens must lie in [0, {self.limit}], got {n}")
        return prompt, n

    def _step(self, ids, corr, flags):
        req = pb_utils.InferenceRequest(model_name=self.step_model,
                                        inputs=[pb_utils.Tensor("input_ids", np.asarray([ids], np.int64))],
                                        requested_output_names=["logits"], correlation_id=corr, flags=flags)
        res = req.exec()
        if res.has_error():
            raise RuntimeError(f"{self.step_model}: {res.error().message()}")
        return pb_utils.get_output_tensor_by_name(res, "logits").as_numpy()

    def _bls(self, g):
        """--generate-step bls: g's steps as BLS requests to the step model, one sequence (a fresh correlation
        id; the prompt flagged START, the last step END), greedy; each token into the outbox. A generation that
        stops before its last step (its client went away, EOS, the model unloads) ends its sequence with an
        END step, which releases the step model's state."""
        START, END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        corr, n, made = self._corrid(), g.left, 0
        feed = [int(x) for x in g.ids.reshape(-1)]
        try:
            while self.outbox.wait_room(g):
                flags = (START if made == 0 else 0) | (END if made == n - 1 else 0)
                tok = greedy(self._step(feed, corr, flags))[0]
                if tok is None:
                    raise ValueError(not_finite(made + 1))
                made += 1
                last = made == n or tok == self.eos
                self.outbox.put(g, [tok], done=last)
                if last:
                    if made < n:
                        self._step([0], corr, END)
                    return
                feed = [tok]
            if made:
                self._step([0], corr, END)
            self.outbox.put(g, done=True)
        except Exception as e:
            self.outbox.put(g, done=True, error=str(e).splitlines()[0] or type(e).__name__)

    def _send_loop(self):
        """The one thread that sends this model's responses: each generation's new tokens as one response, then
        its final flag (with its error, if it failed); until the outbox closes and is drained."""
        while True:
            item = self.outbox.get(METRICS_IDLE_S)
            if item is None:
                self._flush()
                if self.outbox.closed:
                    return
                continue
            g, toks, done, error = item
            c = g.ctx
            try:
                if toks and not c.gone:
                    self._respond(g, toks, done and error is None)
                if done:
                    self._finish(c, error)
                elif time.monotonic() - c.checked > CANCEL_CHECK_S:
                    c.checked = time.monotonic()
                    if c.sender.is_cancelled():
                        c.gone = True
                        self.outbox.stop(g)
            except Exception:       # a client gone mid-send: its generation stops at its next step
                c.gone = True
                if done:
                    self._finish(c, error)
                else:
                    self.outbox.stop(g)

    def _respond(self, g, toks, last):
        out = [pb_utils.Tensor("token_id", np.asarray(toks, np.int64))]
        if self.text:
            stream = g.ctx.text
            piece = "".join(stream.push(t) for t in toks if t != self.eos)
            if last:
                piece += stream.flush()
            out.append(pb_utils.Tensor("text", np.asarray([piece.encode("utf-8")], object)))
        g.ctx.sender.send(pb_utils.InferenceResponse(output_tensors=out))

    def _finish(self, c, error=None):
        # The final flag goes out even to a cancelled or vanished client: until it is sent the request
        # stays alive in the server, which then cannot unload this model or shut down cleanly.
        if c.counted:
            with self._lock:
                self._active -= 1
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if error is None:
                c.sender.send(flags=final)
            else:
                c.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {error}")),
                              flags=final)
        except Exception:
            pass

    def _refuse(self, sender, message):
        """A request answered at once with one error line (by the sender thread, as every response)."""
        self.outbox.put(Generation("refused", [0], 0, ctx=_Client(sender)), done=True, error=message)

    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            try:
                prompt, n = self._prompt(r)
            except ValueError as e:
                self._refuse(sender, str(e).splitlines()[0])
                continue
            with self._lock:
                busy = self._active >= 2 * self.max_generations or self.outbox.closing
                if not busy:
                    self._active += 1
            if busy:
                self._refuse(sender, "the model is unloading" if self.outbox.closing else
                             f"{self.max_generations} generations are running and {self.max_generations} waiting "
                             "(max_generations); retry later")
                continue
            text = (_ByteStream() if self.tok is None else _Stream(self.tok)) if self.text else None
            g = Generation(f"generation {self._corrid()}", prompt, n, self.eos, _Client(sender, text, counted=True))
            if self.engine is not None:
                self.engine.add(g)
            elif n == 0:
                self.outbox.put(g, done=True)
            else:
                try:
                    self._pool.submit(self._bls, g)
                except Exception as e:      # the pool is shut down: the model is unloading
                    self.outbox.put(g, done=True, error=str(e).splitlines()[0])
        return None

    def finalize(self):
        # running generations stop at their next token and end their sequences; every request gets its final flag
        self.outbox.begin_close()
        if self.engine is not None:
            self.engine.join()
        else:
            self._pool.shutdown(wait=True, cancel_futures=False)
        self.outbox.close()
        self._sender.join()
