"""Batched decode across sequences, in-process: generate_batch / `mq-deploy generate` with several prompts,
and the StateBatcher (mq_deploy/serve/triton_models/mq_batch.py) that the served step model runs too.

Tolerance of a batched step against the same sequence run alone: ONNX Runtime may block a GEMM differently
for another batch size, so the last bits of a float may differ, and a float that lands on the other side of a
QuantizeLinear rounding boundary moves one int8 step. helpers.BATCH_RTOL bounds the logits' difference relative
to their magnitude; every test prints the measured difference first (0.0 on this CPU, MLAS, for every model
here: the int8 GEMMs are exact and the float ones did not change with the batch)."""

import collections
import json

import numpy as np
import pytest

from helpers import BATCH_RTOL, assert_user_error, batch_error, tiny_exports, tiny_hybrid_steps

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def art():
    return tiny_exports()


def _runners(path):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.ops.native import ort_library

    out = {"function bodies": OrtRunner(path, custom_op_library=False)}
    if ort_library():
        out["native op"] = OrtRunner(path)
    return out


def _alone(runner, batcher, prompt, tokens):
    """Logits and states of one sequence run alone: a prefill, then one step per token."""
    state = batcher.zeros(1 if runner.artifact.kv_cache == "sentinel" else 0)
    out = []
    for ids in [prompt] + [[t] for t in tokens]:
        res = runner.infer({"input_ids": np.asarray([ids], np.int64), **state})
        out.append(res["logits"][0, -1])
        state = batcher.split(res, 1)[0]
    return out


def _check_interleaved(runner, prompts, n):
    """Sequences that start, run together and end at different rounds, their steps batched (StateBatcher.stack,
    one ORT call per group), each step's logits against the sequence alone, fed the same tokens."""
    from mq_deploy.runtime.apps import state_batcher

    b = state_batcher(runner)
    rng = np.random.default_rng(7)
    tokens = [[int(t) for t in rng.integers(0, 256, n)] for _ in prompts]
    want = [_alone(runner, b, p, t) for p, t in zip(prompts, tokens)]
    # sequence s starts at round s // 2 and runs n - s % 3 steps: some end while others go on
    begin = [s // 2 for s in range(len(prompts))]
    steps = [n - s % 3 for s in range(len(prompts))]
    state, done = {}, {s: 0 for s in range(len(prompts))}
    worst, batched = 0.0, 0
    for rnd in range(max(begin) + n + 1):
        groups = {}
        for s in range(len(prompts)):
            if rnd < begin[s] or done[s] > steps[s]:
                continue
            if s not in state:
                state[s] = b.zeros(0)
            ids = prompts[s] if done[s] == 0 else [tokens[s][done[s] - 1]]
            groups.setdefault((len(ids), b.group_key(state[s])), []).append((s, ids))
        for group in groups.values():
            feeds = b.stack([state[s] for s, _ in group])
            res = runner.infer({"input_ids": np.asarray([ids for _, ids in group], np.int64), **feeds})
            batched += len(group) > 1
            for k, ((s, _), st) in enumerate(zip(group, b.split(res, len(group)))):
                worst = max(worst, batch_error(res["logits"][k, -1], want[s][done[s]]))
                state[s] = st
                done[s] += 1
    assert all(done[s] == steps[s] + 1 for s in done) and batched > 0
    return worst


def test_batched_steps_equal_each_sequence_alone(art):
    prompts = [list(b"And God said"), list(b"In the beginning"), list(b"Let there be"), list(b"And God saw"),
               list(b"light"), list(b"And God said")]
    for what, runner in _runners(art["lm_step"]).items():
        worst = _check_interleaved(runner, prompts, 8)
        print(f"mamba LM, {what}: max |batched - alone| / max |logits| = {worst:.3g} (tolerance {BATCH_RTOL})")
        assert worst <= BATCH_RTOL


def test_generate_batch_equals_one_prompt_runs(art):
    from mq_deploy.runtime.apps import generate, generate_batch

    prompts = [list(b"And God said"), list(b"In the beginning"), list(b"Let"), list(b"And God said"), [5, 200, 17]]
    for what, runner in _runners(art["lm_step"]).items():
        want = [generate(runner, p, 20) for p in prompts]
        got = generate_batch(runner, prompts, 20)
        print(what, "batched:", got[:2], "\nalone:  ", want[:2])
        assert got == want
        # one sequence drops out at its EOS mid-batch, the others go on
        eos = want[1][5]
        want = [generate(runner, p, 20, eos_id=eos) for p in prompts]
        assert min(len(w) for w in want) < 20 < max(len(w) for w in want) + 1
        assert generate_batch(runner, prompts, 20, eos_id=eos) == want
        # sampling: each prompt draws from its own generator, as a run of its own
        want = [generate(runner, p, 12, temperature=0.8, seed=3) for p in prompts]
        assert generate_batch(runner, prompts, 12, temperature=0.8, seed=3) == want
        assert generate_batch(runner, prompts, 0) == [[]] * len(prompts)


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory):
    """One Nemotron-H hybrid (Mamba2 + attention + MLP) written by transformers, quantized W8A8 with float32 and
    with int8 KV caches: {"fp32": step ONNX, "int8": step ONNX}."""
    pytest.importorskip("transformers")
    steps = tiny_hybrid_steps(tmp_path_factory.mktemp("hybrid_batch"), "M*-M", ("fp32", "int8"))
    return {kv: step for kv, (step, _) in steps.items()}


