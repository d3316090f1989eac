"""The neutral description of what adapters do to base tensors.

Adapter formats are translated into these records once, at plan time; the
kernel and the executor never see an adapter key name. All records are
frozen dataclasses so a job can be pickled to a worker and printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorRef:
    """Where the bytes of one adapter tensor live.

    ``fmt`` is "safetensors" (``start``/``end`` are absolute byte offsets) or
    "torch" (a legacy ``.bin`` read with ``torch.load(weights_only=True)``).
    """

    path: str
    key: str
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    fmt: str = "safetensors"
    start: int = -1
    end: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Term:
    """``scale * left @ right`` added to a base tensor, row-aligned with it.

    ``left`` has one row per base row (after ``left_t``, a transpose), and
    ``right`` one column per base column (after ``right_t``). A bias term has
    ``right=None``: then ``left`` is the vector added, times ``scale``.
    """

    kind: str  # "linear", "conv1d" (fan_in_fan_out), "embedding", "lora_bias"
    adapter: str  # the adapter's label, for summaries and messages
    module: str  # the adapter's module name, for messages
    left: TensorRef
    right: TensorRef | None
    scale: float
    left_t: bool = False
    right_t: bool = False

    @property
    def rank(self) -> int:
        if self.right is None:
            return 1
        return self.right.shape[1] if self.right_t else self.right.shape[0]


@dataclass(frozen=True)
class Replacement:
    """A tensor an adapter saves whole (modules_to_save, trained biases): it replaces the base's."""

    adapter: str
    kind: str  # "modules_to_save", "bias", "base_layer"
    source: TensorRef


@dataclass(frozen=True)
class TensorEdit:
    """Everything that happens to one base tensor: an optional new base, then terms added."""

    replacement: Replacement | None = None
    terms: tuple[Term, ...] = ()
