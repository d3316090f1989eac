"""What this machine offers a merge: available RAM, free disk at OUT, free VRAM per GPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # jobs.py imports the codecs (torch); the budget checks run without it
    from ..execute.jobs import Resources


def free_disk(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def cgroup_memory_limit() -> int | None:
    """The memory limit of the cgroup this process runs in (v2 or v1), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(
                Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            )
    for file in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def available_memory() -> int:
    """RAM this process can use: the system's available memory, capped by its cgroup's limit."""
    available = int(psutil.virtual_memory().available)
    limit = cgroup_memory_limit()
    return min(available, limit) if limit else available


def probe(out: Path) -> Resources:
    """Read the machine's resources; looks at GPUs only when torch already sees CUDA."""
    from ..execute.jobs import Resources

    vm = psutil.virtual_memory()
    gpus: list[tuple[str, int, int]] = []
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append((torch.cuda.get_device_name(i), int(free), int(total)))
    return Resources(
        ram_available=available_memory(),
        ram_total=int(vm.total),
        disk_free=free_disk(out),
        cpus=psutil.cpu_count() or 1,
        gpus=tuple(gpus),
    )
