"""Trainable tokens, and what one adapter does to a base's tied embeddings.

PEFT semantics (peft/tuners/trainable_tokens/layer.py, utils/other.py):

- ``trainable_tokens_delta`` holds the *new rows* themselves: merging is
  ``weight.index_copy(0, token_indices, delta)``. The indices live only in
  adapter_config.json: LoRA's ``trainable_token_indices`` (a list for the
  input embedding, or a dict module name -> list, a module matching a key
  when its name ends with it) or the TRAINABLE_TOKENS method's
  ``token_indices`` (the same list for every target).
- On a base that ties its embeddings, trainable tokens of the input
  embedding also apply to lm_head, unless the dict form gives lm_head other
  indices (then each has its own, and they no longer agree). The
  TRAINABLE_TOKENS method ties lm_head whenever the embedding is a target.
  Keys saved for a tied lm_head are copies and are ignored.
- A tensor saved whole for a module's base (``base_layer.weight``, an
  embedding saved because the vocabulary was resized, a modules_to_save
  wrapper's ``original_module.weight``) is loaded into the one shared tensor:
  it is the new base of both. A modules_to_save copy is the module's own.
- ``ensure_weight_tying: true`` on a tied base makes lm_head use exactly what
  the embedding uses (its LoRA, its modules_to_save copy, its tokens): the
  keys saved for lm_head are copies and are ignored.

Whether the two then still agree is decided for all adapters together
(shardmerge/planner/embeddings.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from ..arch.embeddings import Embeddings, find_embeddings, is_vocab_tensor
from ..errors import CorruptFileError, ShardmergeError, UnsupportedAdapterError
from ..io.checkpoint import Checkpoint
from ..terms import Replacement, TensorEdit, TokenRows
from .config import is_standalone_tokens

# Replacement kinds that overwrite a module's base weight (shared when tied).
_BASE_KINDS = ("base_layer", "saved_tensor")


def _indices(cfg: dict, module: str) -> list[int] | None:
    """The token indices the config gives ``module``; None when it gives none.

    The list forms name the input embedding's indices (a delta saved for a
    tied lm_head is a copy of the embedding's, with the same indices).
    """
    if is_standalone_tokens(cfg):
        return cfg.get("token_indices")
    value = cfg.get("trainable_token_indices")
    if isinstance(value, dict):
        for key, indices in value.items():
            if module.endswith(key):  # PEFT's _set_trainable matches name tails
                return indices
        return None
    return value


def embedding_edits(
    adapter,
    modules: dict[str, dict],
    edits: dict[str, TensorEdit],
    weight: float,
    ckpt: Checkpoint,
    resolve,
    counts: Counter,
    errors: list[ShardmergeError],
) -> None:
    """Add the adapter's trainable tokens to ``edits`` and apply its tied-embedding semantics.

    ``resolve(module, suffix)`` is the adapter's module-to-base-tensor rule.
    """
    cfg = adapter.config
    tokens = {
        m: roles["trainable_tokens"] for m, roles in modules.items() if "trainable_tokens" in roles
    }
    errors.extend(_missing_deltas(adapter, list(tokens), ckpt))
    watched = [m for m in modules if (n := resolve(m, "weight")) and is_vocab_tensor(n)]
    if not tokens and not watched:
        return
    emb = find_embeddings(ckpt)
    embed_modules = [m for m in modules if emb.embed and resolve(m, "weight") == emb.embed]
    head_modules = [m for m in modules if resolve(m, "weight") == emb.head]
    ensure = emb.tied and bool(cfg.get("ensure_weight_tying")) and not is_standalone_tokens(cfg)
    rows = {m: _token_rows(adapter, m, ref) for m, ref in tokens.items()}
    follow = _head_follows(cfg, emb, rows, embed_modules, head_modules, ensure)
    for module, (row, problem) in rows.items():
        if module in head_modules and (follow or ensure):
            continue  # a tied copy of the embedding's
        if _add_token_rows(adapter, module, row, problem, edits, weight, resolve, errors):
            counts["trainable_tokens"] += 1
    if emb.tied and emb.embed is not None:
        _tied_edits(adapter, modules, edits, emb, embed_modules, head_modules, ensure, follow)


def _head_follows(
    cfg: dict,
    emb: Embeddings,
    rows: dict[str, tuple[TokenRows | None, str]],
    embed_modules: list[str],
    head_modules: list[str],
    ensure: bool,
) -> bool:
    """Whether a tied lm_head takes the embedding's trainable tokens (its own keys are copies)."""
    embed_row = next((rows[m][0] for m in embed_modules if m in rows), None)
    if not emb.tied or embed_row is None:
        return False
    if is_standalone_tokens(cfg) or ensure:
        return True
    # PEFT ties lm_head's tokens to the embedding's unless the dict form gives it others.
    others = [_indices(cfg, m) for m in head_modules]
    return all(o is None or list(o) == list(embed_row.indices) for o in others)


