"""Output formats and their correct rounding (round to nearest, ties to even)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

# (precision in bits incl. the implicit one, smallest frexp exponent of a normal number)
FORMAT = {
    torch.float64: (53, -1021),
    torch.float32: (24, -125),
    torch.bfloat16: (8, -125),
    torch.float16: (11, -13),
    torch.float8_e4m3fn: (4, -5),  # no infinities: max 448, the rest of the top binade is NaN
}


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert with one correct rounding (round to nearest, ties to even).

    torch converts float64 to bfloat16/float16 through float32, rounding
    twice. Rounding to float32 *to odd* first makes the second rounding exact
    (float32 keeps more than two extra bits of either 16-bit format).
    """
    if x.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    x32 = x.to(torch.float32)
    inexact = x32.to(torch.float64) != x
    bits = x32.view(torch.int32)
    # Step back toward zero where float32 rounded away from it, then set the low bit.
    bits = bits - (inexact & (x32.to(torch.float64).abs() > x.abs())).to(torch.int32)
    bits = bits | inexact.to(torch.int32)
    return bits.view(torch.float32).to(dtype)


def on_midpoint(y: float, precision: int, emin: int) -> bool:
    """Is ``y`` exactly halfway between two neighbours of the output format?

    A float64 rounded from the exact value lies on the same side of every such
    midpoint as the exact value does, unless it lands on one.
    """
    if y == 0.0 or not math.isfinite(y):
        return not math.isfinite(y)
    _, e = math.frexp(abs(y))
    ulp = math.ldexp(1.0, max(e, emin) - precision)
    q = abs(y) / ulp  # exact: a power-of-two division of a float64 this size
    return q - math.floor(q) == 0.5


def round_exact(x: Fraction, dtype: torch.dtype) -> float:
    """Round a rational to the nearest value of ``dtype`` (ties to even); returned as a float.

    The returned float is exactly representable in ``dtype``.
    """
    precision, emin = FORMAT[dtype]
    if x == 0:
        return 0.0
    sign = -1 if x < 0 else 1
    mag = abs(x)
    # Exponent e with 2^(e-1) <= mag < 2^e, as frexp would give.
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** (e - 1) > mag:
        e -= 1
    elif Fraction(2) ** e <= mag:
        e += 1
    e = max(e, emin)
    ulp = Fraction(2) ** (e - precision)
    q, rem = divmod(mag, ulp)
    q = int(q)
    if rem * 2 > ulp or (rem * 2 == ulp and q % 2 == 1):
        q += 1
    value = q * ulp
    if value > Fraction(torch.finfo(dtype).max):
        return sign * float("inf")  # at or past the overflow threshold max + ulp/2
    return sign * float(value)
