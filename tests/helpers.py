"""Shared test factories and CLI helpers. Tests import these from here, never from each other."""

import subprocess
import sys

import torch

from mq_deploy.config import MambaLMConfig, MixerConfig, VimConfig
from mq_deploy.models.mamba import MambaLM
from mq_deploy.models.vim import Vim


def small_lm(**kw):
    cfg = MambaLMConfig(d_model=kw.pop("d_model", 20), n_layer=kw.pop("n_layer", 2), vocab_size=kw.pop("vocab", 50),
                        mixer=MixerConfig(d_model=kw.pop("d_model2", 20), **kw))
    m = MambaLM(cfg)
    m.reset_parameters(seed=1)
    with torch.no_grad():  # make every parameter matter (biases and D away from their init)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def small_vim(**kw):
    cfg = VimConfig(d_model=kw.pop("d_model", 24), n_layer=kw.pop("n_layer", 2), num_classes=7, img_size=kw.pop("img", 12),
                    patch_size=kw.pop("patch", 4), stride=kw.pop("stride", None), in_chans=kw.pop("chans", 1),
                    image_mean=kw.pop("mean", (0.5,)), image_std=kw.pop("std", (0.5,)))
    m = Vim(cfg)
    m.reset_parameters(seed=2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def run_cli(*args, timeout=300, **kw):
    """The real command line in a fresh interpreter (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "mq_deploy", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_user_error(capsys, argv, *needles):
    """In-process CLI call that must end in one clear error line (exit 2, no traceback)."""
    from mq_deploy.cli.main import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
