"""shardmerge: fold LoRA adapters into a model's safetensors shards, streaming, exactly."""

__version__ = "0.1.0"

from .api import MergeResult, merge, plan  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__all__ = ["merge", "plan", "verify", "MergeResult", "VerifyReport", "__version__"]
