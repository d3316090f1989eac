"""shardmerge: fold LoRA adapters into a model's safetensors shards, streaming, exactly."""

from __future__ import annotations

import importlib

from .runtime import set_env_defaults
from .version import __version__

# Before anything imports torch: OpenMP reads its settings once, when torch loads it.
set_env_defaults()

# Loaded on first use: the options and job files are read without torch, and
# `python -m shardmerge` reaches its Ctrl-C handling (__main__) after only the above.
_LAZY = {
    "MergeJob": "jobs",
    "load_job": "jobs",
    "merge": "api",
    "plan": "api",
    "verify": "api",
    "run_job": "api",
    "MergeResult": "api",
    "VerifyReport": "verifier.check",
}

__all__ = [
    "merge",
    "plan",
    "verify",
    "run_job",
    "load_job",
    "MergeJob",
    "MergeResult",
    "VerifyReport",
    "__version__",
]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'shardmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
