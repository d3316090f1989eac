"""``shardmerge inspect``: what a model or adapter folder holds, from headers and configs only."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .adapters import CONFIG_NAME as ADAPTER_CONFIG
from .adapters import adapter_summary
from .codecs import quantization_summary
from .errors import InputError
from .io.checkpoint import open_checkpoint


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
