"""Vim at ImageNet shape: hustvl-keyed .pth files made here (Vim-T: 224 px, patch 16, 197 tokens, depth 24;
the stride-8 "+" variant), JPEG/PNG folders in the ImageFolder layout and flat, Vim's eval transform,
and eval / quantize / verify / run on such folders through the real command line."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

from mq_deploy.config import VimConfig
from mq_deploy.data.images import list_image_folder, read_picture
from mq_deploy.errors import MQUserError
from mq_deploy.families.mamba1 import MixerConfig
from mq_deploy.models.loaders import load_model
from mq_deploy.models.vim import Vim

import reference_impl as ref
from conftest import rel_err
from helpers import assert_user_error

PIL = pytest.importorskip("PIL.Image")


def hustvl_pth(path, d_model=192, depth=24, stride=16, classes=1000, name="vim_tiny_patch16_224_bimambav2"):
    """A .pth as hustvl/Vim's main.py saves it: {"model": state_dict, "args": Namespace, "epoch", ...}."""
    cfg = VimConfig(d_model=d_model, n_layer=depth, num_classes=classes, img_size=224, patch_size=16, stride=stride,
                    in_chans=3, mixer=MixerConfig(d_model=d_model, d_state=16, expand=2, bimamba=True))
    m = Vim(cfg)
    m.reset_parameters(seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 299,
                "args": argparse.Namespace(model=name, input_size=224, batch_size=128)}, path)
    return sd


def test_vim_t_224_and_stride8(tmp_path):
    sd = hustvl_pth(tmp_path / "vim_t.pth")
    loaded = load_model(str(tmp_path / "vim_t.pth"))
    cfg = loaded.config
    assert (cfg.img_size, cfg.patch_size, cfg.stride, cfg.num_patches + 1, cfg.n_layer, cfg.d_model) == \
           (224, 16, 16, 197, 24, 192)
    assert cfg.image_mean == (0.485, 0.456, 0.406) and cfg.image_std == (0.229, 0.224, 0.225)
    x = torch.randn(1, 3, 224, 224)
    # parity on the first 2 of the 24 layers (the whole depth costs minutes in the step-by-step reference)
    sd2 = {k: v for k, v in sd.items() if not k.startswith("layers.") or int(k.split(".")[1]) < 2}
    torch.save({"model": sd2}, tmp_path / "vim_t_2.pth")
    two = load_model(str(tmp_path / "vim_t_2.pth"))
    with torch.no_grad():
        e = rel_err(two.model(x), ref.vim_forward(sd2, x, 16, 16, cfg.mixer.dt_rank, 16))
    print(f"Vim-T 224 (2 layers): rel err vs the hustvl reference {e:.2e}")
    assert e < 1e-4
    # the "+" model: stride 8, 27 x 27 patches + class token; the stride comes from the saved model name
    sd8 = hustvl_pth(tmp_path / "vim_t_plus.pth", depth=2, stride=8, name="vim_tiny_patch16_stride8_224_bimambav2")
    c8 = load_model(str(tmp_path / "vim_t_plus.pth"))
    assert (c8.config.stride, c8.config.num_patches + 1) == (8, 730)
    with torch.no_grad():
        e = rel_err(c8.model(x), ref.vim_forward(sd8, x, 16, 8, c8.config.mixer.dt_rank, 16))
    assert e < 1e-4


def test_stride8_weights_without_args(tmp_path, capsys):
    """A bare state dict of a "+" model (no args to name the stride): its 27 x 27 grid is hustvl's 224 px at
    stride 8, said on stderr; a config.json beside it decides otherwise."""
    sd8 = hustvl_pth(tmp_path / "plus.pth", depth=1, stride=8, name="vim_tiny_patch16_stride8_224_bimambav2")
    torch.save({"model": sd8}, tmp_path / "bare.pth")
    cfg = load_model(str(tmp_path / "bare.pth")).config
    assert (cfg.img_size, cfg.stride, cfg.num_patches + 1) == (224, 8, 730)
    assert "taken as 224 px at stride 8" in capsys.readouterr().err
    folder = tmp_path / "at432"
    folder.mkdir()
    torch.save({"model": sd8}, folder / "weights.pth")
    (folder / "config.json").write_text(json.dumps({"img_size": 432, "stride": 16}))
    cfg = load_model(str(folder)).config
    assert (cfg.img_size, cfg.stride) == (432, 16) and capsys.readouterr().err == ""
    sd16 = hustvl_pth(tmp_path / "t.pth", depth=1)
    torch.save({"model": sd16}, tmp_path / "bare16.pth")
    cfg = load_model(str(tmp_path / "bare16.pth")).config
    assert (cfg.img_size, cfg.stride) == (224, 16) and capsys.readouterr().err == ""


