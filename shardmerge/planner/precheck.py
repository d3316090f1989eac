"""The refusals a plan makes before it needs torch: options, budget, folders, configs, OUT.

``refusals`` runs the planner's first checks with torch-free modules only, so
a mistyped path or option is answered in a fraction of a second instead of
after torch's import. Where it finds a problem it raises exactly what
``build.build_plan`` would raise for the same inputs (the same checks in the
same order, every folder problem together); where a check needs torch or
could find more than ``build_plan`` reports first, it leaves the answer to
``build_plan``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters.folder import BIN_NAME, SAFETENSORS_NAME, open_adapter
from ..errors import InputError, PlanErrors, ShardmergeError
from ..io.checkpoint import open_checkpoint
from ..io.output import check_output_dir
from ..options import MergeOptions, check_merge_args, check_qlora_choice
from .memory import checked_budget

DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def refusals(options: MergeOptions, *, check_out: bool = True) -> None:
    """Raise build_plan's refusal of ``options`` (resolved, one output) when torch is not needed."""
    check_merge_args(options)
    checked_budget(options.max_memory)
    if not DEVICE_NAMES.fullmatch(options.device):
        raise InputError(f"unknown device {options.device!r}; use auto, cpu, cuda or cuda:N.")
    if options.device.startswith("cuda") or any(_legacy(p) for p in options.adapter_paths):
        return  # a GPU check or a .bin adapter needs torch: build_plan answers
    errors: list[ShardmergeError] = []
    if _open_base(options.base, options.qlora_base, errors) is False:
        return  # the codecs (torch) decide what else such a base folder holds
    for path in options.adapter_paths:
        try:
            open_adapter(path, digest=False)
        except ShardmergeError as e:
            errors.append(e)
    if not errors:
        return
    if check_out:
        try:
            # As open_inputs does when a folder does not open: no fingerprint yet.
            check_output_dir(
                Path(options.output),
                Path(options.base),
                [Path(p) for p in options.adapter_paths],
                fingerprint="",
                overwrite=options.overwrite,
                resume=options.resume,
            )
        except ShardmergeError as e:
            errors.append(e)
    raise PlanErrors(errors)


def _open_base(base: str, qlora_base: str, errors: list[ShardmergeError]) -> bool | None:
    """True: the base folder opens and is plainly a 16-bit checkpoint; None: it does not
    open (error noted); False: it might be stored quantized (extra tensors or a
    quantization_config), which only the codecs can tell."""
    try:
        check_qlora_choice(qlora_base)
        ckpt = open_checkpoint(base)
    except ShardmergeError as e:
        errors.append(e)
        return None
    plain = all(n.endswith((".weight", ".bias")) for n in ckpt.weight_map)
    return plain and "quantization_config" not in ckpt.config


def _legacy(path: str) -> bool:
    """An adapter whose weights are a torch pickle (read with torch)."""
    folder = Path(path)
    return (folder / BIN_NAME).exists() and not (folder / SAFETENSORS_NAME).is_file()
