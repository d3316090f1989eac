"""The faster hot paths compute what the slower ones did (issue 15): same values, sound bounds.

(max |out - base| is execute/survival.compare's, tested in test_survival.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from shardmerge.kernel import dora
from shardmerge.kernel.merge import below
from shardmerge.runtime import tune_malloc


@pytest.mark.parametrize("shape", [(7, 5), (64, 64), (3, 4096), (33, 128)])
def test_below_finds_what_a_full_comparison_finds(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g) + 0.5
    picks = torch.randint(0, x.numel(), (9,), generator=g)
    x.view(-1)[picks] = torch.tensor([-1.0, 0.0, 0.2, -0.0, 1e-30, -float("inf"), 0.3, 0.1, 0.2])
    for floor in (0.0, 0.25, 1e-20):
        want = (x.reshape(-1) < floor).nonzero().squeeze(1)
        got = below(x, floor)
        assert torch.equal(got, want) if want.numel() else got is None


def test_below_none_when_nothing_is_below():
    assert below(torch.ones(128, 64), 0.5) is None


def test_tune_malloc_takes_effect_on_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert tune_malloc() is True


@pytest.mark.parametrize("cols", [64, 4096, 4160, 100])
def test_row_sums_within_their_bound(cols):
    """DoRA's row sums of squares (chunked, then pairwise) stay within gamma(height) of
    the exact sum, so the bound _sum_squares states holds."""
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(5, cols, generator=g, dtype=torch.float64) * 1e3) ** 2
    x[0, : cols // 2] *= 1e-12  # a wide spread of magnitudes
    exact = [math.fsum(row.tolist()) for row in x]
    s, height = dora._pairwise_sum(x.clone(), 1)
    assert height <= dora._ROW_CHUNK - 1 + 2 * math.ceil(math.log2(cols)) + 2
    for got, want in zip(s.tolist(), exact, strict=True):
        assert abs(got - want) <= dora._gamma(height) * want


def test_merge_block_settles_strided_rows_as_contiguous_ones():
    """A transposed (strided) base block: the exact tiers write settled elements through a
    flat view of the output, which must be the output itself, not a copy."""
    from shardmerge.kernel.merge import BlockTerm, merge_block

    base = torch.ones(48, 64, dtype=torch.bfloat16).t()  # [64, 48], not contiguous
    assert not base.is_contiguous()
    # 1 + 2^-8 + 2^-30 is just above a bfloat16 midpoint; float32 rounds it onto the
    # midpoint (a tie, to 1.0), so the accumulator is in doubt and float64 settles it: 1 + 2^-7.
    left = torch.full((64, 1), 2.0**-8 + 2.0**-30)
    right = torch.ones(1, 48)
    term = BlockTerm(left, right, 1.0, left.abs().amax(1), right.abs().sum(0))
    got = merge_block(base, [term], torch.bfloat16, torch.float32)
    assert torch.equal(got.float(), torch.full((64, 48), 1.0 + 2.0**-7))


def test_copied_tensors_are_checksummed_in_large_reads_after_a_tiny_one(tmp_path, monkeypatch):
    """The CRC read-back of copied bytes is not stuck at the size of the first copy (a
    2-byte shape tensor made a Kimi-shaped slice 6x slower), and the CRC is the file's."""
    import os
    import zlib

    from shardmerge.io import safetensors as st

    src = tmp_path / "src.bin"
    payload = os.urandom((1 << 20) + 2)
    src.write_bytes(payload)
    entries = [st.OutEntry("tiny", "U8", (2,)), st.OutEntry("big", "U8", (1 << 20,))]
    reads = []
    real = os.preadv
    monkeypatch.setattr(
        os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off)
    )
    with open(src, "rb") as s, open(tmp_path / "out.bin", "wb") as f:
        w = st.StreamWriter(f, entries, {})
        w.begin("tiny")
        w.copy_from(s, 0, 2)
        w.begin("big")
        w.copy_from(s, 2, 1 << 20)
        w.close()
    assert len(reads) == 2  # one read per copy
    assert w.crc == zlib.crc32((tmp_path / "out.bin").read_bytes())
