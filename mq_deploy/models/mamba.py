"""Our PyTorch language model: embedding, pre-norm residual blocks around a registered family's mixer
(mq_deploy.families), final RMSNorm, lm_head; with step-wise decoding through the family's states."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mq_deploy.config import MambaLMConfig
from mq_deploy.models.layers import MixerBase, RMSNorm, at_least_fp32


def make_mixer(mixer_cfg) -> MixerBase:
    from mq_deploy.families import family_of

    return family_of(mixer_cfg).module().Mixer(mixer_cfg)


def block_class(mixer_cfg):
    """Block, or the family's own block class (impl.Block: Zamba2's layers, which read the embeddings too)."""
    from mq_deploy.families import family_of

    return getattr(family_of(mixer_cfg).module(), "Block", Block)


def _emb(layer, e) -> dict:
    return {"emb": e} if layer.reads_embeddings else {}


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)); the residual stream stays fp32 if asked."""

    reads_embeddings = False      # a family's Block that also takes the token embeddings (emb=)

    def __init__(self, mixer_cfg, norm_eps: float, residual_in_fp32: bool, residual_multiplier: float = 1.0):
        super().__init__()
        self.norm = RMSNorm(mixer_cfg.d_model, norm_eps)
        self.mixer = make_mixer(mixer_cfg)
        self.residual_in_fp32 = residual_in_fp32
        self.residual_multiplier = residual_multiplier

    def _add(self, h, out):
        h = at_least_fp32(h) if self.residual_in_fp32 else h
        return h + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)

    def forward(self, h, state=None, return_state=False):
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), state, return_state)
        if return_state:
            out, new_state = out
            return self._add(h, out), new_state
        return self._add(h, out)

    def step(self, h, *states):
        out, *states = self.mixer.step(self.norm(h.to(self.norm.weight.dtype)), *states)
        return (self._add(h, out), *states)


def init_weights(model: nn.Module, n_layer: int, generator=None):
    """mamba-ssm's _init_weights: N(0, 0.02) embeddings, zero linear biases, out_proj scaled 1/sqrt(n_layer)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("dt_proj") and not name.endswith("dt_proj_b"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
                if name.endswith("out_proj"):
                    m.weight /= math.sqrt(n_layer)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, MixerBase):
                m.reset_parameters(generator=generator)


class MambaLM(nn.Module):
    """Causal LM: embedding, n_layer blocks, final RMSNorm, lm_head (tied or untied)."""

    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(block_class(m)(m, cfg.norm_eps, cfg.residual_in_fp32, cfg.residual_multiplier)
                                    for m in cfg.layer_configs())
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.state_scales = {}      # {(layer, point): static scale} of int8 states on a quant point's grid

    def reset_parameters(self, seed: int = 0):
        init_weights(self, self.cfg.n_layer, torch.Generator().manual_seed(seed))

    def _head(self, h):
        logits = self.lm_head(self.norm_f(h.to(self.norm_f.weight.dtype)))
        return logits if self.cfg.logits_scaling == 1.0 else logits / self.cfg.logits_scaling

    def _embed(self, input_ids):
        h = self.embedding(input_ids)
        return h if self.cfg.embedding_multiplier == 1.0 else h * self.cfg.embedding_multiplier

    def _each_layer(self):
        """(index, layer) in order. A lazily loaded model (loaders.load_model(lazy=True), its ends read in with
        loaders.materialize) reads each layer in as it comes and gives it back after: one layer in memory."""
        if getattr(self, "lazy_weights", None) is None:
            yield from enumerate(self.layers)
            return
        from mq_deploy.models.loaders import materialize, release

        for i in range(len(self.layers)):
            layer = materialize(self, f"layers.{i}")
            try:
                yield i, layer
            finally:
                release(layer)

    def backbone(self, input_ids):
        """Hidden states before norm_f and the head (what calibration needs; skips the vocab matmul)."""
        h = e = self._embed(input_ids)
        for _, layer in self._each_layer():
            h = layer(h, **_emb(layer, e))
        return h

    def forward(self, input_ids, return_state=False, state=None):
        """input_ids [b, L] -> logits [b, L, V]; with return_state also the per-layer decode cache.

        state: per-layer states to continue from (as init_state / return_state give)."""
        h = e = self._embed(input_ids)
        states = []
        for i, layer in self._each_layer():
            st = None if state is None else self._decode_state(i, state[i])
            if return_state:
                h, st = layer(h, st, return_state=True, **_emb(layer, e))
                states.append(self._encode_state(i, st))
            else:
                h = layer(h, st, **_emb(layer, e))
        logits = self._head(h)
        return (logits, states) if return_state else logits

    # the states between calls are stored as families.stored_states says (cfg.state_dtype; models.state_codec)
    def _stored(self, i):
        from mq_deploy.families import stored_states

        return stored_states(self.cfg, self.cfg.layer_configs()[i])

    def _decode_state(self, i, st):
        if self.cfg.state_dtype == "float32":
            return st
        from mq_deploy.models.state_codec import decode

        return decode(i, self._stored(i), tuple(st), self.state_scales)

    def _encode_state(self, i, st):
        if self.cfg.state_dtype == "float32":
            return st
        from mq_deploy.models.state_codec import encode

        return encode(i, self._stored(i), tuple(st), self.state_scales)

    def set_state_dtype(self, dtype: str, act_scales: dict | None = None) -> None:
        """Store the decode states as `dtype` (config.STATE_DTYPES) between calls, as a step graph exported
        with that --state-dtype does; act_scales: a quantized checkpoint's per-tensor activation scales (int8
        stores the conv state on its conv1d point's scale). One line if that is impossible."""
        import dataclasses

        from mq_deploy.models.state_codec import conv_scales

        cfg = dataclasses.replace(self.cfg, state_dtype=dtype)
        self.state_scales = conv_scales(cfg, act_scales)
        self.cfg = cfg

    def init_state(self, batch: int, dtype=torch.float32, device=None):
        """Empty decode states: per layer, one tensor [batch, *shape] per StateSpec of its family (zeros; a
        cache's growing length 0)."""
        return [tuple(torch.zeros(batch, *(0 if d is None else d for d in s.shape),
                                  dtype=dtype if s.dtype == "float32" else getattr(torch, s.dtype), device=device)
                      for s in self._stored(i)) for i in range(len(self.layers))]

    def step(self, token, states):
        """token [b] -> (logits [b, V], new states)."""
        h = e = self._embed(token)
        new = []
        for i, (layer, st) in enumerate(zip(self.layers, states)):
            h, *st = layer.step(h, *self._decode_state(i, st), **_emb(layer, e))
            new.append(self._encode_state(i, tuple(st)))
        return self._head(h), new

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, generator=None):
        """Greedy (temperature 0) or sampled continuation; prefill with the full-sequence path."""
        logits, states = self(input_ids, return_state=True)
        last = logits[:, -1]
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = last.argmax(-1)
            out.append(tok)
            last, states = self.step(tok, states)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)
