#!/usr/bin/env python
"""merge_block before and after a kernel change: elements/s, ratio, identical bytes.

Loads the old kernel from ``git show <ref>:shardmerge/kernel/merge.py`` (a
single module at that ref) into a temporary file, runs it and the current
kernel on the same inputs in the same process, alternating, and prints a
markdown table: per case the best time of each, elements per second, the
speed-up, and how many elements reached the exact tier (tier 3) and the
rational arithmetic inside it. Exits 1 if any output byte differs.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_kernel.py --old-ref cbd7dbf

The cases: bf16 output with bf16 factors; float32 output (``--dtype
float32``) with bf16 factors; float32 output with float32 factors; a float32
base at its own dtype with bf16 factors. LoRA-like magnitudes, rank 16,
scale 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch

from shardmerge.kernel import exact as exact_tier
from shardmerge.kernel import merge as new_kernel

BF16, F32 = torch.bfloat16, torch.float32
# name, base dtype, factor dtype, output dtype
CASES = [
    ("bf16 out, bf16 factors", BF16, BF16, BF16),
    ("fp32 out (--dtype float32), bf16 factors", BF16, BF16, F32),
    ("fp32 out (--dtype float32), fp32 factors", BF16, F32, F32),
    ("fp32 base, default dtype, bf16 factors", F32, BF16, F32),
]


def load_old_kernel(ref: str, folder: Path) -> ModuleType:
    """The kernel module as it was at ``ref``, imported from a temporary file."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{ref}:shardmerge/kernel/merge.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "old_merge_kernel.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_merge_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_inputs(case: tuple, rows: int, cols: int, rank: int, seed: int) -> tuple:
    """Base rows and one LoRA term (left, right, scale), LoRA-like magnitudes."""
    _, base_dtype, factor_dtype, _ = case
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=gen) * 0.02).to(base_dtype)
    left = (torch.randn(rows, rank, generator=gen) * 0.01).to(factor_dtype)
    right = (torch.randn(rank, cols, generator=gen) * 0.02).to(factor_dtype)
    return base, left, right, 2.0


def run_once(kernel: ModuleType, inputs: tuple, out_dtype: torch.dtype) -> tuple:
    """One merge_block call through ``kernel``: (output, seconds)."""
    base, left, right, scale = inputs
    acc = kernel.accumulation_dtype(out_dtype, [base.dtype, left.dtype, right.dtype])
    lft, rgt = left.to(acc).contiguous(), right.to(acc).contiguous()
    term = kernel.BlockTerm(lft, rgt, scale, lft.abs().amax(dim=1), rgt.abs().sum(dim=0))
    start = time.perf_counter()
    out = kernel.merge_block(base, [term], out_dtype, acc)
    return out, time.perf_counter() - start


def count_new_tiers(counts: Counter) -> None:
    """Count elements entering tier 3 and its rational step in the current kernel."""
    settle, rationals = new_kernel.settle_exact, exact_tier.settle_by_rationals

    def counting_settle(flat_base, terms, out, idx, rows_i, cols_j):
        counts["tier3"] += idx.numel()
        return settle(flat_base, terms, out, idx, rows_i, cols_j)

    def counting_rationals(flat_base, terms, out, idx, rows_i, cols_j):
        counts["rational"] += idx.numel()
        return rationals(flat_base, terms, out, idx, rows_i, cols_j)

    new_kernel.settle_exact = counting_settle
    exact_tier.settle_by_rationals = counting_rationals


def count_old_tiers(old: ModuleType, counts: Counter) -> None:
    """The same counts for the old single-module kernel."""
    exact, by_fsum = old._exact, old._exact_by_fsum

    def counting_exact(flat_base, terms, out, idx, rows_i, cols_j):
        counts["tier3"] += idx.numel()
        return exact(flat_base, terms, out, idx, rows_i, cols_j)

    def counting_fsum(*args):
        pending = by_fsum(*args)
        counts["rational"] += 0 if pending is None else pending.numel()
        return pending

    old._exact, old._exact_by_fsum = counting_exact, counting_fsum


def bench_case(case: tuple, old: ModuleType, args: argparse.Namespace) -> dict:
    """Alternate old and new ``args.repeats`` times; best times and the byte check."""
    inputs = make_inputs(case, args.rows, args.cols, args.rank, args.seed)
    out_dtype = case[3]
    best = {"old": float("inf"), "new": float("inf")}
    same = True
    for repeat in range(args.repeats):
        outputs = {}
        for key in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
            out, seconds = run_once(old if key == "old" else new_kernel, inputs, out_dtype)
            best[key] = min(best[key], seconds)
            outputs[key] = out.view(torch.uint8)
        same &= torch.equal(outputs["old"], outputs["new"])
    return {"best": best, "same": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-ref", default="HEAD", help="git ref of the old kernel")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    n = args.rows * args.cols
    print(f"block {args.rows}x{args.cols}, rank {args.rank}, old kernel at {args.old_ref}")
    print(
        "| case | old s | new s | old Melem/s | new Melem/s | speed-up | tier 3 old/new "
        "| rationals old/new | bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    identical = True
    counts = {"old": Counter(), "new": Counter()}
    count_new_tiers(counts["new"])
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_kernel(args.old_ref, Path(tmp))
        count_old_tiers(old, counts["old"])
        for case in CASES:
            for c in counts.values():
                c.clear()
            result = bench_case(case, old, args)
            t_old, t_new = result["best"]["old"], result["best"]["new"]
            identical &= result["same"]
            # Every run of a case reaches the same tiers: counts per run.
            co = {k: v // args.repeats for k, v in counts["old"].items()}
            cn = {k: v // args.repeats for k, v in counts["new"].items()}
            print(
                f"| {case[0]} | {t_old:.3f} | {t_new:.3f} | {n / t_old / 1e6:.1f} "
                f"| {n / t_new / 1e6:.1f} | {t_old / t_new:.1f}x "
                f"| {co.get('tier3', 0)}/{cn.get('tier3', 0)} "
                f"| {co.get('rational', 0)}/{cn.get('rational', 0)} "
                f"| {'identical' if result['same'] else 'DIFFER'} |"
            )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
