"""Rotation matrices: Hadamard, and MambaQuant's KLT-enhanced rotation K·H.

K holds the eigenvectors of the calibration covariance of a layer's input (Karhunen-Loeve), sorted
by decreasing eigenvalue; H is a normalised Hadamard matrix. For x with covariance K Λ K^T, the
rotated x K H has covariance H^T Λ H, whose diagonal is trace(Λ)/n in every channel: KLT removes
the correlations, and H then spreads the variance exactly evenly over the channels.
"""

from __future__ import annotations

import torch

from mq_deploy.errors import MQUserError
from mq_deploy.ops.hadamard import hadamard_matrix


def hadamard_rotation(n: int) -> torch.Tensor:
    return torch.from_numpy(hadamard_matrix(n))


def klt_basis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric covariance (float64), columns sorted by decreasing eigenvalue, with
    a deterministic sign (largest-magnitude entry of each column positive)."""
    cov = cov.to(torch.float64)
    cov = (cov + cov.t()) / 2
    evals, evecs = torch.linalg.eigh(cov)
    evecs = evecs[:, torch.argsort(evals, descending=True)]
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
    return evecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def klt_hadamard_rotation(cov: torch.Tensor) -> torch.Tensor:
    """MambaQuant's KLT-enhanced rotation R = K H (orthogonal, float64)."""
    return klt_basis(cov) @ hadamard_rotation(cov.shape[0])


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5,
                      eps: float = 1e-8) -> torch.Tensor:
    """SmoothQuant factors s = max|X|^alpha / max|W|^(1-alpha) per input channel (x / s, W * s)."""
    if not 0.0 <= alpha <= 1.0:
        raise MQUserError(f"alpha must be in [0, 1], got {alpha}")
    a = act_amax.to(torch.float64).clamp_min(eps)
    w = weight_amax.to(torch.float64).clamp_min(eps)
    return a.pow(alpha) / w.pow(1 - alpha)
