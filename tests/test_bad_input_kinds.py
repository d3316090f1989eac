"""Broken and hostile adapters of the newer kinds: DoRA, LoHa/LoKr/IA3, trainable tokens,
resized and tied embeddings.

Each refusal is checked as in test_bad_input.py (a non-zero exit that is not an
internal error, a message naming the problem and the file, no traceback, no
finished model in OUT, the inputs unchanged); an input that is odd but well
defined merges, and its result is checked. Adapters are written by hand with
safetensors (no PEFT model is built), on test_bad_input's tiny two-shard base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import (
    ERR_INCOMPATIBLE,
    ERR_INPUT,
    ERR_RESOURCE,
    ERR_UNSUPPORTED,
    HID,
    INDEX,
    PREFIX,
    SHARD1,
    SHARD2,
    Q,
    V,
    Workspace,
    _cli,
    _snapshot,
    assert_not_complete,
)

import shardmerge
from shardmerge.errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    InputError,
    PlanErrors,
    ShardmergeError,
)

P = f"{PREFIX}{Q}"
E = "model.embed_tokens"
MAG = f"{P}.lora_magnitude_vector"
DELTA = f"{PREFIX}{E}.token_adapter.trainable_tokens_delta"
HEAD_DELTA = f"{PREFIX}lm_head.token_adapter.trainable_tokens_delta"
VOCAB = 16


def _t(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def lora(**cfg) -> dict:
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]} | cfg


def lora_tensors(module: str = P, out: int = HID, r: int = 2) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora_A.weight": _t(r, HID, seed=1),
        f"{module}.lora_B.weight": _t(out, r, seed=2),
    }


def loha(**cfg) -> dict:
    return {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj"]} | cfg


def loha_tensors(r: int = 2) -> dict[str, torch.Tensor]:
    return {
        f"{P}.hada_w1_a": _t(HID, r, seed=3),
        f"{P}.hada_w1_b": _t(r, HID, seed=4),
        f"{P}.hada_w2_a": _t(HID, r, seed=5),
        f"{P}.hada_w2_b": _t(r, HID, seed=6),
    }


def lokr(**cfg) -> dict:
    return {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["q_proj"]} | cfg


def lokr_tensors() -> dict[str, torch.Tensor]:
    # kron([2, 2], [4, 2] @ [2, 4]) is q_proj's [8, 8].
    return {
        f"{P}.lokr_w1": _t(2, 2, seed=7),
        f"{P}.lokr_w2_a": _t(4, 2, seed=8),
        f"{P}.lokr_w2_b": _t(2, 4, seed=9),
    }


def ia3(**cfg) -> dict:
    return {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []} | cfg


def tokens(**cfg) -> dict:
    return {
        "peft_type": "TRAINABLE_TOKENS",
        "target_modules": ["embed_tokens"],
        "token_indices": [1, 3],
    } | cfg


def write(ws: Workspace, name: str, config, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder: ``config`` as adapter_config.json (any JSON value), ``tensors`` saved."""
    folder = ws.inputs / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def set_base_config(ws: Workspace, **values) -> None:
    path = ws.base / "config.json"
    config = json.loads(path.read_text())
    for key, value in values.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DROP = object()


def tie_base(ws: Workspace) -> None:
    """Make the base tied: tie_word_embeddings true and no lm_head stored."""
    shard = ws.base / SHARD2
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((ws.base / INDEX).read_text())
    del index["weight_map"]["lm_head.weight"]
    (ws.base / INDEX).write_text(json.dumps(index))
    set_base_config(ws, tie_word_embeddings=True)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def _base(ws: Workspace, name: str) -> torch.Tensor:
    shard = SHARD1 if name != "lm_head.weight" else SHARD2
    return load_file(str(ws.base / shard))[name]


def _merged(ws: Workspace, name: str) -> torch.Tensor:
    index = json.loads((ws.out / INDEX).read_text())
    return load_file(str(ws.out / index["weight_map"][name]))[name]


# Each case: (adapter config, tensors, phrases the message must hold, exit code, the file
# it must name: "config" or "weights").
Case = tuple[object, dict, tuple[str, ...], int, str]

# --- DoRA ---------------------------------------------------------------------------------

