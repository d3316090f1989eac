"""PEFT's sequential DoRA merge in plain float64: verify's reference, independent of the kernel."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..kernel.dora_parts import DoraPart


def reference_column_sums(
    read_rows: Callable[[int, int], torch.Tensor],
    rows: int,
    block_rows: int,
    parts: Sequence[DoraPart],
) -> dict[int, torch.Tensor]:
    """Plain float64 column sums of (W + delta_j)^2 for the norm_dim=0 DoRA parts (verify)."""
    wanted = [j for j, p in enumerate(parts) if p.magnitude is not None and p.norm_dim == 0]
    sums: dict[int, torch.Tensor] = {}
    for row0 in range(0, rows, max(block_rows, 1)):
        row1 = min(rows, row0 + max(block_rows, 1))
        w = read_rows(row0, row1).to(torch.float64)
        for j in wanted:
            p = parts[j]
            x = w + p.scale * (p.left[row0:row1] @ p.right)
            s = (x * x).sum(0)
            sums[j] = sums[j] + s if j in sums else s
    return sums


def reference_rows(
    base: torch.Tensor,
    parts: Sequence[DoraPart],
    column_sums: dict[int, torch.Tensor],
    row0: int,
    row1: int,
) -> torch.Tensor:
    """PEFT's sequential merge of rows [row0, row1) in plain float64 (verify's reference)."""
    w = base.to(torch.float64)
    value = w.clone()
    for j, p in enumerate(parts):
        d = p.scale * (p.left[row0:row1] @ p.right)
        if p.magnitude is None:
            value = value + d
        elif p.norm_dim == 1:
            norm = torch.linalg.vector_norm(w + d, dim=1)
            value = (p.magnitude[row0:row1] / norm)[:, None] * (value + d)
        else:
            value = (p.magnitude / column_sums[j].sqrt())[None, :] * (value + d)
    return value
