"""Triton Python-backend model written by `mq-deploy triton`: streaming generation as a decoupled model.
Each request is one sequence: the prompt is prefilled in one step (sequence START), then each new token
is one step, and every token goes back to the client as its own response. This is exactly `mq-deploy
generate` (mq_deploy.runtime.apps.generate) greedy: the same calls on the same graph. The steps run
one of two ways (the `step_inline` parameter, `mq-deploy triton --generate-step`):

- inline (the default when the step model is the Python backend's): this model opens the step model's
  ONNX graph itself, from the step model's folder beside its own, and runs the steps of all its running
  generations through one BatchedStepper (mq_batch.py): one ONNX Runtime call per round for all of
  them, states kept here, no BLS request and no step-model process per token;
- bls: each step is a BLS request to the decode-step model named by the `step_model` parameter (any
  backend: Python with its per-CORRID states, or ONNX Runtime / TensorRT with Triton's implicit state),
  whose sequence batcher batches the steps of concurrent generations.

Inputs: text (BYTES [1]; for byte-level LMs, and for LMs whose tokenizer.json came with the export,
encoded with the `tokenizers` package) or prompt_ids (INT64 [n]); max_new_tokens (INT32 [1],
optional). Outputs per response: token_id (INT64 [1]) and, where there is a tokenizer, text: the
new characters as UTF-8, held back while they end inside a multi-byte character (a byte-level LM:
an incremental UTF-8 decoder, bytes that no character can hold become U+FFFD; a BPE tokenizer: the
decoded suffix), as `mq-deploy generate` prints them; never a lone byte of a character, which would
make the JSON response invalid). Generation stops
after max_new_tokens or at the EOS id (sent as the last token, with no text), as generate does.
A client that cancels or disconnects stops the loop at the next token; the sequence is then ended
(its state released).

Concurrency: execute() hands each request to a thread of its own and returns at once, so the
generations of many clients overlap and their steps are batched (above). At most max_generations run at
once per instance; up to max_generations more wait, in arrival order, for a free thread; a request
beyond those is answered at once with an error that says so (retry later). Every request gets its
final flag exactly once, from the thread that ran it or from execute() when it is refused.
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

METRICS_EVERY_S = 0.5


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
        self._send_lock = threading.Lock()   # one response in flight from this stub at a time (_send)
        self.max_generations = int(p.get("max_generations", "64"))
        self._active = 0         # accepted and not finished: running or waiting for a thread
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.max_generations, thread_name_prefix=self.name)
        # sequence ids of this model: high bit set and the process id in them, so they cannot collide
        # with ids chosen by clients talking to the step model directly (those are usually small)
        self._next = (1 << 63) | (os.getpid() & 0xFFFF) << 40 | int.from_bytes(os.urandom(4), "little")
        self._flush = lambda: None          # the inline stepper's metrics, when the server has them
        self.stepper = self._inline_stepper(args, p) if p.get("step_inline") == "1" else None

    def _inline_stepper(self, args, p):
        """The step model's graph run here (parameter step_inline): its session, opened from the step model's
        version folder beside this model's, and a BatchedStepper that batches the steps of every running
        generation of this instance into one call per round."""
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # our helpers are copied beside us
        from mq_batch import BatchedStepper, StateBatcher
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

        return BatchedStepper(run, batcher, int(p.get("batch_wait_us", "1000")) / 1e6, on_call=self._metrics())

    def _metrics(self):
        """Prometheus counters on the server's metrics endpoint (when it has one): mq_generate_steps_total
        (sequence steps run) and mq_generate_step_calls_total (ONNX Runtime calls that ran them); their
        ratio is the mean batch. Each update is a message to the server process, so they are summed here
        and sent at most every METRICS_EVERY_S, and when a generation ends (self._flush)."""
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

    def _generate(self, request, sender):
        prompt, n = self._prompt(request)
        corr = self._corrid()
        if self.stepper is not None:          # the step graph in this process, batched across generations
            seq = self.stepper.open(f"generation {corr}")
            try:
                self._loop(prompt, n, sender, lambda feed, flags: self.stepper.step(seq, feed), None)
            finally:
                self.stepper.close(seq)
                self._flush()
            return
        END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        self._loop(prompt, n, sender, lambda feed, flags: self._step(feed, corr, flags),
                   lambda: self._step([0], corr, END))   # releases the step model's state of this sequence

    def _loop(self, prompt, n, sender, step, end):
        """Greedy decoding: step(ids, flags) -> logits [1, len(ids), vocab]; end(): the sequence is over
        before its last step (cancelled, EOS), or None."""
        START, END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        feed, stream = prompt, (_ByteStream() if self.tok is None else _Stream(self.tok))
        for i in range(n):
            if sender.is_cancelled() or self._stop.is_set():
                if i and end is not None:
                    end()
                return
            flags = (START if i == 0 else 0) | (END if i == n - 1 else 0)
            logits = step(feed, flags)
            tok = int(logits[0, -1].astype(np.float64).argmax())
            out = [pb_utils.Tensor("token_id", np.asarray([tok], np.int64))]
            eos = self.eos is not None and tok == self.eos
            if self.text:
                piece = b"" if eos else stream.push(tok).encode("utf-8")
                if eos or i == n - 1:
                    piece += stream.flush().encode("utf-8")
                out.append(pb_utils.Tensor("text", np.asarray([piece], object)))
            self._send(sender, pb_utils.InferenceResponse(output_tensors=out))
            if eos:
                if i < n - 1 and end is not None:
                    end()
                return
            feed = [tok]

    def _send(self, sender, response, flags=0):
        # The generations' threads send one at a time. Sent side by side from many threads while clients
        # cancelled their streams, tritonserver's Python backend died now and then (SIGSEGV, or
        # boost::interprocess::lock_exception in libtriton_python.so), on this code and on the code before it.
        with self._send_lock:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)

    def _finish(self, sender, message=None):
        # The final flag goes out even to a cancelled or vanished client: until it is sent the request
        # stays alive in the server, which then cannot unload this model or shut down cleanly.
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if message is None:
                self._send(sender, None, final)
            else:
                self._send(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), final)
        except Exception:
            pass

    def _run(self, request, sender):
        message = None
        try:
            self._generate(request, sender)
        except Exception as e:
            message = f"{self.name}: {str(e).splitlines()[0]}"
        finally:
            with self._lock:
                self._active -= 1
        self._finish(sender, message)

    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            with self._lock:
                busy = self._active >= 2 * self.max_generations or self._stop.is_set()
                if not busy:
                    self._active += 1
            if busy:
                self._finish(sender, f"{self.name}: {self.max_generations} generations are running and "
                                     f"{self.max_generations} waiting (max_generations); retry later")
                continue
            try:
                self._pool.submit(self._run, r, sender)
            except Exception as e:      # the pool is shut down: the model is unloading
                with self._lock:
                    self._active -= 1
                self._finish(sender, f"{self.name}: {str(e).splitlines()[0]}")
        return None

    def finalize(self):
        self._stop.set()            # running generations stop at their next token and end their sequences
        self._pool.shutdown(wait=True, cancel_futures=False)
