"""FP8 outputs re-derived: each block's scale from the float64 reference, each code within
half an e4m3 ulp of reference / scale.

Independent of kernel/fp8.py: the scale of a block is recomputed from the
reference's amax (rounded by the correct cast the rest of verify uses), and a
code is checked by its distance to the reference, not re-encoded. Where the reference cannot tell
(a quotient within a hair of a rounding boundary of the scale's dtype, or of
the 448 limit for a kept scale) either neighbour is accepted.
"""

from __future__ import annotations

import torch

from ..io.safetensors import DTYPES
from ..kernel.rounding import cast

# The float64 reference's relative error is ~1e-15: a quotient within this of
# a rounding boundary may round either way. Narrower than any scale dtype's
# spacing, so at most two neighbours qualify.
WINDOW = 1e-12
E4M3_MAX = 448.0


def spread(s: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-block values over the elements of a row block."""
    full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def block_amax(ref: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |ref| per block (edge blocks partial)."""
    bm, bn = block
    rows, cols = ref.shape
    nr, nc = -(-rows // bm), -(-cols // bn)
    out = torch.zeros(nr, nc, dtype=torch.float64)
    for i in range(nr):
        for j in range(nc):
            part = ref[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            out[i, j] = part.abs().max() if part.numel() else 0.0
    return out


def scale_candidates(amax: torch.Tensor, dtype: torch.dtype, pow2: bool) -> torch.Tensor:
    """The fresh scales a correct merge may have written: (low, high) per block."""
    q = amax / E4M3_MAX
    ends = torch.stack([q * (1 - WINDOW), q * (1 + WINDOW)])
    if pow2:
        cands = torch.exp2(torch.ceil(torch.log2(ends)))
        cands = torch.where(ends > 0, cands, torch.ones_like(ends))
    else:
        cands = cast(ends, dtype).to(torch.float64)
        eps = torch.finfo(dtype).eps
        cands = torch.where(cands == 0, torch.full_like(cands, eps), cands)
    return cands


def scale_problems(
    name: str,
    scales: torch.Tensor,
    ref: torch.Tensor,
    encode,
    kept: torch.Tensor | None,
) -> list[str]:
    """What is wrong with the scales of one row block (float64 values) against the reference."""
    amax = block_amax(ref, encode.block)
    cands = scale_candidates(amax, DTYPES[encode.scale_dtype], encode.pow2)
    fresh_ok = (scales == cands[0]) | (scales == cands[1])
    if kept is None:
        ok = fresh_ok
    else:
        ratio = amax / (kept * E4M3_MAX)
        must_fresh = ratio > 1 + WINDOW
        may_fresh = ratio > 1 - WINDOW
        ok = torch.where(must_fresh, fresh_ok, (scales == kept) | (may_fresh & fresh_ok))
    bad = (~ok).nonzero().tolist()
    if not bad:
        return []
    i, j = bad[0]
    return [
        f"{name}: the scale of block ({i}, {j}) of these rows is {float(scales[i, j])!r}, "
        f"not as re-derived from the exact values (amax {float(amax[i, j])!r})."
    ]


def codes_over_scales(
    codes: torch.Tensor, scales: torch.Tensor, ref: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored codes as float8 values and the reference divided by each element's scale."""
    s = spread(scales, block, tuple(ref.shape))
    return codes.reshape(ref.shape).view(torch.float8_e4m3fn), ref / s
