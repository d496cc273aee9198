"""An independent re-statement of mamba-ssm / hustvl-Vim forward math, in their own layout
(channels-first [b, D, L], nn.Conv1d with padding, einsum scan), used only by tests to check our
channels-last models. Written from mamba-ssm's published Mamba equations, sharing no code with mq_deploy.models."""

import torch
import torch.nn.functional as F


def scan_cf(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z [b, D, L]; B, C [b, N, L] (mamba-ssm selective_scan_ref layout)."""
    delta = F.softplus(delta + delta_bias[:, None])
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, 2) + u * D[:, None]
    return y * F.silu(z)


def mixer_branch_cf(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, dt_rank, n):
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = torch.einsum("od,bdl->bol", x_proj_w, x)
    dt, B, C = torch.split(x_dbl, [dt_rank, n, n], dim=1)
    dt = torch.einsum("dr,brl->bdl", dt_proj_w, dt)
    return scan_cf(x, dt, -torch.exp(A_log), B, C, D, z, dt_proj_b)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mixer_cf(sd, p, h, dt_rank, n, bimamba):
    xz = torch.einsum("ed,bld->bel", sd[p + "in_proj.weight"], h)
    if p + "in_proj.bias" in sd:
        xz = xz + sd[p + "in_proj.bias"][:, None]
    args = lambda s, a: (sd[p + f"conv1d{s}.weight"], sd.get(p + f"conv1d{s}.bias"),  # noqa: E731
                         sd[p + f"x_proj{s}.weight"], sd[p + f"dt_proj{s}.weight"], sd[p + f"dt_proj{s}.bias"],
                         sd[p + a], sd[p + f"D{s}"], dt_rank, n)
    y = mixer_branch_cf(xz, *args("", "A_log"))
    if bimamba:
        y_b = mixer_branch_cf(xz.flip(-1), *args("_b", "A_b_log"))
        y = (y + y_b.flip(-1)) / 2
    out = torch.einsum("od,bdl->blo", sd[p + "out_proj.weight"], y)
    if p + "out_proj.bias" in sd:
        out = out + sd[p + "out_proj.bias"]
    return out


def vim_forward(sd, images, patch, stride, dt_rank, n, eps=1e-5):
    """hustvl/Vim forward (bimamba v2, middle class token, divide-out) from a hustvl-named state dict."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    M = x.shape[1]
    pos = M // 2
    x = torch.cat([x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]], 1) + sd["pos_embed"]
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    residual, hidden = None, x
    for i in range(n_layer):
        residual = hidden if residual is None else residual + hidden
        hidden = mixer_cf(sd, f"layers.{i}.mixer.", rms(residual, sd[f"layers.{i}.norm.weight"], eps), dt_rank, n, True)
    out = rms(residual + hidden, sd["norm_f.weight"], eps)
    return F.linear(out[:, pos], sd["head.weight"], sd["head.bias"])


# ---- Mamba2 (mamba-ssm's Mamba2 module), written from its equations: in_proj -> [z, xBC, dt], depthwise
# causal conv + SiLU on xBC, SSD recurrence per head with group-shared B/C, RMSNormGated per group of
# d_ssm / ngroups channels (norm_before_gate: norm(y) * silu(z), else norm(y * silu(z))), out_proj. ----

def mamba2_mixer_cf(sd, p, h, headdim, ngroups, d_state, norm_before_gate=False, rmsnorm=True, eps=1e-5,
                    dt_limit=(0.0, float("inf"))):
    """h [b, L, d] -> [b, L, d], a per-step loop in the layout mamba-ssm's reference uses."""
    zxbcdt = h @ sd[p + "in_proj.weight"].t()
    if p + "in_proj.bias" in sd:
        zxbcdt = zxbcdt + sd[p + "in_proj.bias"]
    nheads = sd[p + "A_log"].shape[0]
    d_ssm = nheads * headdim
    z, xBC, dt = torch.split(zxbcdt, [d_ssm, d_ssm + 2 * ngroups * d_state, nheads], dim=-1)
    L = xBC.shape[1]
    w = sd[p + "conv1d.weight"]
    xBC = F.conv1d(xBC.transpose(1, 2), w, sd.get(p + "conv1d.bias"), padding=w.shape[-1] - 1,
                   groups=w.shape[0])[..., :L].transpose(1, 2)
    xBC = F.silu(xBC)
    x, B, C = torch.split(xBC, [d_ssm, ngroups * d_state, ngroups * d_state], dim=-1)
    b = x.shape[0]
    x = x.reshape(b, L, nheads, headdim)
    B = B.reshape(b, L, ngroups, d_state)
    C = C.reshape(b, L, ngroups, d_state)
    dt = F.softplus(dt + sd[p + "dt_bias"]).clamp(dt_limit[0], dt_limit[1])
    A = -torch.exp(sd[p + "A_log"])
    state = x.new_zeros(b, nheads, headdim, d_state)
    heads_per_group = nheads // ngroups
    ys = []
    for t in range(L):
        for hh in range(nheads):
            g = hh // heads_per_group
            state[:, hh] = (torch.exp(dt[:, t, hh] * A[hh])[:, None, None] * state[:, hh]
                            + dt[:, t, hh][:, None, None] * x[:, t, hh][:, :, None] * B[:, t, g][:, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t].repeat_interleave(heads_per_group, dim=1)))
    y = torch.stack(ys, 1) + x * sd[p + "D"][:, None]
    y = y.reshape(b, L, d_ssm)
    if not rmsnorm:
        y = y * F.silu(z)
    else:
        gs = d_ssm // ngroups
        t_ = y if norm_before_gate else y * F.silu(z)
        t_ = t_.reshape(b, L, ngroups, gs)
        t_ = (t_ * torch.rsqrt(t_.pow(2).mean(-1, keepdim=True) + eps)).reshape(b, L, d_ssm) * sd[p + "norm.weight"]
        y = t_ * F.silu(z) if norm_before_gate else t_
    out = y @ sd[p + "out_proj.weight"].t()
    if p + "out_proj.bias" in sd:
        out = out + sd[p + "out_proj.bias"]
    return out


def mamba2_lm_forward_ssm(sd, ids, n_layer, headdim, ngroups, d_state, norm_before_gate=False, rmsnorm=True,
                          eps_block=1e-5):
    """mamba-ssm's MambaLMHeadModel with Mamba2 mixers (keys backbone.*; residual in fp32, pre-norm)."""
    h = sd["backbone.embedding.weight"][ids]
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        h = h + mamba2_mixer_cf(sd, p + "mixer.", rms(h, sd[p + "norm.weight"], eps_block), headdim, ngroups, d_state,
                                norm_before_gate, rmsnorm)
    h = rms(h, sd["backbone.norm_f.weight"], eps_block)
    return h @ sd.get("lm_head.weight", sd["backbone.embedding.weight"]).t()
