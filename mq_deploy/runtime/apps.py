"""What `mq-deploy generate` and `mq-deploy run` do with an exported graph."""

from __future__ import annotations

import os

import numpy as np

from mq_deploy.errors import MQUserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# -- language models ---------------------------------------------------------------------------------
MAX_NEW_TOKENS = 4096       # the most tokens one generation may ask for (the Triton generate model's limit too)
MAX_SEED = 2 ** 32 - 1


def check_generation(runner, prompt_ids, max_new_tokens: int, temperature: float, seed: int = 0):
    """Everything generate() refuses, checked before any output: returns the artifact's config
    (MambaLMConfig, validated from its metadata by the runner)."""
    art = runner.artifact
    if art.graph != "step":
        raise MQUserError(f"{runner.path}: generate needs the decode-step graph "
                          "(mq-deploy export MODEL -o model_step.onnx --decode-step)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise MQUserError(f"--max-new-tokens must be an integer from 0 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature) \
            or temperature < 0:
        raise MQUserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise MQUserError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    if not len(prompt_ids):
        raise MQUserError("the prompt is empty")
    cfg = art.config
    vocab = cfg.vocab_size
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise MQUserError(f"prompt ids must lie in [0, {vocab})")
    limits = [m.max_positions for m in cfg.layer_configs() if getattr(m, "max_positions", None)]
    if limits and len(prompt_ids) + max_new_tokens > min(limits):
        raise MQUserError(f"the prompt's {len(prompt_ids)} tokens and --max-new-tokens {max_new_tokens} exceed the "
                          f"model's limit of {min(limits)} positions (max_positions of its attention layers)")
    return cfg


def generate(runner, prompt_ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             on_token=None, eos_id: int | None = None) -> list:
    """Prefill the prompt in one call of the step graph, then decode one token per call.

    Greedy when temperature is 0, else sampling from softmax(logits / temperature). Stops after
    max_new_tokens or at eos_id (which is returned as the last id, but not passed to on_token).
    Returns the new ids."""
    from mq_deploy.backends.ort.runner import empty_states, state_layout

    check_generation(runner, prompt_ids, max_new_tokens, temperature, seed)
    layout = state_layout(runner)
    feeds = {"input_ids": np.asarray([prompt_ids], np.int64), **empty_states(runner, 1)}
    rng = np.random.default_rng(seed)
    out = []
    # ORT: states stay bound to the session between steps (IOBinding, no numpy round trip)
    dec = runner.decoder(1) if hasattr(runner, "decoder") and max_new_tokens else None
    for i in range(max_new_tokens):
        if dec is not None:
            logits = (dec.prefill(feeds["input_ids"]) if i == 0 else dec.step([out[-1]]))[0].astype(np.float64)
        else:
            res = runner.infer(feeds)
            logits = res["logits"][0, -1].astype(np.float64)
        if not np.isfinite(logits).all():
            raise MQUserError(f"{runner.path}: the model's logits are not finite at new token {i + 1}; its weights "
                              "or scales overflow float32 (check the checkpoint it was exported from)")
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            tok = int(rng.choice(len(p), p=p / p.sum()))
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if eos_id is not None and tok == eos_id:
            break
        if on_token:
            on_token(tok)
        if dec is None:
            feeds = {"input_ids": np.asarray([[tok]], np.int64), **{name: res[out] for name, out, _ in layout}}
    return out


def state_batcher(runner):
    """The StateBatcher (mq_deploy/serve/triton_models/mq_batch.py, the one the served step model runs) of a
    step graph's state layout."""
    from mq_deploy.backends.ort.runner import state_layout
    from mq_deploy.serve.triton_models.mq_batch import StateBatcher

    return StateBatcher([(name, out, dims, runner.input_specs[name].dtype) for name, out, dims in state_layout(runner)])


MAX_PROMPTS = 1024          # prompts one `generate` decodes as a batch


