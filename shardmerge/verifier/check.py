"""Re-derive a merge from base + adapters and check an output folder against it, streaming.

Independent of the merge kernel: merged tensors are recomputed in float64
with plain BLAS and each output element must lie within half an ulp of that
(the correct-rounding bound, plus a hair for the reference's own error).
Untouched tensors must match the base byte for byte.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..arch.config import config_value
from ..errors import InputError, count, shown
from ..execute.jobs import MergePlan
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, open_checkpoint
from ..io.journal import WORK_DIR, Journal
from ..io.jsonfile import parse_json, read_json
from ..io.sources import RefLoader
from ..options import MergeOptions
from ..planner.build import build_plan
from .tensors import check_tensor


@dataclass
class VerifyReport:
    """What ``verify`` checked and found."""

    out: str
    tensors: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per action
    max_ulp: dict[str, float] = field(default_factory=dict)  # per term kind / replaced
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.tensors.items()))
        ulps = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.max_ulp.items())) or "none merged"
        head = "OK" if self.ok else f"FAILED ({count(len(self.problems), 'problem')})"
        lines = [
            f"verify {self.out}: {head}",
            f"tensors checked: {counts}",
            f"max error in ulp: {ulps}",
        ]
        lines += [f"- {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"- ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def output_provenance(out: Path) -> dict | None:
    """The shardmerge record in OUT's index or single shard metadata (None if none), shape-checked."""
    ckpt = open_checkpoint(out)
    if ckpt.index is not None:
        where = out / INDEX_NAME
        record = (ckpt.index.get("metadata") or {}).get("shardmerge")
    else:
        header = next(iter(ckpt.headers.values()))
        where = Path(header.path)
        text = header.metadata.get("shardmerge")
        record = None if text is None else parse_json(text, lambda p: _bad_record(where, p))
    if record is None:
        return None
    problem = _record_problem(record)
    if problem:
        raise _bad_record(where, problem)
    return record


def _bad_record(where: Path, problem: str) -> InputError:
    return InputError(
        f"{where}: the shardmerge provenance record cannot be used: {problem}.",
        hint="Give --weights and --dtype to verify against, or merge again.",
    )


