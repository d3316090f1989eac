"""Prove a refactor changes no output bytes: run two checkouts on the same inputs, compare files.

Each checkout's test suite runs with its own code (PYTHONPATH=<checkout>, checked) and
PYTHONHASHSEED=0 into the same --basetemp path, moved aside afterwards (tmp_old, tmp_new),
so paths embedded in files match. The tests build inputs from fixed seeds in a folder per
test (named by pytest: test name cut to 30 characters plus a counter). Every regular file
on both sides is compared (size, then sha256) but caches, *.log, captured console output
(*.out, *.err), .shardmerge/report.json and .shardmerge/lock. Counted apart as equal: JSON/MD
equal once each side's checkout path is replaced, JSON equal without VOLATILE keys (a
report's clock and RSS), safetensors with __metadata__ keys in another order (safetensors'
Python API keeps them in a hash map), torch.save zips but for their .data/serialization_id.
--slice also merges bench.py's 70B-shaped slice with each checkout, --slice-repeats pairs\nalternating old/new, page cache dropped, timed with sync, peak anonymous memory sampled.

    .venv/bin/python scripts/compare_checkouts.py                # HEAD vs the working tree
    .venv/bin/python scripts/compare_checkouts.py --old v0.1 --new ../other -k lora --keep
    .venv/bin/python scripts/compare_checkouts.py --slice --slice-layers 1

Exits 0 only when no compared file differs and a merged .safetensors output was compared;
the last line says IDENTICAL or DIFFERENT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".log", ".out", ".err")
VOLATILE = {"seconds", "peak_memory_bytes"}


def log(msg: str) -> None:
    print(msg, flush=True)


def env_for(checkout: Path) -> dict[str, str]:
    # No bytecode: leave no __pycache__ in a checkout others are editing.
    extra = {"PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    return {**os.environ, **extra}


def check_import(py: str, checkout: Path) -> None:
    code = "import shardmerge; print(shardmerge.__file__)"
    r = subprocess.run([py, "-c", code], cwd=checkout, env=env_for(checkout), capture_output=True)
    where = Path(r.stdout.decode().strip() or "/nonexistent").resolve()
    if r.returncode or not where.is_relative_to(checkout.resolve()):
        sys.exit(f"FATAL: in {checkout}, `import shardmerge` gives {where}: {r.stderr.decode()}")
    log(f"  shardmerge from {where}")


def run_tests(py: str, checkout: Path, work: Path, side: str, k: str | None) -> dict[str, str]:
    """Run the suite into work/basetemp, move that to work/tmp_<side>; test id -> outcome."""
    basetemp, junit = work / "basetemp", work / f"junit_{side}.xml"
    cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(basetemp)]
    cmd += ["--junitxml", str(junit)] + (["-k", k] if k else [])
    log(f"$ cd {checkout} && PYTHONPATH={checkout} PYTHONHASHSEED=0 {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(work / f"pytest_{side}.log", "wb") as out:
        rc = subprocess.run(cmd, cwd=checkout, env=env_for(checkout), stdout=out, stderr=out)
    log(f"  pytest exit status {rc.returncode} in {time.perf_counter() - t0:.0f} s")
    if basetemp.exists():
        basetemp.rename(work / f"tmp_{side}")
    try:
        cases = ET.parse(junit).getroot().iter("testcase")
    except (OSError, ET.ParseError):
        return {}
    tag = {"failure", "error", "skipped"}
    return {
        f"{t.get('classname')}::{t.get('name')}": next(iter(tag & {c.tag for c in t}), "passed")
        for t in cases
    }


def report_tests(old: dict[str, str], new: dict[str, str]) -> None:
    for side, mine, other in (("old", old, new), ("new", new, old)):
        bad = sorted(t for t, o in mine.items() if o in ("failure", "error"))
        only = sorted(set(mine) - set(other))
        n = Counter(mine.values())
        log(f"  {side}: {len(mine)} tests, {len(bad)} failed/errored, {n['skipped']} skipped")
        for t in bad[:20]:
            log(f"    {mine[t]}: {t}")
        log(f"  tests only in {side}: {len(only)}" + "".join(f"\n    {t}" for t in only[:20]))


def regular_files(root: Path) -> dict[str, int]:
    files = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            state = rel.endswith((".shardmerge/report.json", ".shardmerge/lock"))
            if stat.S_ISREG(st.st_mode) and not rel.endswith(SKIP_SUFFIXES) and not state:
                files[rel] = st.st_size
    return files


def sha256(path: Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def st_header(path: Path) -> tuple[dict, int] | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return (json.loads(f.read(n)), 8 + n) if n < 1 << 28 else None
    except (OSError, ValueError, struct.error):
        return None


def first_tensor_diff(a: Path, b: Path) -> str:
    ha, hb = st_header(a), st_header(b)
    if ha is None or hb is None:
        return "header not parseable"
    (ja, oa), (jb, ob) = ha, hb
    if ja.get("__metadata__") != jb.get("__metadata__"):
        return "__metadata__"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for n in sorted(set(ja) - {"__metadata__"}, key=lambda n: ja[n]["data_offsets"][0]):
            ta, tb = ja[n], jb.get(n)
            if tb is None or (ta["dtype"], ta["shape"]) != (tb["dtype"], tb["shape"]):
                return f"{n} (missing or dtype/shape)"
            (sa, ea), (sb, _) = ta["data_offsets"], tb["data_offsets"]
            fa.seek(oa + sa)
            fb.seek(ob + sb)
            for left in range(ea - sa, 0, -(8 << 20)):
                if fa.read(min(left, 8 << 20)) != fb.read(min(left, 8 << 20)):
                    return n
    extra = sorted(set(jb) - set(ja))
    return f"{extra[0]} (only in new)" if extra else "none (header layout only)"


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith(".data/serialization_id")}


def equal_modulo(a: Path, b: Path, root_a: Path, root_b: Path) -> str | None:
    """The name of the normalisation under which a and b are equal, or None."""
    if a.suffix in (".json", ".md") and a.stat().st_size < 64 << 20:
        da = a.read_bytes().replace(str(root_a).encode(), b"<ROOT>")
        db = b.read_bytes().replace(str(root_b).encode(), b"<ROOT>")
        if da == db:
            return "checkout path"

        def drop(x: object) -> object:
            if isinstance(x, dict):
                return {k: drop(v) for k, v in x.items() if k not in VOLATILE}
            return [drop(v) for v in x] if isinstance(x, list) else x

        try:
            same = drop(json.loads(da)) == drop(json.loads(db))
        except ValueError:
            return None
        return "JSON keys " + "/".join(sorted(VOLATILE)) if same else None
    if a.suffix == ".safetensors" and (ha := st_header(a)) and (hb := st_header(b)):
        (ja, oa), (jb, ob) = ha, hb
        names_a, names_b = ([k for k in j if k != "__metadata__"] for j in (ja, jb))
        same = ja == jb and names_a == names_b  # dict equality ignores the metadata's key order
        return "safetensors __metadata__ order" if same and sha256(a, oa) == sha256(b, ob) else None
    with contextlib.suppress(zipfile.BadZipFile, ValueError):
        if zipfile.is_zipfile(a) and zipfile.is_zipfile(b) and zip_members(a) == zip_members(b):
            return "torch.save serialization_id"
    return None


def compare(old: Path, new: Path, root_old: Path, root_new: Path) -> bool:
    """Compare two trees and print a summary; True when nothing differs."""
    fo, fn = regular_files(old), regular_files(new)
    common = sorted(set(fo) & set(fn))
    exact, modulo, outputs, diffs, errors = 0, Counter(), 0, [], []
    for rel in common:
        a, b = old / rel, new / rel
        try:
            if fo[rel] == fn[rel] and sha256(a) == sha256(b):
                exact += 1
            elif how := equal_modulo(a, b, root_old, root_new):
                modulo[how] += 1
            else:
                diffs.append(rel)
                continue
        except OSError as e:
            errors.append(f"{rel}: {e}")
            continue
        readme = a.parent / "README.md"
        outputs += a.suffix == ".safetensors" and (
            (a.parent / ".shardmerge").is_dir()
            or (readme.is_file() and "shardmerge" in readme.read_text(errors="replace"))
        )
    log(f"files compared: {len(common)}")
    log(f"files equal: {exact + sum(modulo.values())} ({exact} byte for byte)")
    for how, n in sorted(modulo.items()):
        log(f"  equal only after normalising {how}: {n}")
    log(f"merged .safetensors outputs among the equal files: {outputs}")
    log(f"files differing: {len(diffs)}")
    for rel in diffs[:50]:
        extra = ""
        if rel.endswith(".safetensors"):
            extra = f", first differing tensor: {first_tensor_diff(old / rel, new / rel)}"
        log(f"  {rel}: {fo[rel]} vs {fn[rel]} bytes{extra}")
    if errors:
        log(f"files not readable: {len(errors)}: {errors[:5]}")
    for side, mine, other in (("old", fo, fn), ("new", fn, fo)):
        only = sorted(set(mine) - set(other))
        log(f"files only in {side}: {len(only)}" + (f", e.g. {only[:5]}" if only else ""))
    return not diffs and not errors and outputs > 0


def run_slice(py: str, checkouts: dict[str, Path], work: Path, layers: int, repeats: int) -> bool:
    """Merge bench.py's slice with each checkout, ``repeats`` alternating pairs; compare outputs.

    Each merge runs after the page cache is dropped (when permitted), timed to the end of
    a sync, with the peak anonymous memory of its process tree (bench.py's sampler).
    """
    where = work / "slice"
    spec_ = importlib.util.spec_from_file_location("bench", checkouts["new"] / "scripts/bench.py")
    assert spec_ and spec_.loader
    bench = sys.modules["bench"] = importlib.util.module_from_spec(spec_)  # for its dataclasses
    spec_.loader.exec_module(bench)
    # bench.py's defaults: LoRA r=16 on Llama-3-70B-shaped layers, 5 GB shards, seed 0.
    opts = SimpleNamespace(kind="lora", small=False, moe_layout="", layers=layers, seed=0)
    opts.shard_size = 5_000_000_000
    spec = bench.slice_spec(opts)
    if not bench.slice_intact(where, spec):
        log(f"generating the {layers}-layer slice in {where}")
        where.mkdir(parents=True, exist_ok=True)
        bench.generate(where, spec)
    base, adapter, out = where / bench.slice_names(spec)[0], where / "adapter", where / "out"
    runs: dict[str, list[tuple[float, int]]] = {side: [] for side in checkouts}
    for _ in range(repeats):
        for side, checkout in checkouts.items():
            shutil.rmtree(where / f"out_{side}", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            dropped = bench.drop_caches()
            cmd = ["env", f"PYTHONPATH={checkout}", "PYTHONDONTWRITEBYTECODE=1", py]
            cmd += ["-m", "shardmerge", "merge", str(base), str(adapter), "-o", str(out), "-q"]
            child = bench.timed(cmd, cwd=checkout)
            runs[side].append((child.seconds_sync, child.tree_anon))
            log(
                f"  {side} merge: exit {child.rc}, {child.seconds_sync:.1f} s with sync, peak "
                f"anonymous {child.tree_anon / 2**30:.2f} GiB (page cache dropped: {dropped})"
            )
            if child.rc:
                log(child.stderr[-2000:])
                return False
            out.rename(where / f"out_{side}")  # both merges write to the same path
    for side, got in runs.items():
        times = sorted(s for s, _ in got)
        log(f"  {side}: median {times[len(times) // 2]:.1f} s of {[round(s, 1) for s, _ in got]}")
        log(f"  {side}: peak anonymous {max(m for _, m in got) / 2**30:.2f} GiB")
    return compare(where / "out_old", where / "out_new", checkouts["old"], checkouts["new"])


def compare_suites(args: argparse.Namespace, checkouts: dict[str, Path], work: Path) -> bool:
    """Both test suites, then every file they wrote."""
    results = {}
    for side, checkout in checkouts.items():
        log(f"== {side}: {checkout}")
        results[side] = run_tests(args.python, checkout, work, side, args.k)
    log("== tests")
    report_tests(results["old"], results["new"])
    log("== files the test suites wrote")
    return compare(work / "tmp_old", work / "tmp_new", checkouts["old"], checkouts["new"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="HEAD", help="git ref or checkout folder (default HEAD)")
    ap.add_argument("--new", type=Path, default=REPO, help="checkout folder (default this one)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--slice", action="store_true", help="also merge the 70B-shaped slice")
    ap.add_argument("--slice-layers", type=int, default=2)
    ap.add_argument("--slice-repeats", type=int, default=1, help="alternating old/new pairs")
    ap.add_argument("--no-tests", action="store_true", help="compare the slice only")
    ap.add_argument("-k", dest="k", default=None, help="passed to pytest -k")
    ap.add_argument("--keep", action="store_true", help="keep the worktree and workdir")
    ap.add_argument("--python", default=str(VENV_PY if VENV_PY.exists() else sys.executable))
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="compare-checkouts-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for leftover in ("basetemp", "tmp_old", "tmp_new"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    worktree = None
    try:
        if Path(args.old).is_dir():
            old = Path(args.old).resolve()
        else:
            worktree = old = work / "old"
            git = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.old]
            subprocess.run(git, check=True)
        checkouts = {"old": old, "new": args.new.resolve()}
        for checkout in checkouts.values():
            check_import(args.python, checkout)
        ok = args.no_tests or compare_suites(args, checkouts, work)
        if args.slice:
            log("== 70B-shaped slice")
            ok = (
                run_slice(args.python, checkouts, work, args.slice_layers, args.slice_repeats)
                and ok
            )
        log(f"total {time.perf_counter() - t_start:.0f} s; workdir {work}")
        log("IDENTICAL" if ok else "DIFFERENT")
        return 0 if ok else 1
    finally:
        if worktree is not None and not args.keep:
            git = ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)]
            subprocess.run(git, check=False)
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
