"""How a base folder is quantized, for ``shardmerge inspect``: from config.json and headers only."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

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