def _record_problem(record: object) -> str | None:
    """Why a provenance record is not shaped as planner/provenance.py writes it (None if it is)."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    adapters = record.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        return f"'adapters' must be a list of objects, not {shown(adapters)}"
    for i, a in enumerate(adapters):
        weight = a.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return f"adapters[{i}].weight must be a number, not {shown(weight)}"
    for key in ("dtype", "qlora_base", "quantize", "requant_scales"):
        if not isinstance(record.get(key, ""), str):
            return f"'{key}' must be text, not {shown(record[key])}"
    return None


def verify(
    out: str | Path,
    base: str | Path,
    adapters: list[str | Path],
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    max_memory: int | str | None = None,
    quantize: str | None = None,
    requant_scales: str | None = None,
) -> VerifyReport:
    """Check every tensor of a merged model folder against base + adapters.

    ``weights``, ``dtype``, ``quantize`` and ``requant_scales`` default to what
    the output's provenance records.
    ``base`` and ``adapters`` are local folders (``shardmerge.verify`` resolves Hub ids first).

    >>> report = shardmerge.verify("merged", "Llama-3-8B", ["my-lora"])   # doctest: +SKIP
    >>> report.ok                                                        # doctest: +SKIP
    True
    """
    out = Path(out)
    if not out.is_dir():
        raise InputError(
            f"output folder {out} does not exist.", hint="Give the folder merge wrote."
        )
    journal = Journal.read(out / WORK_DIR)  # a damaged one is refused, not trusted
    if journal is not None and journal.status != "complete":
        raise InputError(
            f"{out} holds an unfinished merge.", hint="Rerun the merge command to finish it first."
        )
    record = output_provenance(out)
    if record is None and journal is None:
        # Neither a record nor a journal: comparing it with a merge would only list differences.
        raise InputError(
            f"{out} is not a shardmerge output: it has no shardmerge record in its "
            f"{'index' if (out / INDEX_NAME).exists() else 'shard metadata'} and no "
            f"{WORK_DIR}/ journal; give verify the folder `shardmerge merge` wrote."
        )
    record = record or {}
    if weights is None:
        recorded = [a.get("weight", 1.0) for a in record.get("adapters", [])]
        weights = recorded if len(recorded) == len(adapters) else None
    if dtype is None:
        dtype = record.get("dtype", "auto")
    qlora_base = record.get("qlora_base", "none")
    quantize = quantize or record.get("quantize", "none")
    requant_scales = requant_scales or record.get("requant_scales", "kept")
    options = MergeOptions.from_lists(
        base, list(adapters), out, weights=weights, dtype=dtype, device="cpu",
        max_memory=max_memory, qlora_base=qlora_base, quantize=quantize,
        requant_scales=requant_scales,
    )  # fmt: skip
    plan = build_plan(options, check_out=False)
    report = VerifyReport(str(out))
    _check_layout(plan, out, report)
    if report.problems:
        return report
    got = open_checkpoint(out)
    loader = RefLoader()
    for shard in plan.shards:
        out_header = got.headers[shard.name]
        with open(shard.in_path, "rb") as src, open(out / shard.name, "rb") as dst:
            for t in shard.tensors:
                written = out_header.tensors
                sides = [written[e.name] for e in t.out_entries[1:]]
                check_tensor(t, src, dst, written[t.name], loader, report, sides)
    return report


def _check_layout(plan: MergePlan, out: Path, report: VerifyReport) -> None:
    """Files, index, names, dtypes and shapes; no LoRA keys."""
    try:
        got = open_checkpoint(out)
    except InputError as e:
        report.problems.append(str(e))
        return
    _check_config(plan, out, report)
    if set(got.shards) != {s.name for s in plan.shards}:
        report.problems.append(
            f"shard files differ: expected {sorted(s.name for s in plan.shards)}, found {sorted(got.shards)}."
        )
        return
    if plan.index is not None:
        index = got.index or {}
        if index.get("weight_map") != plan.index["weight_map"]:
            report.problems.append(f"{out / INDEX_NAME}: weight_map differs from the base's.")
        size = (index.get("metadata") or {}).get("total_size")
        if size != plan.index["metadata"]["total_size"]:
            report.problems.append(
                f"{out / INDEX_NAME}: total_size is {size}, expected {plan.index['metadata']['total_size']}."
            )
    lora = [n for n in got.weight_map if "lora_" in n]
    if lora:
        report.problems.append(f"LoRA tensors remain in the output: {', '.join(lora[:5])}.")
    for shard in plan.shards:
        tensors = got.headers[shard.name].tensors
        expected = {e.name: e for e in shard.out_entries}
        if set(tensors) != set(expected):
            missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
            report.problems.append(
                f"{shard.name}: tensors missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}."
            )
            continue
        for name, e in expected.items():
            t = tensors[name]
            if (t.dtype, t.shape) != (e.dtype, e.shape):
                report.problems.append(
                    f"{shard.name}: {name} is {t.dtype} {list(t.shape)}, expected {e.dtype} {list(e.shape)}."
                )


def _check_config(plan: MergePlan, out: Path, report: VerifyReport) -> None:
    """OUT's config.json: present, without the keys dropped, with the keys updated."""
    path = out / CONFIG_NAME
    try:
        config = read_json(path, "the merged model config (config.json)")
    except InputError as e:
        report.problems.append(str(e))
        return
    kept = [k for k in plan.config_drop if k in config]
    if kept:
        report.problems.append(f"{path} still has {', '.join(kept)}.")
    for key, value in plan.config_update:  # tie_word_embeddings, vocab_size, dtype
        if config_value(config, key) != value:
            report.problems.append(f"{path}: {key} should be {value!r}.")
