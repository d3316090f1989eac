"""What a merge leaves behind for people and tools: the model card and the JSON report.

Both are built from the plan and the merge's results only, never from the
command line, the clock or the machine, so the model card is the same bytes
whatever --max-memory, --workers or output folder a run used.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
from pathlib import Path

from .errors import count
from .io.hub import hub_id_of
from .version import __version__

CARD_NAME = "README.md"
REPORT_NAME = "report.json"
# A tensor that kept less than this share of its adapters' change is warned about.
WEAK_SURVIVAL = 0.5


def _name(path: str) -> str:
    """How the card names an input: its Hub id when it came from the Hub, else its folder name."""
    return hub_id_of(path) or os.path.basename(os.path.normpath(path)) or path


def _adapter_name(adapter) -> str:
    return hub_id_of(adapter.path) or adapter.label


def _fmt_weight(w: float) -> str:
    return repr(float(w))


def equivalent_command(plan) -> str:
    """The shardmerge command that makes this output (inputs by folder name, OUT for the output)."""
    dtype = json.loads(plan.provenance).get("dtype", "auto") if plan.provenance else "auto"
    words = ["shardmerge", "merge", _name(plan.base)] + [_name(a.path) for a in plan.adapters]
    words += ["--weights", ",".join(_fmt_weight(a.weight) for a in plan.adapters)]
    words += ["--dtype", dtype]
    record = json.loads(plan.provenance) if plan.provenance else {}
    for key in ("quantize", "requant_scales"):  # recorded only when not at their defaults
        if key in record:
            words += ["--" + key.replace("_", "-"), record[key]]
    words += ["-o", "OUT"]
    return " ".join(shlex.quote(w) for w in words)


def model_card(plan) -> str:
    """OUT/README.md: Hugging Face model-card front matter and how the model was made."""
    base = _name(plan.base)
    dtype = json.loads(plan.provenance).get("dtype", "auto") if plan.provenance else "auto"
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "tags:",
        "- shardmerge",
        "- merge",
        "- lora",
        "library_name: transformers",
        "---",
        "",
        f"# {base} with {count(len(plan.adapters), 'adapter')} merged",
        "",
        f"This model is **{base}** with the following adapters folded into its weights "
        "by shardmerge (no adapter is needed at inference).",
        "",
        "| adapter | weight | sha256 of weights file |",
        "|---|---|---|",
    ]
    lines += [
        f"| {_adapter_name(a)} | {_fmt_weight(a.weight)} | `{a.sha256}` |" for a in plan.adapters
    ]
    lines += [
        "",
        "## How it was merged",
        "",
        "Every changed tensor is what PEFT's merge defines for its adapter kind, with `w_i` the "
        "weight above scaling adapter i's update: `W + sum_i w_i * scale_i * delta_i` for LoRA "
        "(`delta_i = B @ A`, `scale_i = lora_alpha / r`, or `/ sqrt(r)` with rsLoRA), LoHa and "
        "LoKr (their Hadamard and Kronecker updates), DoRA's magnitude over the norm of the "
        "updated weight, IA3's scaling vector. It is computed exactly and rounded once to the "
        "output dtype. Tensors an adapter saves whole (modules_to_save, trainable token rows) "
        "replace the base's; all other tensors are copied byte for byte.",
        "",
        f"- output dtype: `{dtype}`"
        + (" (each tensor keeps its dtype)" if dtype == "auto" else ""),
        *_quantized_lines(plan),
        "- adapter modules merged: "
        + (", ".join(f"{n} {k}" for k, n in sorted(plan.counts.items())) or "none"),
        f"- shardmerge version: {__version__}",
        "",
        "The equivalent command:",
        "",
        "```",
        equivalent_command(plan),
        "```",
        "",
    ]
    return "\n".join(lines)


def _quantized_lines(plan) -> list[str]:
    """The model card's line on an FP8 output (none otherwise)."""
    record = json.loads(plan.provenance) if plan.provenance else {}
    if record.get("quantize") != "fp8-block":
        return []
    return [
        "- stored as compressed-tensors FP8 (`--quantize fp8-block`): the decoder layers' Linear "
        "weights as float8_e4m3fn codes with one scale per 128x128 block, each code the "
        "correctly rounded value of the exact merged weight over its scale"
    ]


def peak_memory_bytes() -> int:
    """The largest resident set of this process or of any of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


def write_report(doc: dict | list, path: str | os.PathLike) -> None:
    """Write a report as JSON (indented, keys in a stable order), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def survival_entry(record: list) -> dict:
    """A tensor's report entry from its journal record [kept, change, changed, numel], and
    ``new_scales`` where it has a fifth: the FP8 blocks whose kept scale was replaced.

    ``survived`` is kept / change (None when the adapters ask for no change
    or a norm is not finite); ``changed_share`` the share of elements whose
    stored value changed.
    """
    kept, change, changed, numel = record[:4]
    ok = change and kept is not None and math.isfinite(kept) and math.isfinite(change)
    return {
        "survived": kept / change if ok else None,
        "changed_share": changed / numel if numel else 0.0,
        "kept_norm": kept,
        "change_norm": change,
        "elements_changed": changed,
        "elements": numel,
    } | ({"new_scales": record[4]} if len(record) > 4 else {})


def weak_tensors(survival: dict[str, dict]) -> list[str]:
    """Tensors that kept less than half of their adapters' change, worst first."""
    weak = [(e["survived"], n) for n, e in survival.items() if _below(e["survived"])]
    return [n for _, n in sorted(weak)]


def _below(share: float | None) -> bool:
    return share is not None and share < WEAK_SURVIVAL


def survival_lines(survival: dict[str, dict], worst: int = 5) -> list[str]:
    """The end-of-merge summary: the worst tensors, and a warning naming every weak one."""
    ranked = sorted((e["survived"], n) for n, e in survival.items() if e["survived"] is not None)
    if not ranked:
        return []
    shown = ", ".join(
        f"{n} {s:.1%} ({survival[n]['changed_share']:.0%} of elements changed)"
        for s, n in ranked[:worst]
    )
    lines = [f"adapter change kept after rounding (worst first): {shown}."]
    weak = weak_tensors(survival)
    if weak:
        lines.append(
            f"warning: {len(weak)} tensor{'s' if len(weak) > 1 else ''} kept less than half of "
            f"the adapters' change (lost to rounding to the output dtype): {', '.join(weak)}."
        )
    return lines
