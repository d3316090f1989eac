"""transformers' checkpoint conversion rules as shardmerge reads them, and its built-in snapshot.

The snapshot (shardmerge/arch/conversion_rules.json) is what a merge uses
without transformers: it must equal the pinned transformers' rules, so a
transformers that renames or fuses a model type the snapshot lacks fails
here. The rules collected for a config.json must be the ones transformers
collects for the model it builds, and every expert conversion transformers
ships is either mapped or refused by name.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardmerge.arch import rules as rules_mod
from shardmerge.arch.experts import TRANSPOSED
from shardmerge.arch.keymap import build_key_map, converter_layout
from shardmerge.arch.rules import Rule, builtin_table, live_table, rules_for, translate

# Expert conversions shardmerge cannot fold a delta back through (model type -> operation).
REFUSED = {
    "ernie4_5_vl_moe": "ErnieFuseAndSplitTextVisionExperts",
    "inkling2_text": "Interleave",
    "inkling_mm_model": "Interleave",
}


def test_snapshot_equals_the_pinned_transformers_rules():
    import transformers

    assert transformers.__version__ == "5.23.0"
    live, snapshot = live_table(), builtin_table()
    missing = sorted(set(live) - set(snapshot))
    differ = sorted(n for n in set(live) & set(snapshot) if live[n] != snapshot[n])
    assert not missing and not differ and set(snapshot) == set(live), (
        f"transformers renames model types the snapshot lacks ({missing}) or differently "
        f"({differ}): run scripts/conversion_rules.py"
    )


def test_every_expert_conversion_is_mapped_or_refused_by_name():
    refused = {}
    for name, rules in builtin_table().items():
        for rule in rules:
            about_experts = re.search("expert", rule.pattern + " ".join(rule.targets))
            if rule.converts and about_experts and converter_layout(rule) == "refused":
                refused[name] = rule.ops[0][0]
    assert refused == REFUSED


def test_refused_conversion_names_the_operation():
    (rule,) = [r for r in builtin_table()["inkling2_text"] if "w13_weight(" in r.pattern]
    names = ["model.layers.0.mlp.experts.w13_weight", "model.layers.0.mlp.experts.w2_weight"]
    km = build_key_map(names, [rule])
    origin = km.origin("model.layers.0.mlp.experts.gate_up_proj")
    assert origin.kind == "refused" and "Interleave(dim=1)" in origin.reason
    assert origin.disk == names[0] and km.origin(names[1]).kind == "tensor"


def test_transposed_experts_table_matches_transformers_sources():
    """Model types whose experts hold parameters [E, in, out] (is_transposed=True)."""
    import transformers

    models = Path(transformers.__file__).parent / "models"
    found = {
        p.parent.name
        for p in models.glob("*/modeling_*.py")
        if "is_transposed=True" in p.read_text(encoding="utf-8")
    }
    assert found and found <= TRANSPOSED
    assert TRANSPOSED - found == {"aria_text"}  # aria's text model, in aria's module


def test_mixtral_per_expert_names_stack_in_part_order():
    names = [
        f"model.layers.0.block_sparse_moe.experts.{e}.{p}.weight"
        for e in range(2)
        for p in ("w1", "w2", "w3")
    ] + ["model.layers.0.self_attn.q_proj.weight"]
    km = build_key_map(names, rules_for({"model_type": "mixtral"}))
    up = km.origin("model.layers.0.mlp.experts.gate_up_proj")
    assert (up.kind, up.module, up.parts) == (
        "experts", "model.layers.0.block_sparse_moe.experts", ("w1", "w3"),
    )  # fmt: skip
    assert km.origin("model.layers.0.mlp.experts.down_proj").parts == ("w2",)
    assert km.origin("layers.0.self_attn.q_proj.weight").disk == names[-1]


# Architectures whose collected rules are compared with transformers' own (a model built on
# the meta device from the default config): VLMs with nested sub-models, and MoE families.
ARCHITECTURES = [
    ("llava", "LlavaForConditionalGeneration"),
    ("gemma3", "Gemma3ForConditionalGeneration"),
    ("mllama", "MllamaForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("mistral3", "Mistral3ForConditionalGeneration"),
    ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    ("nemotron_h", "NemotronHForCausalLM"),
    ("granitemoehybrid", "GraniteMoeHybridForCausalLM"),
    ("deepseek_v4", "DeepseekV4ForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("step3p7", "Step3p7ForConditionalGeneration"),
    ("kimi_k25", "Kimi_K25ForConditionalGeneration"),
    ("molmo2", "Molmo2ForConditionalGeneration"),
    ("gemma3_text", "Gemma3ForCausalLM"),
    ("dots3_note_text", "Dots3NoteForCausalLM"),
]


@pytest.mark.parametrize(("model_type", "arch"), ARCHITECTURES)
def test_collected_rules_are_the_ones_transformers_collects(model_type, arch):
    import transformers
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping

    config = AutoConfig.for_model(model_type)
    config.architectures = [arch]
    with torch.device("meta"):
        model = getattr(transformers, arch)._from_config(config)
    want = [
        Rule(r.pattern, r.targets, r.ops, r.group, r.offset, t.scope_prefix)
        for t in get_model_conversion_mapping(model)
        for r in [translate(t)]
    ]
    assert rules_for(config.to_dict(), names=list(model.state_dict())) == want


def test_without_transformers_the_snapshot_is_used(tmp_path, monkeypatch):
    """A plan in a process where transformers cannot be imported maps NemotronH's names
    (``backbone.`` stored, ``model.`` loaded) from the snapshot."""
    monkeypatch.setattr(rules_mod, "live_table", lambda: None)
    rules_mod.rule_table.cache_clear()
    try:
        names = ["backbone.layers.0.mixer.q_proj.weight", "backbone.embeddings.weight"]
        km = build_key_map(names, rules_for({"model_type": "nemotron_h"}))
        assert km.origin("model.layers.0.mixer.q_proj.weight").disk == names[0]
    finally:
        rules_mod.rule_table.cache_clear()
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from shardmerge.arch.rules import rule_table, builtin_table\n"
        "assert rule_table() == builtin_table()\n"
        "print('snapshot', len(rule_table()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("snapshot"), done.stderr


def _folder(path: Path, config: dict, tensors: dict[str, torch.Tensor], name: str) -> Path:
    import json

    from safetensors.torch import save_file

    path.mkdir()
    (path / ("config.json" if name == "model" else "adapter_config.json")).write_text(
        json.dumps(config)
    )
    save_file(tensors, str(path / f"{name}.safetensors"), metadata={"format": "pt"})
    return path


def _plan_error(base: Path, adapter: Path, out: Path) -> str:
    import shardmerge
    from shardmerge.errors import ShardmergeError

    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(base, [adapter], out)
    return str(info.value)


def test_lora_on_interleaved_experts_is_refused_by_name(tmp_path):
    """Inkling2 stores gate and up interleaved (w13_weight): LoRA on gate_up_proj is refused."""
    e, i, h, r = 2, 8, 16, 2
    base = _folder(
        tmp_path / "base",
        {"model_type": "inkling2_text", "architectures": ["Inkling2ForCausalLM"]},
        {
            "model.layers.0.mlp.experts.w13_weight": torch.zeros(e, 2 * i, h),
            "model.layers.0.mlp.experts.w2_weight": torch.zeros(e, h, i),
        },
        "model",
    )
    prefix = "base_model.model.model.layers.0.mlp.experts"
    adapter = _folder(
        tmp_path / "adapter",
        {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": [],
         "target_parameters": ["mlp.experts.gate_up_proj"]},
        {f"{prefix}.lora_A.weight": torch.ones(r * e, h),
         f"{prefix}.lora_B.weight": torch.ones(2 * i, r * e)},
        "adapter_model",
    )  # fmt: skip
    text = _plan_error(base, adapter, tmp_path / "out")
    assert "model.layers.0.mlp.experts.gate_up_proj" in text and "Interleave(dim=1)" in text
    assert "w13_weight" in text and not (tmp_path / "out").exists()


def test_lora_on_a_split_fused_projection_is_refused_by_name(tmp_path):
    """Nomic-BERT stores attn.Wqkv, which transformers chunks into q/k/v_proj at load."""
    h, r = 16, 2
    base = _folder(
        tmp_path / "base",
        {"model_type": "nomic_bert"},
        {"encoder.layers.0.attn.Wqkv.weight": torch.zeros(3 * h, h),
         "encoder.layers.0.attn.out_proj.weight": torch.zeros(h, h)},
        "model",
    )  # fmt: skip
    adapter = _folder(
        tmp_path / "adapter",
        {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["k_proj", "o_proj"]},
        {"base_model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(r, h),
         "base_model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.ones(h, r),
         "base_model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.ones(r, h),
         "base_model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.ones(h, r)},
        "adapter_model",
    )  # fmt: skip
    text = _plan_error(base, adapter, tmp_path / "out")
    assert "builds layers.0.self_attn.k_proj.weight from" in text and "Chunk(dim=0)" in text
    assert "attn.Wqkv" in text and "o_proj" not in text  # the renamed out_proj matched


def test_a_damaged_snapshot_is_a_clear_error(tmp_path, monkeypatch):
    from shardmerge.errors import CorruptFileError

    broken = tmp_path / "conversion_rules.json"
    broken.write_text('{"mixtral": [' * 100)
    monkeypatch.setattr(rules_mod, "TABLE", broken)
    rules_mod.builtin_table.cache_clear()
    try:
        with pytest.raises(CorruptFileError, match="conversion_rules.json"):
            builtin_table()
    finally:
        rules_mod.builtin_table.cache_clear()


def _sample_names(pattern: str, expert: int) -> list[str]:
    """Stored names a converter's source branches match, for one expert (under a layer)."""
    names = []
    for branch in re.findall(r"\(\?P<g\d+>(.*?)\)(?=\||$)", pattern):
        plain = branch.replace("(?!\\w)", "").replace("..*\\.", f".{expert}.").replace("\\.", ".")
        names.append("model.layers.0." + plain.lstrip(".^"))
    return names


def test_every_expert_stacking_in_the_table_maps_to_one_fused_parameter():
    """For each model type whose rules stack per-expert tensors, stored names of two experts
    map to fused parameters whose parts follow the rule's order."""
    checked = set()
    table = builtin_table()
    for model_type, rules in table.items():
        for rule in rules:
            if not rule.converts or converter_layout(rule) != "experts":
                continue
            names = [n for e in range(2) for n in _sample_names(rule.pattern, e)]
            km = build_key_map(names, [r for r in rules_for({"model_type": model_type}, table)])
            stacks = [o for o in km.origins.values() if o.kind == "experts"]
            assert len(stacks) == 1, (model_type, rule.pattern, names, km.origins)
            assert len(stacks[0].parts) == len(_sample_names(rule.pattern, 0)), model_type
            checked.add(model_type)
    assert {"mixtral", "qwen2_moe", "jamba", "lfm2_moe", "nemotron_h", "deepseek_v4"} <= checked
    assert len(checked) > 40
