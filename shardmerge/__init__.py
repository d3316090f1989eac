"""shardmerge: fold LoRA adapters into a model's safetensors shards, streaming, exactly."""

from .api import MergeResult, merge, plan, run_job
from .jobs import MergeJob, load_job
from .verifier.check import VerifyReport, verify
from .version import __version__

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
