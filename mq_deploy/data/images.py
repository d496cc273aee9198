"""Image data: Fashion-MNIST / MNIST idx files (gzip or raw), as Debian's dataset-fashion-mnist installs them."""

from __future__ import annotations

import gzip
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
    count = int(np.prod(shape)) if shape else 1
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
        raise MQUserError(f"{directory}: no such directory")
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MQUserError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def to_tensor(images_u8: np.ndarray, mean, std):
    """uint8 [n, H, W] or [n, C, H, W] -> normalised float32 torch tensor [n, C, H, W]."""
    import torch

    x = torch.from_numpy(np.array(images_u8, dtype=np.uint8)).float().div_(255.0)  # a writable copy
    if x.dim() == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip idx file (atomically)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape)
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + a.tobytes())
    os.replace(tmp, path)
