"""adapter_config.json checks: bad values and refused options, per PEFT method, before any arithmetic."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import InputError, ShardmergeError, UnsupportedAdapterError, shown
from .naming import pattern_regex

USE_PEFT = (
    "Merge this adapter with PEFT instead (PeftModel.from_pretrained(...).merge_and_unload()), "
    "which needs the whole model in memory."
)
# What shardmerge merges, for refusals of anything else (adapters/__init__.py's table).
MERGED_KINDS = "LoRA (with DoRA, rsLoRA and MoE expert LoRA), LoHa, LoKr, IA3 and trainable tokens"
FIX_CONFIG = "Fix adapter_config.json, or re-save the adapter with PeftModel.save_pretrained()."

# PEFT method names users see, for refusals.
PEFT_TYPE_NAMES = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "ADALORA": "AdaLoRA",
    "PREFIX_TUNING": "prefix tuning",
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "p-tuning",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "LN_TUNING": "LayerNorm tuning",
}

# init_lora_weights values that change the base weights at initialisation:
# the saved factors only make sense against that modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def is_standalone_tokens(cfg: dict) -> bool:
    """A TRAINABLE_TOKENS adapter (token rows only), not LoRA's trainable_token_indices."""
    return str(cfg.get("peft_type") or "").upper() == "TRAINABLE_TOKENS"


# No weight matrix has a dimension this large; a bigger r is a damaged file.
MAX_RANK = 2**31 - 1


def _is_number(v: object) -> bool:
    """A JSON number usable as a float: finite, and an integer not too large to convert."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _is_rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RANK


def _is_index_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _input_errors(where: Path, problems: list[str]) -> list[ShardmergeError]:
    return [InputError(f"{where}: {p}.", hint=FIX_CONFIG) for p in problems]


def missing_peft_type(where: Path) -> ShardmergeError:
    return InputError(
        f"{where}: has no peft_type; this does not look like a PEFT adapter config.",
        hint="Give the folder written by PeftModel.save_pretrained().",
    )


def unsupported_method(cfg: dict, where: Path, peft_type: str) -> ShardmergeError:
    """The refusal of a PEFT method shardmerge does not merge, by the name users know it by."""
    name = PEFT_TYPE_NAMES.get(peft_type, peft_type or "unknown")
    return UnsupportedAdapterError(
        f"{where}: {name} adapters (peft_type {shown(cfg.get('peft_type'))}) are not supported; "
        f"shardmerge merges {MERGED_KINDS} adapters.",
        hint=USE_PEFT,
    )


def common_config_problems(cfg: dict, where: Path) -> list[ShardmergeError]:
    """Values of the config fields LoRA, LoHa, LoKr and IA3 share, checked before any arithmetic."""
    problems: list[str] = []
    if "r" in cfg and not _is_rank(cfg["r"]):
        problems.append(f"r must be a positive integer (at most {MAX_RANK}), not {shown(cfg['r'])}")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        problems.append(f"lora_alpha must be a finite number, not {shown(cfg['lora_alpha'])}")
    problems += _pattern_problems(cfg)
    for field in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            problems.append(f"{field} must be true or false, not {shown(cfg[field])}")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        problems.append(f"modules_to_save must be a list of module names, not {shown(mts)}")
    # Not used to merge (the saved keys are), but a value PEFT cannot load means a broken file.
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(
                f"target_modules {shown(targets)} is not a valid regular expression ({e})"
            )
    elif targets is not None and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        problems.append(
            f"target_modules must be a list of module names or a regular expression, not {shown(targets)}"
        )
    return _input_errors(where, problems)


def _pattern_problems(cfg: dict) -> list[str]:
    """rank_pattern / alpha_pattern: regular expressions mapped to ranks / finite numbers."""
    problems: list[str] = []
    for field, valid, what in (
        ("rank_pattern", _is_rank, f"a positive integer (at most {MAX_RANK})"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(
                f"{field} must map module-name patterns to values, not {shown(patterns)}"
            )
            continue
        for key, value in patterns.items():
            try:
                pattern_regex(key)  # exactly what PEFT compiles, so the same keys fail
            except re.error as e:
                # PEFT embeds the key in a larger pattern, where a leading (?i) is no longer leading.
                scoped = (
                    "; write an inline flag scoped, as (?i:...)" if "global flags" in str(e) else ""
                )
                problems.append(
                    f"{field} key {shown(key)} is not a valid regular expression as PEFT uses it ({e}){scoped}"
                )
            if not valid(value):
                problems.append(f"{field}[{shown(key)}] must be {what}, not {shown(value)}")
    return problems


def token_config_problems(cfg: dict, where: Path) -> list[ShardmergeError]:
    """trainable_token_indices / token_indices hold lists of integers."""
    problems = []
    standalone = is_standalone_tokens(cfg)
    field = "token_indices" if standalone else "trainable_token_indices"
    value = cfg.get(field)
    if value is None:
        if standalone:
            problems.append("token_indices is missing")
    elif isinstance(value, dict) and not standalone:
        for key, indices in value.items():
            if not _is_index_list(indices):
                problems.append(
                    f"{field}[{shown(key)}] must be a list of integers, not {shown(indices)}"
                )
    elif not _is_index_list(value):
        problems.append(
            f"{field} must be a list of integers (or a dict of them), not {shown(value)}"
        )
    if cfg.get("ensure_weight_tying") is not None and not isinstance(
        cfg["ensure_weight_tying"], bool
    ):
        problems.append(
            f"ensure_weight_tying must be true or false, not {shown(cfg['ensure_weight_tying'])}"
        )
    return _input_errors(where, problems)


def lora_config_problems(cfg: dict, where: Path) -> list[ShardmergeError]:
    """A LoRA config's bad values, else the options shardmerge refuses, by name."""
    bad_values = common_config_problems(cfg, where) + token_config_problems(cfg, where)
    if bad_values:
        return bad_values
    refusals: list[ShardmergeError] = []

    def refuse(what: str, hint: str | None = None) -> None:
        refusals.append(
            UnsupportedAdapterError(f"{where}: {what} is not supported yet.", hint=hint or USE_PEFT)
        )

    targets = cfg.get("target_parameters")
    if cfg.get("use_dora") and (cfg.get("lora_bias") or targets):
        # PEFT refuses both (LoraConfig: lora_bias; ParamWrapper: DoRA on parameters).
        refuse(
            "DoRA (use_dora) together with "
            + ("lora_bias" if cfg.get("lora_bias") else "target_parameters")
        )
    if targets and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return [
            InputError(
                f"{where}: target_parameters must be a list of parameter names, not {shown(targets)}.",
                hint=FIX_CONFIG,
            )
        ]
    if targets and (cfg.get("fan_in_fan_out") or cfg.get("lora_bias")):
        # PEFT's ParamWrapper refuses these; an adapter claiming them was not made by PEFT.
        refuse("target_parameters together with fan_in_fan_out or lora_bias")
    _refuse_lora_variants(cfg, refuse)
    return refusals


