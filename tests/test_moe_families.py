"""LoRA on the MoE families whose checkpoints transformers renames or fuses at load.

One tiny model per family, saved as transformers saves it (its original
checkpoint layout), with PEFT LoRA on the expert parameters
(``target_parameters``) and on attention: GraniteMoE's fused
``block_sparse_moe.input_linear`` (renamed to ``experts.gate_up_proj``),
Jamba's and LFM2-MoE's per-expert ``feed_forward.experts.N.*``, NemotronH's
``backbone.`` prefix (``model.`` once loaded) with non-gated experts, DeepSeek-V4's and Kimi-Linear's renamed attention. The
merge is compared, loaded by transformers, with PEFT's merge_and_unload and
with the float64 reference rounded once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from builders import assert_close_to_oracle, assert_matches_reference, read_raw
from moe_oracle import build_base, loaded_state, make_lora, param_reference, peft_merged

import shardmerge

EXPERTS = 4
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, hidden_size=32)


def _config(model_type: str):
    from transformers import AutoConfig

    granite = dict(_ATTN, intermediate_size=32, num_hidden_layers=2, num_local_experts=EXPERTS)
    kwargs = {
        "granitemoe": granite,
        "granitemoeshared": dict(granite, shared_intermediate_size=16),
        "granitemoehybrid": dict(
            granite, shared_intermediate_size=16, layer_types=["mamba", "attention"],
            mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        ),
        "jamba": dict(
            _ATTN, intermediate_size=32, num_hidden_layers=2, num_experts=EXPERTS,
            expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
            attn_layer_offset=1, mamba_d_state=8, mamba_expand=1,
        ),
        "lfm2_moe": dict(
            _ATTN, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
            num_experts=EXPERTS, num_dense_layers=0, layer_types=["conv", "full_attention"],
        ),
        "nemotron_h": dict(
            _ATTN, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
            n_routed_experts=EXPERTS, hybrid_override_pattern="M*E", mamba_num_heads=4,
            mamba_head_dim=8, ssm_state_size=8, n_groups=1, head_dim=8,
            moe_shared_expert_intermediate_size=16,
        ),
        "deepseek_v4": dict(
            _ATTN, num_hidden_layers=2, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
            o_lora_rank=16, o_groups=2, index_n_heads=2, index_head_dim=16, index_topk=4,
            qk_rope_head_dim=8, moe_intermediate_size=16, n_routed_experts=EXPERTS, hc_mult=2,
            sliding_window=8, num_nextn_predict_layers=0,
        ),
        "kimi_linear": dict(
            _ATTN, num_hidden_layers=2, num_key_value_heads=4, pad_token_id=0, bos_token_id=0,
            eos_token_id=1, num_experts=EXPERTS, num_experts_per_token=2, kv_lora_rank=16,
            qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, linear_head_dim=8,
            linear_num_heads=4, head_dim=8, moe_intermediate_size=16, intermediate_size=32,
        ),
    }[model_type]  # fmt: skip
    return AutoConfig.for_model(model_type, num_experts_per_tok=2, **kwargs)


# model type -> (the experts module's path in a layer, its expert parameters, Linear targets)
FAMILIES = {
    "granitemoe": ("block_sparse_moe.experts", ("gate_up_proj", "down_proj"), ["q_proj"]),
    "granitemoeshared": ("block_sparse_moe.experts", ("gate_up_proj", "down_proj"), ["q_proj"]),
    "granitemoehybrid": ("block_sparse_moe.experts", ("gate_up_proj", "down_proj"), ["q_proj"]),
    "jamba": ("feed_forward.experts", ("gate_up_proj", "down_proj"), ["q_proj"]),
    "lfm2_moe": ("feed_forward.experts", ("gate_up_proj", "down_proj"), ["q_proj"]),
    "nemotron_h": ("mixer.experts", ("up_proj", "down_proj"), ["q_proj"]),
    # Attention renamed at load: DeepSeek-V4's attn.wq_a is self_attn.q_a_proj, Kimi-Linear's
    # self_attn.f_a_proj is self_attn.forget_gate.f_a_proj.
    "deepseek_v4": ("mlp.experts", ("gate_up_proj", "down_proj"), ["q_a_proj"]),
    "kimi_linear": ("mlp.experts", ("gate_up_proj", "down_proj"), ["q_proj", "f_a_proj"]),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    base = build_base(root / "base", _config(model_type), dtype=torch.bfloat16, seed=3)
    experts, params, linear = FAMILIES[model_type]
    adapter = make_lora(
        base, root / "adapter", seed=4, target_modules=linear,
        target_parameters=[f"{experts}.{p}" for p in params],
    )  # fmt: skip
    return model_type, root, base, adapter


def test_family_merges_as_peft_does(family, tmp_path):
    model_type, root, base, adapter = family
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out)
    ref = param_reference(base, adapter, torch.bfloat16)
    linear = FAMILIES[model_type][2]
    assert any(".experts." in n for n in ref.touched)
    assert all(any(f"{m}.weight" in n for n in ref.touched) for m in linear)
    got = loaded_state(out)
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged(base, adapter), ref)
    # The output keeps the base's layout: same names, shapes and dtypes.
    got_raw, base_raw = read_raw(out), read_raw(base)
    assert {n: (t.dtype, t.shape) for n, t in got_raw.items()} == {
        n: (t.dtype, t.shape) for n, t in base_raw.items()
    }
    changed = {n for n in base_raw if got_raw[n].data != base_raw[n].data}
    # Only expert tensors (per expert, or GraniteMoE's fused input/output_linear) and the
    # Linear targets, by their stored names.
    touched = re.compile(
        r"\.experts\.\d+\.|block_sparse_moe\.(input|output)_linear|q_proj|wq_a|f_a_proj"
    )
    assert changed and all(touched.search(n) for n in changed), changed


def test_family_counts_and_verify(family, tmp_path):
    model_type, root, base, adapter = family
    p = shardmerge.plan(base, [adapter], tmp_path / "out")
    experts, params, _ = FAMILIES[model_type]
    fused = [n for n in loaded_state(base) if n.endswith(tuple(f"{experts}.{q}" for q in params))]
    assert fused and p.counts["expert"] == len(fused) * EXPERTS
    assert p.counts["linear"] >= 1
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out)
    report = shardmerge.verify(out, base, [adapter])
    assert report.ok, report.summary()


def _fused_copy(base: Path, folder: Path) -> Path:
    from moe_oracle import load

    load(base).save_pretrained(folder, save_original_format=False)
    return folder


@pytest.mark.parametrize("model_type", ["jamba", "nemotron_h", "deepseek_v4"])
def test_loaded_layout_merges_to_the_same_values(model_type, tmp_path):
    """The checkpoint in the loaded model's own layout (fused experts, ``model.`` prefix) merges
    to the same values as the layout transformers writes by default."""
    base = build_base(tmp_path / "base", _config(model_type), dtype=torch.bfloat16, seed=5)
    fused = _fused_copy(base, tmp_path / "fused")
    experts, params, linear = FAMILIES[model_type]
    assert set(read_raw(fused)) != set(read_raw(base))
    adapter = make_lora(
        base, tmp_path / "adapter", seed=6, target_modules=linear,
        target_parameters=[f"{experts}.{p}" for p in params],
    )  # fmt: skip
    shardmerge.merge(base, [adapter], tmp_path / "a")
    shardmerge.merge(fused, [adapter], tmp_path / "b")
    a, b = loaded_state(tmp_path / "a"), loaded_state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_family_plans_the_same_from_the_builtin_snapshot(family, tmp_path, monkeypatch):
    """Without transformers' rules (the snapshot instead), the plan is the same."""
    from shardmerge.arch import rules

    model_type, root, base, adapter = family
    live = shardmerge.plan(base, [adapter], tmp_path / "out")
    monkeypatch.setattr(rules, "live_table", lambda: None)
    rules.rule_table.cache_clear()
    try:
        snap = shardmerge.plan(base, [adapter], tmp_path / "out")
    finally:
        rules.rule_table.cache_clear()
    assert snap.counts == live.counts and live.counts["expert"] > 0
    assert [s.tensors for s in snap.shards] == [s.tensors for s in live.shards]


