"""The Python face of shardmerge: ``merge``, ``plan`` and ``run_job``; the CLI calls these."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .execute import execute_many
from .jobs import AdapterSpec, MergeJob
from .plan import MergePlan, build_plan

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
) -> MergePlan:
    """Check a merge and return its schedule without writing anything.

    >>> p = shardmerge.plan("Llama-3-8B", ["my-lora"], "merged")   # doctest: +SKIP
    >>> p.summary                                                    # doctest: +SKIP
    {'merge': 224, 'copy': 67}
    """
    return build_plan(
        base,
        list(adapters),
        out,
        weights=weights,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        overwrite=overwrite,
        resume=resume,
        workers=workers,
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
) -> MergeResult:
    """Merge LoRA adapters into a base model folder and write a new model folder.

    ``weights`` gives one factor per adapter (default 1.0 each):
    ``W + sum_i weights[i] * delta_i``. ``dtype`` is "auto" (keep each
    tensor's dtype), "float32", "float16" or "bfloat16". ``max_memory`` is the
    memory budget ("4GiB"; default half the available RAM). Rerunning an
    interrupted merge resumes it (``resume=False`` starts over); ``overwrite``
    replaces whatever model OUT holds. ``workers`` runs that many shards at
    once in worker processes (default: one worker; tiny models in-process).

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
    )
    return _execute_plans([p], start, overwrite=overwrite, resume=resume, progress=progress)[0]


def _execute_plans(
    plans: list[MergePlan], start: float, *, overwrite: bool, resume: bool, progress: bool
) -> list[MergeResult]:
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(t.end - t.start for s in plans[0].shards for t in s.tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging")
    try:
        resumed = execute_many(
            plans, overwrite=overwrite, resume=resume, progress=_bar_callback(bar) if bar else None
        )
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - start
    return [
        MergeResult(
            out=p.out,
            seconds=seconds,
            bytes_written=p.out_bytes,
            tensors=p.summary,
            modules=dict(p.counts),
            shards=len(p.shards),
            shards_resumed=n,
        )
        for p, n in zip(plans, resumed, strict=True)
    ]


def run_job(job: MergeJob, *, progress: bool = False) -> list[MergeResult]:
    """Run a MergeJob (from the CLI flags or a YAML job file); one result per output.

    With ``job.separate`` each adapter gets its own merged model in
    ``job.output/<adapter folder name>``.

    >>> from shardmerge.jobs import load_job
    >>> shardmerge.run_job(load_job("configs/batch-adapters.yaml"))   # doctest: +SKIP
    [MergeResult(out='merged/support', ...), ...]
    """
    outputs = separate_outputs(job) if job.separate else [(job.output, job.adapters)]
    start = time.perf_counter()
    plans = [
        build_plan(
            job.base,
            [a.path for a in adapters],
            out,
            weights=[a.weight for a in adapters],
            dtype=job.dtype,
            device=job.device,
            max_memory=job.max_memory,
            overwrite=job.overwrite,
            resume=job.resume,
            workers=job.workers,
            outputs=len(outputs),
        )
        for out, adapters in outputs
    ]
    results = _execute_plans(
        plans, start, overwrite=job.overwrite, resume=job.resume, progress=progress
    )
    if job.verify:
        from .verify import verify

        for i, (out, adapters) in enumerate(outputs):
            report = verify(out, job.base, [a.path for a in adapters], max_memory=job.max_memory)
            results[i] = MergeResult(**{**results[i].__dict__, "verify": report})
    return results


def separate_outputs(job: MergeJob) -> list[tuple[str, tuple[AdapterSpec, ...]]]:
    """OUT/<adapter folder name> for each adapter (names made unique)."""
    seen: dict[str, int] = {}
    outputs = []
    for a in job.adapters:
        name = os.path.basename(os.path.normpath(a.path.split("@")[0])) or "adapter"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        outputs.append((os.path.join(job.output, name), (a,)))
    return outputs
