"""PEFT LoRA adapters: adapter_config.json + weights -> TensorEdits per base tensor.

Semantics follow PEFT's ``merge_and_unload()`` (tuners/lora/layer.py,
utils/save_and_load.py): scaling ``lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA), per-module ``r``/``lora_alpha`` from ``rank_pattern``/``alpha_pattern``
(first matching pattern wins), ``delta = B @ A`` (transposed for Conv1D
layers and embeddings), ``lora_B.bias * scaling`` added to the layer bias, and
tensors the adapter saves whole (modules_to_save, trained biases) replacing
the base's. Trainable tokens (LoRA's trainable_token_indices, TRAINABLE_TOKENS
adapters) and tied embeddings are settled by tokens.py. Anything else is
refused by name.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    InputError,
    ShardmergeError,
    UnsupportedAdapterError,
)
from ..io.checkpoint import Checkpoint, not_a_regular_file, read_json
from ..io.safetensors import FLOAT_DTYPES, NAME_OF, TensorInfo, read_header
from ..io.sources import load_torch_state
from ..planner.embeddings import find_embeddings, is_vocab_tensor
from ..terms import Replacement, TensorEdit, TensorRef, Term
from . import tokens
from .moe import EXPERT_MODULE, expert_terms

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

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

# PEFT method names users see, for refusals.
_PEFT_TYPE_NAMES = {
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

_USE_PEFT = (
    "Merge this adapter with PEFT instead (PeftModel.from_pretrained(...).merge_and_unload()), "
    "which needs the whole model in memory."
)

_KEY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("lora_A", r"(.+)\.lora_A\.weight"),
        ("lora_B", r"(.+)\.lora_B\.weight"),
        ("lora_B_bias", r"(.+)\.lora_B\.bias"),
        ("emb_A", r"(.+)\.lora_embedding_A"),
        ("emb_B", r"(.+)\.lora_embedding_B"),
        ("dora", r"(.+)\.lora_magnitude_vector(?:\.weight)?"),
        ("trainable_tokens", r"(.+?)(?:\.base_layer)?(?:\.token_adapter)?\.trainable_tokens_delta"),
        ("base_layer", r"(.+)\.token_adapter\.base_layer\.(weight|bias)"),
        # With a resized vocabulary PEFT also saves a modules_to_save wrapper's
        # parts: its copy (the same as module.weight) and the resized original.
        ("mts_copy", r"(.+)\.modules_to_save\.(weight|bias)"),
        ("original", r"(.+)\.original_module\.(weight|bias)"),
        ("base_layer", r"(.+)\.base_layer\.(weight|bias)"),
        ("saved", r"(.+)\.(weight|bias)"),
    )
)


@dataclass(frozen=True)
class Adapter:
    """An adapter folder as read at plan time: config and tensor locations, no weights."""

    path: Path
    label: str
    config: dict
    weights_file: Path
    tensors: dict[str, TensorRef]  # key as saved -> where it lives
    sha256: str  # of the weights file


def open_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Read an adapter folder's config and the layout of its weights file.

    >>> a = open_adapter("my-lora")   # doctest: +SKIP
    >>> a.config["r"]                  # doctest: +SKIP
    16
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"adapter folder {folder} does not exist or is not a folder.",
            hint="Give the folder that holds adapter_config.json and adapter_model.safetensors.",
        )
    config = read_json(
        folder / CONFIG_NAME,
        "the adapter config (adapter_config.json)",
        hint="Give the folder written by PeftModel.save_pretrained().",
    )
    label = label or folder.resolve().name
    st, legacy = folder / SAFETENSORS_NAME, folder / BIN_NAME
    for file in (st, legacy):
        if file.exists() and not file.is_file():
            raise not_a_regular_file(file, "the adapter weights file")
    if st.is_file():
        header = read_header(st)
        tensors = {
            name: TensorRef(str(st), name, t.dtype, t.shape, "safetensors", t.start, t.end)
            for name, t in header.tensors.items()
        }
        weights_file = st
    elif legacy.is_file():
        state = load_torch_state(str(legacy))
        tensors = {
            name: TensorRef(str(legacy), name, NAME_OF[t.dtype], tuple(t.shape), "torch")
            for name, t in state.items()
        }
        weights_file = legacy
    else:
        raise InputError(
            f"{folder}: no adapter weights found ({SAFETENSORS_NAME} or {BIN_NAME}).",
            hint="Give the folder written by PeftModel.save_pretrained().",
        )
    if not tensors:
        raise CorruptFileError(
            f"{weights_file}: holds no tensors.",
            hint="Re-save the adapter with PeftModel.save_pretrained().",
        )
    return Adapter(folder, label, config, weights_file, tensors, _sha256(weights_file))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_supported(adapter: Adapter) -> list[ShardmergeError]:
    """Refuse, by name, adapter kinds and options that shardmerge does not merge."""
    cfg, where = adapter.config, adapter.path / CONFIG_NAME
    peft_type = str(cfg.get("peft_type") or "").upper()
    if not peft_type:
        return [
            InputError(
                f"{where}: has no peft_type; this does not look like a PEFT adapter config.",
                hint="Give the folder written by PeftModel.save_pretrained().",
            )
        ]
    if peft_type in ("LOHA", "LOKR", "IA3"):
        from . import lycoris

        return lycoris.check_supported(adapter)
    if peft_type == "TRAINABLE_TOKENS":
        return tokens.check_config(cfg, where)
    if peft_type != "LORA":
        name = _PEFT_TYPE_NAMES.get(peft_type, peft_type or "unknown")
        return [
            UnsupportedAdapterError(
                f"{where}: {name} adapters (peft_type {cfg.get('peft_type')!r}) are not supported; "
                "shardmerge merges LoRA adapters.",
                hint=_USE_PEFT,
            )
        ]
    bad_values = _config_problems(cfg, where) + tokens.check_config(cfg, where)
    if bad_values:
        return bad_values
    refusals = []

    def refuse(what: str, hint: str | None = None) -> None:
        refusals.append(
            UnsupportedAdapterError(
                f"{where}: {what} is not supported yet.", hint=hint or _USE_PEFT
            )
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
                f"{where}: target_parameters must be a list of parameter names, not {targets!r}.",
                hint="Fix adapter_config.json, or re-save the adapter with PeftModel.save_pretrained().",
            )
        ]
    if targets and (cfg.get("fan_in_fan_out") or cfg.get("lora_bias")):
        # PEFT's ParamWrapper refuses these; an adapter claiming them was not made by PEFT.
        refuse("target_parameters together with fan_in_fan_out or lora_bias")
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
            f"init_lora_weights={init!r}",
            hint="This initialisation changes the base weights. Convert the adapter to plain LoRA "
            "when saving (save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
            "and merge that.",
        )
    return refusals


def _config_problems(cfg: dict, where: Path) -> list[ShardmergeError]:
    """Values of the LoRA config fields we use, checked before any arithmetic with them."""
    problems: list[str] = []

    def is_number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def is_rank(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if "r" in cfg and not is_rank(cfg["r"]):
        problems.append(f"r must be a positive integer, not {cfg['r']!r}")
    if "lora_alpha" in cfg and not is_number(cfg["lora_alpha"]):
        problems.append(f"lora_alpha must be a finite number, not {cfg['lora_alpha']!r}")
    for field, valid, what in (
        ("rank_pattern", is_rank, "a positive integer"),
        ("alpha_pattern", is_number, "a finite number"),
    ):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(f"{field} must map module-name patterns to values, not {patterns!r}")
            continue
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as e:
                problems.append(f"{field} key {key!r} is not a valid regular expression ({e})")
            if not valid(value):
                problems.append(f"{field}[{key!r}] must be {what}, not {value!r}")
    for field in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            problems.append(f"{field} must be true or false, not {cfg[field]!r}")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        problems.append(f"modules_to_save must be a list of module names, not {mts!r}")
    # Not used to merge (the saved keys are), but a value PEFT cannot load means a broken file.
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(f"target_modules {targets!r} is not a valid regular expression ({e})")
    elif targets is not None and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        problems.append(
            f"target_modules must be a list of module names or a regular expression, not {targets!r}"
        )
    return [
        InputError(
            f"{where}: {p}.",
            hint="Fix adapter_config.json, or re-save the adapter with PeftModel.save_pretrained().",
        )
        for p in problems
    ]


def dora_magnitude(
    roles: dict[str, TensorRef],
    module: str,
    kind: str,
    base_shape: tuple[int, ...],
    wfile: str,
    errors: list[ShardmergeError],
) -> TensorRef | None:
    """The DoRA magnitude vector of a PEFT module, checked; None (and an error) if unusable.

    One value per output channel: per row of a Linear weight [out, in], per
    stored column of a Conv1D weight [in, out] or an embedding [vocab, dim].
    """
    ref = roles.get("dora")
    if ref is None:
        errors.append(
            CorruptFileError(
                f"{wfile}: module {module} has no lora_magnitude_vector although "
                "adapter_config.json sets use_dora.",
                hint="Re-save the adapter with PeftModel.save_pretrained().",
            )
        )
        return None
    channels = base_shape[0] if kind == "linear" else base_shape[-1]
    if ref.dtype not in FLOAT_DTYPES:
        errors.append(
            CorruptFileError(
                f"{wfile}: the DoRA magnitude of {module} is {ref.dtype}, not floating point."
            )
        )
        return None
    if ref.numel != channels or sum(d != 1 for d in ref.shape) > 1:
        errors.append(
            IncompatibleAdapterError(
                f"{wfile}: the DoRA magnitude of {module} has shape {list(ref.shape)}, but its base "
                f"tensor {list(base_shape)} has {channels} output channels.",
                hint="Is this adapter made for this base model?",
            )
        )
        return None
    return ref


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key matching the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def resolve_base_name(module: str, suffix: str, ckpt: Checkpoint) -> str | None:
    """The base tensor for ``module.suffix``, allowing the prefix differences checkpoints carry.

    A checkpoint saved from a bare backbone lacks the ``model.``/``transformer.``
    the adapter's module names start with, and old GPT-2 checkpoints do too.
    """
    name = f"{module}.{suffix}"
    if name in ckpt.weight_map:
        return name
    parts = module.split(".")
    if len(parts) > 1:
        stripped = ".".join(parts[1:]) + f".{suffix}"
        if stripped in ckpt.weight_map:
            return stripped
    return None


def resolve_lora_target(module: str, suffix: str, ckpt: Checkpoint) -> str | None:
    """``resolve_base_name``, and a tied base's lm_head, which it stores as the embedding.

    The name returned for that lm_head is not in the checkpoint: read it with
    ``base_tensor``; embeddings.py decides whether the output writes it apart.
    """
    name = resolve_base_name(module, suffix, ckpt)
    if name is None and suffix == "weight" and is_vocab_tensor(f"{module}.weight"):
        emb, wanted = find_embeddings(ckpt), f"{module}.weight"
        if emb.tied and not emb.head_stored and wanted in (emb.head, f"model.{emb.head}"):
            return emb.head
    return name


def base_tensor(ckpt: Checkpoint, name: str) -> TensorInfo:
    """A base tensor's header entry; a tied base's unstored lm_head is its embedding's."""
    if name not in ckpt.weight_map:
        emb = find_embeddings(ckpt)
        if emb.tied and name == emb.head and emb.embed:
            return ckpt.tensor(emb.embed)
    return ckpt.tensor(name)


