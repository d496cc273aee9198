"""What `mq-deploy generate` and `mq-deploy run` do with an exported graph."""

from __future__ import annotations

import os

import numpy as np

from mq_deploy.errors import MQUserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# -- language models ---------------------------------------------------------------------------------
def check_generation(runner, prompt_ids, max_new_tokens: int, temperature: float) -> dict:
    """Everything generate() refuses, checked before any output: returns the artifact's mq.config."""
    meta = getattr(runner, "meta", {})
    if meta.get("mq.graph") != "step" or "conv_state" not in runner.input_specs:
        raise MQUserError(f"{runner.path}: generate needs the decode-step graph "
                          "(mq-deploy export MODEL -o model_step.onnx --decode-step)")
    if max_new_tokens < 0:
        raise MQUserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise MQUserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not len(prompt_ids):
        raise MQUserError("the prompt is empty")
    cfg = meta["mq.config"]
    vocab = cfg["vocab_size"]
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise MQUserError(f"prompt ids must lie in [0, {vocab})")
    return cfg


def generate(runner, prompt_ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             on_token=None, eos_id: int | None = None) -> list:
    """Prefill the prompt in one call of the step graph, then decode one token per call.

    Greedy when temperature is 0, else sampling from softmax(logits / temperature). Stops after
    max_new_tokens or at eos_id (which is returned as the last id, but not passed to on_token).
    Returns the new ids."""
    cfg = check_generation(runner, prompt_ids, max_new_tokens, temperature)
    m = cfg["mixer"]
    feeds = {"input_ids": np.asarray([prompt_ids], np.int64),
             "conv_state": np.zeros((cfg["n_layer"], 1, m["d_inner"], m["d_conv"] - 1), np.float32),
             "ssm_state": np.zeros((cfg["n_layer"], 1, m["d_inner"], m["d_state"]), np.float32)}
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
            feeds = {"input_ids": np.asarray([[tok]], np.int64), "conv_state": res["conv_state_out"],
                     "ssm_state": res["ssm_state_out"]}
    return out


def generate_text(runner, prompt: str | None = None, prompt_ids=None, max_new_tokens: int = 64,
                  temperature: float = 0.0, seed: int = 0, tokenizer: str | None = None, write=None,
                  echo_prompt: bool = False) -> dict:
    """Generate with the artifact's own tokenizer (or --tokenizer): the prompt is encoded, the new tokens
    are decoded as they come and handed to write(text) in whole characters, and decoding stops at the
    EOS id of the config or the tokenizer. echo_prompt: write the prompt text first, once every check has
    passed (a refused graph or flag prints nothing). Returns {"prompt_ids", "new_ids", "text", "stopped_at_eos"}."""
    from mq_deploy.data.tokenizer import tokenizer_for_artifact

    meta = getattr(runner, "meta", {})
    codec = tokenizer_for_artifact(meta, tokenizer, runner.path)
    if prompt_ids is None:
        if prompt is None:
            raise MQUserError("give --prompt TEXT or --prompt-ids IDS")
        if codec is None:
            raise MQUserError(f"{runner.path}: the model's vocabulary is not bytes and no tokenizer came with the "
                              "artifact; pass --tokenizer FILE_OR_DIR or --prompt-ids")
        prompt_ids = [int(i) for i in codec.encode(prompt)[0]]
    check_generation(runner, prompt_ids, max_new_tokens, temperature)
    if echo_prompt and prompt is not None and write:
        write(prompt)
    eos = codec.eos_id if codec is not None else (meta.get("mq.config") or {}).get("eos_token_id")
    stream = codec.stream() if codec is not None else None
    pieces = []

    def on_token(tok):
        if stream is not None:
            piece = stream.push(tok)
            if piece:
                pieces.append(piece)
                if write:
                    write(piece)

    out = generate(runner, prompt_ids, max_new_tokens, temperature, seed, on_token=on_token, eos_id=eos)
    if stream is not None:
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if write:
                write(tail)
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
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MQUserError(f"{path}: not a readable .npy array ({e})") from None
    else:
        a = read_idx(path)
    if a.ndim == 2:
        a = a[None]
    return a, None, [str(i) for i in range(len(a))]


def classify(runner, images_u8: np.ndarray, mean, std, batch: int = 64) -> np.ndarray:
    """Normalise uint8 images as the model was trained and return logits [n, classes]."""
    from mq_deploy.data.images import to_tensor

    shape = runner.input_specs["images"].shape if "images" in getattr(runner, "input_specs", {}) else None
    if images_u8.dtype != np.uint8:
        raise MQUserError(f"images must be 8-bit (0..255), got {images_u8.dtype}")
    out = []
    for i in range(0, len(images_u8), batch):     # folders are read one batch at a time
        x = to_tensor(images_u8[i:i + batch], mean, std).numpy()
        if shape is not None and list(x.shape[1:]) != [d for d in shape[1:]]:
            raise MQUserError(f"images are {list(x.shape[1:])} (channels, height, width); the model takes "
                              f"{list(shape[1:])}")
        out.append(runner.infer({"images": x})["logits"])
    return np.concatenate(out)


def classify_path(model_path: str, images_path: str, *, limit: int | None = None, batch: int = 64,
                  custom_op_library: str | None = None, threads: int | None = None, class_names=None) -> dict:
    """`mq-deploy run`: classify the images at `images_path` with an exported Vision Mamba."""
    from mq_deploy.backends.ort.runner import OrtRunner

    runner = OrtRunner(model_path, custom_op_library=custom_op_library, threads=threads)
    cfg = runner.meta.get("mq.config")
    if runner.meta.get("mq.kind") != "vim" or cfg is None:
        raise MQUserError(f"{model_path}: `run` classifies images with an exported Vision Mamba "
                          "(for a language model use `generate`)")
    images, labels, names = load_images(images_path, cfg["in_chans"], cfg["img_size"])
    if limit and isinstance(images, ImageFiles):   # a class-sorted folder: spread the subset over it
        from mq_deploy.data.images import spread

        keep = spread(len(images), limit)
        images = ImageFiles([images.files[i] for i in keep], images.channels, images.size)
        names = [names[i] for i in keep]
        labels = None if labels is None else labels[keep]
    elif limit:
        images, names = images[:limit], names[:limit]
        labels = None if labels is None else labels[:limit]
    logits = classify(runner, images, cfg["image_mean"], cfg["image_std"], batch=batch)
    if class_names and len(class_names) != logits.shape[-1]:
        raise MQUserError(f"--class-names has {len(class_names)} names, the model has {logits.shape[-1]} classes")
    pred = logits.argmax(-1)
    res = {"predictions": [int(p) for p in pred], "names": names, "classes": class_names}
    if labels is not None:
        res["top1"] = float((pred == np.asarray(labels)).mean())
    return res
