"""Embeddings: trainable tokens, resized vocabularies, and tied input/output embeddings.

The oracle here is the *unmerged* PeftModel: the merged model must compute
what it computes. On a base that ties embed_tokens and lm_head, PEFT's own
merge_and_unload() adds both modules' deltas into the one shared tensor (and
keeps the tie), so its merged logits differ from its unmerged ones; shardmerge
writes lm_head apart and sets tie_word_embeddings false when the two diverge,
and keeps the tie when they do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import (
    load_model,
    logits_of,
    make_base,
    read_adapter,
    read_index,
    read_raw,
    read_tensors,
    shard_files,
)

import shardmerge
from shardmerge.errors import ShardmergeError
from shardmerge.jobs import AdapterSpec, MergeJob
from shardmerge.verifier.check import verify

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB = 256


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Llama with tie_word_embeddings=True in float32: the checkpoint stores no lm_head."""
    return make_base(tmp_path_factory.mktemp("tied") / "base", "llama", tie=True, seed=11)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("untied") / "base", "llama", tie=False, seed=12)


def _train(base: Path, folder: Path, config, *, resize: int | None = None, seed: int = 3) -> Path:
    """A PEFT adapter whose every trainable tensor was moved away from its initial value."""
    from peft import get_peft_model

    model = load_model(base, torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if "lora_B" in name else 0.05))
    pm.save_pretrained(folder)
    return folder


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


def _peft_model(base: Path, adapter: Path, resize: int | None = None):
    from peft import PeftModel

    model = load_model(base, torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _merge_and_check(base, adapters, out, *, resize=None, **kwargs) -> dict:
    """Merge, check verify() and the logits against the unmerged PeftModel; return config.json."""
    adapters = adapters if isinstance(adapters, list) else [adapters]
    shardmerge.merge(base, adapters, out, **kwargs)
    report = verify(out, base, adapters)
    assert report.ok, report.summary()
    if len(adapters) == 1:
        want = logits_of(_peft_model(base, adapters[0], resize))
        got = logits_of(load_model(out, torch.float32))
        assert_logits_close(got, want)
    return json.loads((Path(out) / "config.json").read_text())


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 bases: merged and unmerged differ only by float32 rounding (~1e-7 of the largest logit)."""
    err = float((got - want).abs().max())
    assert err <= 1e-5 + 2e-6 * float(want.abs().max()), f"logits differ by {err:.3g}"


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)).all(dim=1)


# --------------------------------------------------------------------------- trainable tokens


def test_trainable_tokens_list_replace_rows_exactly(untied, tmp_path):
    indices = [3, 17, 200]
    adapter = _train(
        untied, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=indices)
    )
    _, saved = read_adapter(adapter)
    delta = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    config = _merge_and_check(untied, adapter, tmp_path / "out")
    base, out = read_tensors(untied), read_tensors(tmp_path / "out")
    # The saved values are the new rows themselves (index_copy), not differences.
    assert torch.equal(out[EMBED][indices], delta)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[indices] = False
    assert _rows_equal(out[EMBED], base[EMBED])[others].all()
    assert not _rows_equal(out[EMBED], base[EMBED])[indices].any()
    assert torch.equal(out[HEAD], base[HEAD]) and config["tie_word_embeddings"] is False
    assert not torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )  # the LoRA beside the tokens is merged too
    # PEFT's merge is a plain copy of these rows as well: same bytes.
    peft_merged = _peft_model(untied, adapter).merge_and_unload().state_dict()
    assert torch.equal(out[EMBED], peft_merged[EMBED])


def test_trainable_tokens_dict_form_per_module(untied, tmp_path):
    adapter = _train(
        untied,
        tmp_path / "a",
        _lora(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [5, 9, 250]}),
    )  # fmt: skip
    _merge_and_check(untied, adapter, tmp_path / "out")
    base, out = read_tensors(untied), read_tensors(tmp_path / "out")
    assert (~_rows_equal(out[EMBED], base[EMBED])).nonzero().flatten().tolist() == [1, 2]
    assert (~_rows_equal(out[HEAD], base[HEAD])).nonzero().flatten().tolist() == [5, 9, 250]


def test_trainable_tokens_bf16_base_one_rounding(tmp_path):
    """float32 rows into a bfloat16 base: rounded once to the output dtype, or kept exact."""
    base = make_base(tmp_path / "base", "llama", dtype=torch.bfloat16, seed=13)
    adapter = _train(
        base, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=[7, 8])
    )
    _, saved = read_adapter(adapter)
    delta = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert delta.dtype == torch.float32
    shardmerge.merge(base, [adapter], tmp_path / "bf16")
    shardmerge.merge(base, [adapter], tmp_path / "f32", dtype="float32")
    for out in ("bf16", "f32"):
        assert verify(tmp_path / out, base, [adapter]).ok
    b, bf16, f32 = (
        read_tensors(base),
        read_tensors(tmp_path / "bf16"),
        read_tensors(tmp_path / "f32"),
    )
    assert torch.equal(bf16[EMBED][[7, 8]], delta.to(torch.bfloat16))
    assert torch.equal(f32[EMBED][[7, 8]], delta)  # no detour through bfloat16
    assert torch.equal(f32[EMBED][9:], b[EMBED][9:].float())
    assert (
        read_raw(tmp_path / "bf16")[EMBED].data[9 * 128 :] == read_raw(base)[EMBED].data[9 * 128 :]
    )


def test_trainable_tokens_on_tied_base_keep_the_tie(tied, tmp_path):
    """PEFT applies the embedding's tokens to the tied lm_head too: one tensor, tie kept."""
    adapter = _train(
        tied, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=[4, 99])
    )
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is True
    out = read_tensors(tmp_path / "out")
    assert HEAD not in out
    assert not _rows_equal(out[EMBED], read_tensors(tied)[EMBED])[[4, 99]].any()


