"""Hadamard matrices for any size 2^k * m where an order-m Hadamard matrix is known.

Mamba widths are rarely powers of two (Vim-T: d_inner 384 = 12 * 32; mamba-130m: 1536 = 12 * 128),
so a Sylvester-only construction is not enough. We build the small factors with Paley's
constructions from quadratic residues modulo a prime:

  Paley I   p = 3 (mod 4) prime  ->  order p + 1        (4, 8, 12, 20, 24, 32, 44, 48, 60, ...)
  Paley II  p = 1 (mod 4) prime  ->  order 2 (p + 1)    (12, 28, 36, 60, 76, ...)

and take the Kronecker product with a Sylvester matrix. Each small factor is checked (H H^T = m I)
when built; a Kronecker product of orthogonal factors is orthogonal. A size with no construction is an
error, never a silent substitute.

The same structure makes the product cheap: hadamard_matrix(n) = hadamard_matrix(a) kron hadamard_matrix(n / a)
(hadamard_factors), so `rotate` applies it as two small matrix products on [.., a, n / a], n (a + n / a) MACs
per row instead of n^2 (d_inner 8192: 8192 x 192, not 8192^2); `rotate_ref` is the dense product beside it.
The exported graph factors it the same way (export.graph._online_rotation).
"""

from __future__ import annotations

import functools

import numpy as np

from mq_deploy.errors import MQUserError


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, int(p ** 0.5) + 1))


def _jacobsthal(p: int) -> np.ndarray:
    residues = {(i * i) % p for i in range(1, p)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, p)], dtype=np.int64)
    idx = (np.arange(p)[None, :] - np.arange(p)[:, None]) % p
    return chi[idx]                                                 # Q[i, j] = chi(j - i)


def _paley1(p: int) -> np.ndarray:
    q = _jacobsthal(p)
    n = p + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = q
    return s + np.eye(n, dtype=np.int64)                            # I + S, S skew-symmetric


def _paley2(p: int) -> np.ndarray:
    q = _jacobsthal(p)
    n = p + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = q                                                   # symmetric conference matrix
    a = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    b = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, a) + np.kron(np.eye(n, dtype=np.int64), b)    # c has a zero diagonal


@functools.lru_cache(maxsize=None)
def _small_orders(limit: int = 256) -> dict:
    """Order -> construction, for the non-power-of-two factors m we can build (m up to `limit`)."""
    table = {1: ("trivial", 1)}
    for p in range(3, limit):
        if not _is_prime(p):
            continue
        if p % 4 == 3 and p + 1 <= limit:
            table.setdefault(p + 1, ("paley1", p))
        if p % 4 == 1 and 2 * (p + 1) <= limit:
            table.setdefault(2 * (p + 1), ("paley2", p))
    return table


def known_orders(limit: int = 256) -> list:
    """Small Hadamard orders m (not only powers of two) this module can build."""
    return sorted(_small_orders(limit))


def _build_small(m: int) -> np.ndarray:
    kind, p = _small_orders()[m]
    if kind == "trivial":
        return np.ones((1, 1), dtype=np.int64)
    return _paley1(p) if kind == "paley1" else _paley2(p)


def _factor(n: int):
    """n = m * 2^k with m a known small order; prefer the smallest m (most Sylvester structure)."""
    for m in known_orders():
        if n % m == 0 and ((n // m) & (n // m - 1)) == 0:
            return m, n // m
    return None


def has_hadamard(n: int) -> bool:
    return n >= 1 and _factor(n) is not None


@functools.lru_cache(maxsize=32)
def _hadamard_int(n: int) -> np.ndarray:
    f = _factor(n) if n >= 1 else None
    if f is None:
        raise MQUserError(f"no Hadamard matrix of size {n}: sizes must be 2^k * m with m in "
                          f"{known_orders()[:12]}... (Paley/Sylvester constructions)")
    m, pow2 = f
    h = _build_small(m)
    # the Kronecker product of orthogonal factors is orthogonal, so checking the small one suffices
    if not np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)):
        raise AssertionError(f"internal error: Hadamard construction of order {m} is not orthogonal")
    syl = np.ones((1, 1), dtype=np.int64)
    while syl.shape[0] < pow2:
        syl = np.block([[syl, syl], [syl, -syl]])
    h = np.kron(syl, h).astype(np.int8)
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int, normalized: bool = True, dtype=np.float64) -> np.ndarray:
    """Hadamard matrix of size n (entries +-1, or +-1/sqrt(n) when normalized: orthogonal)."""
    h = _hadamard_int(n).astype(dtype)
    return h / np.sqrt(n) if normalized else h