def test_hybrid_batches_sequences_whose_caches_agree(hybrids):
    """A hybrid's KV caches grow per sequence: sequences stack when their caches are equally long (equal prompt
    lengths here), the others run as their own groups; every sequence equals its run alone."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate, generate_batch

    prompts = [list(b"And God said"), list(b"Let there be"), list(b"In the beginning"), list(b"light")]
    for kv, path in hybrids.items():
        runner = OrtRunner(path, custom_op_library=False)
        worst = _check_interleaved(runner, prompts[:2] * 2 + prompts[2:], 6)
        print(f"hybrid, {kv} KV caches: max |batched - alone| / max |logits| = {worst:.3g} (tolerance {BATCH_RTOL})")
        assert worst <= BATCH_RTOL
        assert generate_batch(runner, prompts, 10) == [generate(runner, p, 10) for p in prompts]


def test_a_batch_of_bad_states_is_refused_in_one_line(art, hybrids):
    """Stacking refuses, one line naming the sequence and the state: a batch mixing state dtypes (a float32 and an
    int8 KV cache), a state of the wrong shape or layer count, caches of different lengths."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import state_batcher

    fp, i8 = (OrtRunner(hybrids[k], custom_op_library=False) for k in ("fp32", "int8"))
    b8 = state_batcher(i8)

    def prefill(runner, prompt):
        b = state_batcher(runner)
        return b.split(runner.infer({"input_ids": np.asarray([prompt], np.int64), **b.zeros()}), 1)[0]

    s8, s32 = prefill(i8, list(b"And God")), prefill(fp, list(b"And God"))
    cache = next(n for n in s8 if s8[n].dtype == np.int8)
    cases = [([s8, s32], f"a batch mixes state dtypes: sequence 1's {cache} is float32, sequence 0's int8"),
             ([s8, {**s8, cache: s8[cache].astype(np.float32)}], "a batch mixes state dtypes"),
             ([s8, prefill(i8, list(b"And God said"))], "cannot share a batch: their KV caches are"),
             ([s8, {**s8, "ssm_state": s8["ssm_state"][:1]}], "sequence 1: state ssm_state is [1, 1,"),
             ([{**s8, "conv_state": np.concatenate([s8["conv_state"]] * 2, 1)}], "sequence 0: state conv_state is")]
    for states, needle in cases:
        with pytest.raises(ValueError) as e:
            b8.stack(states)
        msg = str(e.value)
        print(msg)
        assert needle in msg and "\n" not in msg
    lm = OrtRunner(tiny_exports()["lm_step"], custom_op_library=False)
    s = prefill(lm, list(b"And"))
    with pytest.raises(ValueError, match=r"state conv_state is \[3, 1, 64, 3\], the step graph takes \[2, 1, 64, 3\]"):
        state_batcher(lm).stack([s, {**s, "conv_state": np.zeros((3, 1, 64, 3), np.float32)}])


