"""Layer kinds a checkpoint cannot tell by its tensors alone."""

from __future__ import annotations

# Model types whose Linear-like layers are transformers' Conv1D (weight stored
# as (in, out)), with the module names that are Conv1D; PEFT forces
# fan_in_fan_out=True on exactly those.
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "clvp": ("c_fc", "c_proj"),
}


def is_conv1d(model_type: str, module: str) -> bool:
    """Whether ``module`` of a model of ``model_type`` is a Conv1D layer (weight stored (in, out))."""
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type, ())
