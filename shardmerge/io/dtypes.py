"""safetensors dtype names: their sizes without torch, their torch dtypes on first use.

Reading headers (``inspect``, refusals of bad input) needs only the names and
sizes; torch is imported when a tensor is first viewed as a dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Bytes per element of every dtype name a header may use.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    # Also written by safetensors.torch.save_file; copied as they are, never merged into.
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
    # Power-of-two scales of FP8 checkpoints (scale_fmt "ue8m0"); read by codecs/fp8.py.
    "F8_E8M0": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# torch's attribute for each name.
TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
    "F8_E8M0": "float8_e8m0fnu",
}


class _LazyTable(Mapping):
    """A read-only dict built from torch the first time a value is asked for.

    Given ``keys``, ``key in table`` answers from them alone (no torch import):
    ``name in DTYPES`` takes every name a header may hold (torch >= 2.3 has them all).
    """

    def __init__(self, keys: frozenset | None, build):
        self._keys = keys
        self._build = build
        self._table: dict | None = None

    def _values(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __contains__(self, key: object) -> bool:
        return key in self._keys if self._keys is not None else key in self._values()

    def __getitem__(self, key: Any) -> Any:
        return self._values()[key]

    def __iter__(self) -> Iterator:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


def _torch_dtypes() -> dict:
    import torch

    return {k: getattr(torch, v) for k, v in TORCH_NAMES.items() if hasattr(torch, v)}


def _names_of_torch_dtypes() -> dict:
    return {dt: name for name, dt in DTYPES.items()}


DTYPES: Mapping[str, Any] = _LazyTable(frozenset(TORCH_NAMES), _torch_dtypes)
NAME_OF: Mapping[Any, str] = _LazyTable(None, _names_of_torch_dtypes)
