"""What `mq-deploy generate` and `mq-deploy run` do with an exported graph."""

from __future__ import annotations

import os

import numpy as np

from mq_deploy.errors import MQUserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# -- language models ---------------------------------------------------------------------------------
def generate(runner, prompt_ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             on_token=None) -> list:
    """Prefill the prompt in one call of the step graph, then decode one token per call.

    Greedy when temperature is 0, else sampling from softmax(logits / temperature). Returns the new ids."""
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
    m = cfg["mixer"]
    vocab = cfg["vocab_size"]
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise MQUserError(f"prompt ids must lie in [0, {vocab})")
    feeds = {"input_ids": np.asarray([prompt_ids], np.int64),
             "conv_state": np.zeros((cfg["n_layer"], 1, m["d_inner"], m["d_conv"] - 1), np.float32),
             "ssm_state": np.zeros((cfg["n_layer"], 1, m["d_inner"], m["d_state"]), np.float32)}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(max_new_tokens):
        res = runner.infer(feeds)
        logits = res["logits"][0, -1].astype(np.float64)
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            tok = int(rng.choice(len(p), p=p / p.sum()))
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if on_token:
            on_token(tok)
        feeds = {"input_ids": np.asarray([[tok]], np.int64), "conv_state": res["conv_state_out"],
                 "ssm_state": res["ssm_state_out"]}
    return out


# -- image classifiers -------------------------------------------------------------------------------
def _read_picture(path: str, channels: int, size: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise MQUserError("reading PNG/JPEG images needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise MQUserError(f"{path}: cannot read the image ({e})") from None
    return a if channels == 1 else a.transpose(2, 0, 1)


def load_images(path: str, channels: int, size: int):
    """uint8 images [n, H, W] or [n, C, H, W], labels or None, and names, from an idx file, an idx
    directory (its test split, with labels), a .npy array, an image file or a directory of images."""
    from mq_deploy.data.images import _find, load_idx_split, read_idx

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if files:
            imgs = [_read_picture(os.path.join(path, f), channels, size) for f in files]
            return np.stack(imgs), None, files
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
        return _read_picture(path, channels, size)[None], None, [os.path.basename(path)]
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
    x = to_tensor(images_u8, mean, std).numpy()
    if shape is not None and list(x.shape[1:]) != [d for d in shape[1:]]:
        raise MQUserError(f"images are {list(x.shape[1:])} (channels, height, width); the model takes "
                          f"{list(shape[1:])}")
    return np.concatenate([runner.infer({"images": x[i:i + batch]})["logits"] for i in range(0, len(x), batch)])


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
    if limit:
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
