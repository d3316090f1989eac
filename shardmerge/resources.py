"""What this machine offers a merge: available RAM, free disk at OUT, free VRAM per GPU."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Resources:
    ram_available: int
    ram_total: int
    disk_free: int  # at the output folder (or its nearest existing parent)
    cpus: int
    gpus: tuple[tuple[str, int, int], ...] = field(default=())  # (name, free, total) bytes


def free_disk(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def probe(out: Path) -> Resources:
    """Read the machine's resources; looks at GPUs only when torch already sees CUDA."""
    vm = psutil.virtual_memory()
    gpus: list[tuple[str, int, int]] = []
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append((torch.cuda.get_device_name(i), int(free), int(total)))
    return Resources(
        ram_available=int(vm.available),
        ram_total=int(vm.total),
        disk_free=free_disk(out),
        cpus=psutil.cpu_count() or 1,
        gpus=tuple(gpus),
    )