def _picture(path, w, h, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[: h // 2] //= 2       # some structure, so resizing matters
    PIL.fromarray(a).save(path)
    return a


def image_folder(root, classes=("n01440764", "n01443537", "n01484850"), per_class=3):
    """ImageNet-style folder: class subfolders of JPEGs and PNGs of various sizes."""
    sizes = [(300, 260), (256, 320), (500, 375), (224, 224), (240, 400)]
    k = 0
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            w, h = sizes[k % len(sizes)]
            _picture(os.path.join(root, c, f"img_{i}.{'JPEG' if k % 2 else 'png'}"), w, h, k)
            k += 1
    return root


def hustvl_eval(path, size=224, crop_ratio=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """hustvl/Vim's datasets.build_transform(is_train=False, input_size=224) on the RGB image its loader makes
    (torchvision's pil_loader: convert("RGB")), written out independently of mq_deploy: Resize(int(size /
    crop_ratio), bicubic) on the shorter side (torchvision's output-size arithmetic, and no resize when the
    size already matches), CenterCrop(size) (offsets by Python's round), ToTensor, Normalize; in torch float32.
    torchvision is not installed here."""
    im = PIL.open(path).convert("RGB")
    w, h = im.size
    target = int(size / crop_ratio)                  # 256
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = target, int(target * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), PIL.BICUBIC)
    a = np.array(im)                                 # [H, W, 3]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    a = a[top:top + size, left:left + size]
    x = torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1)), a.transpose(2, 0, 1)