def test_trainable_tokens_method_on_tied_base(tied, tmp_path):
    from peft import TrainableTokensConfig

    adapter = _train(tied, tmp_path / "a", TrainableTokensConfig(token_indices=[10, 11, 12]))
    _, saved = read_adapter(adapter)
    assert any(k.startswith("base_model.model.lm_head.") for k in saved)  # a tied copy
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is True and HEAD not in read_tensors(tmp_path / "out")


@pytest.mark.parametrize(
    "indices",
    [{"embed_tokens": [1, 5], "lm_head": [2, 5]}, {"lm_head": [2, 5]}],
    ids=["different_indices", "lm_head_only"],
)
def test_trainable_tokens_on_tied_base_diverging_untie(tied, tmp_path, indices):
    adapter = _train(
        tied, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=indices)
    )
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    base, out = read_tensors(tied), read_tensors(tmp_path / "out")
    changed = (~_rows_equal(out[HEAD], base[EMBED])).nonzero().flatten().tolist()
    assert changed == [2, 5]  # lm_head: the embedding's values with its own rows
    embed_changed = (~_rows_equal(out[EMBED], base[EMBED])).nonzero().flatten().tolist()
    assert embed_changed == indices.get("embed_tokens", [])


def test_overlapping_trainable_tokens_of_two_adapters_refused(untied, tmp_path):
    a1 = _train(
        untied, tmp_path / "a1", _lora(target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )
    a2 = _train(
        untied, tmp_path / "a2", _lora(target_modules=["k_proj"], trainable_token_indices=[2, 3])
    )
    with pytest.raises(ShardmergeError, match=r"both replace row \[2\]"):
        shardmerge.merge(untied, [a1, a2], tmp_path / "out")
    a3 = _train(
        untied, tmp_path / "a3", _lora(target_modules=["k_proj"], trainable_token_indices=[30])
    )
    shardmerge.merge(untied, [a1, a3], tmp_path / "out2")  # disjoint rows: both applied
    assert verify(tmp_path / "out2", untied, [a1, a3]).ok


def test_trainable_token_index_outside_vocabulary_refused(untied, tmp_path):
    adapter = _train(
        untied, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["trainable_token_indices"] = [1, VOCAB]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ShardmergeError, match=r"token indices \[256\].*outside.*256 rows"):
        shardmerge.merge(untied, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- resized vocabulary


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_modules_to_save_after_resize(untied, tied, tmp_path, tie):
    base = tied if tie else untied
    adapter = _train(
        base, tmp_path / "a", _lora(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), resize=260
    )  # fmt: skip
    config = _merge_and_check(base, adapter, tmp_path / "out", resize=260)
    out = read_tensors(tmp_path / "out")
    assert out[EMBED].shape == (260, 64) and out[HEAD].shape == (260, 64)
    assert config["vocab_size"] == 260
    _, saved = read_adapter(adapter)
    assert torch.equal(out[EMBED], saved["base_model.model.model.embed_tokens.weight"])
    assert torch.equal(out[HEAD], saved["base_model.model.lm_head.weight"])
    # Two trained copies on a tied base: they differ, so the tie goes.
    assert config["tie_word_embeddings"] is False
    index_or_header = read_raw(tmp_path / "out")
    assert index_or_header[HEAD].shape == (260, 64)


def test_resized_vocabulary_saved_with_plain_lora_keeps_tie(tied, tmp_path):
    """PEFT saves the resized embedding when training changed the vocabulary; tie kept."""
    adapter = _train(tied, tmp_path / "a", _lora(target_modules=["q_proj"], trainable_token_indices=[256, 259]), resize=260)  # fmt: skip
    config = _merge_and_check(tied, adapter, tmp_path / "out", resize=260)
    assert config["vocab_size"] == 260 and config["tie_word_embeddings"] is True
    assert read_tensors(tmp_path / "out")[EMBED].shape == (260, 64)


def test_embedding_lora_with_resized_base_layer(tied, untied, tmp_path):
    adapter = _train(
        tied, tmp_path / "a", _lora(target_modules=["embed_tokens", "q_proj"]), resize=260
    )
    _, saved = read_adapter(adapter)
    assert saved["base_model.model.model.embed_tokens.base_layer.weight"].shape == (260, 64)
    config = _merge_and_check(tied, adapter, tmp_path / "out", resize=260)
    out = read_tensors(tmp_path / "out")
    # lm_head computes with the resized embedding without the embedding's LoRA.
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 260
    assert torch.equal(out[HEAD], saved["base_model.model.model.embed_tokens.base_layer.weight"])
    # On an untied base the adapter cannot give lm_head's new rows: refused, nothing written.
    adapter2 = _train(untied, tmp_path / "a2", _lora(target_modules=["embed_tokens"]), resize=260)
    with pytest.raises(ShardmergeError, match="260 rows and lm_head.weight 256 rows"):
        shardmerge.merge(untied, [adapter2], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------- tied embeddings


@pytest.mark.parametrize(
    "targets",
    [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]],
    ids=["embed_only", "lm_head_only", "both"],
)
def test_tied_base_lora_on_embeddings_unties(tied, tmp_path, targets):
    adapter = _train(tied, tmp_path / "a", _lora(target_modules=targets + ["v_proj"]))
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    base, out = read_tensors(tied), read_tensors(tmp_path / "out")
    assert torch.equal(out[EMBED], base[EMBED]) == ("embed_tokens" not in targets)
    assert torch.equal(out[HEAD], base[EMBED]) == ("lm_head" not in targets)


def test_peft_merge_and_unload_is_wrong_on_tied_embeddings(tied, tmp_path):
    """Documents the PEFT bug shardmerge avoids: merged != unmerged for LoRA on a tied embedding."""
    adapter = _train(tied, tmp_path / "a", _lora(target_modules=["embed_tokens"]))
    unmerged = logits_of(_peft_model(tied, adapter))
    peft_merged = logits_of(_peft_model(tied, adapter).merge_and_unload())
    assert (peft_merged - unmerged).abs().max() > 1e-2
    shardmerge.merge(tied, [adapter], tmp_path / "out")
    assert_logits_close(logits_of(load_model(tmp_path / "out", torch.float32)), unmerged)


def test_tie_kept_when_nothing_diverges(tied, tmp_path):
    adapter = _train(tied, tmp_path / "a", _lora(target_modules=["q_proj", "v_proj"]))
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config == json.loads((tied / "config.json").read_text())
    base, out = read_raw(tied), read_raw(tmp_path / "out")
    assert HEAD not in out and out[EMBED].data == base[EMBED].data


@pytest.mark.parametrize(
    "kwargs",
    [dict(target_modules=["embed_tokens", "lm_head"]), dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])],
    ids=["lora", "modules_to_save"],
)  # fmt: skip
def test_ensure_weight_tying_keeps_the_tie(tied, tmp_path, kwargs):
    adapter = _train(tied, tmp_path / "a", _lora(ensure_weight_tying=True, **kwargs))
    config = _merge_and_check(tied, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is True
    out = read_tensors(tmp_path / "out")
    assert HEAD not in out and not torch.equal(out[EMBED], read_tensors(tied)[EMBED])


def test_untied_lm_head_goes_into_the_embeddings_shard(tmp_path):
    base = make_base(tmp_path / "base", "llama", tie=True, seed=14, max_shard_size="50KB")
    assert len(shard_files(base)) >= 3
    adapter = _train(base, tmp_path / "a", _lora(target_modules=["lm_head", "q_proj"]))
    _merge_and_check(base, adapter, tmp_path / "out")
    index, base_index = read_index(tmp_path / "out"), read_index(base)
    assert index["weight_map"][HEAD] == base_index["weight_map"][EMBED]
    assert {k: v for k, v in index["weight_map"].items() if k != HEAD} == base_index["weight_map"]
    raw = read_raw(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(len(t.data) for t in raw.values())
    names = list(read_raw(tmp_path / "out").keys())
    assert names.index(HEAD) == names.index(EMBED) + 1  # written right after it


def test_separate_outputs_with_and_without_untied_lm_head(tied, tmp_path):
    """merge --separate: one output unties (an added tensor), the other does not."""
    a1 = _train(tied, tmp_path / "emb", _lora(target_modules=["embed_tokens"]))
    a2 = _train(tied, tmp_path / "qv", _lora(target_modules=["q_proj"]))
    job = MergeJob(str(tied), (AdapterSpec(str(a1)), AdapterSpec(str(a2))), str(tmp_path / "sep"), separate=True, workers=0)  # fmt: skip
    shardmerge.run_job(job)
    for adapter, out in ((a1, tmp_path / "sep" / "emb"), (a2, tmp_path / "sep" / "qv")):
        assert verify(out, tied, [adapter]).ok
        want = logits_of(_peft_model(tied, adapter))
        assert_logits_close(logits_of(load_model(out, torch.float32)), want)
    assert HEAD in read_tensors(tmp_path / "sep" / "emb")
    assert HEAD not in read_tensors(tmp_path / "sep" / "qv")


def test_tied_base_that_also_stores_lm_head(tmp_path):
    """A tied base whose file holds lm_head too (equal bytes, as old .bin exports do)."""
    from safetensors.torch import load_file, save_file

    base = make_base(tmp_path / "base", "llama", tie=True, seed=15)
    tensors = load_file(str(base / "model.safetensors"))
    tensors[HEAD] = tensors[EMBED].clone()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = _train(base, tmp_path / "a", _lora(target_modules=["embed_tokens"]))
    config = _merge_and_check(base, adapter, tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    raw_base, raw_out = read_raw(base), read_raw(tmp_path / "out")
    assert raw_out[HEAD].data == raw_base[HEAD].data and raw_out[EMBED].data != raw_base[EMBED].data
