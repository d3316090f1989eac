"""Merging into FP8 bases with --dtype: a dequantized model, every tensor rounded once.

Tiny DeepSeek-V3 (MLA attention, routed + shared experts, per-expert or
fused 3-D layout) and Qwen3 models are quantized here (fp8_builders.py), in
16x16 blocks over dims that are not multiples of 16, with a scale stored in
another shard than its weight. The LoRA is trained-shape from PEFT on the
dequantized model. Every output tensor must equal the float64 reference
(exact dequantization + PEFT's formula) rounded once; verify re-derives it.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import (
    load_model,
    logits_of,
    make_adapter,
    peft_logits,
    read_index,
    read_tensors,
    reference_merge,
    round_once,
)
from click.testing import CliRunner
from fp8_builders import deepseek_config, quantize_model, qwen3_config, save_tiny
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.cli import main
from shardmerge.inspect_folder import inspect_folder
from shardmerge.planner.describe import describe
from shardmerge.verifier.check import verify

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(tmp, float32 source, LoRA on MLA attention trained-shape on the dequantized base)."""
    tmp = tmp_path_factory.mktemp("ds")
    src = save_tiny(tmp / "src", deepseek_config(), seed=1)
    quantize_model(src, tmp / "fp8", tmp / "deq")
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=MLA, seed=2)
    return tmp, src, adapter


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qw")
    src = save_tiny(tmp / "src", qwen3_config(), seed=3)
    quantize_model(src, tmp / "fp8", tmp / "deq")
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=targets, seed=4)
    return tmp, src, adapter


def assert_exact(out, deq, adapter, dtype: torch.dtype) -> None:
    """Every output tensor is the float64 reference (dequantized base + LoRA) rounded once."""
    got = read_tensors(out)
    ref = reference_merge(deq, [adapter], out_dtype=torch.float64)
    assert set(got) == set(ref.tensors), set(got) ^ set(ref.tensors)
    assert ref.touched
    for name, exact in ref.tensors.items():
        assert torch.equal(got[name], round_once(exact, dtype)), name


def assert_dequantized_model(out, dtype: str) -> None:
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == dtype
    assert not any(n.endswith(("_scale_inv", "_scale")) for n in read_tensors(out))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_fp8_to_dtype_is_exact(deepseek, dtype):
    tmp, _, adapter = deepseek
    out = tmp / f"out-{dtype}"
    shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu", dtype=dtype)
    assert_exact(out, tmp / "deq", adapter, DTYPES[dtype])
    assert_dequantized_model(out, dtype)
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" not in read_index(out)["weight_map"]
    report = verify(out, tmp / "fp8", [adapter])
    assert report.ok, report.summary()
    assert report.tensors["convert"] > 0 and report.tensors["merge"] > 0


@pytest.fixture(scope="module")
def fused(deepseek):
    """The DeepSeek model with transformers v5's fused 3-D expert tensors and 3-D scales."""
    tmp, src, _ = deepseek
    quantize_model(src, tmp / "fused", tmp / "fused-deq", fused=True, seed=5)
    return tmp / "fused", tmp / "fused-deq"


def test_fused_expert_tensors_with_3d_scales(deepseek, fused):
    tmp, _, adapter = deepseek
    got_names = read_tensors(tmp / "fused")
    assert got_names["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].dim() == 3
    out = tmp / "out-fused"
    shardmerge.merge(tmp / "fused", [adapter], out, device="cpu", dtype="float32")
    assert_exact(out, tmp / "fused-deq", adapter, torch.float32)
    assert read_tensors(out)["model.layers.1.mlp.experts.down_proj"].shape == (4, 40, 24)
    assert verify(out, tmp / "fused", [adapter]).ok


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_ue8m0_power_of_two_scales(deepseek, scale_dtype):
    tmp, src, adapter = deepseek
    label = str(scale_dtype).split(".")[-1]
    fp8, deq = tmp / f"ue8m0-{label}", tmp / f"ue8m0-{label}-deq"
    quantize_model(src, fp8, deq, ue8m0=True, scale_dtype=scale_dtype, seed=6)
    out = tmp / f"out-ue8m0-{label}"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="bfloat16")
    assert_exact(out, deq, adapter, torch.bfloat16)
    assert verify(out, fp8, [adapter]).ok