def read_prompts(path: str) -> list:
    """The prompts of a --prompts-file: one per line, UTF-8; blank lines are skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read((64 << 20) + 1)
    except OSError as e:
        raise MQUserError(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > 64 << 20:
        raise MQUserError(f"--prompts-file {path}: larger than 64 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MQUserError(f"--prompts-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MQUserError(f"--prompts-file {path}: holds no prompts (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise MQUserError(f"--prompts-file {path}: {len(prompts)} prompts; at most {MAX_PROMPTS} decode as one batch")
    return prompts


def generate_batch(runner, prompts, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                   eos_id: int | None = None) -> list:
    """Several prompts decoded as one batch: the new ids of each, as generate(runner, prompt, ...) gives them
    alone (sampling: each prompt draws from its own generator seeded with `seed`, as a run of its own does).

    Each round runs the step graph once per group of live sequences whose next input has the same length
    and whose KV caches (a hybrid's) are equally long, their states stacked along each state's batch axis
    (StateBatcher): prompts of equal length prefill together, prompts of other lengths prefill as their own
    groups, and then every single-token step of a pure SSM model is one call for all sequences. Nothing is
    padded, so nothing changes what a sequence computes; only ONNX Runtime's GEMM blocking may depend on
    the batch size (last bits of the logits, measured in tests/test_runtime_batch.py). A sequence that
    reaches max_new_tokens or eos_id leaves the batch; the others go on."""
    prompts = [list(p) for p in prompts]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise MQUserError(f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    for p in prompts:
        check_generation(runner, p, max_new_tokens, temperature, seed)
    batcher = state_batcher(runner)
    slots = 1 if runner.artifact.kv_cache == "sentinel" else 0
    n = len(prompts)
    out = [[] for _ in range(n)]
    rngs = [np.random.default_rng(seed) for _ in range(n)]
    feed = [p for p in prompts]
    state = [batcher.zeros(slots) for _ in range(n)]
    live = list(range(n)) if max_new_tokens else []
    while live:
        groups: dict = {}
        for i in live:
            groups.setdefault((len(feed[i]), batcher.group_key(state[i])), []).append(i)
        for group in groups.values():
            try:
                states = batcher.stack([state[i] for i in group], [f"prompt {i + 1}" for i in group])
            except ValueError as e:
                raise MQUserError(f"{runner.path}: {e}") from None
            res = runner.infer({"input_ids": np.asarray([feed[i] for i in group], np.int64), **states})
            nxt = batcher.split(res, len(group))
            for k, i in enumerate(group):
                logits = res["logits"][k, -1].astype(np.float64)
                if not np.isfinite(logits).all():
                    raise MQUserError(f"{runner.path}: the model's logits are not finite at new token "
                                      f"{len(out[i]) + 1} of prompt {i + 1}; its weights or scales overflow float32 "
                                      "(check the checkpoint it was exported from)")
                if temperature > 0:
                    q = np.exp((logits - logits.max()) / temperature)
                    tok = int(rngs[i].choice(len(q), p=q / q.sum()))
                else:
                    tok = int(logits.argmax())
                out[i].append(tok)
                state[i], feed[i] = nxt[k], [tok]
        live = [i for i in live if len(out[i]) < max_new_tokens and not (eos_id is not None and out[i][-1] == eos_id)]
    return out


def _codec_and_ids(runner, tokenizer, texts, ids):
    """(the artifact's tokenizer or --tokenizer's, or None for bytes; the prompts' ids): `ids` as given, or
    each of `texts` encoded."""
    from mq_deploy.data.tokenizer import tokenizer_for_artifact

    codec = tokenizer_for_artifact(runner.artifact, tokenizer, runner.path)
    if ids is None:
        if codec is None:
            raise MQUserError(f"{runner.path}: the model's vocabulary is not bytes and no tokenizer came with the "
                              "artifact; pass --tokenizer FILE_OR_DIR or --prompt-ids")
        ids = [[int(i) for i in codec.encode(t)[0]] for t in texts]
    return codec, ids


def generate_texts(runner, prompts=None, prompt_ids=None, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int = 0, tokenizer: str | None = None) -> list:
    """generate_text for several prompts (texts, or lists of ids) decoded as one batch (generate_batch):
    [{"prompt_ids", "new_ids", "text", "stopped_at_eos"}], each what generate_text gives for that prompt alone."""

    if (prompts is None) == (prompt_ids is None):
        raise MQUserError("give prompts as text or as ids, not both" if prompts is not None else "no prompts")
    codec, prompt_ids = _codec_and_ids(runner, tokenizer, prompts, prompt_ids)
    eos = codec.eos_id if codec is not None else runner.artifact.config.eos_token_id
    news = generate_batch(runner, prompt_ids, max_new_tokens, temperature, seed, eos_id=eos)
    results = []
    for ids, new in zip(prompt_ids, news):
        stopped = bool(new) and eos is not None and new[-1] == eos
        text = None
        if codec is not None:
            stream = codec.stream()
            text = "".join(stream.push(t) for t in (new[:-1] if stopped else new)) + stream.flush()
        results.append({"prompt_ids": list(ids), "new_ids": new, "text": text, "stopped_at_eos": stopped})
    return results


def generate_text(runner, prompt: str | None = None, prompt_ids=None, max_new_tokens: int = 64,
                  temperature: float = 0.0, seed: int = 0, tokenizer: str | None = None, write=None,
                  echo_prompt: bool = False, write_ids: bool = False) -> dict:
    """Generate with the artifact's own tokenizer (or --tokenizer): the prompt is encoded, the new tokens
    are decoded as they come and handed to write(text) in whole characters, and decoding stops at the
    EOS id of the config or the tokenizer. Give exactly one of prompt and prompt_ids. echo_prompt: write the
    prompt text first, once the prefill has run (a refused graph, flag or prompt prints nothing). write_ids:
    write each new id ("12 ") instead of text. Returns {"prompt_ids", "new_ids", "text", "stopped_at_eos"}."""

    if (prompt is None) == (prompt_ids is None):
        raise MQUserError("give --prompt TEXT or --prompt-ids IDS" if prompt is None else
                          "give either --prompt TEXT or --prompt-ids IDS, not both")
    art = runner.artifact
    codec, ids = _codec_and_ids(runner, tokenizer, None if prompt is None else [prompt],
                                None if prompt_ids is None else [prompt_ids])
    prompt_ids = ids[0]
    check_generation(runner, prompt_ids, max_new_tokens, temperature, seed)
    eos = codec.eos_id if codec is not None else art.config.eos_token_id
    stream = codec.stream() if codec is not None and not write_ids else None
    pieces = []
    echo = [bool(echo_prompt and prompt is not None and write)]

    def emit(piece):
        if echo[0]:      # the prefill has run: the prompt goes out before the first new text
            echo[0] = False
            write(prompt)
        if piece and write:
            write(piece)

    def on_token(tok):
        if write_ids:
            emit(f"{tok} ")
        elif stream is not None:
            piece = stream.push(tok)
            if piece:
                pieces.append(piece)
                emit(piece)

    out = generate(runner, prompt_ids, max_new_tokens, temperature, seed, on_token=on_token, eos_id=eos)
    if stream is not None:
        tail = stream.flush()
        if tail:
            pieces.append(tail)
        emit(tail)
    else:
        emit("")
    return {"prompt_ids": list(prompt_ids), "new_ids": out, "text": "".join(pieces) if stream else None,
            "stopped_at_eos": bool(out) and eos is not None and out[-1] == eos}


# -- image classifiers -------------------------------------------------------------------------------
class ImageFiles:
    """uint8 pictures [n, C, H, W] of a folder, read (resize + center crop) as they are sliced."""

    dtype = np.dtype(np.uint8)

    def __init__(self, files, channels, size):
        self.files, self.channels, self.size = list(files), channels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from mq_deploy.data.images import read_picture

        if isinstance(index, slice):
            files = self.files[index]
            if not files:
                return np.zeros((0, self.channels, self.size, self.size), np.uint8)
            return np.stack([read_picture(f, self.channels, self.size) for f in files])
        raise TypeError("ImageFiles takes slices")


def load_images(path: str, channels: int, size: int):
    """uint8 images [n, H, W] or [n, C, H, W], labels or None, and names, from an idx file, an idx
    directory (its test split, with labels), a .npy array, an image file or a directory of images."""
    from mq_deploy.data.images import _find, load_idx_split, read_idx

    if os.path.isdir(path):
        from mq_deploy.data.images import is_image_folder, list_image_folder

        if is_image_folder(path):   # ImageFolder layout (labels) or flat; Vim's resize + center crop
            files, labels, _ = list_image_folder(path)
            return ImageFiles(files, channels, size), labels, [os.path.relpath(f, path) for f in files]
        try:
            _find(path, "t10k-images-idx3-ubyte")
        except MQUserError:
            raise MQUserError(f"{path}: no images in it (PNG/JPEG files or Fashion-MNIST idx files)") from None
        images, labels = load_idx_split(path, "test")
        return images, labels, [str(i) for i in range(len(images))]
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file or directory")
    low = path.lower()
    if low.endswith(IMAGE_SUFFIXES):
        from mq_deploy.data.images import read_picture

        return read_picture(path, channels, size)[None], None, [os.path.basename(path)]
    if low.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise MQUserError(f"{path}: not a readable .npy array ({why})") from None
    else:
        a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim not in (2, 3, 4) or 0 in a.shape[1:]:
        raise MQUserError(f"{path}: expected uint8 pixels [H, W], [n, H, W] or [n, C, H, W], got {a.dtype} "
                          f"{list(a.shape)}")
    if a.ndim == 2:
        a = a[None]
    return a, None, [str(i) for i in range(len(a))]


def classify(runner, images_u8: np.ndarray, mean, std, batch: int = 64, source: str | None = None) -> np.ndarray:
    """Normalise uint8 images as the model was trained and return logits [n, classes]. source: where the
    images came from (named in errors)."""
    from mq_deploy.data.images import to_tensor

    shape = runner.input_specs["images"].shape if "images" in getattr(runner, "input_specs", {}) else None
    if images_u8.dtype != np.uint8:
        raise MQUserError(f"images must be 8-bit (0..255), got {images_u8.dtype}")
    if not len(images_u8):
        raise MQUserError("no images to classify")
    out = []
    for i in range(0, len(images_u8), batch):     # folders are read one batch at a time
        x = to_tensor(images_u8[i:i + batch], mean, std).numpy()
        if shape is not None and list(x.shape[1:]) != [d for d in shape[1:]]:
            raise MQUserError(f"{source + ': ' if source else ''}images are {list(x.shape[1:])} (channels, height, "
                              f"width); the model takes {list(shape[1:])}")
        out.append(runner.infer({"images": x})["logits"])
    return np.concatenate(out)


def classify_path(model_path: str, images_path: str, *, limit: int | None = None, batch: int = 64,
                  custom_op_library: str | None = None, threads: int | None = None, class_names=None) -> dict:
    """`mq-deploy run`: classify the images at `images_path` with an exported Vision Mamba."""
    from mq_deploy.backends.ort.runner import OrtRunner

    runner = OrtRunner(model_path, custom_op_library=custom_op_library, threads=threads)
    cfg = runner.artifact.config          # validated: image size, mean and std finite, std > 0
    if runner.artifact.kind != "vim" or cfg is None:
        raise MQUserError(f"{model_path}: `run` classifies images with an exported Vision Mamba "
                          "(for a language model use `generate`)")
    if class_names and len(class_names) != cfg.num_classes:
        raise MQUserError(f"--class-names has {len(class_names)} names, the model has {cfg.num_classes} classes")
    images, labels, names = load_images(images_path, cfg.in_chans, cfg.img_size)
    if not len(images):
        raise MQUserError(f"{images_path}: holds no images")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise MQUserError(f"{images_path}: {len(labels)} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            bad = labels.max() if labels.max() >= cfg.num_classes else labels.min()
            raise MQUserError(f"{images_path}: label {bad} is outside the model's {cfg.num_classes} classes "
                              f"(0..{cfg.num_classes - 1}); top-1 against it would be meaningless")
    if limit and isinstance(images, ImageFiles):   # a class-sorted folder: spread the subset over it
        from mq_deploy.data.images import spread

        keep = spread(len(images), limit)
        images = ImageFiles([images.files[i] for i in keep], images.channels, images.size)
        names = [names[i] for i in keep]
        labels = None if labels is None else labels[keep]
    elif limit:
        images, names = images[:limit], names[:limit]
        labels = None if labels is None else labels[:limit]
    logits = classify(runner, images, cfg.image_mean, cfg.image_std, batch=batch, source=images_path)
    pred = logits.argmax(-1)
    res = {"predictions": [int(p) for p in pred], "names": names, "classes": class_names}
    if labels is not None:
        res["top1"] = float((pred == np.asarray(labels)).mean())
    return res
