"""The delta of a hadamard or kronecker term straight from its formula, for verify.

Independent of ``kernel.factors`` (which builds exact low-rank factors for the
merge): plain float64, so within ~1e-16 relative of the true value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernel.factors import f64, kronecker_sides
from ..terms import TensorRef, Term


def reference_delta(term: Term, loader) -> Callable[[int, int], torch.Tensor]:
    """Rows [row0, row1) of ``scale * delta`` in float64, straight from PEFT's formula.

    For verify: independent of ``build_factors`` and of the kernel (float64,
    not exact, so within ~1e-16 relative of the true value).
    """
    s = term.scale
    if term.form == "hadamard":
        w1a, w1b = f64(loader, term.left), f64(loader, term.right)
        w2a, w2b = (f64(loader, r) for r in term.extra)
        return lambda r0, r1: s * ((w1a[r0:r1] @ w1b) * (w2a[r0:r1] @ w2b))

    def whole(side: tuple[TensorRef, ...]) -> torch.Tensor:
        mats = [f64(loader, r) for r in side]
        return mats[0] if len(mats) == 1 else mats[0] @ mats[1]

    w1, w2 = (whole(side) for side in kronecker_sides(term))
    b = w2.shape[0]

    def rows(r0: int, r1: int) -> torch.Tensor:
        i = torch.arange(r0, r1)
        # kron(w1, w2)[i1 * b + i2, j1 * d + j2] = w1[i1, j1] * w2[i2, j2]
        block = w1[i // b][:, :, None] * w2[i % b][:, None, :]
        return s * block.reshape(r1 - r0, -1)

    return rows
