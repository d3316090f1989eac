"""Exact float64 factors for deltas that are not a plain low-rank product, and IA3 scaling.

A ``hadamard`` term is ``scale * (A1 @ B1) * (A2 @ B2)`` (elementwise), a
``kronecker`` term ``scale * kron(W1, W2)`` with each side one matrix or a
product of two. A product of two floats of at most 32 bits is exact in
float64, so a hadamard delta is ``scale * L @ R`` with ``L`` the row-wise
Kronecker (face-splitting) product of ``A1`` and ``A2`` and ``R`` the
column-wise one of ``B1`` and ``B2``; a kronecker delta is
``scale * kron(A1, A2) @ kron(B1, B2)`` for ``W1 = A1 @ B1``, ``W2 = A2 @ B2``
(a whole matrix M is ``I @ M`` or ``M @ I``), or, when both sides are whole,
the dense ``kron(W1, W2)`` itself. Every entry of these factors is one exact
product, and the kernel merges ``W + scale * L @ R`` with one rounding. A
base scaled by a vector (``W * l``) is likewise exact in float64.
"""

from __future__ import annotations

import torch

from ..terms import Scaling, TensorRef, Term


def kronecker_sides(term: Term) -> tuple[tuple[TensorRef, ...], tuple[TensorRef, ...]]:
    w1 = (term.left,) if term.right is None else (term.left, term.right)
    return w1, term.extra


def _side_shape(side: tuple[TensorRef, ...]) -> tuple[int, int, int | None]:
    """(rows, cols, stored rank or None for a whole matrix) of one Kronecker factor."""
    if len(side) == 1:
        return side[0].shape[0], side[0].shape[1], None
    return side[0].shape[0], side[1].shape[1], side[0].shape[1]


def _kronecker_layout(term: Term) -> tuple[bool, int, int, int]:
    """(dense, rank, out, in): how the LoKr factors are built, whichever is smaller.

    A whole matrix takes the rank of its smaller side (``I @ M`` or ``M @ I``);
    when both are whole, the dense delta (each entry one exact product) is
    built instead if it has fewer elements than the low-rank factors.
    """
    (a, c1, r1), (b, d, r2) = (_side_shape(s) for s in kronecker_sides(term))
    rank = (r1 or min(a, c1)) * (r2 or min(b, d))
    out, inp = a * b, c1 * d
    dense = r1 is None and r2 is None and out * inp <= rank * (out + inp)
    return dense, rank, out, inp


def built_numel(term: Term) -> int:
    """Elements of the float64 factors ``build_factors`` makes for a LoHa/LoKr term."""
    if term.form == "hadamard":
        w2a, w2b = term.extra
        rank = term.left.shape[1] * w2a.shape[1]
        return rank * (term.left.shape[0] + term.right.shape[1])
    dense, rank, out, inp = _kronecker_layout(term)
    return out * inp if dense else rank * (out + inp)


def f64(loader, ref: TensorRef) -> torch.Tensor:
    return loader.load(ref).to(torch.float64)


def _face_split_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, p), (n, q) -> (n, p*q): row i is kron(a[i], b[i])."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _face_split_cols(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(p, m), (q, m) -> (p*q, m): column j is kron(a[:, j], b[:, j])."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _as_product(loader, side: tuple[TensorRef, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B the side's matrix; a whole matrix gets an identity on its smaller side."""
    if len(side) == 2:
        return f64(loader, side[0]), f64(loader, side[1])
    m = f64(loader, side[0])
    rows, cols = m.shape
    if rows <= cols:
        return torch.eye(rows, dtype=torch.float64), m
    return m, torch.eye(cols, dtype=torch.float64)


def build_factors(term: Term, loader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact float64 factors of a LoHa/LoKr term on the CPU: ``delta = scale * left @ right``.

    ``right`` is None for a dense LoKr delta (``left`` is then the delta / scale).
    Every entry is a product of two stored floats of at most 32 bits: exact.
    """
    if term.form == "hadamard":
        w2a, w2b = term.extra
        left = _face_split_rows(f64(loader, term.left), f64(loader, w2a))
        right = _face_split_cols(f64(loader, term.right), f64(loader, w2b))
        return left, right
    if term.form != "kronecker":
        raise ValueError(f"unknown term form {term.form!r}")
    w1, w2 = kronecker_sides(term)
    if _kronecker_layout(term)[0]:
        return torch.kron(f64(loader, w1[0]), f64(loader, w2[0])), None
    a1, b1 = _as_product(loader, w1)
    a2, b2 = _as_product(loader, w2)
    return torch.kron(a1, a2), torch.kron(b1, b2)


def load_scaling(scaling: Scaling, loader, device: torch.device) -> torch.Tensor:
    """The IA3 vector, flat, in float64 on ``device``."""
    return loader.load(scaling.vector).reshape(-1).to(device=device, dtype=torch.float64)


def scale_rows(
    base: torch.Tensor, vector: torch.Tensor, axis: int, row0: int, row1: int
) -> torch.Tensor:
    """Base rows [row0, row1) times the IA3 vector, in float64: exact, rounded later once."""
    out = base.to(torch.float64, copy=True)
    if axis == 0:
        v = vector[row0:row1]
        out.mul_(v.view(-1, *([1] * (out.dim() - 1))) if out.dim() else v)
    else:
        out.mul_(vector)
    return out
