"""``shardmerge inspect``: what a model or adapter folder holds, from headers and configs only."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from .adapters.peft import CONFIG_NAME as ADAPTER_CONFIG
from .adapters.peft import _classify_keys, open_adapter, pattern_value
from .errors import InputError
from .io.checkpoint import open_checkpoint

# Roles of adapter keys (from _classify_keys) -> the module kind counted.
_ROLE_KINDS = (
    ("emb_A", "embedding"),
    ("lora_A", "linear_or_conv1d"),
    ("dora", "dora"),
    ("trainable_tokens", "trainable_tokens"),
)


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
        return _inspect_adapter(folder)
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
        "extra_files": list(ckpt.extra_files),
    }


# Key suffixes of PEFT's other additive methods -> the kind counted (one per module).
_OTHER_ROLES = {
    "LOHA": (("hada_w1_a", "loha"),),
    "LOKR": (("lokr_w1", "lokr"), ("lokr_w1_a", "lokr")),
    "IA3": (("ia3_l", "ia3"),),
}


def _inspect_adapter(folder: Path) -> dict:
    a = open_adapter(folder)
    cfg = a.config
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type in _OTHER_ROLES:
        return _inspect_other(a, peft_type)
    modules, unknown = _classify_keys(a)
    kinds: Counter = Counter()
    ranks: set[int] = set()
    scalings: set[float] = set()
    use_rslora = bool(cfg.get("use_rslora", False))
    for module, roles in modules.items():
        for role, kind in _ROLE_KINDS:
            if role in roles:
                kinds[kind] += 1
                break
        else:
            for role in roles:
                if role.startswith(("saved.", "base_layer.")):
                    kinds["saved_tensor"] += 1
        if "lora_B_bias" in roles:
            kinds["lora_bias"] += 1
        first = roles.get("lora_A") or roles.get("emb_A")
        if first is not None and first.shape:
            rank = first.shape[0]
            ranks.add(rank)
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            if isinstance(alpha, (int, float)) and rank > 0:
                scalings.add(alpha / math.sqrt(rank) if use_rslora else alpha / rank)
    dtypes = Counter(r.dtype for r in a.tensors.values())
    return {
        "kind": "adapter",
        "path": str(folder),
        "peft_type": cfg.get("peft_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": use_rslora,
        "use_dora": bool(cfg.get("use_dora", False)),
        "target_modules": cfg.get("target_modules"),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "modules_to_save": cfg.get("modules_to_save") or [],
        "modules": dict(sorted(kinds.items())),
        "ranks": sorted(ranks),
        "scaling": sorted(scalings),
        "weights_file": a.weights_file.name,
        "weights_bytes": a.weights_file.stat().st_size,
        "tensors": len(a.tensors),
        "dtypes": dict(sorted(dtypes.items())),
        "unknown_keys": len(unknown),
        "sha256": a.sha256,
    }


def _inspect_other(a, peft_type: str) -> dict:
    """LoHa, LoKr, IA3: modules counted by their characteristic key; rank and alpha from the config."""
    cfg = a.config
    kinds: Counter = Counter()
    for key in a.tensors:
        leaf = key.rsplit(".", 1)[-1] if not key.endswith(".weight") else key.split(".")[-2]
        for role, kind in _OTHER_ROLES[peft_type]:
            if leaf == role:
                kinds[kind] += 1
    dtypes = Counter(r.dtype for r in a.tensors.values())
    return {
        "kind": "adapter",
        "path": str(a.path),
        "peft_type": cfg.get("peft_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("alpha"),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": cfg.get("target_modules"),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "modules_to_save": cfg.get("modules_to_save") or [],
        "modules": dict(sorted(kinds.items())),
        "ranks": [cfg["r"]] if isinstance(cfg.get("r"), int) else [],
        "scaling": [],
        "weights_file": a.weights_file.name,
        "weights_bytes": a.weights_file.stat().st_size,
        "tensors": len(a.tensors),
        "dtypes": dict(sorted(dtypes.items())),
        "unknown_keys": 0,
        "sha256": a.sha256,
    }