def test_generate_cli_with_several_prompts(art, tmp_path, capsys):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.cli.main import main
    from mq_deploy.runtime.apps import generate_text

    runner = OrtRunner(art["lm_step"], custom_op_library=False)
    prompts = ["And God said", "In the beginning", "Let"]
    want = [generate_text(runner, prompt=p, max_new_tokens=12) for p in prompts]
    out = tmp_path / "r.json"
    argv = ["generate", art["lm_step"], "--no-native", "--max-new-tokens", "12", "--json", str(out)]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    assert [r["new_ids"] for r in res] == [w["new_ids"] for w in want]
    assert [r["text"] for r in res] == [w["text"] for w in want]
    assert all(p + w["text"] in printed for p, w in zip(prompts, want))
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    out2 = tmp_path / "r2.json"
    assert main(["generate", art["lm_step"], "--no-native", "--max-new-tokens", "12", "--json", str(out2),
                 "--prompts-file", str(f)]) == 0
    assert json.loads(out2.read_text())["results"] == res
    (tmp_path / "empty.txt").write_text("\n \n")
    assert_user_error(capsys, ["generate", art["lm_step"], "--prompts-file", tmp_path / "empty.txt"], "holds no prompts")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    assert_user_error(capsys, ["generate", art["lm_step"], "--prompts-file", tmp_path / "bad.txt"], "not UTF-8")


def _engine_run(runner, prompts, lens, room=16, interval_s=0.0, run=None, states=None, stop_after=None):
    """Each prompt greedy-decoded by one DecodeEngine (the inline generate model's), a consumer thread taking the
    tokens as the generate model's sender does: the first half start together, the second half once generation
    0 has made 3 tokens, so sequences join running rounds and leave them at their own lengths. states: {k: a
    state to start generation k from}; stop_after: {k: n}, the consumer stops k once it took n tokens (its
    client went away). Returns ({k: new ids}, {k: error}, [tokens per take], engine)."""
    import threading

    from mq_deploy.runtime.apps import state_batcher
    from mq_deploy.serve.triton_models.mq_batch import DecodeEngine, Generation, Outbox

    outbox = Outbox(room, interval_s)
    engine = DecodeEngine(run or runner.infer, state_batcher(runner), outbox, max_active=64)
    gens = [Generation(f"generation {k}", p, n, eos=None) for k, (p, n) in enumerate(zip(prompts, lens))]
    for k, st in (states or {}).items():
        gens[k].state = st
    got, errors, takes = {k: [] for k in range(len(gens))}, {}, []
    half = (len(gens) + 1) // 2
    left, joined = set(range(len(gens))), []

    def consume():
        while left:
            item = outbox.get(timeout=60)
            assert item is not None, "no news from the engine for 60 s"
            g, toks, done, error = item
            k = gens.index(g)
            got[k] += toks
            if toks:
                takes.append(len(toks))
            if (k == 0 and len(got[0]) >= 3 or done and k < half) and not joined:
                joined.append(True)
                for late in gens[half:]:
                    engine.add(late)
            if stop_after and k in stop_after and len(got[k]) >= stop_after[k]:
                outbox.stop(g)
            if error is not None:
                errors[k] = error
            if done:
                left.discard(k)

    for g in gens[:half]:
        engine.add(g)
    t = threading.Thread(target=consume)
    t.start()
    t.join(120)
    assert not t.is_alive()
    outbox.begin_close()
    engine.join(10)
    return got, errors, takes, engine


def test_decode_engine_equals_generate(art, hybrids):
    """Generations that start and end at different rounds, stepped by one DecodeEngine: each one's tokens equal
    `generate` of its prompt alone, whatever the outbox's room and interval (a response per token, tokens
    gathered by the interval, a full outbox holding a generation back), rounds held several sequences (fewer
    calls than steps), and a hybrid's sequences batch only where their caches agree."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate

    base = [list(b"And God said"), list(b"Let there be"), list(b"In the beginning"), list(b"light"), list(b"A")]
    prompts = base * 2
    lens = [12 - k % 5 for k in range(len(prompts))]
    for path in [art["lm_step"]] + list(hybrids.values()):
        runner = OrtRunner(path, custom_op_library=False)
        want = {k: generate(runner, p, n) for k, (p, n) in enumerate(zip(prompts, lens))}
        for room, interval in ((16, 0.0), (1, 0.0), (3, 0.05)):
            got, errors, takes, engine = _engine_run(runner, prompts, lens, room, interval)
            print(f"{path} room {room} interval {interval}: {engine.steps} steps in {engine.calls} calls, "
                  f"tokens per take {sorted(collections.Counter(takes).items())}")
            assert not errors and got == want
            assert engine.steps == sum(lens) and engine.calls < engine.steps
            assert max(takes) <= room
            if room == 1:
                assert set(takes) == {1}
            if interval:      # a take waits for the interval or a full outbox: several tokens, after the first
                assert max(takes) == room


def test_decode_engine_a_bad_sequence_fails_alone(art):
    """A generation whose state the graph does not take, and one whose logits are not finite, each end with their
    own one-line error; the others of their rounds go on and equal generate. A generation its consumer stops
    ends (done, no error) at its next round, and its state is dropped."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate, state_batcher

    runner = OrtRunner(art["lm_step"], custom_op_library=False)
    prompts = [list(b"And God said"), list(b"Let there be"), list(b"light"), [7] + list(b"nan")]
    zeros = state_batcher(runner).zeros()

    def run(feeds):         # a sequence whose prompt starts with byte 7 gets NaN logits
        res = runner.infer(feeds)
        ids = feeds["input_ids"]
        if ids.shape[1] > 1 and (ids[:, 0] == 7).any():
            res = dict(res, logits=np.where((ids[:, :1] == 7)[..., None], np.nan, res["logits"]))
        return res

    got, errors, _, engine = _engine_run(runner, prompts, [8, 8, 8, 8], room=1, run=run,
                                         states={1: {n: a.astype(np.float16) for n, a in zeros.items()}},
                                         stop_after={2: 3})
    print(errors)
    assert set(errors) == {1, 3}
    assert "generation 1" in errors[1] and "float16" in errors[1] and "\n" not in errors[1]
    assert errors[3] == "generation 3: the logits are not finite at new token 1; the model's weights or scales " \
        "overflow float32"
    assert got[0] == generate(runner, prompts[0], 8) and got[1] == got[3] == []
    assert 3 <= len(got[2]) < 8 and got[2] == generate(runner, prompts[2], 8)[:len(got[2])]
    assert not engine._active and not engine._waiting


