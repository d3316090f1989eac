"""The edits, module counts and problems of one LoHa, LoKr or IA3 adapter, with its checks of factors."""

from __future__ import annotations

from collections import Counter

from ..errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    ShardmergeError,
    UnsupportedAdapterError,
)
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import TensorEdit, TensorRef
from .config import PEFT_TYPE_NAMES, USE_PEFT
from .folder import Adapter, peft_type_of
from .mismatch import missing
from .naming import resolve_base_name


class LycorisEdits:
    """Edits, counts and errors of one adapter, with the messages' common parts."""

    def __init__(self, adapter: Adapter, ckpt: Checkpoint):
        self.adapter = adapter
        self.ckpt = ckpt
        self.name = PEFT_TYPE_NAMES[peft_type_of(adapter.config)]
        self.edits: dict[str, TensorEdit] = {}
        self.counts: Counter = Counter()
        self.errors: list[ShardmergeError] = []

    def incompatible(self, msg: str) -> None:
        self.errors.append(
            IncompatibleAdapterError(
                f"{self.adapter.path}: {msg}", hint="Is this adapter made for this base model?"
            )
        )

    def unsupported(self, msg: str, hint: str | None = USE_PEFT) -> None:
        self.errors.append(
            UnsupportedAdapterError(f"{self.adapter.weights_file}: {msg}", hint=hint)
        )

    def corrupt(self, msg: str) -> None:
        self.errors.append(
            CorruptFileError(
                f"{self.adapter.weights_file}: {msg}",
                hint="The config and the weights disagree; re-save the adapter.",
            )
        )

    def add(self, base: str, edit: TensorEdit, kind: str) -> None:
        old = self.edits.get(base)
        if old is not None:
            self.incompatible(f"it changes {base} twice.")
            return
        self.edits[base] = edit
        self.counts[kind] += 1

    def base_weight(self, module: str, what: str):
        """The 2-D floating-point base weight of ``module``, or None (problem recorded)."""
        name = resolve_base_name(module, "weight", self.ckpt)
        if name is None:
            self.errors.append(missing(self.adapter.path, f"{module}.weight"))
            return None, None
        w = self.ckpt.tensor(name)
        if w.dtype not in FLOAT_DTYPES:
            self.incompatible(f"base tensor {name} is {w.dtype}, not floating point.")
            return None, None
        if len(w.shape) != 2:
            self.unsupported(
                f"module {module}: {self.name} on convolution layers ({len(w.shape)}-D weight "
                f"{name}) is not supported."
            )
            return None, None
        if w.dtype == "F64" and what == "ia3":
            self.unsupported(
                f"module {module}: IA3 on the float64 tensor {name} is not supported (the product "
                "W * l is not exact in float64)."
            )
            return None, None
        return name, w

    def factors_ok(self, module: str, refs: list[TensorRef]) -> bool:
        """2-D floating-point factors of at most 32 bits."""
        if any(len(r.shape) < 2 for r in refs):
            # Not a convolution's factors either: a malformed file.
            shown = ", ".join(f"{r.key.rsplit('.', 1)[-1]} {list(r.shape)}" for r in refs)
            self.corrupt(f"{self.name} factors of {module} are {shown}; each must be a 2-D matrix.")
            return False
        if any(len(r.shape) != 2 for r in refs):
            dims = sorted({len(r.shape) for r in refs})
            self.unsupported(
                f"module {module} has {'/'.join(map(str, dims))}-D {self.name} factors; "
                f"{self.name} on convolution layers is not supported."
            )
            return False
        if any(r.dtype not in FLOAT_DTYPES for r in refs):
            self.corrupt(f"{self.name} factors of {module} are not floating point.")
            return False
        if any(r.dtype == "F64" for r in refs):
            self.unsupported(
                f"module {module} has {self.name} factors stored in float64; their products are "
                "not exact in float64, so shardmerge cannot merge them exactly.",
                hint="Save the adapter in float32 (model.to(torch.float32) before save_pretrained), "
                "or merge it with PEFT.",
            )
            return False
        return True
