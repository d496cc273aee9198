"""Text <-> token ids for language models: UTF-8 bytes (vocab 256) or an HF `tokenizers` tokenizer.json.

Where the tokenizer comes from, in order: an explicit path (--tokenizer FILE_OR_DIR), the tokenizer.json
that came with the checkpoint (LoadedModel.tokenizer_path), bytes for a 256-entry vocabulary. A
non-byte model with no tokenizer is an error: byte values are never fed as token ids.

Every encoding also says how many UTF-8 bytes of the original text each token covers, so bits per
byte compares across tokenizers: a token covers the bytes from the end of the previous token to its
own end (the ends partition the text even where byte-level BPE splits one character over tokens, or
a post-processor trims the leading space out of a token's offsets).
"""

from __future__ import annotations

import codecs
import os

import numpy as np

from mq_deploy.errors import MQUserError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")


class ByteCodec:
    """Byte-level LMs: token id = byte value."""

    kind = "bytes"
    json = None
    source = "bytes"

    def __init__(self, eos_id: int | None = None):
        self.vocab_size = 256
        self.eos_id = eos_id

    def encode(self, data) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 [n] and the UTF-8 bytes each covers (all 1)."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        return ids, np.ones(len(ids), np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream(self) -> "TextStream":
        return _ByteStream()


def _guarded(source: str, what: str, fn, *args, **kw):
    """Call into `tokenizers` (Rust): its errors are plain Exceptions, and a panic is pyo3's PanicException,
    a BaseException; both become one line naming the tokenizer file."""
    try:
        return fn(*args, **kw)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError, MQUserError):
        raise
    except BaseException as e:      # noqa: B036 (PanicException is no Exception)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise MQUserError(f"{source}: the tokenizer cannot {what} ({first})") from None


class TokenizersCodec:
    """A `tokenizers` Tokenizer (tokenizer.json, e.g. GPT-NeoX's byte-level BPE of the Mamba models).
    A degenerate one (an empty vocabulary, ids that do not fit int32) is refused here; one that cannot
    encode a text (a WordLevel / Unigram model whose unknown token is missing) is refused when it meets it."""

    kind = "tokenizers"
    MAX_ID = 2 ** 31 - 2         # ids are int64 in our graphs, but no real vocabulary comes near this

    def __init__(self, tok, json_text: str, source: str, eos_id: int | None = None):
        self.tok, self.json, self.source = tok, json_text, source
        vocab = _guarded(source, "list its vocabulary", tok.get_vocab, with_added_tokens=True)
        if not vocab:
            raise MQUserError(f"{source}: the tokenizer has an empty vocabulary; it cannot encode any text")
        self.max_id = max(vocab.values())
        if min(vocab.values()) < 0 or self.max_id > self.MAX_ID:
            raise MQUserError(f"{source}: the tokenizer has ids from {min(vocab.values())} to {self.max_id}; "
                              f"ids must lie in [0, {self.MAX_ID}]")
        self.vocab_size = self.max_id + 1
        if eos_id is None:
            eos_id = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        self.eos_id = eos_id

    def encode(self, data) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MQUserError(f"the text is not valid UTF-8 ({e}); a BPE tokenizer reads text") from None
        enc = _guarded(self.source, "encode this text", self.tok.encode, data, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int64)
        return ids, covered_bytes(data, enc.offsets)

    def decode(self, ids) -> str:
        return _guarded(self.source, "decode these ids", self.tok.decode, [int(i) for i in ids],
                        skip_special_tokens=False)

    def stream(self) -> "TextStream":
        return _TokenizersStream(self)


def _char_byte_ends(text: str) -> np.ndarray:
    """cum[i] = UTF-8 length of text[:i] (i = 0..len(text))."""
    cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    nbytes = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(nbytes, dtype=np.int64)])


def covered_bytes(text: str, offsets) -> np.ndarray:
    """Bytes of `text` each token covers, from (start, end) character offsets: end(i) - end(i-1),
    with the ends made non-decreasing; the first token also covers whatever precedes it."""
    if not len(offsets):
        return np.zeros(0, np.int64)
    cum = _char_byte_ends(text)
    ends = np.maximum.accumulate(np.asarray([e for _, e in offsets], np.int64))
    ends_b = cum[np.clip(ends, 0, len(text))]
    return np.diff(np.concatenate([[0], ends_b]))


# -- streaming decode: text pieces as tokens arrive, never half a character ---------------------------
class TextStream:
    def push(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        return ""


class _ByteStream(TextStream):
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._dec.decode(bytes([int(token_id)]))

    def flush(self):
        return self._dec.decode(b"", final=True)


class _TokenizersStream(TextStream):
    """Decode the ids so far and emit the new suffix once it no longer ends in an incomplete character
    (U+FFFD from a byte-level piece that splits a multi-byte UTF-8 sequence), as HF's TextStreamer does."""

    def __init__(self, codec: TokenizersCodec):
        self.codec, self.ids, self.sent = codec, [], 0
        self._prefix_ids, self._prefix_len = [], 0

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = self.codec.decode(self._prefix_ids + self.ids)[self._prefix_len:]
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.sent:]
        self.sent = len(text)
        if len(self.ids) > 64:   # keep decoding cost bounded: restart from a short context
            keep = self.ids[-4:]
            self._prefix_ids = keep
            self._prefix_len = len(self.codec.decode(keep))
            self.ids, self.sent = [], 0
        return piece

    def flush(self):
        text = self.codec.decode(self._prefix_ids + self.ids)[self._prefix_len:]
        piece, self.sent = text[self.sent:], len(text)
        return piece