@pytest.mark.parametrize("strategy", ["block", "channel", "tensor"])
def test_qwen3_compressed_tensors_fp8(qwen3, strategy):
    tmp, src, adapter = qwen3
    block = {"block": (16, 16), "channel": (1, 0), "tensor": None}[strategy]
    fp8, deq = tmp / f"ct-{strategy}", tmp / f"ct-{strategy}-deq"
    quantize_model(src, fp8, deq, convention="ct", block=block, scale_dtype=torch.bfloat16)
    assert any(n.endswith(".input_scale") for n in read_tensors(fp8))
    out = tmp / f"out-ct-{strategy}"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="float32")
    assert_exact(out, deq, adapter, torch.float32)
    assert_dequantized_model(out, "float32")
    assert not any(n.endswith(".input_scale") for n in read_tensors(out))
    assert verify(out, fp8, [adapter]).ok


@pytest.fixture(scope="module")
def expert_lora(deepseek):
    """LoRA on the routed experts (PEFT target_parameters) and on kv_b_proj."""
    tmp, _, _ = deepseek
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return make_adapter(
        tmp / "deq", tmp / "expert-lora", target_modules=["kv_b_proj"], target_parameters=targets
    )


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_lora_equals_the_merge_into_the_dequantized_base(
    deepseek, fused, expert_lora, layout
):
    """Merging into the FP8 base gives the bytes of merging into its exact dequantization
    (a float64 base, whose merges the MoE tests check against PEFT)."""
    tmp, _, _ = deepseek
    fp8, deq = (tmp / "fp8", tmp / "deq") if layout == "per_expert" else fused
    outs = {}
    for label, base in (("fp8", fp8), ("deq", deq)):
        outs[label] = tmp / f"out-experts-{layout}-{label}"
        shardmerge.merge(base, [expert_lora], outs[label], device="cpu", dtype="bfloat16")
    got, want = read_tensors(outs["fp8"]), read_tensors(outs["deq"])
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    base = read_tensors(deq)
    experts = [n for n in got if ".experts." in n and "shared" not in n]
    assert experts and all(
        not torch.equal(got[n], round_once(base[n], torch.bfloat16)) for n in experts
    )
    report = verify(outs["fp8"], fp8, [expert_lora])
    assert report.ok and "expert" in report.max_ulp, report.summary()


def test_e5m2_codes(qwen3):
    """fmt e5m2: float8_e5m2 codes (2 mantissa bits) with float32 block scales."""
    tmp, src, adapter = qwen3
    fp8, deq = tmp / "e5m2", tmp / "e5m2-deq"
    quantize_model(src, fp8, deq, code=torch.float8_e5m2, seed=10)
    assert read_tensors(fp8)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e5m2
    out = tmp / "out-e5m2"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="bfloat16")
    assert_exact(out, deq, adapter, torch.bfloat16)
    assert verify(out, fp8, [adapter]).ok


def test_qwen3_fp8_scalar_scale_per_tensor(qwen3):
    """weight_block_size null: one scalar weight_scale_inv per tensor (transformers' FP8Linear)."""
    tmp, src, adapter = qwen3
    fp8, deq = tmp / "fp8-tensor", tmp / "fp8-tensor-deq"
    quantize_model(src, fp8, deq, block=None, seed=9)
    assert read_tensors(fp8)["model.layers.0.self_attn.q_proj.weight_scale_inv"].dim() == 0
    out = tmp / "out-fp8-tensor"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="float16")
    assert_exact(out, deq, adapter, torch.float16)
    assert verify(out, fp8, [adapter]).ok