def test_outbox_order_and_close():
    """The outbox without an engine: a first token is due at once and goes before other news; later tokens wait
    for the interval, oldest first, unless their generation is done or its room is full; a producer waits for
    room; begin_close wakes it, close() ends get() once drained; bad settings are refused."""
    import threading
    import time

    from mq_deploy.serve.triton_models.mq_batch import Generation, Outbox

    ob = Outbox(room=2, interval_s=0.2)
    a, b, c = (Generation(n, [1], 10) for n in "abc")
    ob.put(a, [5])
    g, toks, done, _ = ob.get(0)
    assert (g, toks, done) == (a, [5], False)
    ob.put(a, [6])                      # a's second token waits for the interval...
    ob.put(b, [7])                      # ... b's first does not
    assert ob.get(0)[:2] == (b, [7])
    assert ob.get(0.01) is None
    t0 = time.monotonic()
    assert ob.get(1)[:2] == (a, [6]) and time.monotonic() - t0 > 0.1
    ob.put(a, [1])
    ob.put(a, [2])                      # room full: due at once
    assert ob.get(0)[:2] == (a, [1, 2])
    ob.put(c, [3])
    ob.get(0)
    ob.put(c, [4], done=True)           # done: due at once
    assert ob.get(0)[1:3] == ([4], True)
    ob.put(b, [8, 9])
    waited = []
    t = threading.Thread(target=lambda: waited.append(ob.wait_room(b)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()                 # b's room is full: its producer waits
    ob.begin_close()
    t.join(5)
    assert waited == [False]
    ob.close()
    assert ob.get(1)[:2] == (b, [8, 9])     # what is left goes out, then nothing
    assert ob.get(1) is None
    for bad in ((0, 0.0), (1, -1), (1, 2), (1, 0.1, 0)):
        with pytest.raises(ValueError):
            Outbox(*bad)


def test_outbox_shares_its_response_budget():
    """Past `streams` generations waiting on the interval, each waits longer in proportion (a budget of about
    `streams` responses per interval for all of them); up to `streams`, the interval itself."""
    import time

    from mq_deploy.serve.triton_models.mq_batch import Generation, Outbox

    def first_due_after(n, streams, interval=0.05):
        ob = Outbox(room=64, interval_s=interval, streams=streams)
        gens = [Generation(f"g{k}", [1], 10) for k in range(n)]
        for g in gens:
            ob.put(g, [1])
            ob.get(0)                       # the first tokens go at once
        t0 = time.monotonic()
        for g in gens:
            ob.put(g, [2])                  # now every one waits on the interval
        got = ob.get(5)
        return time.monotonic() - t0, got

    wait, got = first_due_after(2, streams=2)
    assert got is not None and 0.04 < wait < 0.2, wait          # 2 waiting, budget 2: the interval
    wait, got = first_due_after(8, streams=2)
    assert got is not None and 0.19 < wait < 0.6, wait          # 8 waiting, budget 2: 4 intervals
    print(f"8 generations waiting on a 50 ms interval with a budget of 2 streams: the first due after {wait:.3f} s")
