"""shardmerge: fold LoRA adapters into a model's safetensors shards, streaming, exactly."""

__version__ = "0.1.0"

from .api import MergeResult, merge, plan, run_job  # noqa: E402
from .jobs import MergeJob, load_job  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

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
