"""kernel/fp8.py: e4m3 codes and block scales against an independent rational reference."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from shardmerge.kernel.fp8 import (
    ScaleRule,
    decode_e4m3,
    encode_e4m3,
    quantize_block,
    quantize_rows,
)
from shardmerge.kernel.merge import BlockTerm

F8 = torch.float8_e4m3fn


def _magnitudes() -> list[tuple[Fraction, int]]:
    """Every finite non-negative e4m3 value with its code, from the format's definition."""
    out = []
    for code in range(0x7F):  # 0x7F is NaN
        exp, man = code >> 3, code & 7
        value = (
            Fraction(man, 8) * Fraction(2) ** -6
            if exp == 0
            else (1 + Fraction(man, 8)) * Fraction(2) ** (exp - 7)
        )
        out.append((value, code))
    return out


MAGS = _magnitudes()


def ref_code(x: Fraction) -> int:
    """The code nearest to x, ties to the even code; -0 for negatives rounding to zero."""
    a = abs(x)
    best = min(MAGS, key=lambda vc: (abs(vc[0] - a), vc[1] & 1))
    return best[1] | (0x80 if x < 0 else 0)


def ref_round(x: Fraction, dtype: torch.dtype) -> float:
    """x rounded to ``dtype`` (float32/bfloat16) by picking the nearest of its neighbours."""
    t = torch.tensor([float(x)], dtype=torch.float64).to(dtype)
    int_dtype = torch.int16 if dtype.itemsize == 2 else torch.int32
    bits = int(t.view(int_dtype))
    cands = [torch.tensor([bits + d], dtype=int_dtype).view(dtype) for d in (-1, 0, 1)]
    vals = [(Fraction(float(c)), int(c.view(int_dtype))) for c in cands]
    return float(min(vals, key=lambda vb: (abs(vb[0] - x), vb[1] & 1))[0])


def _probe_points() -> list[float]:
    """Every code's value, every midpoint, and their float64 neighbours, both signs."""
    vals = [float(v) for v, _ in MAGS]
    pts = set(vals)
    for a, b in zip(vals, vals[1:], strict=False):
        pts.add((a + b) / 2)
    pts |= {460.0, 464.0, 448.5}
    near = {math.nextafter(p, d) for p in pts for d in (-math.inf, math.inf)}
    pts = {p for p in pts | near if p <= 464.0}
    return sorted(pts | {-p for p in pts})


def test_every_code_decodes_and_encodes_back():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = [c for c in range(256) if c not in (0x7F, 0xFF, 0x80)]
    values = decode_e4m3(codes)
    back = encode_e4m3(values)
    assert back[finite].tolist() == finite
    assert int(back[0x80]) == 0  # an exact zero is +0, whatever its sign
    assert [Fraction(float(values[c])) for c in range(0x7F)] == [v for v, _ in MAGS]


def test_midpoints_and_their_neighbours_round_to_nearest_even():
    pts = _probe_points()
    got = encode_e4m3(torch.tensor(pts, dtype=torch.float64)).tolist()
    want = [ref_code(Fraction(p)) if p != 0 else 0 for p in pts]
    assert got == want
    # torch's cast rounds through float32: just above a midpoint it lands on the
    # midpoint and then rounds to even, the wrong way. Ours must differ there.
    torch_codes = torch.tensor(pts, dtype=torch.float64).to(F8).view(torch.uint8).tolist()
    assert any(t != g for t, g in zip(torch_codes, got, strict=True))


def test_beyond_the_rounding_limit_is_refused():
    assert int(encode_e4m3(torch.tensor([464.0], dtype=torch.float64))) == 0x7E
    with pytest.raises(ValueError, match="e4m3 range"):
        encode_e4m3(torch.tensor([math.nextafter(464.0, 500.0)], dtype=torch.float64))


def _exact(base: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float]]):
    """Rows of exact values (rationals) of base + sum scale * left @ right."""
    rows, cols = base.shape
    b = base.double().tolist()
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            v = Fraction(b[i][j])
            for left, right, scale in terms:
                v += Fraction(scale) * sum(
                    Fraction(float(left[i, k])) * Fraction(float(right[k, j]))
                    for k in range(left.shape[1])
                )
            row.append(v)
        out.append(row)
    return out


