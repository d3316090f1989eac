"""What an adapter folder holds, for ``shardmerge inspect``: from its config and key names only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .folder import Adapter, open_adapter, peft_type_of
from .lora_keys import classify_lora_keys
from .lowrank import lora_scaling
from .naming import pattern_value

# Roles of adapter keys (from classify_lora_keys) -> the module kind counted.
_ROLE_KINDS = (
    ("emb_A", "embedding"),
    ("lora_A", "linear_or_conv1d"),
    ("dora", "dora"),
    ("trainable_tokens", "trainable_tokens"),
)


# Key suffixes of PEFT's other additive methods -> the kind counted (one per module).
_OTHER_ROLES = {
    "LOHA": (("hada_w1_a", "loha"),),
    "LOKR": (("lokr_w1", "lokr"), ("lokr_w1_a", "lokr")),
    "IA3": (("ia3_l", "ia3"),),
}


def adapter_summary(folder: Path) -> dict:
    """A summary of a PEFT adapter folder, as plain data."""
    a = open_adapter(folder)
    cfg = a.config
    peft_type = peft_type_of(cfg)
    if peft_type in _OTHER_ROLES:
        return _inspect_other(a, peft_type)
    modules, unknown = classify_lora_keys(a)
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
                scalings.add(lora_scaling(alpha, rank, use_rslora))
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


def _inspect_other(a: Adapter, peft_type: str) -> dict:
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
