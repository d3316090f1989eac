"""The Python face of shardmerge: ``merge``, ``plan`` and ``run_job``; the CLI calls these."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .execute.driver import execute_many
from .io.hub import resolve
from .io.journal import WORK_DIR
from .jobs import AdapterSpec, MergeJob
from .planner.build import MergePlan, build_plan
from .report import REPORT_NAME, peak_memory_bytes, write_report

PathLike = str | os.PathLike


@dataclass(frozen=True)
class MergeResult:
    """What a merge did."""

    out: str
    seconds: float
    bytes_written: int
    tensors: dict[str, int]  # per action: merge, replace, copy, convert
    modules: dict[str, int]  # adapter modules applied, per kind
    shards: int = 0
    shards_resumed: int = 0  # shards an earlier, interrupted run had finished
    verify: object | None = None  # the VerifyReport, when the job asked for one
    base: str = ""
    adapters: tuple[dict, ...] = ()  # {"path", "label", "weight", "sha256"} each
    max_delta: dict[str, float] = field(default_factory=dict)  # per tensor kind: max |out - base|
    peak_memory_bytes: int = 0

    def report(self) -> dict:
        """The JSON report of this merge (what OUT/.shardmerge/report.json holds)."""
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
        }


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
) -> MergePlan:
    """Check a merge and return its schedule without writing anything.

    >>> p = shardmerge.plan("Llama-3-8B", ["my-lora"], "merged")   # doctest: +SKIP
    >>> p.summary                                                    # doctest: +SKIP
    {'merge': 224, 'copy': 67}

    ``base`` and ``adapters`` may be Hub ids (``org/name[@revision]``); ``offline``
    (default: HF_HUB_OFFLINE) takes them only from the local Hub cache.
    """
    return build_plan(
        resolve(base, offline=offline),
        [resolve(a, offline=offline) for a in adapters],
        out,
        weights=weights,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
        qlora_base=qlora_base,
    )


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
) -> MergeResult:
    """Merge LoRA adapters into a base model folder and write a new model folder.

    ``weights`` gives one factor per adapter (default 1.0 each):
    ``W + sum_i weights[i] * delta_i``. ``dtype`` is "auto" (keep each
    tensor's dtype), "float32", "float16" or "bfloat16". ``max_memory`` is the
    memory budget ("4GiB"; default half the available RAM). Rerunning an
    interrupted merge resumes it (``resume=False`` starts over); ``overwrite``
    replaces whatever model OUT holds. ``workers`` runs that many shards at
    once in worker processes (default: one worker; tiny models in-process).
    The JSON report goes to ``OUT/.shardmerge/report.json`` and, given
    ``report``, to that path too; ``events`` receives progress as dicts
    (``{"event": "start" | "shard" | "progress" | "done", ...}``).
    ``qlora_base="nf4"`` merges into the base weights as a QLoRA run saw them
    (NF4 round trip of the quantized Linear weights); a bitsandbytes 4-bit base
    folder is dequantized in any case.

    >>> import shardmerge
    >>> shardmerge.merge("Llama-3-8B", ["my-lora"], "merged")   # doctest: +SKIP
    MergeResult(out='merged', ...)
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    start = time.perf_counter()
    p = plan(
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
    )
    return _execute_plans(
        [p],
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
            bytes_written=p.out_bytes,
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
            peak_memory_bytes=peak,
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
    job: MergeJob,
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
    outputs = separate_outputs(job) if job.separate else [(job.output, job.adapters)]
    start = time.perf_counter()
    # Hub ids to cached folders, once each (after separate_outputs: names come from the ids).
    local = {
        p: resolve(p, offline=job.offline) for p in [job.base, *(a.path for a in job.adapters)]
    }
    plans = [
        build_plan(
            local[job.base],
            [local[a.path] for a in adapters],
            out,
            weights=[a.weight for a in adapters],
            dtype=job.dtype,
            device=job.device,
            max_memory=job.max_memory,
            overwrite=job.overwrite,
            resume=job.resume,
            workers=job.workers,
            outputs=len(outputs),
            qlora_base=job.qlora_base,
        )
        for out, adapters in outputs
    ]
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
        from .verifier.check import verify

        for i, (out, adapters) in enumerate(outputs):
            report = verify(
                out, local[job.base], [local[a.path] for a in adapters], max_memory=job.max_memory
            )
            results[i] = MergeResult(**{**results[i].__dict__, "verify": report})
    return results


def separate_outputs(job: MergeJob) -> list[tuple[str, tuple[AdapterSpec, ...]]]:
    """OUT/<adapter folder name> for each adapter (names made unique); name for org/name@rev."""
    seen: dict[str, int] = {}
    outputs = []
    for a in job.adapters:
        name = os.path.basename(os.path.normpath(a.path.split("@")[0])) or "adapter"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        outputs.append((os.path.join(job.output, name), (a,)))
    return outputs
