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
    # A part of the stored tensor, taken after loading: (start, stop, step) per
    # leading dimension (e.g. one expert's rows of a fused LoRA factor).
    part: tuple[tuple[int, int, int], ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def loaded_shape(self) -> tuple[int, ...]:
        """The shape after ``part`` is taken."""
        dims = [len(range(*p)) for p in self.part]
        return (*dims, *self.shape[len(dims) :])

    @property
    def loaded_numel(self) -> int:
        return math.prod(self.loaded_shape)


@dataclass(frozen=True)
class Term:
    """``scale * left @ right`` added to a base tensor, row-aligned with it.

    ``left`` has one row per base row (after ``left_t``, a transpose), and
    ``right`` one column per base column (after ``right_t``). A bias term has
    ``right=None``: then ``left`` is the vector added, times ``scale``.
    """

    # The module kind, for counts, summaries and messages only (the algebra is
    # ``form``'s): "linear", "conv1d" (fan_in_fan_out), "embedding", "lora_bias",
    # "expert", "loha", "lokr".
    kind: str
    adapter: str  # the adapter's label, for summaries and messages
    module: str  # the adapter's module name, for messages
    left: TensorRef
    right: TensorRef | None
    scale: float
    left_t: bool = False
    right_t: bool = False
    # How the factors make the delta, named by its algebra (never by an adapter
    # kind): "lowrank" is scale * left @ right (a bias term when right is
    # None); "hadamard" is scale * (left @ right) * (extra[0] @ extra[1]),
    # elementwise; "kronecker" is scale * kron(left-side, extra-side), each
    # side one matrix or a product of two. kernel code turns the last two into
    # exact low-rank factors at load time.
    form: str = "lowrank"
    extra: tuple[TensorRef, ...] = ()
    # The rows of the base tensor (viewed as 2-D: leading dims flattened) the
    # term covers, e.g. one expert of a fused 3-D expert tensor; None: all.
    rows: tuple[int, int] | None = None
    # DoRA: the magnitude vector m; the merged tensor is m * (W + delta) / ||W + delta||
    # with the L2 norm along ``norm_dim`` of the base tensor as stored (1: one
    # norm per row, as for Linear; 0: one per column, as for Embedding/Conv1D).
    magnitude: TensorRef | None = None
    norm_dim: int = 1

    @property
    def rank(self) -> int:
        if self.right is None:
            return 1
        shape = self.right.loaded_shape
        return shape[1] if self.right_t else shape[0]


@dataclass(frozen=True)
class Replacement:
    """A tensor an adapter saves whole (modules_to_save, trained biases): it replaces the base's."""

    adapter: str
    kind: str  # "modules_to_save", "bias", "saved_tensor", "base_layer", "tied_embedding"
    source: TensorRef


@dataclass(frozen=True)
class Scaling:
    """IA3: the base tensor times a vector broadcast along one axis, exact, before any term."""

    adapter: str
    module: str
    vector: TensorRef  # as many entries as the base tensor has along ``axis``
    axis: int  # 0: one factor per row (per element of a 1-D tensor); 1: one per column


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: whole rows of a tensor replaced by stored values (PEFT's index_copy).

    Row ``k`` of ``source`` becomes row ``indices[k]``: the stored values are
    the new rows themselves, not differences.
    """

    adapter: str
    module: str
    indices: tuple[int, ...]
    source: TensorRef  # (len(indices), row width)


@dataclass(frozen=True)
class TensorEdit:
    """Everything that happens to one base tensor: an optional new base, then terms added."""

    replacement: Replacement | None = None
    terms: tuple[Term, ...] = ()
    # IA3: the base tensor is first multiplied by this vector.
    scaling: Scaling | None = None
    # Trainable tokens: rows replaced after the replacement, before any term.
    token_rows: tuple[TokenRows, ...] = ()
