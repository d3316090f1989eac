"""LoRA on MoE experts: PEFT ``target_parameters`` on fused expert parameters, per-expert Linear LoRA.

The adapter names the fused in-memory parameter (``mlp.experts.gate_up_proj``
[E, 2I, H]); the checkpoint keeps it per expert (transformers' default save)
or fused (``save_original_format=False``). Both layouts must give the same
merged model: compared after loading with transformers (which fuses) against
PEFT's ``merge_and_unload`` (within its roundings) and against a float64
reference built from the live PEFT modules with PEFT's own formula, rounded
once (exactly).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import (
    KEY_PREFIX,
    Reference,
    assert_close_to_oracle,
    assert_matches_reference,
    folder_files,
    load_model,
    make_adapter,
    make_base,
    peft_merged_state,
    read_adapter,
    read_raw,
    read_tensors,
    reference_merge,
)
from moe_oracle import param_reference
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.errors import PlanErrors, ShardmergeError

memory = importlib.import_module("shardmerge.planner.memory")

MOE_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LAYERS, EXPERTS, RANK = 2, 4, 4


def _merge(base, adapters, out, **kwargs) -> Path:
    shardmerge.merge(base, adapters if isinstance(adapters, list) else [adapters], out, **kwargs)
    return Path(out)


def _param_reference(base: Path, adapter: Path, dtype: torch.dtype) -> Reference:
    """The float64 merge from the live PEFT model (moe_oracle.param_reference), in-memory names."""
    return param_reference(base, adapter, dtype)


def _in_memory(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load_model(folder).state_dict().items()}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tmp_path_factory):
    """A tiny MoE in both disk layouts, an adapter on its expert parameters, the oracles."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    # bfloat16 makes the rounding of every merged element matter.
    dtype = torch.float32 if model_type == "mixtral" else torch.bfloat16
    per_expert = make_base(root / "per_expert", model_type, dtype=dtype, seed=11)
    fused = root / "fused"
    load_model(per_expert).save_pretrained(fused, save_original_format=False)
    extra = {"target_modules": ["q_proj"]} if model_type == "qwen2_moe" else {"target_modules": []}
    adapter = make_adapter(
        per_expert, root / "adapter", target_parameters=MOE_TARGETS, r=RANK, seed=12, **extra
    )
    ref = _param_reference(per_expert, adapter, dtype)
    return SimpleNamespace(
        model_type=model_type,
        root=root,
        layouts={"per_expert": per_expert, "fused": fused},
        adapter=adapter,
        ref=ref,
        peft=peft_merged_state(per_expert, [adapter]),
        linear=len(extra["target_modules"]) * LAYERS,
    )


def test_layouts_are_what_transformers_writes(moe):
    per_expert = read_raw(moe.layouts["per_expert"])
    fused = read_raw(moe.layouts["fused"])
    part = "w1" if moe.model_type == "mixtral" else "gate_proj"
    moe_path = "block_sparse_moe" if moe.model_type == "mixtral" else "mlp"
    assert f"model.layers.1.{moe_path}.experts.3.{part}.weight" in per_expert
    assert not any("gate_up_proj" in n for n in per_expert)
    assert len(fused["model.layers.1.mlp.experts.gate_up_proj"].shape) == 3
    assert not any(".experts.0." in n for n in fused)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_lora_matches_peft_and_reference(moe, layout, tmp_path):
    base = moe.layouts[layout]
    out = _merge(base, moe.adapter, tmp_path / "out")
    # Same tensor names, shapes and dtypes as the base: the layout is kept.
    got_raw, base_raw = read_raw(out), read_raw(base)
    assert {n: (t.dtype, t.shape) for n, t in got_raw.items()} == {
        n: (t.dtype, t.shape) for n, t in base_raw.items()
    }
    got = _in_memory(out)
    assert_matches_reference(got, moe.ref)
    assert_close_to_oracle(got, moe.peft, moe.ref)
    # Every expert of every layer changed; every other tensor is byte-identical.
    for name in moe.ref.touched:
        if ".experts." in name:
            base_t = moe.ref.base[name]
            for e in range(EXPERTS):
                assert not torch.equal(got[name][e].double(), base_t[e]), (name, e)
    changed = {n for n in base_raw if got_raw[n].data != base_raw[n].data}
    expert_parts = {n for n in base_raw if ".experts." in n and "shared" not in n}
    expert_parts = {n for n in expert_parts if not n.endswith("_bias")}
    q_proj = {n for n in base_raw if "q_proj.weight" in n} if moe.linear else set()
    assert changed == expert_parts | q_proj


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_counts_verify_and_summary(moe, layout, tmp_path):
    base = moe.layouts[layout]
    p = shardmerge.plan(base, [moe.adapter], tmp_path / "out")
    expected = {"expert": LAYERS * EXPERTS * len(MOE_TARGETS)}
    if moe.linear:
        expected["linear"] = moe.linear
    assert p.counts == expected
    # Expert terms of a fused tensor cover that expert's rows of it, viewed as a matrix.
    terms = [t for s in p.shards for j in s.tensors if j.edit for t in j.edit.terms]
    experts = [t for t in terms if t.kind == "expert"]
    assert len(experts) == LAYERS * EXPERTS * (2 if layout == "fused" else 3)
    assert all((t.rows is not None) == (layout == "fused") for t in experts)
    out = _merge(base, moe.adapter, tmp_path / "out")
    report = shardmerge.verify(out, base, [moe.adapter])
    assert report.ok, report.summary()
    assert 0 < report.max_ulp["expert"] <= 0.5


