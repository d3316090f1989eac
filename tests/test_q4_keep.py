"""Without --dtype: untouched modules of AWQ, compressed-tensors INT and MXFP4 bases stay packed.

Modules no adapter touches keep their stored tensors byte for byte; a touched
module is dequantized, merged and rounded once in the model's dtype, and
named in quantization_config as not quantized (``modules_to_not_convert``,
or compressed-tensors' ``ignore``). GPTQ has no such setting transformers
reads: refused with the alternative.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import make_adapter, read_raw, read_tensors, reference_merge, round_once
from click.testing import CliRunner
from fp8_builders import deepseek_config, save_tiny
from q4_builders import (
    ct_quantize_model,
    gpt_oss_config,
    llama_config,
    mxfp4_quantize_model,
    quantize_model,
)

import shardmerge
from shardmerge.cli import main
from shardmerge.codecs import open_base_format
from shardmerge.io.checkpoint import open_checkpoint
from shardmerge.verifier.check import verify


def set_dtype(folder, dtype: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config))


def assert_kept(base, out, touched_modules: set[str], side=(".qweight", ".qzeros", ".scales")):
    """Every tensor of ``out`` not of a touched module is the base's, byte for byte."""
    ours, theirs = read_raw(out), read_raw(base)
    for name, raw in ours.items():
        if not any(name.startswith(m + ".") or name.startswith(m + "_") for m in touched_modules):
            assert raw == theirs[name], name
    for m in touched_modules:
        assert not any(f"{m}{s}" in ours for s in side), m


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keep-awq")
    src = save_tiny(tmp / "src", llama_config(), seed=11)
    quantize_model(src, tmp / "awq", tmp / "deq", "awq", bits=4, group=16)
    set_dtype(tmp / "awq", "float16")
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=["q_proj", "v_proj"])
    return tmp, adapter


def test_awq_keeps_untouched_modules_packed(awq):
    tmp, adapter = awq
    out = tmp / "out"
    shardmerge.merge(tmp / "awq", [adapter], out, device="cpu")
    touched = {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert_kept(tmp / "awq", out, touched)
    got = read_tensors(out)
    ref = reference_merge(tmp / "deq", [adapter], out_dtype=torch.float64)
    for m in touched:
        assert got[f"{m}.weight"].dtype == torch.float16
        assert torch.equal(
            got[f"{m}.weight"], round_once(ref.tensors[f"{m}.weight"], torch.float16)
        )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and set(qc["modules_to_not_convert"]) == touched
    # The output is an AWQ folder again: its packed modules are the base's, the rest plain.
    view, stored = open_base_format(open_checkpoint(out))
    assert len(stored.specs) == 14 - len(touched)
    assert view.tensor("model.layers.0.self_attn.q_proj.weight").dtype == "F16"
    report = verify(out, tmp / "awq", [adapter])
    assert report.ok, report.summary()


def test_gptq_without_dtype_is_refused_with_the_alternative(awq):
    tmp, adapter = awq
    quantize_model(tmp / "src", tmp / "gptq", tmp / "gptq-deq", "gptq", bits=4, group=16)
    out = tmp / "out-gptq"
    result = CliRunner().invoke(
        main, ["merge", str(tmp / "gptq"), str(adapter), "-o", str(out), "-q"]
    )
    assert result.exit_code == 2, result.output
    assert "no way" in result.stderr and "--dtype bfloat16" in result.stderr
    assert not out.exists() or not any(out.glob("*.safetensors"))


def test_compressed_tensors_keeps_untouched_experts_packed(tmp_path):
    """Kimi-K2-shaped: LoRA on the 16-bit attention and on layer 1's routed down_proj experts
    (PEFT target_parameters); transformers with the compressed-tensors package loads the mixed
    folder to the fully dequantized merge."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = save_tiny(tmp_path / "src", deepseek_config(), seed=13)
    base = tmp_path / "int4"
    ct_quantize_model(src, base, tmp_path / "deq", bits=4, group=8, select=lambda n: ".mlp." in n)
    set_dtype(base, "bfloat16")
    adapter = make_adapter(
        tmp_path / "deq", tmp_path / "lora", target_modules=["q_a_proj", "kv_b_proj"],
        target_parameters=["1.mlp.experts.down_proj"],
    )  # fmt: skip
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out, device="cpu")
    touched = {f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(4)}
    sides = (".weight_packed", ".weight_scale", ".weight_shape")
    assert_kept(
        base, out, touched | {"model.layers.0.self_attn", "model.layers.1.self_attn"}, sides
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", *sorted(touched)]
    assert verify(out, base, [adapter]).ok
    full = tmp_path / "full"
    shardmerge.merge(base, [adapter], full, device="cpu", dtype="bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.float32
    ).state_dict()
    want = read_tensors(full)
    # The packed MLPs transformers keeps by name (it fuses the routed experts on load).
    common = [n for n in want if n in theirs and ".mlp." in n and n.endswith("proj.weight")]
    assert len(common) == 6
    for name in common:
        assert torch.equal(theirs[name], want[name].float()), name


def test_mxfp4_attention_lora_copies_the_experts(tmp_path):
    src = save_tiny(tmp_path / "src", gpt_oss_config(), seed=14)
    base = tmp_path / "mxfp4"
    mxfp4_quantize_model(src, base, tmp_path / "deq")
    set_dtype(base, "bfloat16")
    adapter = make_adapter(tmp_path / "deq", tmp_path / "lora", target_modules=["q_proj", "o_proj"])
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out, device="cpu")
    attention = {f"model.layers.{i}.self_attn" for i in (0, 1)}
    assert_kept(base, out, attention, ())
    raw = read_raw(out)
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in raw
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((base / "config.json").read_text())["quantization_config"]
    assert verify(out, base, [adapter]).ok


def test_mxfp4_expert_lora_dequantizes_that_layers_experts(tmp_path):
    src = save_tiny(tmp_path / "src", gpt_oss_config(), seed=15)
    base = tmp_path / "mxfp4"
    mxfp4_quantize_model(src, base, tmp_path / "deq")
    set_dtype(base, "bfloat16")
    adapter = make_adapter(
        tmp_path / "deq", tmp_path / "lora", target_modules=[],
        target_parameters=["0.mlp.experts.down_proj"],
    )  # fmt: skip
    out = tmp_path / "out"
    shardmerge.merge(base, [adapter], out, device="cpu")
    experts = "model.layers.0.mlp.experts"
    assert_kept(base, out, {experts}, ("_blocks", "_scales"))
    got = read_tensors(out)
    assert got[f"{experts}.gate_up_proj"].dtype == torch.bfloat16  # untouched, same module
    assert "model.layers.1.mlp.experts.down_proj_blocks" in got
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"][-1] == experts
    assert verify(out, base, [adapter]).ok
