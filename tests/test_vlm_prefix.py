"""Vision-language checkpoints merge whichever prefix convention the base and the adapter use.

transformers 5 loads Llava-style models as ``model.language_model.*`` and
``model.vision_tower.*`` but writes checkpoints as ``language_model.model.*``
and ``vision_tower.*`` (Qwen2.5-VL: ``model.*`` and ``visual.*``); adapters
made with transformers 4 name the modules the old way, adapters made with 5
the new way. Every pairing merges, and to the same bytes: the base in the
layout transformers writes or in its loaded layout
(``save_original_format=False``), the adapter from PEFT on the loaded model
or renamed to the old convention. The merge is compared, loaded by
transformers, with PEFT's merge_and_unload and the float64 reference.
Kimi-K2.5 adds MoE experts inside a VLM and a chain of renamings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import assert_close_to_oracle, assert_matches_reference, read_raw
from moe_oracle import build_base, loaded_state, make_lora, param_reference, peft_merged
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.errors import ShardmergeError

_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, pad_token_id=0,
)  # fmt: skip
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def _config(model_type: str):
    import transformers as tf

    if model_type == "llava":
        vision = tf.CLIPVisionConfig(**_VISION, image_size=16, patch_size=8)
        return tf.LlavaConfig(
            text_config=tf.LlamaConfig(**_TEXT), vision_config=vision, image_token_index=127
        )
    if model_type == "gemma3":
        vision = dict(_VISION, model_type="siglip_vision_model", image_size=16, patch_size=8)
        return tf.Gemma3Config(
            text_config=dict(_TEXT, head_dim=8), vision_config=vision, mm_tokens_per_image=4
        )
    if model_type == "qwen2_5_vl":
        text = dict(_TEXT, model_type="qwen2_5_vl_text")
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
        vision = dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
            fullatt_block_indexes=[0],
        )  # fmt: skip
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    if model_type == "mllama":
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
            attention_heads=4, image_size=16, patch_size=8, vision_output_dim=64,
            intermediate_layers_indices=[0],
        )  # fmt: skip
        return tf.MllamaConfig(
            text_config=dict(_TEXT, cross_attention_layers=[0]), vision_config=vision
        )
    raise ValueError(model_type)


# model type -> (new prefix, old prefix) of adapter keys after PEFT's base_model.model.
OLD_NAMES = {
    "llava": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.")],
    "gemma3": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.")],
    "mllama": [("model.language_model.", "language_model.model."), ("model.vision_model.", "vision_model.")],
    "qwen2_5_vl": [("model.language_model.", "model."), ("model.visual.", "visual.")],
}  # fmt: skip


def _old_convention(adapter: Path, folder: Path, model_type: str) -> Path:
    """The adapter with its keys named as transformers 4 named the modules."""
    shutil.copytree(adapter, folder)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = {}
    for key, t in tensors.items():
        rest = key.removeprefix("base_model.model.")
        for new, old in OLD_NAMES[model_type]:
            if rest.startswith(new):
                rest = old + rest[len(new) :]
                break
        renamed[f"base_model.model.{rest}"] = t
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=sorted(OLD_NAMES))
def vlm(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    written = build_base(root / "written", _config(model_type), "vlm", dtype=torch.bfloat16)
    loaded = root / "loaded"
    build_base(loaded, _config(model_type), "vlm", dtype=torch.bfloat16, original_format=False)
    assert set(read_raw(written)) != set(read_raw(loaded))
    adapter = make_lora(written, root / "adapter", "vlm", target_modules=["q_proj", "v_proj"])
    old = _old_convention(adapter, root / "adapter_old", model_type)
    return model_type, {"written": written, "loaded": loaded}, {"new": adapter, "old": old}


@pytest.mark.parametrize("layout", ["written", "loaded"])
def test_vlm_merges_either_prefix_convention(vlm, layout, tmp_path):
    model_type, bases, adapters = vlm
    base = bases[layout]
    outs = {}
    for convention, adapter in adapters.items():
        outs[convention] = tmp_path / convention
        shardmerge.merge(base, [adapter], outs[convention])
    tensors = {c: {n: t.data for n, t in read_raw(out).items()} for c, out in outs.items()}
    assert tensors["old"] == tensors["new"]
    ref = param_reference(base, adapters["new"], torch.bfloat16, "vlm")
    assert any("language_model" in n for n in ref.touched)
    got = loaded_state(outs["new"], "vlm")
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged(base, adapters["new"], "vlm"), ref)
    # The output keeps the base's layout, and verify re-derives it from the old-named adapter.
    assert set(read_raw(outs["new"])) == set(read_raw(base))
    report = shardmerge.verify(outs["old"], base, [adapters["old"]])
    assert report.ok and report.max_ulp["linear"] <= 0.5, report.summary()
    card = json.loads((outs["new"] / "config.json").read_text())
    assert card["model_type"] == model_type


def test_kimi_k25_experts_inside_a_vlm_and_renamed_vision_layers(tmp_path):
    """Kimi-K2.5 as transformers writes it: ``language_model.model.blocks.N`` with per-expert
    DeepSeek-V3 experts, and a vision tower whose ``mlp.fc0``/``fc1`` load as ``fc1``/``fc2``
    (a renaming chain): LoRA on attention, on the experts and on the loaded ``fc1``."""
    from transformers import AutoConfig

    text = dict(
        _TEXT, model_type="deepseek_v3", num_hidden_layers=2, num_key_value_heads=4,
        moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8,
    )  # fmt: skip
    vision = dict(
        _VISION, model_type="kimi_k25_vision", patch_size=8, pos_emb_height=4, pos_emb_width=4,
        pos_emb_time=2,
    )  # fmt: skip
    config = AutoConfig.for_model("kimi_k25", text_config=text, vision_config=vision)
    base = build_base(tmp_path / "base", config, "vlm", dtype=torch.bfloat16)
    stored = read_raw(base)
    assert "language_model.model.blocks.1.mlp.experts.3.up_proj.weight" in stored
    assert "vision_tower.encoder.blocks.0.mlp.fc0.weight" in stored
    adapter = make_lora(
        base, tmp_path / "adapter", "vlm", target_modules=["q_a_proj", "fc1"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out)
    ref = param_reference(base, adapter, torch.bfloat16, "vlm")
    assert "model.vision_tower.layers.0.mlp.fc1.weight" in ref.touched
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in ref.touched
    got = loaded_state(out, "vlm")
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged(base, adapter, "vlm"), ref)
    changed = {n for n, t in read_raw(out).items() if t.data != stored[n].data}
    assert "vision_tower.encoder.blocks.0.mlp.fc0.weight" in changed
    assert "vision_tower.encoder.blocks.0.mlp.fc1.weight" not in changed


def test_step3p7_stacked_gate_and_up_concatenated_at_load(tmp_path):
    """Step3p7 stores each MoE layer's experts stacked, gate and up apart (``moe.gate_proj.weight``
    [E, I, H]); transformers concatenates them along each expert's rows into
    ``mlp.experts.gate_up_proj``: LoRA on it lands on both stored tensors, expert by expert."""
    from transformers import AutoConfig

    text = dict(
        _TEXT, model_type="step3p5", num_hidden_layers=2, head_dim=8, pad_token_id=1,
        num_experts_per_tok=2, n_routed_experts=4, mlp_layer_types=["dense", "sparse"],
        layer_types=["full_attention", "full_attention"], moe_intermediate_size=16,
        share_expert_dim=16, num_sliding_attention_heads=4, query_pre_attn_scalar=8,
    )  # fmt: skip
    vision = dict(
        _VISION, model_type="step3p5_vision", intermediate_size=32, image_size=28,
        patch_size=14, max_position_embeddings=16,
    )  # fmt: skip
    config = AutoConfig.for_model("step3p7", text_config=text, vision_config=vision)
    base = build_base(tmp_path / "base", config, "vlm", dtype=torch.bfloat16)
    stored = read_raw(base)
    assert stored["model.layers.1.moe.gate_proj.weight"].shape == (4, 16, 32)
    adapter = make_lora(
        base, tmp_path / "adapter", "vlm", target_modules=r".*language_model.*\.q_proj",
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out)
    ref = param_reference(base, adapter, torch.bfloat16, "vlm")
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in ref.touched
    got = loaded_state(out, "vlm")
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged(base, adapter, "vlm"), ref)
    changed = {n for n, t in read_raw(out).items() if t.data != stored[n].data}
    moe = {f"model.layers.1.moe.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert moe <= changed
    assert shardmerge.verify(out, base, [adapter]).ok
    # The vision model's q_proj is a chunk of a fused in_proj_weight: refused by name.
    everywhere = make_lora(base, tmp_path / "everywhere", "vlm", target_modules=["q_proj"])
    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(base, [everywhere], tmp_path / "out2")
    assert "attn.in_proj_weight" in str(info.value) and "Chunk(dim=0)" in str(info.value)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl"])
def test_vlm_embedding_and_head_lora(model_type, tmp_path):
    """LoRA on the language model's embedding and lm_head of a VLM stored as transformers writes
    it (``language_model.model.embed_tokens``, ``language_model.lm_head`` for Llava) matches PEFT."""
    base = build_base(tmp_path / "base", _config(model_type), "vlm")
    adapter = make_lora(
        base, tmp_path / "adapter", "vlm", target_modules=["embed_tokens", "lm_head"]
    )
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out)
    ref = param_reference(base, adapter, torch.float32, "vlm")
    heads = {n for n in ref.touched if n.endswith(("embed_tokens.weight", "lm_head.weight"))}
    assert len(heads) == 2 and heads == ref.touched
    got = loaded_state(out, "vlm")
    assert_matches_reference(got, ref)
    assert_close_to_oracle(got, peft_merged(base, adapter, "vlm"), ref)
