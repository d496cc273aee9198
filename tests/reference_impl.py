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
