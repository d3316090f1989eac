"""Reading adapter tensors named by TensorRef, from safetensors or legacy .bin files."""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..errors import CorruptFileError
from ..terms import TensorRef
from .safetensors import DTYPES, NAME_OF, TensorInfo, read_rows, read_tensor

if TYPE_CHECKING:
    import torch


def load_torch_state(path: str) -> dict[str, torch.Tensor]:
    """Load a legacy ``.bin`` state dict safely: tensors only, no arbitrary pickle.

    ``weights_only=True`` refuses any object that is not a tensor or a plain
    container, so a hostile file cannot run code.
    """
    import torch  # not at the top: opening an adapter folder must not import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptFileError(
            f"{path}: cannot be loaded as a tensor-only PyTorch file ({_load_failure(e)[:300]}); "
            "it is corrupt or holds objects other than tensors.",
            hint="shardmerge loads .bin files with torch.load(weights_only=True) and refuses "
            "anything else; convert the adapter to adapter_model.safetensors.",
        ) from None
    except OSError as e:
        raise CorruptFileError(f"cannot read {path}: {e.strerror or e}.") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CorruptFileError(
            f"{path}: is not a state dict of named tensors.",
            hint="Re-save the adapter with PeftModel.save_pretrained() (it writes "
            "adapter_model.safetensors).",
        )
    for key, value in state.items():
        if value.dtype not in NAME_OF:
            raise CorruptFileError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}.")
    return state


def _load_failure(e: Exception) -> str:
    """The informative line of a torch.load error (torch's weights_only text is long)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Weights only load failed"):
        reasons = [
            line
            for line in lines[1:]
            if not line.startswith(("Check the documentation", "Please file an issue"))
        ]
        return "refused by weights_only=True" + (f": {reasons[0]}" if reasons else "")
    # torch's own messages can run on for several sentences: keep the first.
    return lines[0].split(". ")[0] if len(lines[0]) > 160 else lines[0]


# Whole adapter tensors kept for taking further parts of them (one expert's
# columns of a fused MoE lora_B are strided: the whole tensor is read once and
# every expert's part taken from it). Bigger tensors are read again each time.
PART_CACHE_BYTES = 64 << 20


class RefLoader:
    """Loads TensorRefs, keeping each legacy .bin file open (memory-mapped) once loaded."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._wholes: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def load(self, ref: TensorRef) -> torch.Tensor:
        """The tensor ``ref`` names, with its ``part`` taken (a fresh tensor then)."""
        if not ref.part:
            return self._load(ref)
        index = tuple(slice(*p) for p in ref.part)
        rows = ref.part[0]
        if ref.fmt == "safetensors" and len(ref.part) == 1 and rows[2] == 1 and len(ref.shape) == 2:
            # A range of rows (one expert's rows of a fused lora_A): read just those.
            info = TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end)
            buf = _byte_buffer((rows[1] - rows[0]) * info.row_bytes)
            with open(ref.path, "rb") as f:
                return read_rows(f, info, rows[0], rows[1], buf)
        whole = self._wholes.get((ref.path, ref.key))
        if whole is None:
            whole = self._load(ref)
            nbytes = whole.numel() * whole.element_size()
            if ref.fmt == "safetensors" and nbytes <= PART_CACHE_BYTES:
                while self._wholes and nbytes + self._cached_bytes() > PART_CACHE_BYTES:
                    self._wholes.popitem(last=False)
                self._wholes[(ref.path, ref.key)] = whole
        else:
            self._wholes.move_to_end((ref.path, ref.key))
        return whole[index].clone()

    def release(self) -> None:
        """Drop the whole tensors kept for taking parts of them."""
        self._wholes.clear()

    def _cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._wholes.values())

    def _load(self, ref: TensorRef) -> torch.Tensor:
        if ref.fmt == "torch":
            state = self._states.get(ref.path)
            if state is None:
                state = self._states[ref.path] = load_torch_state(ref.path)
            return state[ref.key]
        info = TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end)
        tensor = read_tensor(ref.path, info)
        assert tensor.dtype == DTYPES[ref.dtype]
        return tensor


def _byte_buffer(nbytes: int) -> torch.Tensor:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8)
