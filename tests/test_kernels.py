"""kernels.merge_block returns the correctly rounded value of W + sum_t s_t L_t @ R_t.

Every expected value here comes from exact integer arithmetic and an
independent implementation of round-to-nearest-even (``correctly_rounded``:
it looks at the neighbouring bit patterns of the output dtype and compares
their distances to the exact value as Fractions); ``rounding.round_exact`` is
only ever the thing under test.

The adversarial cases are built so that the exact value sits on, or within
2^-60 relative of, a rounding boundary of the output dtype: ties, the
half-size gap below a power of two, the subnormal range and zero, and the
overflow threshold; near-total cancellation; terms of wildly different
magnitudes. The tier counters (how many elements reached the float64 and the
exact-rational tiers) are collected by wrapping the kernel's private helpers
from outside and printed at the end of the module.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch

from shardmerge.kernel import exact as exact_tier
from shardmerge.kernel import merge as kernels
from shardmerge.kernel import rounding
from shardmerge.kernel.merge import BlockTerm, accumulation_dtype, merge_block

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
OUT_DTYPES = [BF16, F16, F32]
NAMES = {BF16: "bf16", F16: "fp16", F32: "fp32", F64: "fp64"}
INT_OF = {BF16: torch.int16, F16: torch.int16, F32: torch.int32}

# ---------------------------------------------------------------------------
# Independent oracle: exact sums in Python integers, rounding by neighbours.
# ---------------------------------------------------------------------------

_SHIFT = 1100  # every finite float64 times 2^1100 is an integer


def _si(v: float) -> int:
    """v * 2^_SHIFT as an exact integer."""
    n, d = float(v).as_integer_ratio()
    return n << (_SHIFT - (d.bit_length() - 1))


def _ints(t: torch.Tensor) -> list:
    return [_si(v) for v in t.double().reshape(-1).tolist()]


def exact_merge(base: torch.Tensor, terms: list) -> list[Fraction]:
    """Exact W + sum s * L @ R (or s * L for right=None), elementwise, flattened."""
    cols = base.shape[1] if base.dim() == 2 else 1
    acc = [w << (2 * _SHIFT) for w in _ints(base)]
    for left, right, scale in terms:
        s = _si(scale)
        if right is None:
            for n, v in enumerate(_ints(left)):
                acc[n] += (s * v) << _SHIFT
            continue
        r = left.shape[1]
        lft = _ints(left)
        rgt = _ints(right)
        rgt_cols = [rgt[j::cols] for j in range(cols)]
        for i in range(base.shape[0]):
            li = lft[i * r : (i + 1) * r]
            for j in range(cols):
                acc[i * cols + j] += s * sum(a * b for a, b in zip(li, rgt_cols[j], strict=True))
    den = 1 << (3 * _SHIFT)
    return [Fraction(a, den) for a in acc]


def _from_bits(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits], dtype=INT_OF[dtype]).view(dtype).item()


def _to_bits(v: float, dtype: torch.dtype) -> int:
    return torch.tensor([v], dtype=F64).to(dtype).view(INT_OF[dtype]).item()


_INF_BITS = {d: _to_bits(math.inf, d) for d in OUT_DTYPES}
# "Infinity" as a rounding candidate stands for 2^(emax+1) = max + ulp(max).
_BEYOND = {
    d: 2 * Fraction(torch.finfo(d).max) - Fraction(_from_bits(_INF_BITS[d] - 2, d))
    for d in OUT_DTYPES
}


def correctly_rounded(x: Fraction, dtype: torch.dtype) -> float:
    """x rounded to the nearest ``dtype`` value, ties to the even bit pattern (IEEE 754)."""
    if x == 0:
        return 0.0
    sign = -1.0 if x < 0 else 1.0
    mag = abs(x)
    inf_bits = _INF_BITS[dtype]
    try:
        guess = _to_bits(float(mag), dtype)  # within a couple of ulp of the answer
    except OverflowError:
        guess = inf_bits
    guess = min(guess, inf_bits)

    def value(bits: int) -> Fraction:
        return _BEYOND[dtype] if bits == inf_bits else Fraction(_from_bits(bits, dtype))

    candidates = [b for b in range(guess - 2, guess + 3) if 0 <= b <= inf_bits]
    best = min(candidates, key=lambda b: (abs(value(b) - mag), b % 2))
    return sign * (math.inf if best == inf_bits else _from_bits(best, dtype))


# ---------------------------------------------------------------------------
# Driving the kernel the way the executor does.
# ---------------------------------------------------------------------------


def block_terms(terms: list, acc: torch.dtype) -> list[BlockTerm]:
    out = []
    for left, right, scale in terms:
        lft = left.to(acc).contiguous()
        if right is None:
            out.append(BlockTerm(lft, None, scale))
        else:
            rgt = right.to(acc).contiguous()
            out.append(BlockTerm(lft, rgt, scale, lft.abs().amax(dim=1), rgt.abs().sum(dim=0)))
    return out


def acc_dtype_for(base: torch.Tensor, terms: list, out_dtype: torch.dtype) -> torch.dtype:
    dtypes = [base.dtype] + [
        t.dtype for left, right, _ in terms for t in (left, right) if t is not None
    ]
    return accumulation_dtype(out_dtype, dtypes)


def run_kernel(
    base: torch.Tensor, terms: list, out_dtype: torch.dtype, block_rows: int | None = None
) -> torch.Tensor:
    acc = acc_dtype_for(base, terms, out_dtype)
    bts = block_terms(terms, acc)
    TIERS["elements"] += base.numel()
    rows = base.shape[0]
    step = block_rows or rows
    pieces = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        sliced = [
            BlockTerm(t.left[r0:r1], None, t.scale)
            if t.right is None
            else BlockTerm(t.left[r0:r1], t.right, t.scale, t.left_absmax[r0:r1], t.right_abssum)
            for t in bts
        ]
        pieces.append(merge_block(base[r0:r1], sliced, out_dtype, acc))
    return torch.cat(pieces)


def check(base: torch.Tensor, terms: list, out_dtype: torch.dtype) -> torch.Tensor:
    """Run the kernel and assert every element is the correctly rounded exact value."""
    saved = [base.clone()] + [
        t.clone() for left, right, _ in terms for t in (left, right) if t is not None
    ]
    out = run_kernel(base, terms, out_dtype)
    assert out.dtype == out_dtype and out.shape == base.shape
    after = [base] + [t for left, right, _ in terms for t in (left, right) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(saved, after, strict=True)), "inputs modified"
    got = out.double().reshape(-1).tolist()
    bad = []
    for n, x in enumerate(exact_merge(base, terms)):
        want = correctly_rounded(x, out_dtype)
        if got[n] != want:
            bad.append((n, float(x), got[n], want))
    assert not bad, (
        f"{len(bad)} of {len(got)} elements not correctly rounded to {NAMES[out_dtype]} "
        f"(index, exact, got, want): {bad[:6]}"
    )
    return out


# ---------------------------------------------------------------------------
# Tier counters, measured from outside by wrapping the kernel's helpers.
# ---------------------------------------------------------------------------

TIERS: Counter = Counter()


@pytest.fixture(autouse=True)
def count_tiers(monkeypatch):
    refine, exact = kernels._refine, kernels.settle_exact
    in_float64, rationals = exact_tier.settle_in_float64, exact_tier.settle_by_rationals

    def counting_refine(base, terms, out, idx, acc_dtype, max_rank):
        key = "tier2" if acc_dtype != torch.float64 else "tier1_f64_doubt"
        TIERS[key] += idx.numel()
        return refine(base, terms, out, idx, acc_dtype, max_rank)

    def counting_exact(flat_base, terms, out, idx, rows_i, cols_j):
        TIERS["tier3"] += idx.numel()
        return exact(flat_base, terms, out, idx, rows_i, cols_j)

    def counting_in_float64(flat_base, terms, out, idx, rows_i, cols_j):
        left = in_float64(flat_base, terms, out, idx, rows_i, cols_j)
        TIERS["tier3_float64"] += idx.numel() - (0 if left is None else left.numel())
        return left

    def counting_rationals(flat_base, terms, out, idx, rows_i, cols_j):
        TIERS["rational"] += idx.numel()
        return rationals(flat_base, terms, out, idx, rows_i, cols_j)

    monkeypatch.setattr(kernels, "_refine", counting_refine)
    monkeypatch.setattr(kernels, "settle_exact", counting_exact)
    monkeypatch.setattr(exact_tier, "settle_in_float64", counting_in_float64)
    monkeypatch.setattr(exact_tier, "settle_by_rationals", counting_rationals)
    yield


class _TierReport:
    """Prints the tier counts in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        c = TIERS
        terminalreporter.write_line(
            f"test_kernels: {c['elements']} elements merged; {c['tier2']} refined in float64 "
            f"(tier 2), {c['tier1_f64_doubt']} in doubt after a float64 first tier, "
            f"{c['tier3']} settled exactly (tier 3: {c['tier3_float64']} proven exact in float64, "
            f"{c['rational']} in rationals); on generic random blocks: "
            f"{c['generic_tier2']} tier 2 and {c['generic_f64_doubt_or_tier3']} later of "
            f"{c['generic_elements']}; naive float32 (PEFT-style) median error on "
            f"cancellation: {c['naive_fp32_median_ulp_error']} ulp; torch float64->16-bit double roundings seen: "
            f"bf16 {c['torch_double_rounding_bf16']}, fp16 {c['torch_double_rounding_fp16']}"
        )


