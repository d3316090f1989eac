"""A base's input and output embeddings: whether they are tied, and what a merge makes of them.

A base *ties* its embeddings when the loaded model shares one tensor between
the input embedding (``embed_tokens``) and the output projection
(``lm_head``); the checkpoint then stores only the embedding. An adapter may
change the two differently (LoRA on only one of them, modules_to_save of one,
trainable tokens of one). The unmerged PeftModel then computes with two
different matrices, so the merged model must too: ``lm_head.weight`` is
written as a tensor of its own (the embedding's bytes plus lm_head's own
changes) and config.json says ``tie_word_embeddings: false``. When both
change alike the tie is kept. A resized vocabulary (a replacement with more
or fewer rows) sets ``vocab_size``.

PEFT's ``merge_and_unload()`` instead adds both deltas into the one shared
tensor and keeps the tie, so its merged logits differ from its unmerged ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..arch.embeddings import OUTPUT_NAMES, Embeddings, find_embeddings, is_vocab_tensor
from ..errors import IncompatibleAdapterError, ShardmergeError, UnsupportedAdapterError
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import Replacement, TensorEdit, TensorRef, TokenRows

# The kind of the Replacement that gives an untied lm_head the tied embedding's values.
TIED_KIND = "tied_embedding"


def output_shape(shape: tuple[int, ...], edit: TensorEdit | None) -> tuple[int, ...]:
    """A tensor's shape in the output: a replacement may resize a vocabulary tensor."""
    if edit is not None and edit.replacement is not None:
        return tuple(edit.replacement.source.shape)
    return tuple(shape)


def base_ref(ckpt: Checkpoint, name: str) -> TensorRef:
    """A base tensor's bytes as a TensorRef (to read it as another tensor's source)."""
    t = ckpt.tensor(name)
    path = str(ckpt.headers[ckpt.weight_map[name]].path)
    return TensorRef(path, name, t.dtype, t.shape, "safetensors", t.start, t.end)


def _effect(edit: TensorEdit | None):
    """What an edit does, without the labels naming who does it (for comparing two edits)."""
    if edit is None:
        return None
    terms = tuple(replace(t, adapter="", module="") for t in edit.terms)
    rows = tuple((r.indices, r.source) for r in edit.token_rows)
    source = edit.replacement.source if edit.replacement else None
    scaling = replace(edit.scaling, adapter="", module="") if edit.scaling else None
    if source is None and not terms and not rows and scaling is None:
        return None
    return source, terms, rows, scaling


@dataclass
class Resolution:
    """The edits with the embeddings settled, and what else the output needs."""

    edits: dict[str, TensorEdit]
    # A tensor the base does not store, written right after another: (after, name, edit).
    new_tensor: tuple[str, str, TensorEdit] | None = None
    config: list[tuple[str, object]] = field(default_factory=list)  # dotted keys of config.json
    errors: list[ShardmergeError] = field(default_factory=list)

    def update_index(self, index: dict | None) -> dict | None:
        """Name the new tensor in the output index's weight_map (total_size comes from the jobs)."""
        if index is not None and self.new_tensor is not None:
            after, name, _ = self.new_tensor
            index["weight_map"][name] = index["weight_map"][after]
        return index


def resolve(ckpt: Checkpoint, edits: dict[str, TensorEdit]) -> Resolution:
    """Settle tied embeddings, check row replacements and vocabulary sizes, for all adapters together."""
    res = Resolution(dict(edits))
    emb = find_embeddings(ckpt) if any(n in res.edits for n in _names_to_watch(ckpt)) else None
    if emb is not None and emb.tied:
        _settle_tie(ckpt, emb, res)
    elif (
        emb is not None and emb.embed is None and emb.flag is not False and len(emb.candidates) > 1
    ):
        touched = sorted(n for n in res.edits if n in emb.names())
        if touched:
            res.errors.append(
                UnsupportedAdapterError(
                    f"{ckpt.path}: cannot tell which of {', '.join(emb.candidates)} is the input "
                    f"embedding that {emb.head} may be tied to, and the adapters change "
                    f"{', '.join(touched)}.",
                    hint="Set tie_word_embeddings in the base's config.json explicitly.",
                )
            )
    _check_token_rows(ckpt, res)
    if emb is not None and emb.embed is not None:
        _check_vocabulary(ckpt, emb, res)
    return res


def _names_to_watch(ckpt: Checkpoint) -> set[str]:
    return {n for n in ckpt.weight_map if is_vocab_tensor(n)} | set(OUTPUT_NAMES)


def _settle_tie(ckpt: Checkpoint, emb: Embeddings, res: Resolution) -> None:
    """Keep the tie when embed and lm_head change alike; otherwise write them apart."""
    e_edit, l_edit = res.edits.get(emb.embed), res.edits.get(emb.head)
    if _effect(e_edit) == _effect(l_edit):
        if not emb.head_stored:
            res.edits.pop(emb.head, None)  # the tie carries embed's values to lm_head
        return
    # The PeftModel computes with two different matrices: so does the output.
    res.config.append(("tie_word_embeddings", False))
    text = ckpt.config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        res.config.append(("text_config.tie_word_embeddings", False))
    if emb.head_stored:
        return  # its stored bytes equal the embedding's: its own edit applies to them
    edit = l_edit or TensorEdit()
    if edit.replacement is None:
        source = base_ref(ckpt, emb.embed)
        edit = replace(edit, replacement=Replacement("", TIED_KIND, source))
    res.edits.pop(emb.head, None)
    res.new_tensor = (emb.embed, emb.head, edit)