def _refuse_lora_variants(cfg: dict, refuse) -> None:
    """LoRA variants whose saved factors do not make a plain ``W + scale * B @ A``."""
    if cfg.get("layer_replication"):
        refuse("layer replication (layer_replication)")
    if cfg.get("alora_invocation_tokens"):
        refuse(
            "activated LoRA (alora_invocation_tokens)",
            hint="An aLoRA only applies after its invocation tokens, so it cannot be merged into weights.",
        )
    if cfg.get("use_qalora"):
        refuse("QA-LoRA (use_qalora)")
    if cfg.get("arrow_config"):
        refuse("Arrow routing (arrow_config)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refuse(
            f"init_lora_weights={shown(init)}",
            hint="This initialisation changes the base weights. Convert the adapter to plain LoRA "
            "when saving (save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
            "and merge that.",
        )


def lycoris_config_problems(cfg: dict, where: Path) -> list[ShardmergeError]:
    """Bad values and refused options of a LoHa, LoKr or IA3 config."""
    peft_type = str(cfg.get("peft_type") or "").upper()
    problems = list(common_config_problems(cfg, where))
    if peft_type in ("LOHA", "LOKR"):
        alpha = cfg.get("alpha")
        if "alpha" in cfg and not _is_number(alpha):
            problems.append(
                InputError(
                    f"{where}: alpha must be a finite number, not {shown(alpha)}.", hint=FIX_CONFIG
                )
            )
        if cfg.get("use_rslora"):
            problems.append(
                UnsupportedAdapterError(
                    f"{where}: rsLoRA scaling (use_rslora: true) for {PEFT_TYPE_NAMES[peft_type]} "
                    "is not supported; PEFT 0.21 defines none for it.",
                    hint=USE_PEFT,
                )
            )
        return problems
    ff = cfg.get("feedforward_modules")
    if isinstance(ff, str):
        try:
            re.compile(ff)
        except re.error as e:
            problems.append(
                InputError(f"{where}: feedforward_modules {shown(ff)} is not a valid regex ({e}).")
            )
    elif ff is not None and not (isinstance(ff, list) and all(isinstance(m, str) for m in ff)):
        problems.append(
            InputError(
                f"{where}: feedforward_modules must be a list of module names or a regex, "
                f"not {shown(ff)}.",
                hint=FIX_CONFIG,
            )
        )
    return problems