DORA_REFUSED: dict[str, Case] = {
    "magnitude_too_long": (
        lora(use_dora=True), {**lora_tensors(), MAG: torch.ones(HID + 1)},
        ("DoRA magnitude", "[9]", "8 output channels"), ERR_INCOMPATIBLE, "weights",
    ),
    "magnitude_2d": (
        lora(use_dora=True), {**lora_tensors(), MAG: torch.ones(2, HID // 2)},
        ("DoRA magnitude", "[2, 4]"), ERR_INCOMPATIBLE, "weights",
    ),
    "magnitude_empty": (
        lora(use_dora=True), {**lora_tensors(), MAG: torch.ones(0)},
        ("DoRA magnitude", "[0]"), ERR_INCOMPATIBLE, "weights",
    ),
    "magnitude_int": (
        lora(use_dora=True), {**lora_tensors(), MAG: torch.ones(HID, dtype=torch.int32)},
        ("DoRA magnitude", "I32", "not floating point"), ERR_INPUT, "weights",
    ),
    "magnitude_bool": (
        lora(use_dora=True), {**lora_tensors(), MAG: torch.ones(HID, dtype=torch.bool)},
        ("BOOL", "not floating point"), ERR_INPUT, "weights",
    ),
    "magnitude_missing": (
        lora(use_dora=True), lora_tensors(),
        ("no lora_magnitude_vector", "use_dora"), ERR_INPUT, "weights",
    ),
    "magnitude_without_use_dora": (
        lora(use_dora=False), {**lora_tensors(), MAG: torch.ones(HID)},
        ("lora_magnitude_vector", "use_dora"), ERR_UNSUPPORTED, "weights",
    ),
    "magnitude_without_lora_factors": (
        lora(use_dora=True), {MAG: torch.ones(HID)},
        ("DoRA magnitude vector without LoRA factors",), ERR_INCOMPATIBLE, "folder",
    ),
    # Both spellings PEFT has used, in one file: which one counts is not defined.
    "magnitude_with_and_without_weight_suffix": (
        lora(use_dora=True),
        {**lora_tensors(), MAG: torch.ones(HID), f"{MAG}.weight": 2 * torch.ones(HID)},
        ("two keys hold the same tensor", "lora_magnitude_vector.weight"), ERR_INPUT, "weights",
    ),
    "use_dora_string": (
        lora(use_dora="true"), {**lora_tensors(), MAG: torch.ones(HID)},
        ("use_dora must be true or false",), ERR_INPUT, "config",
    ),
    "dora_with_lora_bias": (
        lora(use_dora=True, lora_bias=True), {**lora_tensors(), MAG: torch.ones(HID)},
        ("DoRA (use_dora) together with lora_bias", "not supported"), ERR_UNSUPPORTED, "config",
    ),
    "lora_factor_1d": (
        lora(), {f"{P}.lora_A.weight": _t(2 * HID), f"{P}.lora_B.weight": _t(HID, 2)},
        ("a LoRA factor is a 2-D matrix", "[16]"), ERR_INPUT, "weights",
    ),
    "lora_keys_with_and_without_prefix": (
        lora(), {**lora_tensors(), f"{Q}.lora_A.weight": _t(2, HID, seed=9)},
        ("two keys hold the same tensor", f"{Q}.lora_A.weight"), ERR_INPUT, "weights",
    ),
}  # fmt: skip

# --- LoHa, LoKr, IA3 ------------------------------------------------------------------------

LYCORIS_REFUSED: dict[str, Case] = {
    # Configs with wrong-typed fields.
    "loha_r_string": (loha(r="4"), loha_tensors(), ("r must be a positive integer", "'4'"), ERR_INPUT, "config"),
    "lokr_r_string": (lokr(r="2"), lokr_tensors(), ("r must be a positive integer",), ERR_INPUT, "config"),
    # alpha: null was an internal error (None / r).
    "loha_alpha_null": (loha(alpha=None), loha_tensors(), ("alpha must be a finite number", "None"), ERR_INPUT, "config"),
    "lokr_alpha_null": (lokr(alpha=None), lokr_tensors(), ("alpha must be a finite number",), ERR_INPUT, "config"),
    "loha_alpha_bool": (loha(alpha=True), loha_tensors(), ("alpha must be a finite number",), ERR_INPUT, "config"),
    "loha_rank_pattern_list": (loha(rank_pattern=["q_proj"]), loha_tensors(), ("rank_pattern must map",), ERR_INPUT, "config"),
    "lokr_alpha_pattern_null": (lokr(alpha_pattern={"q_proj": None}), lokr_tensors(), ("alpha_pattern['q_proj']",), ERR_INPUT, "config"),
    "loha_target_modules_int": (loha(target_modules=5), loha_tensors(), ("target_modules must be a list",), ERR_INPUT, "config"),
    "lokr_target_modules_bad_regex": (lokr(target_modules="q_proj("), lokr_tensors(), ("not a valid regular expression",), ERR_INPUT, "config"),
    "ia3_target_modules_dict": (ia3(target_modules={"q": 1}), {f"{P}.ia3_l": torch.ones(HID, 1)}, ("target_modules must be a list",), ERR_INPUT, "config"),
    "ia3_feedforward_modules_int": (ia3(feedforward_modules=5), {f"{P}.ia3_l": torch.ones(HID, 1)}, ("feedforward_modules must be a list",), ERR_INPUT, "config"),
    "ia3_feedforward_modules_list_of_ints": (ia3(feedforward_modules=[1]), {f"{P}.ia3_l": torch.ones(HID, 1)}, ("feedforward_modules must be a list",), ERR_INPUT, "config"),
    # A rank no matrix can have is refused by key, before the factors are compared with it.
    "loha_huge_r": (loha(r=10**30), loha_tensors(), ("r must be a positive integer (at most",), ERR_INPUT, "config"),
    "lokr_rank_pattern_huge": (lokr(rank_pattern={"q_proj": 2**62}), lokr_tensors(), ("rank_pattern['q_proj'] must be a positive integer",), ERR_INPUT, "config"),
    # Factors of the wrong shape, rank, dtype or size.
    "loha_ranks_differ": ({}, {**loha_tensors(), f"{P}.hada_w1_b": _t(3, HID)}, ("ranks of its LoHa factors do not match",), ERR_INCOMPATIBLE, "folder"),
    "loha_halves_differ": ({}, {**loha_tensors(), f"{P}.hada_w2_a": _t(4, 2)}, ("8x8", "4x8"), ERR_INCOMPATIBLE, "folder"),
    "loha_factor_1d": ({}, {**loha_tensors(), f"{P}.hada_w1_a": _t(HID)}, ("hada_w1_a [8]", "2-D matrix"), ERR_INPUT, "weights"),
    "loha_factor_3d": ({}, {**loha_tensors(), f"{P}.hada_w1_a": _t(HID, 2, 1)}, ("3-D", "convolution"), ERR_UNSUPPORTED, "weights"),
    "loha_int_factors": ({}, {k: v.to(torch.int32) for k, v in loha_tensors().items()}, ("not floating point",), ERR_INPUT, "weights"),
    "loha_float64_factors": ({}, {k: v.double() for k, v in loha_tensors().items()}, ("float64",), ERR_UNSUPPORTED, "weights"),
    "loha_empty_rows": ({}, {**loha_tensors(), f"{P}.hada_w1_a": _t(0, 2), f"{P}.hada_w2_a": _t(0, 2)}, ("[0, 8]", "[8, 8]"), ERR_INCOMPATIBLE, "folder"),
    "loha_partner_missing": ({}, {k: v for k, v in loha_tensors().items() if not k.endswith("w2_b")}, ("lacks hada_w2_b",), ERR_INCOMPATIBLE, "folder"),
    "lokr_partner_missing": ("lokr", {f"{P}.lokr_w1": _t(2, 2), f"{P}.lokr_w2_a": _t(4, 2)}, ("lokr_w2_a for w2", "both lokr_w2_a and lokr_w2_b"), ERR_INCOMPATIBLE, "folder"),
    "lokr_whole_and_half": ("lokr", {**lokr_tensors(), f"{P}.lokr_w1_a": _t(2, 2)}, ("lokr_w1, lokr_w1_a",), ERR_INCOMPATIBLE, "folder"),
    "lokr_ranks_differ": ("lokr", {**lokr_tensors(), f"{P}.lokr_w2_b": _t(3, 4)}, ("ranks differ",), ERR_INCOMPATIBLE, "folder"),
    "lokr_kron_wrong_shape": ("lokr", {**lokr_tensors(), f"{P}.lokr_w1": _t(3, 2)}, ("[12, 8]", "[8, 8]"), ERR_INCOMPATIBLE, "folder"),
    "lokr_factor_1d": ("lokr", {**lokr_tensors(), f"{P}.lokr_w1": _t(4)}, ("lokr_w1 [4]", "2-D matrix"), ERR_INPUT, "weights"),
    "lokr_int8_factor": ("lokr", {**lokr_tensors(), f"{P}.lokr_w1": torch.ones(2, 2, dtype=torch.int8)}, ("not floating point",), ERR_INPUT, "weights"),
    "lokr_empty": ("lokr", {f"{P}.lokr_w1": _t(0, 0), f"{P}.lokr_w2": _t(8, 8)}, ("[0, 0]",), ERR_INCOMPATIBLE, "folder"),
    "ia3_wrong_length": ("ia3", {f"{P}.ia3_l": torch.ones(HID + 1, 1)}, ("ia3_l has 9 entries",), ERR_INCOMPATIBLE, "folder"),
    "ia3_empty": ("ia3", {f"{P}.ia3_l": torch.ones(0, 1)}, ("ia3_l has 0 entries",), ERR_INCOMPATIBLE, "folder"),
    "ia3_1d": ("ia3", {f"{P}.ia3_l": torch.ones(HID)}, ("ia3_l", "[8]", "[out, 1]"), ERR_INPUT, "weights"),
    "ia3_3d": ("ia3", {f"{P}.ia3_l": torch.ones(HID, 1, 1)}, ("3-D ia3_l", "convolution"), ERR_UNSUPPORTED, "weights"),
    "ia3_int": ("ia3", {f"{P}.ia3_l": torch.ones(HID, 1, dtype=torch.int32)}, ("not floating point",), ERR_INPUT, "weights"),
    "ia3_layout_contradicts_config": (ia3(feedforward_modules=["q_proj"]), {f"{P}.ia3_l": torch.ones(HID, 1)}, ("feedforward_modules says",), ERR_INPUT, "weights"),
    # Keys of two families in one file.
    "loha_with_lora_keys": ({}, {**loha_tensors(), **lora_tensors(f"{PREFIX}{V}", out=4)}, ("does not understand in a LoHa adapter", "v_proj.lora_A.weight"), ERR_UNSUPPORTED, "weights"),
    "loha_with_lokr_key": ({}, {**loha_tensors(), f"{P}.lokr_w1": _t(2, 2)}, ("does not understand in a LoHa adapter", "lokr_w1"), ERR_UNSUPPORTED, "weights"),
    "lokr_with_dora_key": ("lokr", {**lokr_tensors(), MAG: torch.ones(HID)}, ("does not understand in a LoKr adapter", "lora_magnitude_vector"), ERR_UNSUPPORTED, "weights"),
    "ia3_with_trainable_tokens": ("ia3", {f"{P}.ia3_l": torch.ones(HID, 1), DELTA: _t(2, HID)}, ("does not understand in a IA3 adapter", "trainable_tokens_delta"), ERR_UNSUPPORTED, "weights"),
    "loha_keys_with_and_without_prefix": ({}, {**loha_tensors(), f"{Q}.hada_w1_a": _t(HID, 2)}, ("two keys hold the same tensor", f"{Q}.hada_w1_a"), ERR_INPUT, "weights"),
}  # fmt: skip

_LYCORIS_DEFAULT = {"loha": loha(), "lokr": lokr(), "ia3": ia3()}

# --- trainable tokens -------------------------------------------------------------------------

TOKENS_REFUSED: dict[str, Case] = {
    "index_negative": (tokens(token_indices=[-1, 3]), {DELTA: _t(2, HID)}, ("token indices [-1]", "16 rows"), ERR_INCOMPATIBLE, "config"),
    "index_out_of_range": (tokens(token_indices=[1, VOCAB]), {DELTA: _t(2, HID)}, ("token indices [16]",), ERR_INCOMPATIBLE, "config"),
    "index_huge": (tokens(token_indices=[10**30, 1]), {DELTA: _t(2, HID)}, (str(10**30),), ERR_INCOMPATIBLE, "config"),
    "index_float": (tokens(token_indices=[1.0, 3]), {DELTA: _t(2, HID)}, ("token_indices must be a list of integers",), ERR_INPUT, "config"),
    "index_bool": (tokens(token_indices=[True, 3]), {DELTA: _t(2, HID)}, ("token_indices must be a list of integers",), ERR_INPUT, "config"),
    "index_string": (tokens(token_indices="1,3"), {DELTA: _t(2, HID)}, ("token_indices must be a list of integers",), ERR_INPUT, "config"),
    "index_repeated": (tokens(token_indices=[3, 3]), {DELTA: _t(2, HID)}, ("repeat row [3]",), ERR_INCOMPATIBLE, "config"),
    "no_token_indices": ({"peft_type": "TRAINABLE_TOKENS", "target_modules": ["embed_tokens"]}, {DELTA: _t(2, HID)}, ("token_indices is missing",), ERR_INPUT, "config"),
    "token_indices_null": (tokens(token_indices=None), {DELTA: _t(2, HID)}, ("token_indices is missing",), ERR_INPUT, "config"),
    "delta_too_many_rows": (tokens(), {DELTA: _t(3, HID)}, ("trainable_tokens_delta", "[3, 8]", "[2, 8]"), ERR_INCOMPATIBLE, "weights"),
    "delta_too_wide": (tokens(), {DELTA: _t(2, HID + 1)}, ("[2, 9]",), ERR_INCOMPATIBLE, "weights"),
    "delta_1d": (tokens(), {DELTA: _t(2 * HID)}, ("[16]", "[2, 8]"), ERR_INCOMPATIBLE, "weights"),
    "delta_int": (tokens(), {DELTA: torch.ones(2, HID, dtype=torch.int32)}, ("I32", "floating-point"), ERR_INCOMPATIBLE, "weights"),
    "delta_module_not_in_base": (tokens(), {f"{PREFIX}model.nothing.token_adapter.trainable_tokens_delta": _t(2, HID)}, ("model.nothing", "matches no tensor"), ERR_INPUT, "weights"),
    # token_indices given, rows not saved: merging would drop them silently.
    "standalone_without_delta": (tokens(), {f"{PREFIX}{E}.weight": _t(VOCAB, HID)}, ("holds no trainable_tokens_delta",), ERR_INPUT, "config"),
    "standalone_with_lora_keys": (tokens(r=2, lora_alpha=4), {DELTA: _t(2, HID), **lora_tensors()}, ("TRAINABLE_TOKENS adapter", "holds LoRA keys", "lora_A.weight"), ERR_INPUT, "weights"),
    "lora_list_without_delta": (lora(trainable_token_indices=[1, 2]), lora_tensors(), ("trainable_token_indices gives token indices for the input embedding", "holds no trainable_tokens_delta"), ERR_INPUT, "config"),
    "lora_dict_unknown_module": (lora(trainable_token_indices={"nothing": [1]}), lora_tensors(), ("'nothing'", "holds no trainable_tokens_delta"), ERR_INPUT, "config"),
    "lora_dict_misses_the_delta": (lora(trainable_token_indices={"nothing": [1]}), {**lora_tensors(), DELTA: _t(1, HID)}, ("'nothing'", "gives no token indices for it"), 1, "config"),
    "lora_delta_without_indices": (lora(), {**lora_tensors(), DELTA: _t(1, HID)}, ("gives no token indices",), ERR_UNSUPPORTED, "weights"),
    "lora_dict_of_string": (lora(trainable_token_indices={"embed_tokens": "1"}), {**lora_tensors(), DELTA: _t(1, HID)}, ("trainable_token_indices['embed_tokens']",), ERR_INPUT, "config"),
    "lora_head_index_out_of_range": (lora(trainable_token_indices={"lm_head": [2, 99]}), {**lora_tensors(), HEAD_DELTA: _t(2, HID)}, ("[99] of lm_head",), ERR_INCOMPATIBLE, "config"),
    "delta_with_and_without_token_adapter": (lora(trainable_token_indices=[1]), {**lora_tensors(), DELTA: _t(1, HID), f"{PREFIX}{E}.trainable_tokens_delta": _t(1, HID)}, ("two keys hold the same tensor",), ERR_INPUT, "weights"),
    "tokens_and_lora_on_one_embedding": (lora(trainable_token_indices=[1]), {**lora_tensors(), DELTA: _t(1, HID), f"{PREFIX}{E}.lora_embedding_A": _t(2, VOCAB), f"{PREFIX}{E}.lora_embedding_B": _t(HID, 2)}, ("adapter ", "trainable tokens replace some rows of model.embed_tokens.weight"), ERR_UNSUPPORTED, "label"),
}  # fmt: skip

# --- tensors saved whole: resized, 1-D, wrong width or dtype ---------------------------------

_MTS = lora(modules_to_save=["embed_tokens", "lm_head"])
SAVED_REFUSED: dict[str, Case] = {
    "resized_to_zero_rows": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": _t(0, HID), f"{PREFIX}lm_head.weight": _t(0, HID)}, ("[0, 8]", "[16, 8]"), ERR_INCOMPATIBLE, "folder"),
    "embedding_1d": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": _t(VOCAB * HID)}, ("[128]", "[16, 8]"), ERR_INCOMPATIBLE, "folder"),
    "embedding_3d": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": _t(VOCAB, HID, 1)}, ("[16, 8, 1]",), ERR_INCOMPATIBLE, "folder"),
    "embedding_wrong_width": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": _t(VOCAB, HID + 1)}, ("[16, 9]",), ERR_INCOMPATIBLE, "folder"),
    "embedding_int": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": torch.ones(VOCAB, HID, dtype=torch.int32)}, ("I32",), ERR_INCOMPATIBLE, "folder"),
    "only_embedding_resized": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.weight": _t(20, HID)}, ("20 rows", "lm_head.weight 16 rows", "resized the vocabulary"), ERR_INCOMPATIBLE, "label"),
    "resized_base_layer_with_stale_lora": (lora(), {**lora_tensors(), f"{PREFIX}{E}.lora_embedding_A": _t(2, VOCAB), f"{PREFIX}{E}.lora_embedding_B": _t(HID, 2), f"{PREFIX}{E}.base_layer.weight": _t(7, HID)}, ("[16, 8]", "[7, 8]"), ERR_INCOMPATIBLE, "folder"),
    # A modules_to_save wrapper's parts were not checked at all.
    "original_module_wrong_width": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.original_module.weight": _t(VOCAB, HID + 3)}, ("original_module.weight", "[16, 11]"), ERR_INCOMPATIBLE, "folder"),
    "modules_to_save_copy_1d": (_MTS, {**lora_tensors(), f"{PREFIX}{E}.modules_to_save.weight": _t(VOCAB * HID)}, ("modules_to_save.weight", "[128]"), ERR_INCOMPATIBLE, "folder"),
}  # fmt: skip

ALL_REFUSED = {
    **{f"dora-{k}": v for k, v in DORA_REFUSED.items()},
    **{f"lycoris-{k}": v for k, v in LYCORIS_REFUSED.items()},
    **{f"tokens-{k}": v for k, v in TOKENS_REFUSED.items()},
    **{f"saved-{k}": v for k, v in SAVED_REFUSED.items()},
}


@pytest.mark.parametrize("case", sorted(ALL_REFUSED))
def test_refused_with_a_clear_message(ws, case):
    config, tensors, phrases, code, names = ALL_REFUSED[case]
    if isinstance(config, str):
        config = _LYCORIS_DEFAULT[config]
    elif config == {}:
        config = loha()
    a = write(ws, case, config, tensors)
    where = {
        "config": str(a / "adapter_config.json"),
        "weights": str(a / "adapter_model.safetensors"),
        "folder": str(a),
        "label": case,
        "none": "",
    }[names]
    run = ws.merge(adapters=[a])
    ws.refused(run, where, *phrases, code=code)


TIED_REFUSED: dict[str, Case] = {
    # The original module is the new value of the shared tensor (tokens.py): a bad one
    # was written as lm_head or as the embedding itself.
    "original_module_wrong_width": (lora(modules_to_save=["embed_tokens"]), {**lora_tensors(), f"{PREFIX}{E}.original_module.weight": _t(VOCAB, HID + 3), f"{PREFIX}{E}.weight": _t(VOCAB, HID)}, ("original_module.weight", "[16, 11]"), ERR_INCOMPATIBLE, "folder"),
    "original_module_int": (lora(modules_to_save=["embed_tokens"]), {**lora_tensors(), f"{PREFIX}{E}.original_module.weight": torch.ones(VOCAB, HID, dtype=torch.int32), f"{PREFIX}{E}.weight": _t(VOCAB, HID)}, ("original_module.weight is I32",), ERR_INCOMPATIBLE, "folder"),
    "original_module_1d": (lora(modules_to_save=["embed_tokens"]), {**lora_tensors(), f"{PREFIX}{E}.original_module.weight": _t(VOCAB * HID), f"{PREFIX}{E}.weight": _t(VOCAB, HID)}, ("[128]",), ERR_INCOMPATIBLE, "folder"),
    "token_base_layer_1d": (lora(trainable_token_indices=[1]), {DELTA: _t(1, HID), f"{PREFIX}{E}.token_adapter.base_layer.weight": _t(VOCAB * HID)}, ("[128]", "[16, 8]"), ERR_INCOMPATIBLE, "folder"),
    "resized_to_zero_rows": (lora(modules_to_save=["embed_tokens"]), {**lora_tensors(), f"{PREFIX}{E}.weight": _t(0, HID)}, ("[0, 8]",), ERR_INCOMPATIBLE, "folder"),
    "dora_on_head_wrong_magnitude": (lora(target_modules=["lm_head"], use_dora=True), {f"{PREFIX}lm_head.lora_A.weight": _t(2, HID), f"{PREFIX}lm_head.lora_B.weight": _t(VOCAB, 2), f"{PREFIX}lm_head.lora_magnitude_vector": torch.ones(HID)}, ("DoRA magnitude of lm_head", "16 output channels"), ERR_INCOMPATIBLE, "weights"),
    # lm_head given other indices than the embedding: PEFT saves its own delta.
    "head_indices_differ_without_head_delta": (lora(trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}), {**lora_tensors(), DELTA: _t(1, HID)}, ("'lm_head'", "holds no trainable_tokens_delta"), ERR_INPUT, "config"),
    "ensure_weight_tying_string": (lora(ensure_weight_tying="yes", trainable_token_indices=[1]), {DELTA: _t(1, HID)}, ("ensure_weight_tying must be true or false",), ERR_INPUT, "config"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TIED_REFUSED))
def test_tied_base_refused_with_a_clear_message(ws, case):
    tie_base(ws)
    config, tensors, phrases, code, names = TIED_REFUSED[case]
    a = write(ws, case, config, tensors)
    where = {"config": a / "adapter_config.json", "weights": a / "adapter_model.safetensors"}
    run = ws.merge(adapters=[a])
    ws.refused(run, str(where.get(names, a)), *phrases, code=code)


@pytest.mark.parametrize("text", ["[1, 2]", '"LORA"', "null", "5", "true"])
def test_adapter_config_valid_json_but_not_an_object(ws, text):
    (ws.adapter / "adapter_config.json").write_text(text)
    run = ws.merge()
    ws.refused(
        run, str(ws.adapter / "adapter_config.json"), "must be a JSON object", code=ERR_INPUT
    )


# --- base configs the embeddings logic reads ---------------------------------------------------

BASE_CONFIG_REFUSED = {
    # bool("false") is True: the tie would be guessed from a typo.
    "tie_string_false": (
        {"tie_word_embeddings": "false"},
        "tie_word_embeddings must be true or false",
    ),
    "tie_string_true": (
        {"tie_word_embeddings": "true"},
        "tie_word_embeddings must be true or false",
    ),
    "tie_int": ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false"),
    "text_config_tie_string": (
        {"tie_word_embeddings": _DROP, "text_config": {"tie_word_embeddings": "no"}},
        "text_config.tie_word_embeddings must be true or false",
    ),
    # Was an internal error (iterating an int).
    "architectures_int": (
        {"tie_word_embeddings": _DROP, "architectures": 5},
        "architectures must be a list of class names",
    ),
    "architectures_list_of_int": (
        {"tie_word_embeddings": _DROP, "architectures": [5]},
        "architectures must be a list of class names",
    ),
}


@pytest.mark.parametrize("stored_head", [True, False], ids=["lm_head_stored", "tied_layout"])
@pytest.mark.parametrize("case", sorted(BASE_CONFIG_REFUSED))
def test_bad_base_config_for_embeddings(ws, case, stored_head):
    values, phrase = BASE_CONFIG_REFUSED[case]
    if not stored_head:
        tie_base(ws)
    set_base_config(ws, **values)
    emb = {
        f"{PREFIX}{E}.lora_embedding_A": _t(2, VOCAB),
        f"{PREFIX}{E}.lora_embedding_B": _t(HID, 2),
    }
    a = write(ws, case, lora(target_modules=["embed_tokens"]), emb)
    run = ws.merge(adapters=[a])
    ws.refused(run, str(ws.base / "config.json"), phrase, code=ERR_INPUT)


def test_bad_base_config_ignored_when_embeddings_untouched(ws):
    """tie_word_embeddings is only read when an adapter changes an embedding."""
    set_base_config(ws, tie_word_embeddings="false", architectures=5)
    run = ws.merge()
    assert run.code == 0, run.output


@pytest.mark.parametrize(
    "values",
    [
        {"text_config": [1]},
        {"text_config": "x"},
        {"vocab_size": "16", "text_config": {"vocab_size": "16"}},
    ],
    ids=["text_config_list", "text_config_string", "vocab_size_string"],
)
def test_odd_but_harmless_base_config_merges_resized_vocabulary(ws, values):
    """A resize sets vocab_size to the new row count, whatever was there; a text_config that
    is not an object is left alone."""
    set_base_config(ws, **values)
    new_e, new_h = _t(20, HID, seed=11), _t(20, HID, seed=12)
    a = write(
        ws,
        "resized",
        _MTS,
        {**lora_tensors(), f"{PREFIX}{E}.weight": new_e, f"{PREFIX}lm_head.weight": new_h},
    )
    run = ws.merge("--verify", adapters=[a])
    assert run.code == 0, run.output
    config = json.loads((ws.out / "config.json").read_text())
    assert torch.equal(_merged(ws, f"{E}.weight"), new_e)
    assert torch.equal(_merged(ws, "lm_head.weight"), new_h)
    if "vocab_size" in values:
        assert config["vocab_size"] == 20 and config["text_config"]["vocab_size"] == 20
    else:
        assert config["text_config"] == values["text_config"]


# --- odd but well-defined adapters merge, exactly -------------------------------------------------


def _dora_reference(ws: Workspace, tensors: dict, mag_key: str) -> torch.Tensor:
    w = _base(ws, f"{Q}.weight").double()
    v = w + 2.0 * tensors[f"{P}.lora_B.weight"].double() @ tensors[f"{P}.lora_A.weight"].double()
    m = tensors[mag_key].double().reshape(-1)
    return (m / v.norm(dim=1))[:, None] * v


@pytest.mark.parametrize(
    "magnitude, key",
    [
        (torch.rand(HID, generator=torch.Generator().manual_seed(3)), f"{MAG}.weight"),  # PEFT's
        (torch.zeros(HID), MAG),
        (-torch.rand(HID, generator=torch.Generator().manual_seed(4)), MAG),
        (torch.rand(HID, generator=torch.Generator().manual_seed(5)).half(), MAG),
        (torch.rand(HID, generator=torch.Generator().manual_seed(6)).double(), MAG),
        (torch.tensor([math.nan, math.inf] + [1.0] * (HID - 2)), MAG),
    ],
    ids=["weight_suffix", "zeros", "negative", "float16", "float64", "nan_and_inf"],
)
def test_dora_magnitudes_that_merge(ws, magnitude, key):
    """Odd magnitudes have a defined result (PEFT's too): NaN and inf reach the rows they
    scale and no others; zero gives +0.0; the rest is within rounding of float64."""
    tensors = {**lora_tensors(), key: magnitude}
    a = write(ws, "dora", lora(use_dora=True), tensors)
    # NaN/Inf in an adapter is refused unless asked for (test_nonfinite.py).
    allow = () if bool(magnitude.isfinite().all()) else ("--allow-nonfinite",)
    run = ws.merge("--verify", *allow, adapters=[a])
    assert run.code == 0, run.output
    got = _merged(ws, f"{Q}.weight").double()
    want = _dora_reference(ws, tensors, key)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    fine = want.isfinite()
    torch.testing.assert_close(got[fine], want[fine], rtol=2**-23, atol=0)
    if not magnitude.any():
        assert not torch.signbit(got).any(), "zeros are written as +0.0"


def test_lora_alpha_so_large_that_the_merge_overflows(ws):
    """Values past float32's range round to inf: refused by default (test_nonfinite.py);
    with --allow-nonfinite merged and verified (verify reported the correct infinities as
    'off by inf ulp')."""
    tensors = lora_tensors()
    a = write(ws, "huge", lora(lora_alpha=1e308), tensors)
    run = ws.merge("--verify", adapters=[a])
    assert run.code == 2 and "the merge made" in run.output and "Inf at index" in run.output
    run = ws.merge("--verify", "--allow-nonfinite", "--overwrite", adapters=[a])
    assert run.code == 0, run.output
    assert "verify" in run.stdout and "OK" in run.stdout
    got = _merged(ws, f"{Q}.weight")
    delta = tensors[f"{P}.lora_B.weight"].double() @ tensors[f"{P}.lora_A.weight"].double()
    assert torch.equal(got, torch.sign(delta).float() * math.inf)


def test_lokr_large_config_r_with_whole_factors(ws):
    """Both LoKr factors stored whole: r only sets the scale alpha / r (PEFT too)."""
    w1, w2 = _t(2, 2, seed=1), _t(4, 4, seed=2)
    a = write(ws, "lokr", lokr(r=7), {f"{P}.lokr_w1": w1, f"{P}.lokr_w2": w2})
    run = ws.merge("--verify", adapters=[a])
    assert run.code == 0, run.output
    want = _base(ws, f"{Q}.weight").double() + (4 / 7) * torch.kron(w1.double(), w2.double())
    torch.testing.assert_close(_merged(ws, f"{Q}.weight").double(), want, rtol=2**-23, atol=0)


def test_trainable_tokens_on_tied_base_with_equal_dict_indices(ws):
    """dict form naming lm_head with the embedding's own indices: PEFT saves no lm_head delta
    (the tie shares it), so none is needed; the tie is kept."""
    tie_base(ws)
    rows = _t(1, HID, seed=5)
    cfg = lora(trainable_token_indices={"embed_tokens": [1], "lm_head": [1]})
    a = write(ws, "tok", cfg, {**lora_tensors(), DELTA: rows})
    run = ws.merge("--verify", adapters=[a])
    assert run.code == 0, run.output
    merged = _merged(ws, f"{E}.weight")
    assert torch.equal(merged[1], rows[0])
    assert torch.equal(merged[2:], _base(ws, f"{E}.weight")[2:])
    assert "lm_head.weight" not in json.loads((ws.out / INDEX).read_text())["weight_map"]
    assert json.loads((ws.out / "config.json").read_text())["tie_word_embeddings"] is True


def test_standalone_trainable_tokens_on_tied_lm_head_only(ws):
    """A TRAINABLE_TOKENS adapter on lm_head of a tied base unties it: lm_head written apart."""
    tie_base(ws)
    rows = _t(1, HID, seed=6)
    cfg = tokens(target_modules=["lm_head"], token_indices=[2])
    a = write(ws, "head", cfg, {HEAD_DELTA: rows})
    run = ws.merge("--verify", adapters=[a])
    assert run.code == 0, run.output
    embed = _base(ws, f"{E}.weight")
    head = _merged(ws, "lm_head.weight")
    assert torch.equal(head[2], rows[0])
    assert torch.equal(head[[0, 1, 3]], embed[[0, 1, 3]])
    assert torch.equal(_merged(ws, f"{E}.weight"), embed)
    assert json.loads((ws.out / "config.json").read_text())["tie_word_embeddings"] is False


# --- resources, the API and the real process ---------------------------------------------------


def test_loha_rank_too_big_for_the_budget(ws):
    """LoHa's exact factors have rank r^2: r=4096 is refused by the planner, before any byte."""
    a = write(ws, "big", loha(r=4096), loha_tensors(4096))
    run = ws.merge("--max-memory", "1GiB", adapters=[a])
    ws.refused(run, f"{Q}.weight", "Raise --max-memory", code=ERR_RESOURCE)


@pytest.mark.parametrize(
    "config, tensors, exc, phrase, names",
    [
        (loha(alpha=None), loha_tensors(), InputError, "alpha must be a finite number", "config"),
        (
            lora(use_dora=True),
            {**lora_tensors(), MAG: torch.ones(HID), f"{MAG}.weight": torch.ones(HID)},
            CorruptFileError,
            "two keys hold the same tensor",
            "weights",
        ),
        (
            tokens(token_indices=[1, 99]),
            {DELTA: _t(2, HID)},
            IncompatibleAdapterError,
            "[99]",
            "config",
        ),
    ],
    ids=["loha_alpha_null", "dora_duplicate_magnitude", "token_index_out_of_range"],
)
def test_api_raises_the_error_class(ws, config, tensors, exc, phrase, names):
    a = write(ws, "api", config, tensors)
    before = _snapshot(ws.inputs)
    with pytest.raises(ShardmergeError) as info:
        shardmerge.merge(ws.base, [a], ws.out)
    # The planner wraps what it finds in PlanErrors; its exit code is the one kind's.
    found = info.value.errors if isinstance(info.value, PlanErrors) else [info.value]
    assert [type(e) for e in found] == [exc] and info.value.exit_code == exc.exit_code
    message = str(info.value)
    assert phrase in message
    assert (
        str(a / {"config": "adapter_config.json", "weights": "adapter_model.safetensors"}[names])
        in message
    )
    assert _snapshot(ws.inputs) == before
    assert_not_complete(ws.out)


@pytest.mark.parametrize(
    "what", ["loha_alpha_null", "architectures_int"], ids=["adapter", "base_config"]
)
def test_real_process_former_internal_errors(ws, what):
    """Both were exit 70 ('internal error ... TypeError'); through a real process now exit 2."""
    if what == "loha_alpha_null":
        a = write(ws, what, loha(alpha=None), loha_tensors())
        named = a / "adapter_config.json"
    else:
        tie_base(ws)
        set_base_config(ws, tie_word_embeddings=_DROP, architectures=5)
        emb = {
            f"{PREFIX}{E}.lora_embedding_A": _t(2, VOCAB),
            f"{PREFIX}{E}.lora_embedding_B": _t(HID, 2),
        }
        a = write(ws, what, lora(target_modules=["embed_tokens"]), emb)
        named = ws.base / "config.json"
    before = _snapshot(ws.inputs)
    proc = _cli("merge", str(ws.base), str(a), "-o", str(ws.out), "-q")
    assert proc.returncode == ERR_INPUT, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and str(named) in proc.stderr
    assert _snapshot(ws.inputs) == before
    assert_not_complete(ws.out)