@pytest.fixture(autouse=True, scope="module")
def report_tiers(request):
    plugin = _TierReport()
    request.config.pluginmanager.register(plugin, "shardmerge-kernel-tiers")
    yield


def tier_snapshot() -> Counter:
    return Counter(TIERS)


# ---------------------------------------------------------------------------
# Data builders.
# ---------------------------------------------------------------------------


def exactly(values, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` that must hold ``values`` exactly."""
    t64 = torch.as_tensor(values, dtype=F64)
    t = t64.to(dtype)
    assert torch.equal(t.to(F64), t64), f"construction not exact in {dtype}"
    return t


def randn(gen: torch.Generator, shape, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


def lora_delta(terms) -> torch.Tensor:
    total = None
    for left, right, scale in terms:
        d = scale * (left.double() if right is None else left.double() @ right.double())
        total = d if total is None else total + d
    return total


def precision(dtype: torch.dtype) -> int:
    return {BF16: 8, F16: 11, F32: 24, F64: 53}[dtype]


def midpoint_case(ys, units, offsets, eps, k, base_dtype, factor_dtype, cancel=None):
    """W = y (per row); terms add ``offsets`` units, then ``eps * 2^-k`` units, exactly.

    With offsets of +-1/2 unit (unit = the output dtype's ulp at y) the exact
    value is a rounding midpoint, nudged by +-2^-k units or not at all.
    ``cancel`` adds +2^cancel * |y| first and -2^cancel * |y| last, which
    wipes the low bits of any float accumulator.
    """
    rows, cols = len(ys), len(offsets)
    base = exactly([[y] * cols for y in ys], base_dtype)
    logs = [math.log2(u) for u in units]
    s1 = 2.0 ** max(-100, min(100, round(sum(logs) / len(logs))))
    l1 = exactly([[u / s1] for u in units], factor_dtype)
    shift = min(k, max(0, int(math.log2(s1)) + 126))  # keep every scale a normal float32
    l2 = exactly([[u / s1 * 2.0 ** -(k - shift)] for u in units], factor_dtype)
    terms = [
        (l1, exactly([offsets], factor_dtype), s1),
        (l2, exactly([eps], factor_dtype), s1 * 2.0**-shift),
    ]
    if cancel is not None:
        big = max(abs(y) for y in ys) or 1.0
        mag = 2.0 ** (math.floor(math.log2(big)) + cancel)
        ones_l = exactly([[1.0]] * rows, factor_dtype)
        ones_r = exactly([[1.0] * cols], factor_dtype)
        terms = [(ones_l, ones_r, mag)] + terms + [(ones_l, ones_r, -mag)]
    return base, terms


def random_mantissa_values(rng, n, bits, exps):
    """n values +-2^(e-1) * (1 + m / 2^(bits-1)): exact with ``bits`` bits of precision."""
    out = []
    for _ in range(n):
        e = rng.choice(exps)
        m = rng.randrange(1 << (bits - 1))
        out.append(rng.choice((-1.0, 1.0)) * 2.0 ** (e - 1) * (1 + m / 2 ** (bits - 1)))
    return out


def unit_at(y: float, out_dtype: torch.dtype) -> float:
    """The output dtype's ulp just above |y| (y normal)."""
    _, e = math.frexp(abs(y))
    return 2.0 ** (e - precision(out_dtype))


# Base dtype, factor dtype pairs: LoRA factors usually come in float32 or the
# base's own dtype.
INPUTS = [(BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F32, F32)]
COMBOS = [(b, f, o) for b, f in INPUTS for o in OUT_DTYPES]


def cid(combo) -> str:
    return "-".join(NAMES[d] for d in combo)


# ---------------------------------------------------------------------------
# The oracle itself, and round_exact.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=NAMES.get)
def test_oracle_agrees_with_torch_on_float32_inputs(dtype):
    # float32 -> 16-bit conversion in torch is a single correct rounding, so it
    # is a fair check of the oracle (float64 -> 16-bit is not; see below).
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2**31 - 1, (3000,), generator=gen, dtype=torch.int64)
    vals = bits.to(torch.int32).view(F32)
    vals = vals[torch.isfinite(vals)]
    vals = torch.cat([vals, vals * 2.0**-100, vals * 2.0**100])  # cover the extremes of 16-bit
    vals = vals[torch.isfinite(vals)][:4000]
    want = vals.to(dtype).double().tolist()
    for v, w in zip(vals.double().tolist(), want, strict=True):
        assert correctly_rounded(Fraction(v), dtype) == w, (v, dtype)


def _random_doubles(n: int, lo: int, hi: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.getrandbits(52)
        e = rng.randint(lo, hi)
        v = math.ldexp(1 + m / 2**52, e) * rng.choice((-1, 1))
        out.append(v)
    return out


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=NAMES.get)
def test_round_exact_matches_oracle_and_torch(dtype):
    fin = torch.finfo(dtype)
    lo = math.frexp(fin.smallest_normal)[1] - precision(dtype) - 3  # deep in the subnormals
    hi = math.frexp(fin.max)[1] + 1  # past the overflow threshold
    values = _random_doubles(3000, lo, hi, seed=7)
    # Plus every kind of boundary: exact ties, ties +- 1 double ulp.
    for e in range(lo, hi + 1, 3):
        for mant in (1.0, 1.5):
            mid = math.ldexp(mant + 2.0 ** -precision(dtype), e)
            values += [mid, math.nextafter(mid, 0), math.nextafter(mid, math.inf)]
    t64 = torch.tensor(values, dtype=F64)
    by_torch = t64.to(dtype).double().tolist()
    # torch (CPU) converts float64 to a 16-bit dtype through float32: two roundings.
    via_f32 = t64.to(F32).to(dtype).double().tolist()
    double_rounded = 0
    for v, t, t2 in zip(values, by_torch, via_f32, strict=True):
        mine = rounding.round_exact(Fraction(v), dtype)
        assert mine == correctly_rounded(Fraction(v), dtype), (v, dtype)
        if torch.tensor(mine, dtype=F64).to(dtype).item() != mine and math.isfinite(mine):
            raise AssertionError(f"round_exact({v}) = {mine} is not a {dtype} value")
        if mine != t:
            # The only disagreement allowed is torch's own double rounding.
            assert dtype != F32 and t == t2, (v, mine, t)
            double_rounded += 1
    if dtype == F32:
        assert double_rounded == 0
    else:
        assert double_rounded > 0  # the boundary values above provoke it
    TIERS[f"torch_double_rounding_{NAMES[dtype]}"] += double_rounded


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=NAMES.get)
def test_cast_rounds_float64_once(dtype):
    """kernels.cast is a single correct rounding, unlike torch's float64 -> 16-bit .to()."""
    fin = torch.finfo(dtype)
    lo = math.frexp(fin.smallest_normal)[1] - precision(dtype) - 3
    hi = math.frexp(fin.max)[1] + 1
    values = _random_doubles(3000, lo, hi, seed=8)
    for e in range(lo, hi + 1, 2):
        mid = math.ldexp(1 + 2.0 ** -precision(dtype), e)
        values += [mid, math.nextafter(mid, 0), math.nextafter(mid, math.inf), -mid]
    got = rounding.cast(torch.tensor(values, dtype=F64), dtype).double().tolist()
    for v, g in zip(values, got, strict=True):
        assert g == correctly_rounded(Fraction(v), dtype), (v, g)


def test_round_exact_special_values():
    assert rounding.round_exact(Fraction(0), BF16) == 0.0
    # Ties to even, at 1 and across a power of two.
    assert rounding.round_exact(1 + Fraction(1, 2**8), BF16) == 1.0
    assert rounding.round_exact(1 + Fraction(3, 2**8), BF16) == 1 + 2**-6
    assert rounding.round_exact(2 - Fraction(1, 2**9), BF16) == 2.0
    # Overflow: at the threshold to infinity, just below it to max.
    fmax = Fraction(torch.finfo(F16).max)
    assert rounding.round_exact(fmax + 16, F16) == math.inf
    assert rounding.round_exact(fmax + 16 - Fraction(1, 2**40), F16) == 65504.0
    assert rounding.round_exact(-(fmax + 16), F16) == -math.inf
    # Half the smallest subnormal rounds to zero (even); anything above to it.
    tiny = Fraction(2) ** -24
    assert rounding.round_exact(tiny / 2, F16) == 0.0
    assert rounding.round_exact(tiny / 2 + Fraction(1, 2**80), F16) == 2.0**-24
    assert rounding.round_exact(tiny * 3 / 2, F16) == 2.0**-23


# ---------------------------------------------------------------------------
# merge_block against the oracle.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_random_lora(combo):
    base_dtype, factor_dtype, out_dtype = combo
    gen = torch.Generator().manual_seed(11)
    rows, cols, r = 24, 40, 8
    base = randn(gen, (rows, cols), base_dtype, 0.05)
    a = randn(gen, (r, cols), factor_dtype, 0.3)
    b = randn(gen, (rows, r), factor_dtype, 0.02)
    check(base, [(b, a, 16 / 8)], out_dtype)


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_near_total_cancellation(combo):
    """W = -(delta rounded): the result is the tiny rounding error of W, or less."""
    base_dtype, factor_dtype, out_dtype = combo
    gen = torch.Generator().manual_seed(12)
    rows, cols, r = 24, 32, 16
    terms = [
        (randn(gen, (rows, r), factor_dtype), randn(gen, (r, cols), factor_dtype), 2.0),
        (randn(gen, (rows, 4), factor_dtype), randn(gen, (4, cols), factor_dtype), 0.7),
    ]
    delta = lora_delta(terms)
    base = (-delta).to(base_dtype)
    # Half the rows cancel to the output dtype's rounding instead of the base's.
    base[: rows // 2] = (-delta[: rows // 2]).to(out_dtype).to(base_dtype)
    before = tier_snapshot()
    out = check(base, terms, out_dtype)
    assert TIERS["tier2"] + TIERS["tier3"] + TIERS["tier1_f64_doubt"] > sum(
        before[k] for k in ("tier2", "tier3", "tier1_f64_doubt")
    ), "cancellation should leave elements in doubt"
    # The case is hard: a plain float32 evaluation (as PEFT does) is wrong on most elements.
    naive = (base.float() + 2.0 * (terms[0][0].float() @ terms[0][1].float())) + 0.7 * (
        terms[1][0].float() @ terms[1][1].float()
    )
    wrong = (naive.to(out_dtype) != out).float().mean().item()
    assert wrong > (0.2 if out_dtype == F32 else 0.0), wrong
    if out_dtype == F32 and base_dtype == F32:
        ulps = (naive.view(torch.int32).long() - out.view(torch.int32).long()).abs()
        TIERS["naive_fp32_median_ulp_error"] = int(ulps.median().item())


@pytest.mark.parametrize("k", [6, 20, 40, 70])
@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_ties_and_near_ties(combo, k):
    """Exact midpoints (ties to even), and midpoints +- 2^-k ulp, with and without cancellation."""
    base_dtype, factor_dtype, out_dtype = combo
    rng = random.Random(k * 101 + len(cid(combo)))
    bits = min(precision(base_dtype), precision(out_dtype))
    ys = random_mantissa_values(rng, 8, bits, range(-3, 4))
    units = [unit_at(y, out_dtype) for y in ys]
    offsets = [0.5, 0.5, 0.5, -0.5, -0.5, -0.5, 1.5, -1.5]
    eps = [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0]
    before = tier_snapshot()
    for cancel in (None, 10, 40):
        base, terms = midpoint_case(ys, units, offsets, eps, k, base_dtype, factor_dtype, cancel)
        check(base, terms, out_dtype)
    if k >= 70 or (k >= 40 and out_dtype != F32):
        # Beyond the reach of the float accumulators: only exact arithmetic decides.
        assert TIERS["tier3"] > before["tier3"]


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_power_of_two_boundaries(combo):
    """Just below 2^e the gap is half the gap above: midpoints at -1/4 and -3/4 ulp."""
    base_dtype, factor_dtype, out_dtype = combo
    ys = [s * 2.0**e for e in range(-4, 5) for s in (1.0, -1.0)]
    units = [unit_at(y, out_dtype) for y in ys]  # the ulp above |y|
    offsets = [-0.25, -0.25, -0.25, 0.5, 0.5, 0.5, -0.75, -0.75, -0.75]
    eps = [-1.0, 0.0, 1.0] * 3
    for k, cancel in ((8, None), (30, None), (64, None), (64, 30)):
        base, terms = midpoint_case(ys, units, offsets, eps, k, base_dtype, factor_dtype, cancel)
        check(base, terms, out_dtype)


SUBNORMAL_COMBOS = [(b, f, o) for b, f, o in COMBOS if f != F16]


@pytest.mark.parametrize("combo", SUBNORMAL_COMBOS, ids=cid)
def test_subnormals_and_zero(combo):
    """Results in the output's subnormal range, at zero, and at the smallest normal."""
    base_dtype, factor_dtype, out_dtype = combo
    fin = torch.finfo(out_dtype)
    tiny = fin.smallest_normal * 2.0 ** (1 - precision(out_dtype))  # smallest subnormal
    candidates = [0.0, tiny, 2 * tiny, 3 * tiny, fin.smallest_normal - tiny, fin.smallest_normal]
    ys = []
    for y in candidates + [-y for y in candidates[1:]]:
        if torch.tensor(y, dtype=F64).to(base_dtype).double().item() == y:
            ys.append(y)
    units = [tiny] * len(ys)
    offsets = [0.5, 0.5, 0.5, -0.5, -0.5, -0.5, 1.5, 1.5, 1.5]
    eps = [-1.0, 0.0, 1.0] * 3
    for k, cancel in ((3, None), (12, None), (40, None), (70, None), (70, 20)):
        base, terms = midpoint_case(ys, units, offsets, eps, k, base_dtype, factor_dtype, cancel)
        check(base, terms, out_dtype)
    # And random products that land in the subnormal range.
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(16, 24, generator=gen, dtype=F64) * tiny * 50).to(base_dtype)
    lft = randn(gen, (16, 4), factor_dtype)
    rgt = randn(gen, (4, 24), factor_dtype)
    scale = max(tiny * 8, 2.0**-126)
    check(base, [(lft, rgt, scale), (lft, rgt, -scale * 0.75)], out_dtype)


OVERFLOW_COMBOS = [
    (b, f, o)
    for b, f, o in COMBOS
    if torch.tensor(torch.finfo(o).max, dtype=F64).to(b).double().item() == torch.finfo(o).max
]


@pytest.mark.parametrize("combo", OVERFLOW_COMBOS, ids=cid)
def test_overflow_threshold(combo):
    """max + ulp/2 rounds to infinity (ties to even); a hair below it, to max."""
    base_dtype, factor_dtype, out_dtype = combo
    fmax = torch.finfo(out_dtype).max
    ys = [fmax, -fmax]
    unit = (
        fmax
        - torch.tensor(fmax, dtype=out_dtype)
        .view(INT_OF[out_dtype])
        .sub(1)
        .view(out_dtype)
        .double()
        .item()
    )
    offsets = [0.5, 0.5, 0.5, 0.25, 0.75]
    eps = [-1.0, 0.0, 1.0, 0.0, 0.0]
    for k, cancel in ((4, None), (30, None), (70, None), (70, -1)):
        # cancel=-1 adds and later subtracts max/2: a float32 accumulator overflows
        # to infinity on the way for bfloat16 outputs, though the result is finite.
        base, terms = midpoint_case(
            ys, [unit, unit], offsets, eps, k, base_dtype, factor_dtype, cancel
        )
        check(base, terms, out_dtype)


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_rank_64_mixed_magnitudes(combo):
    base_dtype, factor_dtype, out_dtype = combo
    gen = torch.Generator().manual_seed(13)
    rows, cols, r = 16, 24, 64
    spread = 6 if F16 in (factor_dtype, base_dtype, out_dtype) else 20
    exps = torch.randint(-spread, spread + 1, (rows, r), generator=gen).double()
    lft = (torch.randn(rows, r, generator=gen, dtype=F64) * 2.0**exps).to(factor_dtype)
    exps = torch.randint(-spread, spread + 1, (r, cols), generator=gen).double()
    rgt = (torch.randn(r, cols, generator=gen, dtype=F64) * 2.0**exps).to(factor_dtype)
    terms = [(lft, rgt, 0.25)]
    delta = lora_delta(terms)
    base = randn(gen, (rows, cols), base_dtype, 1.0)
    base[::2] = (-delta[::2]).to(base_dtype)  # every other row cancels
    check(base, terms, out_dtype)


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_bias_terms(combo):
    """right=None: a vector (or block) added times a scale, on 1-D and 2-D bases."""
    base_dtype, factor_dtype, out_dtype = combo
    gen = torch.Generator().manual_seed(14)
    n = 64
    extra = randn(gen, (n,), factor_dtype)
    base = (-(extra.double() * 0.5)).to(base_dtype)  # cancels
    check(base, [(extra, None, 0.5)], out_dtype)
    second = randn(gen, (n,), factor_dtype, 2.0**-20)
    check(base, [(extra, None, 0.5), (second, None, 1 / 3)], out_dtype)
    base2 = randn(gen, (8, 16), base_dtype)
    left2 = (-base2.double() * 4).to(factor_dtype)
    check(base2, [(left2, None, 0.25), (randn(gen, (8, 16), factor_dtype), None, 1e-3)], out_dtype)


@pytest.mark.parametrize("combo", COMBOS, ids=cid)
def test_several_terms(combo):
    """Three adapters (weights folded into non-dyadic scales) plus a bias-like term."""
    base_dtype, factor_dtype, out_dtype = combo
    gen = torch.Generator().manual_seed(15)
    rows, cols = 20, 28
    terms = []
    for r, scale in ((4, 2.0 * 0.7), (16, 0.5 * 0.3), (8, 1 / 3)):
        terms.append(
            (randn(gen, (rows, r), factor_dtype, 0.1), randn(gen, (r, cols), factor_dtype), scale)
        )
    base = (-lora_delta(terms)).to(base_dtype)
    terms.append((randn(gen, (rows, cols), factor_dtype, 2.0**-12), None, 0.1))
    check(base, terms, out_dtype)


def test_float64_inputs_into_16_bit_outputs():
    """A float64 accumulator; its own cast to 16 bits double-rounds, and must be caught."""
    base = exactly([[1.0, 1.0, -1.0, 3.0]], F64)
    left = exactly([[1.0]], F64)
    # 1 + 2^-8 + 2^-30 is just above a bf16 midpoint; via float32 it becomes the tie.
    right = exactly([[2.0**-8 + 2.0**-30, 2.0**-8 - 2.0**-30, -(2.0**-8) - 2.0**-30, 2**-11]], F64)
    for out_dtype in (BF16, F16, F32):
        check(base, [(left, right, 1.0)], out_dtype)
    gen = torch.Generator().manual_seed(16)
    terms = [(randn(gen, (12, 8), F64), randn(gen, (8, 20), F64), 2.0)]
    base = (-lora_delta(terms)).to(BF16).to(F64) + randn(gen, (12, 20), F64, 2.0**-40)
    for out_dtype in (BF16, F16, F32):
        check(base, terms, out_dtype)


def test_no_terms_is_a_plain_cast():
    gen = torch.Generator().manual_seed(17)
    base = randn(gen, (8, 8), F32)
    for out_dtype in OUT_DTYPES:
        assert torch.equal(merge_block(base, [], out_dtype, F32), base.to(out_dtype))


# ---------------------------------------------------------------------------
# Invariances: block size and thread count do not change a single byte.
# ---------------------------------------------------------------------------


def _invariance_case(gen, out_dtype):
    rows, cols, r = 48, 128, 32
    terms = [
        (randn(gen, (rows, r), F32, 0.1), randn(gen, (r, cols), F32), 2.0),
        (randn(gen, (rows, 8), BF16), randn(gen, (8, cols), BF16), 1 / 3),
    ]
    base = randn(gen, (rows, cols), BF16, 0.02)
    base[::8] = (-lora_delta(terms)[::8]).to(BF16)  # hard rows, which reach the later tiers
    return base, terms


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=NAMES.get)
def test_block_size_invariance(out_dtype):
    gen = torch.Generator().manual_seed(18)
    base, terms = _invariance_case(gen, out_dtype)
    whole = run_kernel(base, terms, out_dtype)
    for block_rows in (1, 7, 33):
        split = run_kernel(base, terms, out_dtype, block_rows=block_rows)
        assert torch.equal(whole.view(INT_OF[out_dtype]), split.view(INT_OF[out_dtype]))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=NAMES.get)
def test_thread_count_invariance(out_dtype):
    gen = torch.Generator().manual_seed(19)
    rows, cols, r = 128, 384, 64
    terms = [(randn(gen, (rows, r), F32, 0.05), randn(gen, (r, cols), F32, 0.05), 2.0)]
    base = randn(gen, (rows, cols), BF16, 0.02)
    base[::16] = (-lora_delta(terms)[::16]).to(BF16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_kernel(base, terms, out_dtype).view(INT_OF[out_dtype]))
            results.append(
                run_kernel(base, terms, out_dtype, block_rows=100).view(INT_OF[out_dtype])
            )
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(results[0], other)
    # And a slice of it against the oracle, for good measure.
    sl = slice(0, 8)
    check(base[sl], [(terms[0][0][sl], terms[0][1], 2.0)], out_dtype)


def test_generic_blocks_rarely_need_later_tiers():
    """On ordinary data nearly every element is settled by the first tier."""
    gen = torch.Generator().manual_seed(20)
    rows, cols, r = 256, 512, 16
    base = randn(gen, (rows, cols), BF16, 0.02)
    terms = [(randn(gen, (rows, r), F32, 0.01), randn(gen, (r, cols), F32, 0.02), 2.0)]
    before = tier_snapshot()
    run_kernel(base, terms, BF16)
    run_kernel(base.float(), terms, F32)
    tier2 = TIERS["tier2"] - before["tier2"]
    late = TIERS["tier3"] - before["tier3"] + TIERS["tier1_f64_doubt"] - before["tier1_f64_doubt"]
    TIERS["generic_tier2"] += tier2
    TIERS["generic_f64_doubt_or_tier3"] += late
    TIERS["generic_elements"] += 2 * rows * cols
    assert tier2 < 0.01 * rows * cols
    assert late < 0.001 * rows * cols


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fsum_tier_agrees_with_rationals(out_dtype, monkeypatch):
    """The exact-products + fsum tier gives the rational tier's results, also where it must defer
    (products near float64's underflow or overflow, values exactly on a midpoint)."""
    g = torch.Generator().manual_seed(5)
    rows, cols, r = 24, 16, 6
    left = torch.randn(rows, r, generator=g, dtype=torch.float64)
    right = torch.randn(r, cols, generator=g, dtype=torch.float64)
    base = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    left[0] *= 2.0**-560  # products around 2^-1120: underflow
    right[:, 1] *= 2.0**-400  # with row 0: far below the safe range
    left[2] *= 2.0**600
    right[:, 3] *= 2.0**500  # products past float64's range
    # Exact midpoints of the output format: base on a midpoint, factors zero.
    precision, _ = kernels.FORMAT[out_dtype]
    left[4] = 0.0
    base[4] = (1.0 + 2.0**-precision) * torch.arange(1, cols + 1, dtype=torch.float64)
    left[5] = 2.0**-30  # tiny terms nudging a midpoint
    base[5] = 1.0 + 2.0**-precision
    term = kernels.BlockTerm(
        left, right, 0.37, left.abs().amax(1), right.abs().sum(0), may_underflow=True
    )
    bias = kernels.BlockTerm(torch.randn(rows, cols, generator=g, dtype=torch.float64), None, -1.5)
    idx = torch.arange(rows * cols)
    rows_i, cols_j = idx // cols, idx % cols
    flat = base.reshape(-1)

    def run() -> torch.Tensor:
        out = torch.zeros(rows, cols, dtype=out_dtype)
        exact_tier.settle_exact(flat, [term, bias], out, idx, rows_i, cols_j)
        return out

    fast = run()
    deferred = exact_tier.settle_by_fsum(
        flat, [term, bias], torch.zeros(rows, cols, dtype=out_dtype), idx, rows_i, cols_j
    )
    assert deferred is not None and 0 < deferred.numel() < rows * cols / 2
    monkeypatch.setattr(exact_tier, "settle_in_float64", _defer_all)
    by_fsum = run()
    monkeypatch.setattr(exact_tier, "settle_by_fsum", _defer_all)
    slow = run()
    assert torch.equal(fast.view(torch.uint8), slow.view(torch.uint8))
    assert torch.equal(by_fsum.view(torch.uint8), slow.view(torch.uint8))


# ---------------------------------------------------------------------------
# 16-bit-precision factors into float32 outputs: many exact ties (issue 15).
# ---------------------------------------------------------------------------


def _defer_all(flat_base, terms, out, idx, rows_i, cols_j):
    return torch.arange(idx.numel())


def _bf16_values(gen, shape, scale, storage):
    """Random values exactly representable in bf16, stored as ``storage``."""
    return randn(gen, shape, BF16, scale).to(storage)


@pytest.mark.parametrize("stage", ["float64", "fsum"])
@pytest.mark.parametrize("scale", [2.0, 0.37, 1.5])
@pytest.mark.parametrize(
    "base_dtype, storage", [(BF16, BF16), (F32, BF16), (F32, F32), (BF16, F64), (F32, F64)]
)
def test_bf16_precision_factors_into_float32(base_dtype, storage, scale, stage, monkeypatch):
    """Exact values fit in float64 and often sit on a float32 midpoint; all exactly rounded.

    ``stage="fsum"`` turns the float64 proof off, so the fsum step must settle the ties.
    """
    if stage == "fsum":
        monkeypatch.setattr(exact_tier, "settle_in_float64", _defer_all)
    gen = torch.Generator().manual_seed(21)
    rows, cols, r = 24, 64, 16
    base = randn(gen, (rows, cols), base_dtype, 0.02)
    terms = [
        (
            _bf16_values(gen, (rows, r), 0.01, storage),
            _bf16_values(gen, (r, cols), 0.02, storage),
            scale,
        )
    ]
    # Mixed-sign cancellation: every third row is the float32 rounding of -delta.
    base[::3] = (-lora_delta(terms)[::3]).to(F32).to(base_dtype)
    before = tier_snapshot()
    check(base, terms, F32)
    tier3 = TIERS["tier3"] - before["tier3"]
    assert tier3 > 0, "the case should reach the exact tier"
    assert TIERS["rational"] == before["rational"], "no element needs rationals here"
    if stage == "float64" and scale != 0.37:
        # Dyadic scales keep every sum exact in float64: all settled there.
        assert TIERS["tier3_float64"] - before["tier3_float64"] == tier3


@pytest.mark.parametrize("stage", ["float64", "fsum"])
def test_exact_ties_round_to_even_both_ways(stage, monkeypatch):
    """W + 1/2 ulp exactly: odd W rounds up, even W stays; also +-3/2 ulp."""
    if stage == "fsum":
        monkeypatch.setattr(exact_tier, "settle_in_float64", _defer_all)
    rng = random.Random(22)
    ys = random_mantissa_values(rng, 16, 24, range(-8, 8))
    units = [unit_at(y, F32) for y in ys]
    offsets = [0.5, -0.5, 1.5, -1.5, 0.25, -0.75]
    before = tier_snapshot()
    base, terms = midpoint_case(ys, units, offsets, [0.0] * 6, 8, F32, BF16)
    out = check(base, terms, F32)
    bits = base.view(torch.int32)[:, :2]
    moved = out.view(torch.int32)[:, :2] != bits
    odd = (bits & 1) == 1
    assert torch.equal(moved, odd), "a tie moves exactly when W's last bit is odd"
    assert bool(odd.any()) and bool((~odd).any())
    assert TIERS["rational"] == before["rational"]


@pytest.mark.parametrize("stage", ["float64", "fsum"])
def test_float32_subnormal_ties_without_rationals(stage, monkeypatch):
    """Results in float32's subnormal range, exactly on and beside their midpoints."""
    if stage == "fsum":
        monkeypatch.setattr(exact_tier, "settle_in_float64", _defer_all)
    tiny = 2.0**-149
    ys = [k * tiny for k in (0, 1, 2, 3, 7, -1, -2, -5)] + [2.0**-126, -(2.0**-126)]
    base = exactly([[y] * 4 for y in ys], F32)
    left = exactly([[2.0**-75]] * len(ys), BF16)
    right = exactly([[1.0, -1.0, 3.0, -3.0]], BF16)  # +-1/2, +-3/2 of the smallest subnormal
    before = tier_snapshot()
    check(base, [(left, right, 1.0)], F32)
    check(base, [(left, right, 1.0), (left, exactly([[2.0**-20] * 4], BF16), 1.0)], F32)
    assert TIERS["rational"] == before["rational"]


def test_float64_factors_full_precision():
    """Full float64 factors: products are not exact, the float64 proof must decline them."""
    gen = torch.Generator().manual_seed(23)
    terms = [(randn(gen, (12, 8), F64, 0.1), randn(gen, (8, 24), F64, 0.1), 2.0)]
    base = (-lora_delta(terms)).to(F32).to(F64)
    for out_dtype in (F32, BF16):
        check(base, terms, out_dtype)
        check(base.to(F32), terms, out_dtype)