def _add_token_rows(
    adapter,
    module: str,
    row: TokenRows | None,
    problem: str,
    edits: dict[str, TensorEdit],
    weight: float,
    resolve,
    errors: list[ShardmergeError],
) -> bool:
    """Add one module's token rows to its base tensor's edit; False (problem recorded) if not."""
    wfile = adapter.weights_file
    if problem:
        errors.append(UnsupportedAdapterError(f"{wfile}: {problem}", hint=_HINT))
        return False
    if weight != 1.0:
        errors.append(
            UnsupportedAdapterError(
                f"{adapter.path}: it replaces rows of {module} (trainable tokens); a weight "
                f"of {weight} has no defined meaning for replaced rows.",
                hint="Give this adapter weight 1.0.",
            )
        )
        return False
    base = resolve(module, "weight")
    if base is None:
        errors.append(
            CorruptFileError(
                f"{wfile}: trainable tokens of {module}, which matches no tensor of the base model."
            )
        )
        return False
    old = edits.get(base, TensorEdit())
    edits[base] = replace(old, token_rows=old.token_rows + (row,))
    return True


def _tied_edits(
    adapter,
    modules: dict[str, dict],
    edits: dict[str, TensorEdit],
    emb: Embeddings,
    embed_modules: list[str],
    head_modules: list[str],
    ensure: bool,
    follow: bool,
) -> None:
    """A tied base: what the embedding and lm_head each compute with in the PeftModel."""
    e_edit = edits.pop(emb.embed, TensorEdit())
    h_edit = edits.pop(emb.head, TensorEdit())
    if ensure:
        h_edit = TensorEdit()  # lm_head's keys are copies of the embedding's
    shared = next(
        (
            e.replacement
            for e in (e_edit, h_edit)
            if e.replacement is not None and e.replacement.kind in _BASE_KINDS
        ),
        None,
    )
    if shared is None:
        originals = [
            modules[m]["original.weight"]
            for m in embed_modules + ([] if ensure else head_modules)
            if "original.weight" in modules[m]
        ]
        if originals:
            shared = Replacement(adapter.label, "base_layer", originals[0])

    def own(e: TensorEdit) -> Replacement | None:
        return e.replacement if e.replacement and e.replacement.kind not in _BASE_KINDS else None

    e_new = replace(e_edit, replacement=own(e_edit) or shared)
    if ensure:
        h_new = e_new
    else:
        h_new = replace(h_edit, replacement=own(h_edit) or shared)
        if follow:
            h_new = replace(h_new, token_rows=e_new.token_rows)
    for name, e in ((emb.embed, e_new), (emb.head, h_new)):
        if e != TensorEdit():
            edits[name] = e


_HINT = "Re-save the adapter with PeftModel.save_pretrained(), or merge it with PEFT."


def _missing_deltas(adapter, token_modules: list[str], ckpt: Checkpoint) -> list[ShardmergeError]:
    """Token indices in the config that no saved trainable_tokens_delta carries.

    PEFT saves a delta for every module it gives trainable tokens, except a
    tied lm_head sharing the embedding's (transformers' tie restores it), and
    refuses to load a config naming a module that is not there; merging
    without the rows would drop them silently.
    """
    cfg = adapter.config
    if is_standalone_tokens(cfg):
        value = cfg.get("token_indices")
        missing = ["its target modules"] if value and not token_modules else []
    else:
        value = cfg.get("trainable_token_indices")
        if isinstance(value, dict):
            missing = [
                k for k, v in value.items() if v and not any(m.endswith(k) for m in token_modules)
            ]
            if missing:
                # A tied lm_head given the embedding's own indices shares its delta.
                emb = find_embeddings(ckpt)
                head = emb.head.rsplit(".", 1)[0]
                embed = (emb.embed or "").rsplit(".", 1)[0]
                embed_indices = [v for k, v in value.items() if embed and embed.endswith(k)]
                missing = [
                    k
                    for k in missing
                    if not (emb.tied and head.endswith(k) and value[k] in embed_indices)
                ]
        else:
            missing = ["the input embedding"] if value and not token_modules else []
    if not missing:
        return []
    field = "token_indices" if is_standalone_tokens(cfg) else "trainable_token_indices"
    shown = ", ".join(map(repr, missing)) if isinstance(value, dict) else missing[0]
    return [
        CorruptFileError(
            f"{adapter.path / 'adapter_config.json'}: {field} gives token indices for {shown}, "
            f"but {adapter.weights_file} holds no trainable_tokens_delta for it: the trained "
            "token rows are missing.",
            hint="Re-save the adapter with PeftModel.save_pretrained(), or fix "
            f"{field} in adapter_config.json.",
        )
    ]


def _token_rows(adapter, module: str, ref) -> tuple[TokenRows | None, str]:
    """The TokenRows of one module's trainable_tokens_delta, or a problem."""
    indices = _indices(adapter.config, module)
    if indices is None:
        return None, (
            f"module {module} has trainable tokens (trainable_tokens_delta) but "
            f"{adapter.path / 'adapter_config.json'} gives no token indices for it."
        )
    return TokenRows(adapter.label, module, tuple(indices), ref), ""
