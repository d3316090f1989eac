"""What a merge leaves behind for people and tools: the model card and the JSON report.

Both are built from the plan and the merge's results only, never from the
command line, the clock or the machine, so the model card is the same bytes
whatever --max-memory, --workers or output folder a run used.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
from pathlib import Path

from .version import __version__

CARD_NAME = "README.md"
REPORT_NAME = "report.json"


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


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
        f"# {base} with {len(plan.adapters)} LoRA adapter{'s' if len(plan.adapters) != 1 else ''} merged",
        "",
        f"This model is **{base}** with the following adapters folded into its weights "
        "by shardmerge (no adapter is needed at inference).",
        "",
        "| adapter | weight | sha256 of weights file |",
        "|---|---|---|",
    ]
    lines += [f"| {a.label} | {_fmt_weight(a.weight)} | `{a.sha256}` |" for a in plan.adapters]
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
