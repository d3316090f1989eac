"""The ``--qlora-base`` choices, and the reasons some asked-for ones are refused."""

from __future__ import annotations

from ..errors import InputError

QLORA_BASE_CHOICES = ("none", "nf4")
# Asked for often; refused with the reason (see the README).
REFUSED_CHOICES = {
    "nf4-dq": "double quantization stores each block's absmax as 8 bits around a float32 mean "
    "of all absmax values of the tensor; that mean's last bits depend on the GPU's reduction "
    "order, and bitsandbytes' CPU and CUDA kernels quantize the absmax differently, so the "
    "values the adapter saw cannot be reproduced reliably. Merge into the 4-bit folder saved "
    "from the training run instead (exact), or use --qlora-base nf4 (no double quantization)",
    "fp4": "bitsandbytes' CPU and CUDA kernels use different FP4 code values, so there is no "
    "single reference to follow; only NF4 is supported",
}


def check_choice(choice: str) -> None:
    """Refuse an unknown or unsupported ``--qlora-base`` value, with the reason."""
    if choice in QLORA_BASE_CHOICES:
        return
    if choice in REFUSED_CHOICES:
        raise InputError(
            f"--qlora-base {choice} is not supported: {REFUSED_CHOICES[choice]}.",
            hint=f"Choose one of: {', '.join(QLORA_BASE_CHOICES)}.",
        )
    raise InputError(
        f"unknown --qlora-base {choice!r}; choose one of: {', '.join(QLORA_BASE_CHOICES)}."
    )
