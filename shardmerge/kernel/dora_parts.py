"""The terms of a tensor with DoRA terms, as the DoRA merger takes them: float64 factors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedAdapterError


@dataclass
class DoraPart:
    """One term of a tensor that has DoRA terms: float64 factors on the compute device.

    ``left`` (rows, r) and ``right`` (r, cols) make the delta ``scale * left @ right``,
    oriented like the base tensor as stored. ``magnitude`` (one per channel)
    makes it a DoRA term; None is a plain LoRA term.
    """

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    norm_dim: int = 1
    name: str = ""  # "adapter label, module", for messages
    right_abs: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.right_abs = self.right.abs()

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def parts_for(
    tensor: str, terms: Sequence, factors: Sequence, load: Callable, compatible: Callable
) -> list[DoraPart]:
    """The DoraParts of a tensor's terms and their loaded factors (execute/factors.py).

    ``compatible(term)``: may the term share a tensor with DoRA terms (the merge policy).
    """
    parts = []
    for term, f in zip(terms, factors, strict=True):
        if not compatible(term):
            raise UnsupportedAdapterError(
                f"{tensor}: its {term.kind} term from adapter {term.adapter} cannot be combined "
                "with DoRA terms on the same tensor.",
                hint="Merge these adapters in separate runs.",
            )
        left = f.left.to(torch.float64)
        mag = None
        if term.magnitude is not None:
            mag = load(term.magnitude).to(device=left.device, dtype=torch.float64).reshape(-1)
        parts.append(
            DoraPart(
                left,
                f.right.to(torch.float64),
                f.scale,
                mag,
                term.norm_dim,
                f"adapter {term.adapter}, module {term.module}",
            )
        )
    return parts
