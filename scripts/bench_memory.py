#!/usr/bin/env python
"""Peak memory of ``shardmerge merge`` against model size, optionally under a hard cgroup limit.

Generates llama-typed models of N layers (each layer: two 2048x8192 bf16 MLP
matrices copied as they are, q/v projections merged with a rank-8 LoRA;
about 65 MiB per layer, one shard), merges each in a child process and prints
a markdown table: model size, peak memory (the largest summed RSS of the
merge's process tree, or the largest single-process ru_maxrss if higher),
the cgroup's own peak (page cache included) when a limit is set, the limit,
and whether the run passed (exit 0, no OOM kill, peak RSS under the limit
and under --max-memory).

    .venv/bin/python scripts/bench_memory.py --layers 2 8 --max-memory 1GiB
    .venv/bin/python scripts/bench_memory.py --layers 2 8 24 --cgroup-limit 512MiB \\
        --max-memory 512MiB --workers 0

--cgroup-limit needs a writable memory cgroup (we create a child of our own,
v1 or v2; root usually can); without one that column says why. Models are
written under --dir (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from memtools import Cgroup, drop_page_cache, make_model, measure, merge_command, mib  # noqa: E402

from shardmerge.planner.memory import parse_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="model sizes, in layers")
    ap.add_argument("--max-memory", default="1GiB", help="--max-memory passed to the merge")
    ap.add_argument("--workers", type=int, default=1, help="--workers passed to the merge")
    ap.add_argument("--cgroup-limit", help="also run each merge under this hard memory limit")
    ap.add_argument("--dir", type=Path, help="where to write models (kept)")
    args = ap.parse_args(argv)

    budget = parse_size(args.max_memory)
    limit = parse_size(args.cgroup_limit) if args.cgroup_limit else None
    root = args.dir or Path(tempfile.mkdtemp(prefix="shardmerge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    ok = True
    try:
        for layers in args.layers:
            model = root / f"llama-{layers}l"
            if model.exists():
                shutil.rmtree(model)
            size = make_model(model, layers)
            settings = [None] + ([limit] if limit else [])
            for lim in settings:
                group, why = None, ""
                if lim is not None:
                    try:
                        group = Cgroup.create(f"shardmerge-bench-{layers}-{time.time_ns()}", lim)
                    except (OSError, RuntimeError) as e:
                        why = f"no cgroup: {e}"
                out = root / f"out-{layers}l"
                shutil.rmtree(out, ignore_errors=True)
                drop_page_cache(model)
                if lim is not None and group is None:
                    rows.append((layers, size, None, None, lim, why, None))
                    continue
                try:
                    cmd = merge_command(model, out, args.max_memory, workers=args.workers)
                    run = measure(cmd, cgroup=group)
                finally:
                    if group is not None:
                        group.remove()
                shutil.rmtree(out, ignore_errors=True)
                passed = run.returncode == 0 and not run.oom_kills and run.peak <= budget
                if lim is not None:
                    passed = passed and run.peak <= lim
                ok = ok and passed
                verdict = (
                    "yes" if passed else f"NO (rc {run.returncode}, OOM kills {run.oom_kills})"
                )
                rows.append((layers, size, run.peak, run.cgroup_peak, lim, verdict, run.seconds))
                if run.returncode != 0:
                    print(run.stderr, file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"merge --max-memory {args.max_memory} --workers {args.workers}\n")
    print("| layers | model size | peak RSS | cgroup peak | limit | passed | time |")
    print("|---:|---:|---:|---:|---:|:---|---:|")
    for layers, size, peak, cg_peak, lim, verdict, seconds in rows:
        print(
            f"| {layers} | {mib(size)} | {mib(peak)} | {mib(cg_peak)} | "
            f"{mib(lim) if lim else 'none'} | {verdict} | "
            f"{'-' if seconds is None else f'{seconds:.1f} s'} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