def _reference(values, block, dtype, kept=None):
    """Codes and scales from exact values: fresh scales amax/448 rounded once; kept unless > 448."""
    bm, bn = block
    rows, cols = len(values), len(values[0])
    nr, nc = -(-rows // bm), -(-cols // bn)
    scales = [[0.0] * nc for _ in range(nr)]
    for i in range(nr):
        for j in range(nc):
            amax = max(
                abs(values[r][c])
                for r in range(i * bm, min(rows, (i + 1) * bm))
                for c in range(j * bn, min(cols, (j + 1) * bn))
            )
            if kept is not None and amax <= 448 * Fraction(kept[i][j]):
                scales[i][j] = kept[i][j]
                continue
            s = ref_round(amax / 448, dtype) if amax else 0.0
            scales[i][j] = s if s else torch.finfo(dtype).eps
    codes = [
        [
            ref_code(values[r][c] / Fraction(scales[r // bm][c // bn])) if values[r][c] else 0
            for c in range(cols)
        ]
        for r in range(rows)
    ]
    return codes, scales


def _block_terms(terms, dtype=torch.float64):
    """Kernel terms with factors in ``dtype`` (float32: the kernel's float32 first tier)."""
    return [
        BlockTerm(a.to(dtype), b.to(dtype), s, a.to(dtype).abs().amax(1), b.to(dtype).abs().sum(0))
        for a, b, s in terms
    ]


@pytest.mark.parametrize(
    "scale_dtype,factors", [(torch.bfloat16, torch.float64), (torch.float32, torch.float32)]
)
def test_merged_block_matches_the_rational_reference(scale_dtype, factors):
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(50, 150, generator=g) * 0.05).to(torch.bfloat16)
    base[:, 140:] = 0  # a column block with small values only
    left = torch.randn(50, 3, generator=g).to(torch.bfloat16)
    right = (torch.randn(3, 150, generator=g) * 0.01).to(torch.bfloat16)
    terms = [(left, right, 0.5)]
    block = (24, 64)
    got = quantize_block(base, _block_terms(terms, factors), block, ScaleRule(scale_dtype))
    codes, scales = _reference(_exact(base, terms), block, scale_dtype)
    assert got.scales.tolist() == scales
    assert got.codes.tolist() == codes
    assert bool(got.fresh.all())


@pytest.mark.parametrize("factors", [torch.float64, torch.float32])
def test_ties_and_near_ties_of_value_over_scale(factors):
    # amax 448 makes the scale exactly 1; 1.0625 lies halfway between e4m3 1.0 and 1.125.
    base = torch.tensor([[448.0, 1.0625, -1.1875, 1.0625, 0.0]], dtype=torch.bfloat16)
    left = torch.tensor([[1.0]])
    right = torch.tensor([[0.0, 0.0, 0.0, 2.0**-40, -(2.0**-40)]], dtype=torch.float32)
    terms = [(left, right, 1.0)]
    got = quantize_block(base, _block_terms(terms, factors), (128, 128), ScaleRule(torch.bfloat16))
    codes, _ = _reference(_exact(base, terms), (128, 128), torch.bfloat16)
    assert got.codes.tolist() == codes
    values = decode_e4m3(got.codes)[0].tolist()
    assert values[1] == 1.0 and values[2] == -1.25  # exact ties go to even
    assert values[3] == 1.125  # a hair above the tie rounds up (torch's cast would not)
    assert int(got.codes[0, 4]) == 0x80  # a tiny negative rounds to -0
    naive = (base.double() + terms[0][1].double()).to(F8).to(torch.float64)[0].tolist()
    assert naive[3] == 1.0


@pytest.mark.parametrize("factors", [torch.float64, torch.float32])
def test_kept_scales_stay_unless_a_block_would_exceed_448(factors):
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(40, 160, generator=g)).to(torch.bfloat16)
    left = torch.zeros(40, 1)
    left[30:, 0] = 1.0
    right = torch.zeros(1, 160)
    right[0, 150] = 30.0  # pushes one block past its kept scale
    terms = [(left, right, 1.0)]
    block = (20, 128)
    kept = torch.full((2, 2), 2.0**-5, dtype=torch.float64)  # 448 / 32 = 14: room for |v| <= 14
    got = quantize_block(base, _block_terms(terms, factors), block, ScaleRule(torch.float32), kept)
    assert got.fresh.tolist() == [[False, False], [False, True]]
    codes, scales = _reference(_exact(base, terms), block, torch.float32, kept.tolist())
    assert got.scales.tolist() == scales
    assert got.codes.tolist() == codes


def test_ue8m0_scales_are_powers_of_two_at_or_above_amax_over_448():
    base = torch.tensor([[448.0, 3.0], [-896.0 * 1.5, 0.0]], dtype=torch.float32)
    got = quantize_block(base, [], (1, 2), ScaleRule(torch.float32, pow2=True))
    assert got.scales.tolist() == [[1.0], [4.0]]
    # -1344 / 4 = -336 is halfway between -320 and -352: the even code wins.
    assert decode_e4m3(got.codes).tolist() == [[448.0, 3.0], [-320.0, 0.0]]


def test_a_scale_on_a_rounding_midpoint_is_settled_exactly():
    # amax / 448 = 1 + 2^-8 lies halfway between bfloat16 1.0 and 1 + 2^-7.
    base = torch.tensor([[449.75, 1.0]], dtype=torch.float32)
    tie = quantize_block(base, [], (1, 2), ScaleRule(torch.bfloat16))
    assert tie.scales.tolist() == [[1.0]]  # the tie goes to the even bfloat16
    # A hair above the midpoint (a term of 2^-30 on the amax element) rounds up.
    terms = [(torch.tensor([[1.0]]), torch.tensor([[2.0**-30, 0.0]]), 1.0)]
    above = quantize_block(base, _block_terms(terms), (1, 2), ScaleRule(torch.bfloat16))
    assert above.scales.tolist() == [[1.0 + 2.0**-7]]
    codes, scales = _reference(_exact(base, terms), (1, 2), torch.bfloat16)
    assert above.scales.tolist() == scales and above.codes.tolist() == codes


def test_a_block_of_zeros_gets_the_dtypes_epsilon_and_zero_codes():
    base = torch.zeros(4, 6, dtype=torch.bfloat16)
    base[:2, 3:] = 3.0
    got = quantize_block(base, [], (2, 3), ScaleRule(torch.bfloat16))
    eps = torch.finfo(torch.bfloat16).eps  # compressed-tensors' scale for an all-zero block
    assert got.scales.tolist() == [
        [eps, ref_round(Fraction(3, 448), torch.bfloat16)],
        [eps, eps],
    ]
    assert int(got.codes[2:].abs().sum()) == 0 and int(got.codes[:2, :3].sum()) == 0


def test_column_slices_give_the_same_codes_and_scales_as_one_block():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 700, generator=g) * 0.1
    base[:, 300:400] *= 8  # these blocks outgrow the kept scales
    base = base.to(torch.bfloat16)
    left, right = torch.randn(40, 2, generator=g), torch.randn(2, 700, generator=g) * 0.01
    terms = _block_terms([(left, right, 1.5)])
    block, rule = (16, 128), ScaleRule(torch.bfloat16)
    kept = torch.full((3, 6), 2.0**-9, dtype=torch.float64)
    for k in (None, kept):
        whole = quantize_block(base, terms, block, rule, k)
        sliced = quantize_rows(base, terms, block, rule, k, max_elements=40 * 256)
        assert torch.equal(whole.codes, sliced.codes)
        assert torch.equal(whole.scales, sliced.scales) and torch.equal(whole.fresh, sliced.fresh)
    assert bool(whole.fresh.any()) and not bool(whole.fresh.all())


def test_float32_scales_from_full_precision_inputs_match_the_reference():
    # 24-bit values and factors: the amax is not a float32, and float32 scales are
    # finer than a float32 bound: the float64 bounds (or rationals) decide.
    g = torch.Generator().manual_seed(7)
    base = torch.randn(32, 512, generator=g)
    terms = [(torch.randn(32, 2, generator=g), torch.randn(2, 512, generator=g) * 0.01, 0.75)]
    block = (4, 32)
    got = quantize_block(base, _block_terms(terms, torch.float32), block, ScaleRule(torch.float32))
    codes, scales = _reference(_exact(base, terms), block, torch.float32)
    assert got.scales.tolist() == scales
    assert got.codes.tolist() == codes