def test_rank_and_alpha_patterns_and_rslora_on_parameters(tmp_path):
    """Patterns match the parameter's full name (PEFT's current_key), e.g. ``...experts.down_proj``."""
    base = make_base(tmp_path / "base", "mixtral", seed=13)
    adapter = make_adapter(
        base, tmp_path / "adapter", target_modules=[], target_parameters=MOE_TARGETS, r=RANK,
        rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 3}, use_rslora=True,
    )  # fmt: skip
    ref = _param_reference(base, adapter, torch.float32)
    got = _in_memory(_merge(base, adapter, tmp_path / "out"))
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged_state(base, [adapter]), ref)
    _, tensors = read_adapter(adapter)
    layer = f"{KEY_PREFIX}model.layers.0.mlp.experts"
    assert tensors[f"{layer}.lora_A.weight"].shape[0] == 2 * EXPERTS  # down_proj: r=2
    assert tensors[f"{layer}.base_layer.lora_A.weight"].shape[0] == RANK * EXPERTS


def test_fused_blocks_cut_through_experts_give_identical_bytes(moe, tmp_path, monkeypatch):
    base = moe.layouts["fused"]
    whole = folder_files(_merge(base, moe.adapter, tmp_path / "whole"))
    # 37 rows of gate_up_proj's [E*2I, H] view per block: blocks straddle expert boundaries.
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", 37 * 64 * memory.MERGE_BYTES_PER_ELEMENT)
    p = shardmerge.plan(base, [moe.adapter], tmp_path / "small")
    fused = [t for s in p.shards for t in s.tensors if t.name.endswith("gate_up_proj")]
    assert fused and all(1 < t.block_rows < t.rows // EXPERTS for t in fused)
    assert folder_files(_merge(base, moe.adapter, tmp_path / "small")) == whole


def _forge(adapter: Path, folder: Path, edit) -> Path:
    """A copy of ``adapter`` with its tensors changed by ``edit(dict)``."""
    shutil.copytree(adapter, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _plan_errors(base, adapter, out) -> list[ShardmergeError]:
    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(base, [adapter], out)
    return info.value.errors if isinstance(info.value, PlanErrors) else [info.value]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_count_mismatch_is_refused(moe, layout, tmp_path):
    def three_experts(t):
        for k in list(t):
            if k.endswith("experts.lora_A.weight"):  # down_proj: A [r*E, I], B [H, r*E]
                t[k] = t[k][: RANK * 3].contiguous()
                b = k.replace("lora_A", "lora_B")
                t[b] = t[b][:, : RANK * 3].contiguous()

    forged = _forge(moe.adapter, tmp_path / "forged", three_experts)
    errors = _plan_errors(moe.layouts[layout], forged, tmp_path / "out")
    text = "\n".join(map(str, errors))
    assert len(errors) == LAYERS
    assert "down_proj" in text and "3 experts" in text and f"has {EXPERTS} experts" in text


def test_unmatched_keys_are_listed_in_one_error(moe, tmp_path):
    def strays(t):
        a, b = (f"{KEY_PREFIX}model.layers.0.mlp.experts.lora_{x}.weight" for x in "AB")
        t[a.replace("layers.0", "layers.7")] = t[a].clone()
        t[b.replace("layers.0", "layers.7")] = t[b].clone()
        t[f"{KEY_PREFIX}model.layers.0.self_attn.nope_proj.lora_A.weight"] = torch.zeros(RANK, 64)
        t[f"{KEY_PREFIX}model.layers.0.self_attn.nope_proj.lora_B.weight"] = torch.zeros(64, RANK)

    forged = _forge(moe.adapter, tmp_path / "forged", strays)
    errors = _plan_errors(moe.layouts["per_expert"], forged, tmp_path / "out")
    assert len(errors) == 1, errors
    text = str(errors[0])
    assert "2 match no tensor of the base" in text
    assert "model.layers.7.mlp.experts" in text and "model.layers.0.self_attn.nope_proj" in text


def test_target_parameters_on_unknown_experts_are_unmatched(moe, tmp_path):
    forged = _forge(moe.adapter, tmp_path / "forged", lambda t: None)
    cfg = json.loads((forged / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (forged / "adapter_config.json").write_text(json.dumps(cfg))
    # A base without those experts: the adapter's expert LoRA matches nothing there.
    other = make_base(tmp_path / "llama", "llama")
    errors = _plan_errors(other, forged, tmp_path / "out")
    text = "\n".join(map(str, errors))
    assert "match no tensor" in text and "model.layers.1.mlp.experts" in text


def test_transposed_experts_gpt_oss(tmp_path):
    """gpt_oss stores experts [E, in, out] (is_transposed): the delta of each expert is transposed."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=EXPERTS,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(21)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    base = tmp_path / "base"
    model.save_pretrained(base)
    shapes = {n: t.shape for n, t in read_raw(base).items()}
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (EXPERTS, 32, 64)  # [E, in, out]
    adapter = make_adapter(
        base, tmp_path / "adapter", target_modules=[], target_parameters=MOE_TARGETS, r=RANK
    )
    ref = _param_reference(base, adapter, torch.float32)
    out = _merge(base, adapter, tmp_path / "out")
    got = _in_memory(out)
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged_state(base, [adapter]), ref)
    assert shardmerge.verify(out, base, [adapter]).ok


def test_per_expert_linear_modules_switch_transformers(tmp_path):
    """Experts as separate nn.Linear modules (Switch Transformers): plain LoRA on each, every one counted."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, SwitchTransformersConfig

    cfg = SwitchTransformersConfig(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=EXPERTS, encoder_sparse_step=1, decoder_sparse_step=1,
    )  # fmt: skip
    torch.manual_seed(31)
    base = tmp_path / "base"
    AutoModelForSeq2SeqLM.from_config(cfg).to(torch.bfloat16).save_pretrained(base)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(32)
    pm = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(base),
        LoraConfig(r=RANK, lora_alpha=8, target_modules=["wi", "wo"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    modules = 4 * EXPERTS * 2  # 4 sparse blocks (2 encoder, 2 decoder), wi and wo of each expert
    p = shardmerge.plan(base, [adapter], tmp_path / "out")
    assert p.counts == {"expert": modules}
    out = _merge(base, adapter, tmp_path / "out")
    ref = reference_merge(base, [adapter])
    got = read_tensors(out)
    assert len([n for n in ref.touched if ".experts.expert_" in n]) == modules
    assert_matches_reference(got, ref)
    peft = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(adapter))
    merged = peft.merge_and_unload().state_dict()
    assert_close_to_oracle(got, {n: merged[n] for n in ref.touched}, ref)
    assert shardmerge.verify(out, base, [adapter]).ok


def test_per_expert_linear_lora_in_peft_key_format_mixtral(tmp_path):
    """An adapter on Mixtral's per-expert Linears (w1/w2/w3, as transformers v4 built it), by hand."""
    base = make_base(tmp_path / "base", "mixtral", dtype=torch.bfloat16, seed=14)
    shapes = {n: t.shape for n, t in read_raw(base).items()}
    g = torch.Generator().manual_seed(41)
    tensors = {}
    for name, shape in shapes.items():
        if ".experts." in name:
            out_f, in_f = shape
            module = name.removesuffix(".weight")
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = torch.randn(2, in_f, generator=g)
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) / 20
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    p = shardmerge.plan(base, [adapter], tmp_path / "out")
    assert p.counts == {"expert": LAYERS * EXPERTS * 3}
    out = _merge(base, adapter, tmp_path / "out")
    ref = reference_merge(base, [adapter])
    assert len(ref.touched) == LAYERS * EXPERTS * 3
    assert_matches_reference(read_tensors(out), ref)


def test_fused_experts_stored_transposed_on_disk(tmp_path):
    """qwen3_vl_moe checkpoints store fused experts [E, in, out], which transformers transposes
    at load when the shape differs from the parameter's: merged, they equal the untransposed merge."""
    per_expert = make_base(tmp_path / "per_expert", "mixtral", dtype=torch.bfloat16, seed=15)
    fused = tmp_path / "fused"
    load_model(per_expert).save_pretrained(fused, save_original_format=False)
    adapter = make_adapter(
        per_expert, tmp_path / "adapter", target_modules=[], target_parameters=MOE_TARGETS, r=RANK
    )
    flipped = tmp_path / "flipped"
    shutil.copytree(fused, flipped)
    tensors = load_file(str(fused / "model.safetensors"))
    experts = [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]
    for name in experts:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(flipped / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fused / "config.json").read_text())
    (flipped / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_vl_moe"}))

    straight = read_tensors(_merge(fused, adapter, tmp_path / "out_straight"))
    out = _merge(flipped, adapter, tmp_path / "out_flipped")
    got = read_tensors(out)
    assert len(experts) == 2 * LAYERS
    for name in experts:
        assert got[name].shape[1:] == straight[name].shape[:0:-1]
        assert torch.equal(got[name].transpose(1, 2), straight[name]), name
    assert not torch.equal(
        straight[experts[0]], load_file(str(fused / "model.safetensors"))[experts[0]]
    )
    assert shardmerge.verify(out, flipped, [adapter]).ok