# -- loading -------------------------------------------------------------------------------------------
def read_tokenizer(path: str, eos_id: int | None = None) -> TokenizersCodec:
    """tokenizer.json (or a folder holding one) -> TokenizersCodec; a clear error when it is not one."""
    from mq_deploy.models.loaders import path_problem

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(file):
        raise MQUserError(f"{path}: no tokenizer.json in this folder (a `tokenizers` tokenizer file is expected; "
                          "a tokenizer.model of sentencepiece is not supported)")
    if not os.path.isfile(file):
        raise MQUserError(f"{file}: {path_problem(file)}")
    try:
        with open(file, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise MQUserError(f"{file}: not a tokenizer.json (not UTF-8 text)") from None
    except OSError as e:
        raise MQUserError(f"{file}: cannot read ({e.strerror})") from None
    return tokenizer_from_json(text, file, eos_id)


def tokenizer_from_json(text: str, source: str, eos_id: int | None = None) -> TokenizersCodec:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MQUserError("BPE tokenizers need the `tokenizers` package (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:   # noqa: B036 (plain Exception for malformed files, PanicException for worse)
        raise MQUserError(f"{source}: not a valid `tokenizers` tokenizer.json "
                          f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    return TokenizersCodec(tok, text, source, eos_id)


def check_fits(codec, vocab_size: int, model_name: str) -> None:
    """Every id the tokenizer can produce must have an embedding row."""
    if codec.vocab_size > vocab_size:
        raise MQUserError(f"{codec.source}: the tokenizer has ids up to {codec.vocab_size - 1}, but {model_name} "
                          f"embeds only {vocab_size} tokens; is this the model's own tokenizer?")


def tokenizer_for(loaded, tokenizer: str | None = None):
    """The codec of a loaded LM: --tokenizer, else the checkpoint's tokenizer.json, else bytes (vocab 256)."""
    cfg = loaded.config
    eos = getattr(cfg, "eos_token_id", None)
    path = tokenizer or loaded.tokenizer_path
    if path and not tokenizer and not os.path.exists(path):
        raise MQUserError(f"{loaded.path}: its tokenizer {path} is gone (was the checkpoint moved away from "
                          "it?); pass --tokenizer FILE_OR_DIR")
    if path:
        codec = read_tokenizer(path, eos)
        check_fits(codec, cfg.vocab_size, loaded.path)
        return codec
    if cfg.vocab_size == 256:
        return ByteCodec(eos)
    raise MQUserError(f"{loaded.path}: this model's vocabulary has {cfg.vocab_size} entries, not 256 bytes, and "
                      "no tokenizer came with it; pass --tokenizer FILE_OR_DIR (its tokenizer.json)")


def tokenizer_for_artifact(meta, tokenizer: str | None = None, source: str = "the artifact"):
    """The codec an exported graph carries in its metadata (or --tokenizer, which wins). meta: the runner's
    ArtifactMeta, or the raw mq.* metadata dict (validated here)."""
    from mq_deploy.backends.base import ArtifactMeta, parse_metadata

    art = meta if isinstance(meta, ArtifactMeta) else parse_metadata(meta or {}, source)
    cfg = art.config
    vocab = getattr(cfg, "vocab_size", None)
    eos = getattr(cfg, "eos_token_id", None)
    if tokenizer:
        codec = read_tokenizer(tokenizer, eos)
    elif art.tokenizer == "bytes":
        return ByteCodec(eos)
    elif art.tokenizer_json:
        codec = tokenizer_from_json(art.tokenizer_json, f"{source} (its tokenizer)", eos)
    else:
        return None
    if vocab:
        check_fits(codec, vocab, source)
    return codec


def read_text_file(path: str) -> bytes:
    from mq_deploy.models.loaders import require_file

    require_file(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise MQUserError(f"{path}: cannot read ({e.strerror})") from None


def encode_file(codec, path: str, min_tokens: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a text file and the bytes each covers; a clear error for too little text."""
    data = read_text_file(path)
    try:
        ids, nbytes = codec.encode(data)
    except MQUserError as e:
        raise MQUserError(f"{path}: {e}") from None
    if len(ids) < min_tokens:
        raise MQUserError(f"{path}: too short for a language model ({len(ids)} tokens)")
    return ids, nbytes


def train_byte_level_bpe(path: str, texts, vocab_size: int):
    """A GPT-NeoX-style byte-level BPE tokenizer.json (<|endoftext|> = id 0) trained with `tokenizers`
    on `texts` (strings), for tests, benchmarks and models that have none. Returns the Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from mq_deploy import fileio

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fileio.write_text(str(path), tok.to_str(), overwrite=True, inout=True)
    return tok
