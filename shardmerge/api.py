"""The Python face of shardmerge: ``merge``, ``plan``, ``run_job`` and ``verify``; the CLI calls these.

Each builds one ``MergeOptions`` (options.py); Hub ids become local folders in
``MergeOptions.resolved()`` only.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .io.journal import WORK_DIR, refuse_if_locked
from .options import AdapterSpec, MergeOptions, output_folders, resolve_inputs
from .planner.precheck import refusals
from .report import REPORT_NAME, peak_memory_bytes, survival_entry, weak_tensors, write_report

if TYPE_CHECKING:  # the planner, executors and verifier import torch: on first use only
    from .execute.jobs import MergePlan
    from .verifier.check import VerifyReport

PathLike = str | os.PathLike


@dataclass(frozen=True)
class MergeResult:
    """What a merge did."""

    out: str
    seconds: float
    bytes_written: int  # shard bytes this run wrote (resumed shards are not written again)
    tensors: dict[str, int]  # per action: merge, replace, copy, convert
    modules: dict[str, int]  # adapter modules applied, per kind
    shards: int = 0
    shards_resumed: int = 0  # shards an earlier, interrupted run had finished
    verify: object | None = None  # the VerifyReport, when the job asked for one
    base: str = ""
    adapters: tuple[dict, ...] = ()  # {"path", "label", "weight", "sha256"} each
    max_delta: dict[str, float] = field(default_factory=dict)  # per tensor kind: max |out - base|
    peak_memory_bytes: int = 0
    # Per touched tensor: how much of the adapters' change it kept (report.survival_entry).
    survival: dict[str, dict] = field(default_factory=dict)
    # --executor ray: {"executor": "ray", "nodes": [{node, ip, shards, bytes, ...}]}
    cluster: dict = field(default_factory=dict)
    already_complete: bool = False  # an earlier run of this job finished OUT; nothing was written

    @property
    def weak(self) -> list[str]:
        """Tensors that kept less than half of their adapters' change, worst first."""
        return weak_tensors(self.survival)

    def report(self) -> dict:
        """The JSON report of this merge (what OUT/.shardmerge/report.json holds)."""
        cluster = {"cluster": dict(self.cluster)} if self.cluster else {}
        return {
            "out": self.out,
            "base": self.base,
            "adapters": [dict(a) for a in self.adapters],
            "seconds": round(self.seconds, 3),
            "bytes_written": self.bytes_written,
            "tensors": dict(self.tensors),
            "modules": dict(self.modules),
            "shards": self.shards,
            "shards_resumed": self.shards_resumed,
            "peak_memory_bytes": self.peak_memory_bytes,
            "max_delta": dict(self.max_delta),
            "survival": dict(self.survival),
            "survival_below_half": self.weak,
            **cluster,
        }


def execute_many(plans: list[MergePlan], **kwargs) -> list[int]:
    """execute/driver.py's execute_many, imported on first use (it loads torch)."""
    from .execute.driver import execute_many as run

    return run(plans, **kwargs)


# Receives the --json events: start, shard, progress, done.
EventSink = Callable[[dict], None]


def _bar_callback(bar):
    def update(item: int | str) -> None:
        if isinstance(item, str):
            bar.set_postfix_str(item, refresh=False)  # the shard being merged
        else:
            bar.update(item)

    return update


def plan(
    base: PathLike,
    adapters: list[PathLike],
    out: PathLike,
    *,
    weights: list[float] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_memory: int | str | None = None,
    overwrite: bool = False,
    resume: bool = True,
    workers: int | None = None,
    offline: bool | None = None,
    qlora_base: str = "none",
    allow_nonfinite: bool = False,
    quantize: str = "none",
    requant_scales: str = "kept",
) -> MergePlan:
    """Check a merge and return its schedule without writing anything.

    >>> p = shardmerge.plan("Llama-3-8B", ["my-lora"], "merged")   # doctest: +SKIP
    >>> p.summary                                                    # doctest: +SKIP
    {'merge': 224, 'copy': 67}

    ``base`` and ``adapters`` may be Hub ids (``org/name[@revision]``); ``offline``
    (default: HF_HUB_OFFLINE) takes them only from the local Hub cache.
    """
    options = MergeOptions.from_lists(
        base,
        adapters,
        out,
        weights=weights,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
        offline=offline,
        qlora_base=qlora_base,
        allow_nonfinite=allow_nonfinite,
        quantize=quantize,
        requant_scales=requant_scales,
    )
    return plan_options(options)


def plan_options(options: MergeOptions, *, check_out: bool = True) -> MergePlan:
    """The schedule of the merge ``options`` describe (one output; ``separate`` is run_job's).

    ``check_out=False`` skips the checks of the output folder (``shardmerge plan`` without -o).
    """
    local = options.resolved()
    return _build_plan(local, local.output, local.adapters, check_out=check_out)


