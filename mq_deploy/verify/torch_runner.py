"""The PyTorch reference behind the Runner protocol: our model, FP or fake-quantized (a quantized
checkpoint loaded with mq_deploy.quant.qcheckpoint.load)."""

from __future__ import annotations

import contextlib

import numpy as np

from mq_deploy.backends.base import Runner, TensorSpec


class TorchRunner(Runner):
    """Feeds: input_ids (LM; with conv_state / ssm_state for the step form) or images (Vim)."""

    def __init__(self, loaded, step: bool = False):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.name = f"PyTorch reference {loaded.path}"
        cfg = loaded.config
        self.step = step
        if loaded.architecture == "mamba_lm":
            from mq_deploy.families import state_inputs

            self.input_specs = {"input_ids": TensorSpec("input_ids", np.int64, ("batch", "seq"))}
            self.output_names = ["logits"]
            self.layout = state_inputs(cfg) if step else []      # as the step graph lays its states out
            for si in self.layout:
                self.input_specs[si.name] = TensorSpec(si.name, np.dtype(si.spec.dtype), si.dims)
                self.output_names.append(si.output)
        else:
            self.input_specs = {"images": TensorSpec("images", np.float32,
                                                     ("batch", cfg.in_chans, cfg.img_size, cfg.img_size))}
            self.output_names = ["logits"]

    @contextlib.contextmanager
    def perturbed(self, rel: float, seed: int = 0):
        """Within the block, the reference runs under another valid rounding order: every quantizer's input
        (each mixer's act_hook) or, in a float model, every mixer's input is multiplied by (1 +- rel), the sign
        drawn per element (rel = 2^-23 moves each float32 value by one or two units of its last place, as a
        different summation order does). What verify's noise floor measures."""
        import torch

        from mq_deploy.calib.collect import mixers

        g = torch.Generator().manual_seed(seed)

        def jitter(t):
            if not torch.is_floating_point(t):
                return t
            sign = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
            return t * (1 + rel * sign)

        undo = []
        try:
            for _, mixer in mixers(self.model):
                hook = getattr(mixer, "act_hook", None)
                if hook is not None:
                    mixer.act_hook = lambda name, t, hook=hook: hook(name, jitter(t))
                    undo.append(lambda mixer=mixer, hook=hook: setattr(mixer, "act_hook", hook))
                else:
                    h = mixer.register_forward_pre_hook(lambda mod, args: (jitter(args[0]),) + tuple(args[1:]))
                    undo.append(h.remove)
            yield self
        finally:
            for u in reversed(undo):
                u()

    def with_step(self, step: bool) -> "TorchRunner":
        return self if step == self.step else TorchRunner(self.loaded, step=step)

    def infer_impl(self, feeds: dict) -> dict:
        import torch

        with torch.no_grad():
            if "images" in feeds:
                return {"logits": self.model(torch.from_numpy(feeds["images"])).numpy()}
            ids = torch.from_numpy(feeds["input_ids"])
            vocab = self.loaded.config.vocab_size
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                from mq_deploy.errors import MQUserError
                raise MQUserError(f"{self.name}: token ids must lie in [0, {vocab})")
            if not self.step:
                return {"logits": self.model(ids).numpy()}
            per_layer = [{} for _ in self.model.layers]          # layer -> {position in its states: tensor}
            for si in self.layout:
                t = torch.from_numpy(feeds[si.name])
                for j, i in enumerate(si.layers):
                    per_layer[i][si.position] = t[j] if si.spec.stacked else t
            state = [tuple(d[k] for k in sorted(d)) for d in per_layer]
            logits, states = self.model(ids, return_state=True, state=state)
            out = {"logits": logits.numpy()}
            for si in self.layout:
                parts = [states[i][si.position] for i in si.layers]
                out[si.output] = (torch.stack(parts) if si.spec.stacked else parts[0]).numpy()
            return out