@pytest.mark.parametrize("model_type", ["jamba", "lfm2_moe"])
def test_per_expert_linear_lora_without_target_parameters(family_bases, model_type, tmp_path):
    """An adapter on the per-expert Linear modules as transformers 4 built them (no
    target_parameters; ``feed_forward.experts.N.gate_proj``, by hand) merges into them."""
    import json

    from builders import KEY_PREFIX, read_tensors, reference_merge
    from safetensors.torch import save_file

    base = family_bases(model_type)
    g = torch.Generator().manual_seed(43)
    tensors = {}
    for name, t in read_raw(base).items():
        if re.search(r"\.experts\.\d+\.", name):
            out_f, in_f = t.shape
            module = name.removesuffix(".weight")
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = torch.randn(2, in_f, generator=g)
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) / 20
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    parts = sorted({k.split(".experts.")[1].split(".")[1] for k in tensors})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": parts}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    p = shardmerge.plan(base, [adapter], tmp_path / "out")
    assert p.counts == {"expert": len(tensors) // 2}
    shardmerge.merge(base, [adapter], tmp_path / "out")
    ref = reference_merge(base, [adapter])
    assert len(ref.touched) == len(tensors) // 2
    assert_matches_reference(read_tensors(tmp_path / "out"), ref)


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    """Tiny bases by model type, built once per module."""
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            root = tmp_path_factory.mktemp(f"{model_type}_base")
            made[model_type] = build_base(root, _config(model_type), dtype=torch.bfloat16, seed=7)
        return made[model_type]

    return get
