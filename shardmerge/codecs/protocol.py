"""What a base storage format is to the rest of shardmerge (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..terms import TensorRef

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# Reads one tensor a codec needs besides the base rows (a scale, a code table).
Loader = Callable[[TensorRef], torch.Tensor]


class RowDecoder(Protocol):
    """Base rows of one tensor as the merge sees them, from the rows as stored."""

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1): ``raw`` is their stored bytes (``packed``) or values."""
        ...


class TensorCodec(Protocol):
    """How one base tensor's values are made from what the base folder stores.

    A frozen, picklable value: it travels in the plan to worker processes.
    """

    method: str  # the codec's name, e.g. "nf4" (a QLoRA round trip) or "bnb4" (packed 4-bit)
    dtype: str  # safetensors dtype of the decoded values

    @property
    def packed(self) -> bool:
        """True: the stored rows are raw bytes the decoder unpacks; False: typed rows."""
        ...

    @property
    def blocksize(self) -> int:
        """Values per quantization block (named in messages)."""
        ...

    @property
    def bytes_per_element(self) -> int:
        """Working memory per decoded element of a row block, for the memory model."""
        ...

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block must be a multiple of this so blocks hold whole quantization blocks."""
        ...

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Memory the decoder holds for the whole tensor (its scales)."""
        ...

    def decoder(self, shape: tuple[int, ...], load: Loader) -> RowDecoder:
        """The row decoder of a tensor of ``shape``; ``load`` reads its side tensors."""
        ...


@dataclass(frozen=True)
class StoredBase:
    """A base folder stored in a quantized format, opened and checked."""

    format: str  # the BaseFormat's name
    specs: Mapping[str, TensorCodec]  # decoded tensor name -> how to decode it
    shapes: Mapping[str, tuple[int, ...]]  # decoded tensor name -> its decoded shape
    storage: Mapping[str, str]  # decoded tensor name -> its stored safetensors dtype
    aux: frozenset[str]  # the side tensors (scales, code tables), dropped from the output
    # stored name -> decoded name where they differ (GPTQ's ``m.qweight`` is ``m.weight``)
    names: Mapping[str, str] = field(default_factory=dict)
    # decoded name -> the stored tensors it is made of (packed codes and side tensors)
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class BaseFormat(Protocol):
    """A storage format of whole base folders, recognised by tensor names and config.json."""

    name: str  # short name, e.g. "bnb4"
    title: str  # in messages: "the base ... is already a {title} model"
    quant_method: str  # config.json quantization_config.quant_method of folders in it

    def marked(self, ckpt: Checkpoint) -> bool:
        """True when tensor names alone say the folder is in this format."""
        ...

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Raise if an unmarked, unconfigured folder still holds this format's side tensors."""
        ...

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Whether a folder whose config names ``quant_method`` is in this format;
        raises for a variant that cannot be read."""
        ...

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every coded tensor; raise on the first problem."""
        ...


class RowEncoder(Protocol):
    """Stored output rows of one tensor, from its exact value (base rows plus block terms)."""

    def __call__(self, base: torch.Tensor, terms: list, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) as stored bytes; ``terms`` are the kernel's BlockTerms."""
        ...

    def values(self, stored: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """What rows [row0, row1) of stored bytes decode to (float64)."""
        ...

    def side_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors written after the last row (scales), by output name."""
        ...


class OutputCodec(Protocol):
    """How one output tensor is stored when not as plain values: the ``encode`` side.

    A frozen, picklable value carried by a tensor job, like TensorCodec.
    """

    method: str  # e.g. "fp8-block"
    dtype: str  # safetensors dtype of the stored tensor

    @property
    def bytes_per_element(self) -> int:
        """Working memory per element of a row block (in place of the plain merge's)."""
        ...

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block must be a multiple of this (whole scale blocks)."""
        ...

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Memory the encoder holds whatever the block size (scales, working slices)."""
        ...

    def side_entries(self, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype, shape) of the tensors written after this one."""
        ...

    def encoder(self, shape: tuple[int, ...], load: Loader) -> RowEncoder:
        """The row encoder of a tensor of ``shape``; ``load`` reads kept scales."""
        ...
