"""Where a base keeps its input and output embeddings, and whether the loaded model ties them.

A base *ties* its embeddings when the loaded model shares one tensor between
the input embedding (``embed_tokens``) and the output projection
(``lm_head``); the checkpoint then stores only the embedding.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..errors import InputError
from ..io.checkpoint import Checkpoint

# Names (tails) of input embeddings and output projections in transformers' models.
INPUT_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")
# Architectures with an output projection (a bare backbone has none to untie).
_HEAD_ARCHITECTURE = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration|ForMaskedLM)$")
# Bytes compared at a time when a tied base stores lm_head too.
_COMPARE_CHUNK = 16 << 20


@dataclass(frozen=True)
class Embeddings:
    """Where a base keeps its embeddings and whether the loaded model shares them."""

    embed: str | None  # the input embedding tensor; None when there is none or several
    head: str  # the output projection's tensor name (stored or to be written)
    head_stored: bool
    tied: bool
    flag: bool | None  # config.json's tie_word_embeddings (top level, else text_config)
    candidates: tuple[str, ...] = ()  # input embedding look-alikes, for messages

    def names(self) -> set[str]:
        return {n for n in (self.embed, self.head) if n} | set(self.candidates)


def tie_flag(config: dict) -> bool | None:
    """config.json's tie_word_embeddings: the top level's, else text_config's; None if absent."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return None


def is_vocab_tensor(name: str) -> bool:
    """A tensor whose rows are the vocabulary (an adapter may resize it)."""
    return name.endswith(INPUT_SUFFIXES) or any(
        name == n or name.endswith("." + n) for n in OUTPUT_NAMES
    )


def find_embeddings(ckpt: Checkpoint) -> Embeddings:
    """The base's embeddings and tie state.

    Tied means: config.json says ``tie_word_embeddings: true`` and the
    checkpoint stores no lm_head (or stores one equal byte for byte, which
    transformers then ties); with the flag absent, a model with an LM head
    architecture whose checkpoint stores no lm_head is tied (the class default
    cannot be read without transformers, the checkpoint is the evidence).
    """
    candidates = sorted(
        (n for n in ckpt.weight_map if n.endswith(INPUT_SUFFIXES)),
        key=lambda n: (n.count("."), n),
    )
    candidates = [n for n in candidates if len(ckpt.tensor(n).shape) == 2]
    embed = None
    if len(candidates) == 1 or (
        len(candidates) > 1 and candidates[0].count(".") < candidates[1].count(".")
    ):
        embed = candidates[0]  # the outermost one: the language model's own
    heads = sorted(
        (n for n in ckpt.weight_map if any(n == h or n.endswith("." + h) for h in OUTPUT_NAMES)),
        key=lambda n: (n.count("."), n),
    )
    default_head = (
        "embed_out.weight" if ckpt.config.get("model_type") == "gpt_neox" else "lm_head.weight"
    )
    head = heads[0] if heads else default_head
    _check_config(ckpt)
    flag = tie_flag(ckpt.config)
    tied = False
    if embed is not None and flag is not False:
        if not heads:
            archs = ckpt.config.get("architectures") or []
            has_head = not archs or any(_HEAD_ARCHITECTURE.search(str(a)) for a in archs)
            tied = flag is True or has_head
        elif flag is True:
            tied = _same_bytes(ckpt, embed, head)
    return Embeddings(embed, head, bool(heads), tied, flag, tuple(candidates))


def _check_config(ckpt: Checkpoint) -> None:
    """The config.json values read here, typed as transformers writes them.

    A string tie_word_embeddings ("false") would be read as true, and the
    unmerged model's tie with it: refused rather than guessed.
    """
    where = ckpt.path / "config.json"
    hint = "Fix config.json, or re-save the model with save_pretrained()."
    for scope, cfg in (("", ckpt.config), ("text_config.", ckpt.config.get("text_config"))):
        value = cfg.get("tie_word_embeddings") if isinstance(cfg, dict) else None
        if value is not None and not isinstance(value, bool):
            raise InputError(
                f"{where}: {scope}tie_word_embeddings must be true or false, not {value!r}.",
                hint=hint,
            )
    archs = ckpt.config.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise InputError(
            f"{where}: architectures must be a list of class names, not {archs!r}.", hint=hint
        )


def _same_bytes(ckpt: Checkpoint, a: str, b: str) -> bool:
    """Whether two stored tensors are equal byte for byte (transformers then ties them)."""
    ta, tb = ckpt.tensor(a), ckpt.tensor(b)
    if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
        return False
    pa, pb = ckpt.headers[ckpt.weight_map[a]].path, ckpt.headers[ckpt.weight_map[b]].path
    return _compare(str(pa), ta.start, str(pb), tb.start, ta.nbytes)


@functools.lru_cache(maxsize=16)
def _compare(path_a: str, start_a: int, path_b: str, start_b: int, n: int) -> bool:
    # The only base bytes read at plan time, and only for a tied base that
    # stores lm_head too: streamed in chunks, memory stays bounded.
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        done = 0
        while done < n:
            k = min(_COMPARE_CHUNK, n - done)
            fa.seek(start_a + done)
            fb.seek(start_b + done)
            if fa.read(k) != fb.read(k):
                return False
            done += k
    return True