def _classify_keys(
    adapter: Adapter, duplicates: list[tuple[str, str]] | None = None
) -> tuple[dict[str, dict[str, TensorRef]], list[str]]:
    """Group the adapter's keys by module: {module: {role: ref}}; unknown keys returned apart.

    Two keys for one module and role (``x.lora_A.weight`` with and without the
    ``base_model.model.`` prefix, ``lora_magnitude_vector`` with and without
    ``.weight``) are appended to ``duplicates`` as (kept, other).
    """
    modules: dict[str, dict[str, TensorRef]] = {}
    unknown: list[str] = []
    for key, ref in adapter.tensors.items():
        rest = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        for role, pattern in _KEY_PATTERNS:
            m = pattern.fullmatch(rest)
            if m:
                module = m.group(1)
                if role in ("base_layer", "saved", "mts_copy", "original"):
                    role = f"{role}.{m.group(2)}"
                roles = modules.setdefault(module, {})
                if role in roles:
                    if duplicates is not None:
                        duplicates.append((roles[role].key, key))
                    break
                roles[role] = ref
                break
        else:
            unknown.append(key)
    return modules, unknown


def adapter_edits(
    adapter: Adapter, weight: float, ckpt: Checkpoint
) -> tuple[dict[str, TensorEdit], Counter, list[ShardmergeError]]:
    """Translate one adapter into edits of base tensors.

    Returns the edits by base tensor name, the count of modules applied per
    kind, and every problem found (empty when the adapter fits the base).
    """
    if str(adapter.config.get("peft_type") or "").upper() in ("LOHA", "LOKR", "IA3"):
        from . import lycoris

        return lycoris.adapter_edits(adapter, weight, ckpt)
    errors: list[ShardmergeError] = list(check_supported(adapter))
    if errors:
        return {}, Counter(), errors
    cfg = adapter.config
    wfile = adapter.weights_file
    duplicates: list[tuple[str, str]] = []
    modules, unknown = _classify_keys(adapter, duplicates)
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        errors.append(
            UnsupportedAdapterError(
                f"{wfile}: keys shardmerge does not understand: {shown}.",
                hint="Is this a PEFT LoRA adapter? Otherwise merge it with the tool that made it.",
            )
        )
    if duplicates:
        # Which of the two PEFT would load is not defined: refuse rather than pick one.
        shown = "; ".join(f"{a} and {b}" for a, b in duplicates[:4])
        errors.append(
            CorruptFileError(
                f"{wfile}: two keys hold the same tensor of one module: {shown}.",
                hint="Keep one of each pair, or re-save the adapter with PeftModel.save_pretrained().",
            )
        )
    standalone = str(cfg.get("peft_type") or "").upper() == "TRAINABLE_TOKENS"
    if standalone:
        # A TRAINABLE_TOKENS adapter holds token rows (and maybe a resized embedding), no LoRA.
        lora_keys = sorted(
            ref.key for roles in modules.values() for role, ref in roles.items()
            if role in ("lora_A", "lora_B", "lora_B_bias", "emb_A", "emb_B", "dora")
        )  # fmt: skip
        if lora_keys:
            errors.append(
                CorruptFileError(
                    f"{wfile}: a TRAINABLE_TOKENS adapter (peft_type in adapter_config.json) "
                    f"holds LoRA keys: {', '.join(lora_keys[:6])}.",
                    hint="Fix peft_type in adapter_config.json, or re-save the adapter with "
                    "PeftModel.save_pretrained().",
                )
            )
    if duplicates or (errors and standalone):
        return {}, Counter(), errors

    model_type = str(ckpt.config.get("model_type", ""))
    conv1d_names = CONV1D_MODULES.get(model_type, ())
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules_to_save = set(cfg.get("modules_to_save") or [])
    edits: dict[str, TensorEdit] = {}
    counts: Counter = Counter()

    def incompatible(msg: str) -> None:
        errors.append(
            IncompatibleAdapterError(
                f"{adapter.path}: {msg}",
                hint="Is this adapter made for this base model?",
            )
        )

    def add(base: str, *, term: Term | None = None, repl: Replacement | None = None) -> None:
        old = edits.get(base, TensorEdit())
        edits[base] = TensorEdit(
            replacement=repl or old.replacement,
            terms=old.terms + ((term,) if term else ()),
        )

    # Keys that match no base tensor, reported together (so a dropped module is never silent).
    unmatched: list[str] = []
    if cfg.get("target_parameters"):
        moe = expert_terms(
            cfg["target_parameters"], adapter.label, str(wfile), modules, weight, ckpt,
            rank_of=lambda key: pattern_value(rank_pattern, key, cfg.get("r", 8)),
            scale_of=lambda key, r: _scaling(pattern_value(alpha_pattern, key, cfg.get("lora_alpha", 8)), r, use_rslora),
        )  # fmt: skip
        for base_name, term in moe.terms:
            add(base_name, term=term)
        counts.update(moe.counts)
        errors.extend(moe.errors)
        unmatched.extend(moe.unmatched)
        modules = {m: roles for m, roles in modules.items() if m not in moe.claimed}
    for module, roles in sorted(modules.items()):
        if "dora" in roles and not cfg.get("use_dora"):
            # The weights hold DoRA vectors although the config does not say so: refuse.
            errors.append(
                UnsupportedAdapterError(
                    f"{wfile}: module {module} has DoRA magnitude vectors (lora_magnitude_vector) "
                    "but adapter_config.json has no use_dora; the two disagree.",
                    hint="Set use_dora: true if this is a DoRA adapter, or re-save it with "
                    "PeftModel.save_pretrained().",
                )
            )
            continue
        low_rank = [r for r in ("lora_A", "lora_B", "emb_A", "emb_B") if r in roles]
        r_cfg = pattern_value(rank_pattern, module, cfg.get("r", 8))
        alpha = pattern_value(alpha_pattern, module, cfg.get("lora_alpha", 8))
        if low_rank:
            pair = (
                ("emb_A", "emb_B") if "emb_A" in roles or "emb_B" in roles else ("lora_A", "lora_B")
            )
            if not all(p in roles for p in pair) or set(low_rank) != set(pair):
                incompatible(
                    f"module {module} has {', '.join(low_rank)} but not a complete A/B pair."
                )
                continue
            a, b = roles[pair[0]], roles[pair[1]]
            if len(a.shape) < 2 or len(b.shape) < 2:
                # Not a convolution's factors either: a malformed file.
                errors.append(
                    CorruptFileError(
                        f"{wfile}: LoRA factors of {module} have shapes {list(a.shape)} and "
                        f"{list(b.shape)}; a LoRA factor is a 2-D matrix.",
                        hint="Re-save the adapter with PeftModel.save_pretrained().",
                    )
                )
                continue
            if len(a.shape) != 2 or len(b.shape) != 2:
                errors.append(
                    UnsupportedAdapterError(
                        f"{wfile}: module {module} has {len(a.shape)}-D LoRA factors; "
                        "LoRA on convolution layers is not supported yet.",
                        hint=_USE_PEFT,
                    )
                )
                continue
            if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
                errors.append(
                    CorruptFileError(f"{wfile}: LoRA factors of {module} are not floating point.")
                )
                continue
            rank = a.shape[0]
            if b.shape[1] != rank:
                incompatible(
                    f"module {module}: lora_A has rank {rank} but lora_B has {b.shape[1]}."
                )
                continue
            if rank != r_cfg:
                errors.append(
                    CorruptFileError(
                        f"{wfile}: module {module} has rank {rank} but adapter_config.json gives r={r_cfg}.",
                        hint="The config and the weights disagree; re-save the adapter.",
                    )
                )
                continue
            scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            base_name = resolve_lora_target(module, "weight", ckpt)
            if base_name is None:
                unmatched.append(f"{module}.weight")
                continue
            w = base_tensor(ckpt, base_name)
            if w.dtype not in FLOAT_DTYPES:
                incompatible(
                    f"base tensor {base_name} is {w.dtype}, not floating point; cannot add LoRA to it."
                )
                continue
            saved_base = roles.get("base_layer.weight")
            if saved_base is not None and is_vocab_tensor(base_name):
                w = TensorInfo(w.name, w.dtype, saved_base.shape, w.start, w.end)  # resized
            out_f, in_f = b.shape[0], a.shape[1]
            if pair[0] == "emb_A":
                kind, left_t, right_t, expect = "embedding", True, True, (in_f, out_f)
            elif module.rsplit(".", 1)[-1] in conv1d_names or (
                cfg.get("fan_in_fan_out") and w.shape == (in_f, out_f) and w.shape != (out_f, in_f)
            ):
                kind, left_t, right_t, expect = "conv1d", True, True, (in_f, out_f)
            else:
                kind, left_t, right_t, expect = "linear", False, False, (out_f, in_f)
            if w.shape != expect:
                incompatible(
                    f"target {module}: the LoRA delta has shape {list(expect)} but base tensor "
                    f"{base_name} has shape {list(w.shape)}."
                )
                continue
            magnitude = None
            if cfg.get("use_dora"):
                magnitude = dora_magnitude(roles, module, kind, w.shape, str(wfile), errors)
                if magnitude is None:
                    continue
            left, right = (a, b) if left_t else (b, a)
            add(
                base_name,
                term=Term(
                    kind, adapter.label, module, left, right, weight * scaling, left_t, right_t,
                    magnitude=magnitude, norm_dim=1 if kind == "linear" else 0,
                ),
            )  # fmt: skip
            # One expert's Linear of an MoE whose experts are separate modules counts as an expert.
            counts["expert" if kind == "linear" and EXPERT_MODULE.search(module) else kind] += 1
            if "lora_B_bias" in roles:
                bias_ref = roles["lora_B_bias"]
                bias_name = resolve_base_name(module, "bias", ckpt)
                if bias_name is None:
                    incompatible(
                        f"module {module} has a LoRA bias (lora_bias) but the base has no {module}.bias."
                    )
                elif ckpt.tensor(bias_name).shape != bias_ref.shape:
                    incompatible(
                        f"lora_B.bias of {module} has shape {list(bias_ref.shape)} but base "
                        f"{bias_name} has {list(ckpt.tensor(bias_name).shape)}."
                    )
                else:
                    add(
                        bias_name,
                        term=Term(
                            "lora_bias", adapter.label, module, bias_ref, None, weight * scaling
                        ),
                    )
                    counts["lora_bias"] += 1
        elif "lora_B_bias" in roles:
            incompatible(f"module {module} has lora_B.bias without LoRA factors.")
        elif "dora" in roles:
            incompatible(f"module {module} has a DoRA magnitude vector without LoRA factors.")

        for role, ref in roles.items():
            # A modules_to_save wrapper's parts (its copy, the original) are checked
            # like saved tensors: tokens.py may take the original as a tied base's value.
            wrapper_part = role.startswith(("original.", "mts_copy."))
            if not role.startswith(("saved.", "base_layer.")) and not wrapper_part:
                continue
            suffix = role.split(".", 1)[1]
            base_name = resolve_lora_target(module, suffix, ckpt)
            if role.startswith("base_layer."):
                kind = "base_layer"
            elif (
                wrapper_part
                or module in modules_to_save
                or module.rsplit(".", 1)[-1] in modules_to_save
            ):
                kind = "modules_to_save"
            else:
                kind = "bias" if suffix == "bias" else "saved_tensor"
            shown = ref.key if wrapper_part else f"{module}.{suffix}"
            if base_name is None:
                unmatched.append(f"{shown} (saved whole, {kind})")
                continue
            w = base_tensor(ckpt, base_name)
            resized = (
                is_vocab_tensor(base_name)
                and len(ref.shape) == len(w.shape) == 2
                and ref.shape[1:] == w.shape[1:]
                and ref.shape[0] > 0
            )
            if ref.shape != w.shape and not resized:
                incompatible(
                    f"saved tensor {shown} has shape {list(ref.shape)} but base {base_name} "
                    f"has {list(w.shape)}."
                )
                continue
            if (ref.dtype in FLOAT_DTYPES) != (w.dtype in FLOAT_DTYPES):
                incompatible(
                    f"saved tensor {shown} is {ref.dtype} but base {base_name} is {w.dtype}."
                )
                continue
            if wrapper_part:
                continue
            if weight != 1.0:
                errors.append(
                    UnsupportedAdapterError(
                        f"{adapter.path}: it replaces {base_name} whole ({kind}); a weight of {weight} "
                        "has no defined meaning for a replaced tensor.",
                        hint="Give this adapter weight 1.0.",
                    )
                )
                continue
            if edits.get(base_name, TensorEdit()).replacement is not None:
                incompatible(f"it saves {base_name} twice.")
                continue
            add(base_name, repl=Replacement(adapter.label, kind, ref))
            counts[kind] += 1

    tokens.embedding_edits(
        adapter, modules, edits, weight, ckpt,
        lambda module, suffix: resolve_lora_target(module, suffix, ckpt), counts, errors,
    )  # fmt: skip
    if unmatched:
        shown = ", ".join(unmatched[:12]) + (
            f" and {len(unmatched) - 12} more" if len(unmatched) > 12 else ""
        )
        incompatible(
            f"{len(unmatched)} of its module(s) match no tensor of the base model: {shown}."
        )
    if not edits and not errors:
        incompatible("it holds no LoRA weights that apply to the base model.")
    return edits, counts, errors
