"""The one image transform of every Vision Mamba path: `run`, `eval`, calibration, `verify` and the Triton
preprocessing model. `mq-deploy triton` copies this very file beside that model (as mq_picture.py), so the
server runs the same code; it therefore imports nothing but the standard library, numpy and Pillow.

Which transform applies is decided once, by `transform_for(img_size)`, as hustvl/Vim's (DeiT's)
`build_transform(is_train=False)` decides it (`resize_im = input_size > 32`):
- img_size > 32 (Vim-T/S/B at 224): resize the shorter side to int(img_size / 0.875) (256 for 224) with
  bicubic interpolation, center-crop img_size, as torchvision's `Resize(int)` + `CenterCrop` on a PIL
  image (timm's `create_transform(224, is_training=False)`, crop_pct 0.875, does the same);
- img_size <= 32 (the 28 px Fashion-MNIST sample): hustvl resizes nothing, so a picture of exactly
  img_size x img_size is taken as it is; a picture of any other size is resized and cropped as above
  (hustvl would fail on it).
Then pixel / 255, (x - mean) / std per channel, in float32 (ToTensor + Normalize). Grey models read
pictures as "L", colour models as "RGB" (Pillow's convert: alpha dropped, grey replicated).
"""

import io
import re
import warnings

import numpy as np

EVAL_CROP_RATIO = 0.875     # hustvl/Vim's --eval-crop-ratio default: 224 -> resize 256, crop 224
RESIZE_ABOVE = 32           # hustvl/Vim's (DeiT's) eval transform resizes only inputs larger than this


class PictureError(ValueError):
    """A picture that cannot be read, or cannot be read safely (callers turn it into their own error)."""


def transform_for(img_size: int) -> dict:
    """The eval transform of a model of `img_size` px: {"resize": shorter side, "crop": size,
    "exact_as_is": whether a picture of exactly the crop size skips the resize}."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise PictureError(f"img_size must be a positive integer, got {img_size!r}")
    return {"resize": int(img_size / EVAL_CROP_RATIO), "crop": img_size, "exact_as_is": img_size <= RESIZE_ABOVE}


def transform(im, channels: int, img_size: int) -> np.ndarray:
    """A PIL image -> uint8 [channels, img_size, img_size], by transform_for(img_size)."""
    from PIL import Image

    t = transform_for(img_size)
    size = t["crop"]
    with warnings.catch_warnings():     # palette-with-transparency notes: the conversion is what hustvl's loader does
        warnings.simplefilter("ignore", UserWarning)
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if not (t["exact_as_is"] and (w, h) == (size, size)):
        short = t["resize"]
        # torchvision's Resize(int) on a PIL image: the shorter side to `short`, the longer one scaled and
        # truncated (int); a picture whose shorter side already has that length is left alone
        if (w <= h and w != short) or (h < w and h != short):
            w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            im = im.resize((w, h), Image.BICUBIC)
        # torchvision's CenterCrop: offsets rounded with Python's round() (half to even)
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def decode(source, channels: int, img_size: int) -> np.ndarray:
    """An encoded picture (a path, or the bytes of a PNG/JPEG/... file) -> uint8 [C, img_size, img_size].
    Raises PictureError for anything Pillow cannot read, and for pictures past Pillow's decompression-bomb
    limit (a header can announce 100000 x 100000 pixels in a few bytes)."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return transform(im, channels, img_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(m.group(1)):,}" if m else "more than that"
        raise PictureError(f"too many pixels ({n}; Pillow reads at most {Image.MAX_IMAGE_PIXELS:,}, a guard "
                           "against decompression bombs)") from None
    except PictureError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # UnidentifiedImageError is an OSError
        raise PictureError(f"cannot read the image ({e})") from None


def normalize(images_u8, mean, std) -> np.ndarray:
    """uint8 [n, H, W] or [n, C, H, W] -> float32 [n, C, H, W]: pixel / 255, then (x - mean) / std per
    channel, each step in float32 (bit for bit torchvision's ToTensor + Normalize)."""
    a = np.asarray(images_u8)
    if a.dtype != np.uint8:
        raise PictureError(f"images must be 8-bit (0..255), got {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise PictureError(f"images must be [n, H, W] or [n, C, H, W], got shape {list(a.shape)}")
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    if m.shape[1] not in (1, a.shape[1]) or s.shape[1] not in (1, a.shape[1]):
        raise PictureError(f"mean/std have {m.shape[1]}/{s.shape[1]} values for {a.shape[1]}-channel images")
    return (a.astype(np.float32) / np.float32(255.0) - m) / s
