"""An adapter that does not fit the base: one short summary per adapter, with the likely cause.

Bases and adapters are written by hand (safetensors + JSON), so each case
shows exactly one kind of mismatch: another size of the family, another
architecture, a renamed prefix, more layers than the base has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.errors import PlanErrors, ShardmergeError

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
QUESTION = "made for this base model"


def llama_modules(layers: int, prefix: str = "model.", leaves=PROJ) -> list[str]:
    return [f"{prefix}layers.{i}.self_attn.{p}" for i in range(layers) for p in leaves]


def write_base(
    folder: Path, modules: list[str], hidden: int = 8, model_type: str = "llama"
) -> Path:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    tensors = {f"{m}.weight": torch.randn(hidden, hidden, generator=g) for m in modules}
    tensors["norm.weight"] = torch.ones(hidden)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": model_type, "hidden_size": hidden}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_adapter(folder: Path, modules: list[str], hidden: int = 8, **config) -> Path:
    g = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True)
    lora = {}
    for m in modules:
        lora[f"base_model.model.{m}.lora_A.weight"] = torch.randn(2, hidden, generator=g)
        lora[f"base_model.model.{m}.lora_B.weight"] = torch.randn(hidden, 2, generator=g)
    save_file(lora, folder / "adapter_model.safetensors")
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(PROJ), **config}
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    return folder


def refusal(base: Path, adapter: Path, tmp_path: Path) -> tuple[ShardmergeError, str]:
    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(base, [adapter], tmp_path / "out")
    errors = info.value.errors if isinstance(info.value, PlanErrors) else [info.value]
    assert len(errors) == 1, [str(e) for e in errors]
    assert errors[0].exit_code == 3
    return errors[0], str(errors[0])


def test_another_size_is_one_short_summary_with_the_dimensions(tmp_path):
    base = write_base(tmp_path / "small", llama_modules(4))
    adapter = write_adapter(tmp_path / "wide", llama_modules(4), hidden=12)
    error, text = refusal(base, adapter, tmp_path)
    assert len(text.splitlines()) <= 10, text
    assert text.startswith(f"{adapter}: 16 of its 16 modules do not fit the base {base}")
    assert "16 have another shape" in text and "and 13 more" in text
    assert text.count("model.layers.") == 3  # the first few examples only
    assert "another size of the same model family" in text
    assert "12 where the base has 8" in text
    assert text.count(QUESTION) == 1


def test_another_architecture_names_the_missing_layer_names(tmp_path):
    gpt2 = [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")]
    base = write_base(tmp_path / "gpt2", gpt2, model_type="gpt2")
    adapter = write_adapter(tmp_path / "llama_lora", llama_modules(2))
    _, text = refusal(base, adapter, tmp_path)
    assert "(model_type gpt2)" in text and "8 match no tensor of the base" in text
    assert "another architecture or model type" in text
    assert "k_proj, o_proj, q_proj, v_proj" in text and "c_attn, c_proj" in text
    assert text.count(QUESTION) == 1
    assert len(text.splitlines()) <= 10


def test_renamed_prefix_is_said_and_not_asked_about(tmp_path):
    base = write_base(tmp_path / "trunk", llama_modules(2, prefix="trunk.stack."))
    adapter = write_adapter(tmp_path / "lora", llama_modules(2))
    error, text = refusal(base, adapter, tmp_path)
    assert "renamed prefixes" in text
    assert "the adapter's model. is trunk.stack. in the base" in text
    assert QUESTION not in text
    assert "Rename the adapter's keys (model. -> trunk.stack.)" in (error.hint or "")


def test_more_layers_than_the_base_counts_those_that_fit(tmp_path):
    base = write_base(tmp_path / "two", llama_modules(2))
    adapter = write_adapter(tmp_path / "four", llama_modules(4))
    _, text = refusal(base, adapter, tmp_path)
    assert "8 of its 16 modules do not fit" in text
    assert "other layer or expert numbers" in text and "numbers 0-1" in text
    assert text.count(QUESTION) == 1


def test_the_adapter_config_names_another_base_as_evidence(tmp_path):
    base = write_base(tmp_path / "Llama-3.2-1B", llama_modules(2))
    named = write_adapter(
        tmp_path / "a", llama_modules(2), hidden=12, base_model_name_or_path="org/Llama-3.2-3B"
    )
    _, text = refusal(base, named, tmp_path)
    assert "says it was trained on 'org/Llama-3.2-3B'" in text
    same = write_adapter(
        tmp_path / "b", llama_modules(2), hidden=12, base_model_name_or_path="org/Llama-3.2-1B"
    )
    _, text = refusal(base, same, tmp_path)
    assert (
        "says it was trained on" not in text
    )  # the config names this base: no evidence against it


def test_one_adapter_of_two_is_summarised_alone(tmp_path):
    base = write_base(tmp_path / "base", llama_modules(2))
    good = write_adapter(tmp_path / "good", llama_modules(2))
    bad = write_adapter(tmp_path / "bad", llama_modules(2), hidden=12)
    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(base, [good, bad], tmp_path / "out")
    text = str(info.value)
    assert f"{bad}: 8 of its 8 modules" in text and str(good) not in text


def test_an_inconsistent_adapter_is_not_asked_about_its_base(tmp_path):
    """lora_A and lora_B of different ranks fit no base: a re-save is the advice, not the question."""
    base = write_base(tmp_path / "base", llama_modules(1))
    adapter = write_adapter(tmp_path / "lora", llama_modules(1))
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = f"base_model.model.{llama_modules(1)[0]}.lora_B.weight"
    tensors[key] = torch.zeros(8, 3)
    save_file(tensors, path)
    error, text = refusal(base, adapter, tmp_path)
    assert "lora_A has rank 2 but lora_B has 3" in text
    assert QUESTION not in str(error) and "re-save the adapter" in (error.hint or "")


def test_many_other_problems_are_summarised_without_a_module_count(tmp_path):
    base = write_base(tmp_path / "base", llama_modules(2))
    adapter = write_adapter(tmp_path / "lora", llama_modules(2))
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    for m in llama_modules(2):  # every module's B of another rank than its A
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.zeros(8, 3)
    save_file(tensors, path)
    error, text = refusal(base, adapter, tmp_path)
    assert text.startswith(f"{adapter}: it does not fit the base {base} (model_type llama):")
    assert "8 other problems: " in text and "and 5 more" in text
    assert QUESTION not in str(error) and len(text.splitlines()) <= 10