_CHECK_VALUES = 1 << 22      # a block of this many entries at a time when a matrix is compared with a Hadamard


@functools.lru_cache(maxsize=32)
def _kron_split(n: int):
    """(a, q) with hadamard_matrix(n) = hadamard_matrix(a) kron hadamard_matrix(q), a a power of two and a + q
    smallest; None where there is none (n < 4, or no such split: Paley 12). Checked entry by entry."""
    if n < 4 or not has_hadamard(n):
        return None
    H = _hadamard_int(n)
    rows = max(1, _CHECK_VALUES // n)
    cands = [a for a in (2 ** k for k in range(1, n.bit_length())) if n % a == 0 and has_hadamard(n // a)]
    for a in sorted(cands, key=lambda a: a + n // a):
        q = n // a
        P, Q = _hadamard_int(a), _hadamard_int(q)
        ok = True
        for i in range(0, n, rows):
            idx = np.arange(i, min(n, i + rows))       # row i of P kron Q: P[i // q] kron Q[i % q]
            kron = (P[idx // q][:, :, None].astype(np.int16) * Q[idx % q][:, None, :]).reshape(len(idx), n)
            if not np.array_equal(kron, H[idx]):
                ok = False
                break
        if ok:
            return a, q
    return None


def hadamard_factors(R):
    """(P, Q), float64 normalised Hadamard matrices with R = P kron Q (P of a power-of-two size a, Q of size
    n / a, a + n / a smallest), when R (a tensor or an array) is the normalised Hadamard matrix of its size,
    hadamard_matrix(n), to 1e-6 / sqrt(n) (float32 holds it); else None. Compared a block of rows at a time."""
    shape = tuple(R.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        return None
    n = shape[0]
    split = _kron_split(n)
    if split is None:
        return None
    H, root, rows = _hadamard_int(n), np.sqrt(n), max(1, _CHECK_VALUES // n)
    for i in range(0, n, rows):
        blk = R[i:i + rows]
        blk = blk.detach().double().cpu().numpy() if hasattr(blk, "detach") else np.asarray(blk, np.float64)
        if not np.abs(blk * root - H[i:i + rows]).max() <= 1e-6:      # (a NaN fails too)
            return None
    return hadamard_matrix(split[0]), hadamard_matrix(split[1])


_FACTORS = None      # rotation tensor -> (its version, its (P, Q) as tensors or None): checked once (weakly held)


def rotate_ref(x, R):
    """x @ R."""
    return x @ R


def factors_of(R):
    """hadamard_factors(R) as float64 tensors (P, Q), or None, checked once per tensor (weakly held; again after
    an in-place change of R): the recipes and loaders share one rotation per size across all layers, which the
    forward and the export read layer after layer. Anything but a tensor is checked every time."""
    import torch
    from torch.utils.weak import WeakIdKeyDictionary

    global _FACTORS
    if not torch.is_tensor(R):
        f = hadamard_factors(R)
        return None if f is None else tuple(torch.from_numpy(m) for m in f)
    if _FACTORS is None:
        _FACTORS = WeakIdKeyDictionary()
    seen = _FACTORS.get(R)
    if seen is None or seen[0] != R._version:
        f = hadamard_factors(R)
        seen = _FACTORS[R] = (R._version, None if f is None else tuple(torch.from_numpy(m) for m in f))
    return seen[1]


def rotate(x, R):
    """x @ R, the same as rotate_ref; a Hadamard R (factors_of) as P^T X Q on x's last axis split [.., a, q]."""
    f = factors_of(R)
    if f is None:
        return x @ R
    P, Q = (m.to(dtype=x.dtype, device=x.device) for m in f)
    a, q = P.shape[0], Q.shape[0]
    y = x.reshape(*x.shape[:-1], a, q) @ Q                          # X Q
    y = (y.transpose(-1, -2) @ P).transpose(-1, -2)                  # P^T (X Q), as one product with P
    return y.reshape(x.shape)
