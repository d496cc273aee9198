"""Image data: Fashion-MNIST / MNIST idx files (gzip or raw), as Debian's dataset-fashion-mnist installs them,
and folders of JPEG/PNG files: the ImageFolder layout (one subfolder per class, labels from the sorted
class names, as torchvision's ImageFolder) or a flat folder of unlabelled images.

Pictures go through the one eval transform of mq_deploy/data/picture.py (hustvl/Vim's: shorter side to
256 bicubic, center crop 224, for 224-px models), then (pixel / 255 - mean) / std per channel.
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

from mq_deploy.errors import MQUserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# "calib" is our own: a small slice of the training images shipped with a sample for calibration
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "calib": "calib"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (the MNIST container format), optionally gzip-compressed."""
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise MQUserError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise MQUserError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MQUserError(f"{path}: truncated idx header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(shape)      # Python ints: a header of huge dimensions cannot wrap around int64
    if len(data) - header != count * dtype.itemsize:
        raise MQUserError(f"{path}: holds {len(data) - header} data bytes, its header announces "
                          f"{count * dtype.itemsize} (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise MQUserError(f"{directory}: no {stem}[.gz] (expected the idx layout of Debian's dataset-fashion-mnist)")


def load_idx_split(directory: str, split: str = "test"):
    """Images uint8 [n, 28, 28] and labels int64 [n] of one split ('train' or 'test') of an idx directory."""
    if split not in _SPLIT_PREFIX:
        raise MQUserError(f"unknown split {split!r} (expected one of {', '.join(_SPLIT_PREFIX)})")
    if not os.path.isdir(directory):
        raise MQUserError(_not_a_folder(directory))
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MQUserError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def to_tensor(images_u8: np.ndarray, mean, std):
    """uint8 [n, H, W] or [n, C, H, W] -> normalised float32 torch tensor [n, C, H, W] (picture.normalize)."""
    import torch

    from mq_deploy.data import picture

    try:
        return torch.from_numpy(picture.normalize(images_u8, mean, std))
    except picture.PictureError as e:
        raise MQUserError(str(e)) from None


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip idx file (atomically)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape)
    from mq_deploy import fileio

    # a data file the caller (tests, the samples' data preparation) replaces on purpose
    with fileio.atomic_file(path, "wb", overwrite=True, inout=True) as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + a.tobytes())


# -- folders of pictures -------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _not_a_folder(path: str) -> str:
    if os.path.isfile(path):
        return (f"{path}: a file, but Vision Mamba data is a folder (of images, or of Fashion-MNIST idx files); "
                "text is for language models")
    return f"{path}: no such directory"


def list_image_folder(path: str):
    """(files, labels or None, class names or None) of an image folder.

    Subfolders holding images make it an ImageFolder (class index = position in the sorted subfolder
    names, as torchvision); images directly in it make a flat, unlabelled folder."""
    if not os.path.isdir(path):
        raise MQUserError(_not_a_folder(path))
    entries = sorted(os.listdir(path))
    classes = [e for e in entries if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")]
    flat = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(path, e))]
    if classes and not flat:
        files, labels = [], []
        for i, c in enumerate(classes):
            found = []
            for root, dirs, names in os.walk(os.path.join(path, c), followlinks=True):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names) if _is_image(n)]
            if not found:
                raise MQUserError(f"{os.path.join(path, c)}: class folder without images (JPEG/PNG)")
            files += found
            labels += [i] * len(found)
        return files, np.asarray(labels, np.int64), classes
    if flat:
        return [os.path.join(path, f) for f in flat], None, None
    raise MQUserError(f"{path}: no images in it (JPEG/PNG files, or class subfolders of them)")


def read_picture(path: str, channels: int, size: int) -> np.ndarray:
    """uint8 [C, size, size]: the picture at `path` through the eval transform (picture.transform_for)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MQUserError("reading PNG/JPEG images needs Pillow (pip install pillow)") from None
    from mq_deploy.data import picture

    try:
        return picture.decode(path, channels, size)
    except picture.PictureError as e:
        raise MQUserError(f"{path}: {e}") from None


class ImageFolderData:
    """Images of a folder, read on demand: a slice gives a normalised float32 tensor [n, C, H, W] of those
    images; an index array gives a reordered view (nothing read). So an ImageNet-sized folder is read
    one batch at a time by evaluation and calibration alike."""

    def __init__(self, files, channels, size, mean, std):
        self.files, self.channels, self.size, self.mean, self.std = list(files), channels, size, mean, std

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return to_tensor(self.uint8(index), self.mean, self.std)
        idx = np.asarray(index).reshape(-1)
        return ImageFolderData([self.files[int(i)] for i in idx], self.channels, self.size, self.mean, self.std)

    def uint8(self, index=slice(None)) -> np.ndarray:
        files = self.files[index]
        if not files:
            return np.zeros((0, self.channels, self.size, self.size), np.uint8)
        return np.stack([read_picture(f, self.channels, self.size) for f in files])


def spread(n: int, limit: int | None) -> np.ndarray:
    """`limit` indices spread evenly over n items (an ImageFolder is sorted by class; the first N would be
    one class)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def is_image_folder(path: str) -> bool:
    """A folder of pictures (flat, or class subfolders holding pictures) rather than an idx directory.
    A folder with neither is an error that names both layouts."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if any(n.endswith(("-idx3-ubyte", "-idx3-ubyte.gz", "-idx1-ubyte", "-idx1-ubyte.gz")) for n in names):
        return False
    if any(_is_image(n) for n in names):
        return True
    for n in names:
        sub = os.path.join(path, n)
        if os.path.isdir(sub) and not n.startswith("."):
            for _, _, files in os.walk(sub, followlinks=True):
                if any(_is_image(f) for f in files):
                    return True
    raise MQUserError(f"{path}: no images in it (JPEG/PNG files, flat or in class subfolders) and no idx files "
                      "(t10k-images-idx3-ubyte[.gz] etc., the layout of Debian's dataset-fashion-mnist)")
