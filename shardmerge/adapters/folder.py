"""An adapter folder as PEFT's save_pretrained() writes it: config, weights file, their layout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError, InputError
from ..io.checkpoint import not_a_regular_file
from ..io.jsonfile import read_json
from ..io.safetensors import NAME_OF, read_header
from ..io.sources import load_torch_state
from ..terms import TensorRef

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class Adapter:
    """An adapter folder as read at plan time: config and tensor locations, no weights."""

    path: Path
    label: str
    config: dict
    weights_file: Path
    tensors: dict[str, TensorRef]  # key as saved -> where it lives
    sha256: str  # of the weights file


def peft_type_of(config: dict) -> str:
    """The config's peft_type, upper-cased ("" when absent): the adapter method."""
    return str(config.get("peft_type") or "").upper()


def open_adapter(path: str | Path, label: str | None = None, *, digest: bool = True) -> Adapter:
    """Read an adapter folder's config and the layout of its weights file.

    ``digest=False`` leaves ``sha256`` empty (the planner's early checks, planner/precheck.py).

    >>> a = open_adapter("my-lora")   # doctest: +SKIP
    >>> a.config["r"]                  # doctest: +SKIP
    16
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"adapter folder {folder} does not exist or is not a folder.",
            hint="Give the folder that holds adapter_config.json and adapter_model.safetensors.",
        )
    config = read_json(
        folder / CONFIG_NAME,
        "the adapter config (adapter_config.json)",
        hint="Give the folder written by PeftModel.save_pretrained().",
    )
    label = label or folder.resolve().name
    weights_file, tensors = _weights_layout(folder)
    if not tensors:
        raise CorruptFileError(
            f"{weights_file}: holds no tensors.",
            hint="Re-save the adapter with PeftModel.save_pretrained().",
        )
    sha256 = file_sha256(weights_file) if digest else ""
    return Adapter(folder, label, config, weights_file, tensors, sha256)


def _weights_layout(folder: Path) -> tuple[Path, dict[str, TensorRef]]:
    """The weights file (safetensors preferred to the legacy .bin) and where each tensor lives."""
    st, legacy = folder / SAFETENSORS_NAME, folder / BIN_NAME
    for file in (st, legacy):
        if file.exists() and not file.is_file():
            raise not_a_regular_file(file, "the adapter weights file")
    if st.is_file():
        header = read_header(st)
        return st, {
            name: TensorRef(str(st), name, t.dtype, t.shape, "safetensors", t.start, t.end)
            for name, t in header.tensors.items()
        }
    if legacy.is_file():
        state = load_torch_state(str(legacy))
        return legacy, {
            name: TensorRef(str(legacy), name, NAME_OF[t.dtype], tuple(t.shape), "torch")
            for name, t in state.items()
        }
    raise InputError(
        f"{folder}: no adapter weights found ({SAFETENSORS_NAME} or {BIN_NAME}).",
        hint="Give the folder written by PeftModel.save_pretrained().",
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def duplicate_keys_error(wfile: object, duplicates: list[tuple[str, str]]) -> CorruptFileError:
    """Two keys of one module holding the same tensor: which PEFT would load is not defined."""
    pairs = "; ".join(f"{a} and {b}" for a, b in duplicates[:4])
    return CorruptFileError(
        f"{wfile}: two keys hold the same tensor of one module: {pairs}.",
        hint="Keep one of each pair, or re-save the adapter with PeftModel.save_pretrained().",
    )