def odd_pictures(root):
    """JPEGs and PNGs of the sizes and modes that trip a transform: exactly 224, off by one, landscape,
    portrait, grey, RGBA."""
    rng = np.random.default_rng(7)
    os.makedirs(root, exist_ok=True)
    out = []
    for w, h, mode, ext in [(224, 224, "RGB", "jpg"), (300, 200, "RGB", "jpg"), (225, 224, "RGB", "jpg"),
                            (500, 375, "RGB", "jpg"), (200, 300, "RGB", "jpg"), (256, 256, "RGB", "png"),
                            (240, 320, "L", "png"), (320, 240, "RGBA", "png"), (224, 224, "L", "jpg")]:
        chans = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        a = rng.integers(0, 256, (h, w, chans), dtype=np.uint8)
        a[: h // 3] //= 3                             # structure, so where the crop lands matters
        if mode == "RGBA":
            a[..., 3] = rng.integers(0, 256, (h, w), dtype=np.uint8)   # alpha, dropped by convert("RGB")
        p = os.path.join(root, f"{w}x{h}_{mode}.{ext}")
        PIL.fromarray(a[..., 0] if chans == 1 else a, mode).save(p)
        out.append(p)
    return out


def test_eval_transform_is_hustvls(tmp_path):
    """Every Vim path reads a picture through data/picture.py; on 224-px models it equals hustvl's eval
    transform bit for bit, a picture that is already 224 x 224 included (it is resized to 256 and cropped,
    as in hustvl, not taken as it is)."""
    from mq_deploy.data.images import ImageFolderData
    from mq_deploy.data.picture import transform_for

    assert transform_for(224) == {"resize": 256, "crop": 224, "exact_as_is": False}
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    files = odd_pictures(str(tmp_path / "odd"))
    got_x = ImageFolderData(files, 3, 224, mean, std)[:]            # eval / calibration / verify
    for i, f in enumerate(files):
        want_x, want_u8 = hustvl_eval(f)
        got = read_picture(f, 3, 224)                                # run
        diff = int(np.abs(got.astype(int) - want_u8).max())
        print(f"{os.path.basename(f)}: max |ours - hustvl| = {diff} (uint8), tensor {float((got_x[i] - want_x).abs().max())}")
        assert got.shape == (3, 224, 224) and np.array_equal(got, want_u8), f
        assert torch.equal(got_x[i], want_x), f
    # the 224 x 224 JPEG: not the picture as it was
    raw = np.asarray(PIL.open(files[0]).convert("RGB")).transpose(2, 0, 1)
    assert not np.array_equal(read_picture(files[0], 3, 224), raw)


def test_small_models_keep_their_transform(tmp_path):
    """28 px (the Fashion-MNIST sample): hustvl resizes nothing at <= 32 px, so a 28 x 28 picture is taken
    as it is; a picture of another size is resized (shorter side 32, bicubic) and center-cropped."""
    from mq_deploy.data.picture import transform_for

    assert transform_for(28) == {"resize": 32, "crop": 28, "exact_as_is": True}
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    PIL.fromarray(a, "L").save(tmp_path / "a.png")
    assert np.array_equal(read_picture(str(tmp_path / "a.png"), 1, 28), a[None])
    b = rng.integers(0, 256, (30, 40), dtype=np.uint8)             # 40 wide, 30 high
    PIL.fromarray(b, "L").save(tmp_path / "b.png")
    want = np.asarray(PIL.fromarray(b, "L").resize((42, 32), PIL.BICUBIC))[2:30, 7:35]   # int(32*40/30) = 42
    assert np.array_equal(read_picture(str(tmp_path / "b.png"), 1, 28), want[None])


def test_pictures_that_cannot_be_read_safely(tmp_path):
    """A PNG header announcing 100000 x 100000 pixels (a decompression bomb) is refused before decoding;
    so is a truncated file."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(MQUserError, match=r"bomb.png: too many pixels"):
        read_picture(str(bomb), 3, 224)
    good = tmp_path / "good.jpg"
    _picture(good, 300, 260, 0)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(MQUserError, match=r"cut.jpg: cannot read the image"):
        read_picture(str(tmp_path / "cut.jpg"), 3, 224)


def test_image_folder_layouts_and_errors(tmp_path):
    root = image_folder(str(tmp_path / "val"))
    files, labels, classes = list_image_folder(root)
    assert classes == ["n01440764", "n01443537", "n01484850"] and list(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        _picture(flat / f"p{i}.jpg", 260, 300, i)
    files, labels, classes = list_image_folder(str(flat))
    assert len(files) == 2 and labels is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(MQUserError, match="no images in it"):
        list_image_folder(str(tmp_path / "empty"))
    (flat / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MQUserError, match="broken.jpg: cannot read the image"):
        read_picture(str(flat / "broken.jpg"), 3, 224)
    os.makedirs(tmp_path / "val" / "n09999999")
    with pytest.raises(MQUserError, match="n09999999: class folder without images"):
        list_image_folder(root)


@pytest.fixture(scope="module")
def vim_small(tmp_path_factory):
    d = tmp_path_factory.mktemp("vim224")
    hustvl_pth(d / "vim.pth", d_model=64, depth=2, classes=3)
    return d


def test_cli_on_image_folders(vim_small, capsys):
    from mq_deploy.cli.main import main
    from mq_deploy.evaluate import EvalConfig, evaluate

    d = vim_small
    val = image_folder(str(d / "val"))
    pth = str(d / "vim.pth")
    out = d / "eval.json"
    assert main(["eval", pth, "--data", val, "--json", str(out)]) == 0
    top1 = json.loads(out.read_text())["value"]
    # top-1 by hand from the same transform
    loaded = load_model(pth)
    files, labels, _ = list_image_folder(val)
    x = torch.from_numpy(np.stack([read_picture(f, 3, 224) for f in files])).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loaded.config.image_mean, loaded.config.image_std))
    x = (x - mean) / std
    with torch.no_grad():
        want = float((loaded.model(x).argmax(-1).numpy() == labels).mean())
    assert top1 == want
    assert evaluate(loaded, EvalConfig(data=val, limit=3))["samples"] == 3    # spread over the classes
    q, onnx_path = str(d / "q"), str(d / "vim.onnx")
    assert main(["quantize", pth, "-o", q, "--calib", val, "--calib-samples", "6"]) == 0
    assert main(["export", q, "-o", onnx_path]) == 0
    vj = d / "verify.json"
    code = main(["verify", onnx_path, "--reference", q, "--data", val, "--json", str(vj)])
    rep = json.loads(vj.read_text())
    print(f"verify on the folder: {rep['outputs']['logits']['cosine_mean']:.6f} cosine, code {code}")
    assert rep["metrics"]["samples"] == 9 and rep["outputs"]["logits"]["cosine_mean"] > 0.99
    capsys.readouterr()
    assert main(["run", onnx_path, "--images", val]) == 0
    printed = capsys.readouterr().out
    assert "n01440764/img_0.png" in printed and "top-1" in printed
    assert main(["run", onnx_path, "--images", os.path.join(val, "n01443537")]) == 0   # a flat folder
    assert "top-1" not in capsys.readouterr().out
    os.makedirs(d / "nothing", exist_ok=True)
    assert_user_error(capsys, ["eval", pth, "--data", str(d / "nothing")], "no images in it")


def test_calibration_on_a_flat_folder(vim_small, tmp_path, capsys):
    """A flat folder (no labels) larger than --calib-samples calibrates quantize and inspect; asking for more
    images than it holds says how many were used."""
    from mq_deploy.cli.main import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        _picture(flat / f"p{i}.{'jpg' if i % 2 else 'png'}", 260 + 10 * i, 300, i)
    pth = str(vim_small / "vim.pth")
    assert main(["quantize", pth, "-o", str(tmp_path / "q"), "--calib", str(flat), "--calib-samples", "3"]) == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 3
    assert main(["inspect", pth, "-o", str(tmp_path / "rep"), "--calib", str(flat), "--calib-samples", "2"]) == 0
    capsys.readouterr()
    assert main(["quantize", pth, "-o", str(tmp_path / "q9"), "--calib", str(flat), "--calib-samples", "9"]) == 0
    assert "holds 5 images: calibrating on 5, not 9" in capsys.readouterr().err