def test_untouched_tensors_equal_transformers_loading_the_fp8_folder(deepseek):
    """transformers reads the FP8 folder itself (FineGrainedFP8Config(dequantize=True), float32:
    one rounding of code * scale); every tensor no adapter touches must be the same. Its loader
    needs whole blocks, so this base is quantized in 8x8 blocks, which tile every dim."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    tmp, src, adapter = deepseek
    fp8 = tmp / "fp8-b8"
    quantize_model(src, fp8, tmp / "fp8-b8-deq", block=(8, 8), seed=11)
    out = tmp / "out-b8"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="float32")
    config = FineGrainedFP8Config(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(
        fp8, quantization_config=config, dtype=torch.float32
    ).state_dict()
    ours = load_model(out, torch.float32).state_dict()
    untouched = [k for k in theirs if not any(m in k for m in MLA)]
    assert len(untouched) > 15 and any("experts" in k for k in untouched)
    for name in untouched:
        assert torch.equal(theirs[name], ours[name]), name


@pytest.mark.parametrize("strategy", ["block", "channel"])
def test_untouched_tensors_equal_transformers_decompressing_compressed_tensors(qwen3, strategy):
    """transformers with the compressed-tensors package decompresses the folder itself (in the
    bf16 scales' dtype: one rounding of code * scale); untouched tensors must be the same."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    tmp, src, adapter = qwen3
    block = {"block": (16, 16), "channel": (1, 0)}[strategy]
    fp8 = tmp / f"ct-tf-{strategy}"
    quantize_model(src, fp8, tmp / f"ct-tf-{strategy}-deq", convention="ct", block=block,
                   scale_dtype=torch.bfloat16, seed=12)  # fmt: skip
    out = tmp / f"out-ct-tf-{strategy}"
    shardmerge.merge(fp8, [adapter], out, device="cpu", dtype="bfloat16")
    config = CompressedTensorsConfig(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(
        fp8, quantization_config=config, dtype=torch.float32
    ).state_dict()
    ours = read_tensors(out)
    coded = {n for n, t in read_tensors(fp8).items() if t.dtype == torch.float8_e4m3fn}
    touched = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    untouched = {n for n in coded if not any(m in n for m in touched)}
    assert len(untouched) == 4  # k_proj and up_proj of both layers
    for name in untouched:
        assert torch.equal(theirs[name], ours[name].float()), name


def test_logits_match_the_unmerged_peft_model_on_the_dequantized_base(deepseek):
    tmp, _, adapter = deepseek
    out = tmp / "out-logits"
    shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu", dtype="float32")
    # In float32 (the MoE kernels take no float64): the merged weights rounded once against
    # the dequantized base rounded to float32 with PEFT's LoRA path beside it.
    want = peft_logits(tmp / "deq", [adapter], dtype=torch.float32)
    got = logits_of(load_model(out, torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base = logits_of(load_model(tmp / "deq", torch.float32))
    assert not torch.allclose(base, want, rtol=1e-4, atol=1e-4)  # the adapter matters


def test_plan_and_inspect_show_the_quantization(deepseek):
    tmp, _, adapter = deepseek
    plan = describe(
        shardmerge.plan(tmp / "fp8", [adapter], tmp / "p", device="cpu", dtype="bfloat16")
    )
    assert plan["qlora_base"] == "fp8"
    assert plan["quantized_tensors"] == 28
    d = inspect_folder(tmp / "fp8")
    q = d["quantization"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [16, 16]
    assert q["fp8_tensors"] == {"F8_E4M3": 28} and q["side_tensors"] == 28
    assert inspect_folder(tmp / "deq")["quantization"] is None
    result = CliRunner().invoke(main, ["inspect", str(tmp / "fp8")])
    assert "quantization: fp8; fmt e4m3, weight_block_size [16, 16]" in result.output


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.experts.2.up_proj.weight",  # dequantized only
        "model.layers.1.self_attn.kv_b_proj.weight",  # dequantized and merged
    ],
)
def test_verify_catches_one_changed_value(deepseek, name):
    tmp, _, adapter = deepseek
    out = tmp / f"out-tamper-{name.split('.')[-2]}"
    shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu", dtype="float32")
    assert verify(out, tmp / "fp8", [adapter]).ok
    file = out / read_index(out)["weight_map"][name]
    tensors = load_file(str(file))
    bits = tensors[name].view(torch.int32).clone()
    bits.view(-1)[37] += 1  # one ulp
    tensors[name] = bits.view(torch.float32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    report = verify(out, tmp / "fp8", [adapter])
    assert not report.ok
    assert any(name in p for p in report.problems), report.problems


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_gives_the_same_bytes(deepseek):
    tmp, _, adapter = deepseek
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp / f"out-{device}"
        shardmerge.merge(tmp / "fp8", [adapter], outs[device], device=device, dtype="bfloat16")
    for file in sorted(p.name for p in outs["cpu"].glob("*.safetensors")):
        assert (outs["cpu"] / file).read_bytes() == (outs["cuda"] / file).read_bytes(), file