def _build_plan(
    local: MergeOptions,
    out: str,
    adapters: tuple[AdapterSpec, ...],
    *,
    outputs: int = 1,
    check_out: bool = True,
) -> MergePlan:
    """build_plan for resolved options, writing ``adapters`` into ``out``."""
    one = replace(local, output=out, adapters=adapters, separate=False)
    refusals(one, check_out=check_out)  # bad input answered before torch loads
    from .planner.build import build_plan

    return build_plan(one, check_out=check_out, outputs=outputs)


def merge(
    base: PathLike,
    adapters: PathLike | list[PathLike],
    out: PathLike,
    *,
    weights: list[float] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_memory: int | str | None = None,
    overwrite: bool = False,
    resume: bool = True,
    workers: int | None = None,
    progress: bool = False,
    report: PathLike | None = None,
    events: EventSink | None = None,
    offline: bool | None = None,
    qlora_base: str = "none",
    allow_nonfinite: bool = False,
    executor: str = "local",
    ray_address: str = "auto",
    quantize: str = "none",
    requant_scales: str = "kept",
) -> MergeResult:
    """Merge PEFT adapters (LoRA, DoRA, LoHa, LoKr, IA3, ...) into a base model folder, writing a new one.

    ``weights``: one factor per adapter (default 1.0 each), ``W + sum_i
    weights[i] * delta_i``. ``dtype``: "auto" (each tensor's own), "float32",
    "float16" or "bfloat16". ``max_memory``: the budget ("4GiB"; default half the
    available RAM). A rerun resumes (``resume=False`` starts over; ``overwrite``
    replaces a model in OUT). The JSON report goes to OUT/.shardmerge/report.json
    and ``report``; ``events`` receives the --json events as dicts. The other
    keywords are the merge flags of the same names (README, ``shardmerge merge
    --help``): ``qlora_base``, ``allow_nonfinite``, ``executor`` and
    ``ray_address``, ``quantize`` and ``requant_scales``. ``MergeResult.survival``
    says how much of the adapters' change each touched tensor kept.

    >>> import shardmerge
    >>> shardmerge.merge("Llama-3-8B", ["my-lora"], "merged")   # doctest: +SKIP
    MergeResult(out='merged', ...)
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    start = time.perf_counter()
    options = MergeOptions.from_lists(
        base,
        adapters,
        out,
        weights=weights,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
        offline=offline,
        qlora_base=qlora_base,
        allow_nonfinite=allow_nonfinite,
        executor=executor,
        ray_address=ray_address,
        quantize=quantize,
        requant_scales=requant_scales,
    )
    check_not_locked(options)
    return _execute_plans(
        [plan_options(options)],
        start,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        report=report,
        events=events,
    )[0]


def _event_callback(events: EventSink, total: int, every: float = 1.0):
    """Progress items as events: each shard start, and bytes done at most every ``every`` s."""
    state = {"done": 0, "last": 0.0}
    lock = threading.Lock()

    def update(item: int | str) -> None:
        with lock:
            if isinstance(item, str):
                events({"event": "shard", "name": item})
                force = True
            else:
                state["done"] += item
                force = state["done"] >= total
            now = time.monotonic()
            if force or now - state["last"] >= every:
                state["last"] = now
                events({"event": "progress", "bytes_done": state["done"], "bytes_total": total})

    return update


def _execute_plans(
    plans: list[MergePlan],
    start: float,
    *,
    overwrite: bool,
    resume: bool,
    progress: bool,
    report: PathLike | None = None,
    events: EventSink | None = None,
) -> list[MergeResult]:
    bar = None
    total = sum(t.end - t.start for s in plans[0].shards for t in s.tensors)
    callbacks = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging")
        callbacks.append(_bar_callback(bar))
    if events:
        outs = [p.out for p in plans]
        events({"event": "start", "out": outs[0] if len(outs) == 1 else outs, "bytes_total": total})
        callbacks.append(_event_callback(events, total))

    def callback(item: int | str) -> None:
        for c in callbacks:
            c(item)

    if not plans[0].allow_nonfinite:
        from .planner.finite import check_adapters_finite

        check_adapters_finite(plans)  # before anything is written
    stats: list[dict] = []
    try:
        resumed = execute_many(
            plans,
            overwrite=overwrite,
            resume=resume,
            progress=callback if callbacks else None,
            stats=stats,
        )
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    results = [
        MergeResult(
            out=p.out,
            seconds=seconds,
            bytes_written=st.get("bytes_written", p.out_bytes),
            tensors=p.summary,
            modules=dict(p.counts),
            shards=len(p.shards),
            shards_resumed=n,
            base=p.base,
            adapters=tuple(
                {"path": a.path, "label": a.label, "weight": a.weight, "sha256": a.sha256}
                for a in p.adapters
            ),
            max_delta=st.get("max_delta", {}),
            survival={k: survival_entry(r) for k, r in st.get("survival", {}).items()},
            peak_memory_bytes=peak,
            cluster=st.get("cluster", {}),
            already_complete=st.get("already_complete", False),
        )
        for p, n, st in zip(plans, resumed, stats, strict=True)
    ]
    for r in results:
        write_report(r.report(), os.path.join(r.out, WORK_DIR, REPORT_NAME))
    if report is not None:
        docs = [r.report() for r in results]
        write_report(docs[0] if len(docs) == 1 else docs, report)
    if events:
        for r in results:
            events({"event": "done", **r.report()})
    return results


def run_job(
    job: MergeOptions,
    *,
    progress: bool = False,
    report: PathLike | None = None,
    events: EventSink | None = None,
) -> list[MergeResult]:
    """Run a MergeJob (from the CLI flags or a YAML job file); one result per output.

    With ``job.separate`` each adapter gets its own merged model in
    ``job.output/<adapter folder name>``.

    >>> from shardmerge.jobs import load_job
    >>> shardmerge.run_job(load_job("configs/batch-adapters.yaml"))   # doctest: +SKIP
    [MergeResult(out='merged/support', ...), ...]
    """
    check_not_locked(job)
    start = time.perf_counter()
    local = job.resolved()
    outputs = _outputs(job, local)
    plans = [_build_plan(local, out, adapters, outputs=len(outputs)) for out, adapters in outputs]
    results = _execute_plans(
        plans,
        start,
        overwrite=job.overwrite,
        resume=job.resume,
        progress=progress,
        report=report,
        events=events,
    )
    if job.verify:
        from .verifier.check import verify as verify_output

        for i, (out, adapters) in enumerate(outputs):
            checked = verify_output(
                out, local.base, [a.path for a in adapters], max_memory=job.max_memory
            )
            results[i] = MergeResult(**{**results[i].__dict__, "verify": checked})
    return results


def prepare(job: MergeOptions) -> None:
    """Refuse bad input without torch, then import what planning and merging need.

    The CLI calls this before Ctrl-C starts unwinding a merge (until then it
    exits at once): a KeyboardInterrupt inside torch's import can surface as
    another error, or as a death by signal.
    """
    check_not_locked(job)  # before Hub ids are resolved or any input is read
    local = job.resolved()
    for out, adapters in _outputs(job, local):
        refusals(replace(local, output=out, adapters=adapters, separate=False))
    for name in ("planner.build", "execute.driver", "verifier.check"):
        importlib.import_module(f".{name}", __package__)


def _outputs(job: MergeOptions, local: MergeOptions) -> list[tuple[str, tuple[AdapterSpec, ...]]]:
    """(OUT, adapters) of each output: one, or one per adapter with ``separate``."""
    if not job.separate:
        return [(job.output, local.adapters)]
    names = separate_outputs(job)  # from the ids, not the resolved folders
    return [(out, (a,)) for (out, _), a in zip(names, local.adapters, strict=True)]


def separate_outputs(job: MergeOptions) -> list[tuple[str, tuple[AdapterSpec, ...]]]:
    """OUT/<adapter folder name> for each adapter (names made unique); name for org/name@rev."""
    return [(out, (a,)) for out, a in zip(output_folders(job), job.adapters, strict=True)]


def check_not_locked(job: MergeOptions) -> None:
    """Refuse a job whose OUT another shardmerge is writing, before any slow work."""
    for out in output_folders(job):
        refuse_if_locked(Path(out))


def verify(
    out: PathLike,
    base: PathLike,
    adapters: list[PathLike],
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    max_memory: int | str | None = None,
    offline: bool | None = None,
    quantize: str | None = None,
    requant_scales: str | None = None,
) -> VerifyReport:
    """Check every tensor of a merged model folder against base + adapters.

    ``weights`` and ``dtype`` default to what the output's provenance records.
    ``base`` and ``adapters`` may be Hub ids, as for merge (``offline`` likewise).

    >>> report = shardmerge.verify("merged", "Llama-3-8B", ["my-lora"])   # doctest: +SKIP
    >>> report.ok                                                        # doctest: +SKIP
    True
    """
    from .verifier.check import verify as verify_output

    base, adapters = resolve_inputs(base, list(adapters), offline=offline)
    return verify_output(
        out,
        base,
        adapters,
        weights=weights,
        dtype=dtype,
        max_memory=max_memory,
        quantize=quantize,
        requant_scales=requant_scales,
    )