def _check_vocabulary(ckpt: Checkpoint, emb: Embeddings, res: Resolution) -> None:
    """embed and lm_head keep one vocabulary size; a new one goes into config.json."""
    embed_shape = ckpt.tensor(emb.embed).shape
    sizes = {emb.embed: output_shape(embed_shape, res.edits.get(emb.embed))[0]}
    if emb.head_stored:
        sizes[emb.head] = output_shape(ckpt.tensor(emb.head).shape, res.edits.get(emb.head))[0]
    elif res.new_tensor is not None:
        sizes[emb.head] = output_shape(embed_shape, res.new_tensor[2])[0]
    if all(s == embed_shape[0] for s in sizes.values()):
        return
    if len(set(sizes.values())) > 1:
        shown = " and ".join(f"{n} {s} rows" for n, s in sizes.items())
        edits = [res.edits.get(emb.embed), res.edits.get(emb.head)]
        if res.new_tensor is not None:
            edits.append(res.new_tensor[2])
        who = sorted({e.replacement.adapter for e in edits if e and e.replacement} - {""})
        res.errors.append(
            IncompatibleAdapterError(
                f"the merged model would have {shown}: "
                f"{'adapter ' + ', '.join(who) if who else 'the adapter'} resized the vocabulary "
                "of one of them but does not save the other at the new size.",
                hint="Merge into the resized base the adapter was trained on: save it after "
                "model.resize_token_embeddings(...) with save_pretrained() and give that folder.",
            )
        )
        return
    rows = sizes[emb.embed]
    for scope in ("", "text_config."):
        where = ckpt.config if not scope else ckpt.config.get("text_config")
        if isinstance(where, dict) and "vocab_size" in where:
            res.config.append((f"{scope}vocab_size", rows))


def _check_token_rows(ckpt: Checkpoint, res: Resolution) -> None:
    """Row replacements: inside the tensor, one per row, alone or after a replacement only."""
    items = list(res.edits.items()) + ([res.new_tensor[1:]] if res.new_tensor else [])
    for name, edit in items:
        if not edit.token_rows:
            continue
        who = sorted({r.adapter for r in edit.token_rows} | {t.adapter for t in edit.terms})
        if edit.terms or edit.scaling is not None:
            res.errors.append(
                UnsupportedAdapterError(
                    f"{'adapters' if len(who) > 1 else 'adapter'} {', '.join(who)}: trainable "
                    f"tokens replace some rows of {name} and a delta (LoRA, LoHa, LoKr, IA3) "
                    "also changes it; shardmerge does not combine the two on one tensor.",
                    hint="Merge these adapters in separate runs, or drop one of them.",
                )
            )
            continue
        base = ckpt.tensor(name) if name in ckpt.weight_map else None
        shape = output_shape(base.shape if base else (), edit)
        dtype = edit.replacement.source.dtype if edit.replacement else (base.dtype if base else "")
        if len(shape) != 2 or dtype not in FLOAT_DTYPES:
            res.errors.append(
                UnsupportedAdapterError(
                    f"trainable tokens of {name}: the tensor is {dtype} {list(shape)}; rows "
                    "can only be replaced in a 2-D floating-point tensor."
                )
            )
            continue
        seen: dict[int, str] = {}
        for r in edit.token_rows:
            problem = ""
            if r.source.dtype not in FLOAT_DTYPES or tuple(r.source.shape) != (
                len(r.indices),
                shape[1],
            ):
                problem = (
                    f"{r.source.path}: trainable_tokens_delta of {r.module} is {r.source.dtype} "
                    f"{list(r.source.shape)}, expected a floating-point "
                    f"[{len(r.indices)}, {shape[1]}] for {len(r.indices)} token indices"
                )
            elif bad := [i for i in r.indices if not 0 <= i < shape[0]]:
                problem = (
                    f"{_config_of(r)}: token indices {bad[:5]} of {r.module} are outside "
                    f"{name}'s {shape[0]} rows"
                )
            elif len(set(r.indices)) != len(r.indices):
                twice = sorted(i for i, n in Counter(r.indices).items() if n > 1)
                problem = f"{_config_of(r)}: token indices of {r.module} repeat {'row' if len(twice) == 1 else 'rows'} {twice[:5]}"
            elif clash := sorted(i for i in r.indices if i in seen):
                problem = (
                    f"adapters {seen[clash[0]]} and {r.adapter} both replace {'row' if len(clash) == 1 else 'rows'} "
                    f"{clash[:5]} of {name}; PEFT refuses overlapping trainable tokens"
                )
            if problem:
                res.errors.append(
                    IncompatibleAdapterError(
                        f"{problem}.", hint="Is this adapter made for this base model?"
                    )
                )
                break
            seen.update(dict.fromkeys(r.indices, r.adapter))


def _config_of(rows: TokenRows) -> Path:
    """The adapter_config.json that gave these token indices (beside the weights file)."""
    return Path(rows.source.path).parent / "adapter_config.json"
