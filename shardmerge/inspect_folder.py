"""``shardmerge inspect``: what a model or adapter folder holds, from headers and configs only.

It imports no torch (tests/test_startup.py): the quantization summary reads names and dtypes.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .adapters import CONFIG_NAME as ADAPTER_CONFIG
from .adapters import adapter_summary
from .errors import InputError
from .io.checkpoint import Checkpoint, open_checkpoint

# quantization_config keys shown as they are (the settings that say how tensors are stored).
SHOWN_KEYS = (
    "quant_method",
    "fmt",
    "weight_block_size",
    "scale_fmt",
    "activation_scheme",
    "format",
    "quantization_status",
    "ignore",
    "modules_to_not_convert",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
)
# Side tensors of quantized weights, by name ending (scales, zero points, 4-bit states).
SIDE_ENDINGS = ("_scale_inv", "_scale", "_zero_point", ".absmax", ".quant_map")
_FP8 = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")


def inspect_folder(path: str | os.PathLike) -> dict:
    """A summary of a model folder or a PEFT adapter folder, as plain data."""
    folder = Path(path)
    if not folder.exists():
        raise InputError(
            f"{folder} does not exist.",
            hint="Give a model folder (config.json + .safetensors) or a PEFT adapter folder.",
        )
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder.",
            hint="Give a model folder (config.json + .safetensors) or a PEFT adapter folder.",
        )
    if (folder / ADAPTER_CONFIG).exists():
        return adapter_summary(folder)
    return _inspect_model(folder)


def _inspect_model(folder: Path) -> dict:
    ckpt = open_checkpoint(folder)
    tensors = [t for h in ckpt.headers.values() for t in h.tensors.values()]
    dtypes: Counter = Counter(t.dtype for t in tensors)
    dtype_bytes: Counter = Counter()
    for t in tensors:
        dtype_bytes[t.dtype] += t.end - t.start
    largest = sorted(tensors, key=lambda t: (-(t.end - t.start), t.name))[:5]
    cfg = ckpt.config
    return {
        "kind": "model",
        "path": str(folder),
        "model_type": cfg.get("model_type"),
        "dtype": cfg.get("torch_dtype", cfg.get("dtype")),
        "shards": len(ckpt.shards),
        "tensors": len(tensors),
        "total_bytes": ckpt.total_bytes,
        "dtypes": {d: {"tensors": dtypes[d], "bytes": dtype_bytes[d]} for d in sorted(dtypes)},
        "largest_tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.end - t.start}
            for t in largest
        ],
        "tie_word_embeddings": cfg.get("tie_word_embeddings"),
        # quantization_config's settings and the FP8 tensors; None when not quantized.
        "quantization": quantization_summary(ckpt),
        "extra_files": list(ckpt.extra_files),
    }


def quantization_summary(ckpt: Checkpoint) -> dict | None:
    """The quantization settings and what the tensors hold; None for an unquantized folder."""
    config = ckpt.config.get("quantization_config")
    config = config if isinstance(config, dict) else {}
    dtypes = Counter(ckpt.tensor(n).dtype for n in ckpt.weight_map)
    fp8 = {d: n for d, n in dtypes.items() if d in _FP8}
    if not config and not fp8:
        return None
    summary = {k: config[k] for k in SHOWN_KEYS if k in config}
    groups = config.get("config_groups")
    if isinstance(groups, dict):  # compressed-tensors: how each group's weights are stored
        summary["weights"] = {
            name: {
                k: v
                for k, v in (g.get("weights") or {}).items()
                if k in ("type", "num_bits", "strategy", "block_structure", "group_size")
            }
            for name, g in groups.items()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict)
        }
    summary["fp8_tensors"] = fp8
    summary["side_tensors"] = sum(1 for n in ckpt.weight_map if n.endswith(SIDE_ENDINGS))
    return summary
