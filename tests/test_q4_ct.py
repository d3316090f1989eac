"""Merging into compressed-tensors pack-quantized (INT4/INT8) bases with --dtype.

A Kimi-K2-shaped tiny DeepSeek-V3 (MLA attention in 16 bits, INT4 routed
and shared experts in groups of 8: the package requires whole groups) and a
Llama with asymmetric INT8 channels (packed zero points) are packed here
(q4_builders.py). Every output tensor must equal the float64 reference
rounded once; the compressed-tensors package (through transformers) must
decompress the untouched tensors to the same values; verify re-derives it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import make_adapter, read_index, read_tensors, reference_merge, round_once
from fp8_builders import deepseek_config, save_tiny
from q4_builders import ct_quantize_model, llama_config

import shardmerge
from shardmerge.verifier.check import verify

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def experts_only(name: str) -> bool:
    return ".mlp." in name


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(tmp, INT4 experts folder, its exact twin, LoRA on the 16-bit MLA attention)."""
    tmp = tmp_path_factory.mktemp("kimi")
    src = save_tiny(tmp / "src", deepseek_config(), seed=5)
    ct_quantize_model(src, tmp / "int4", tmp / "deq", bits=4, group=8, select=experts_only)
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=MLA, seed=6)
    return tmp, tmp / "int4", tmp / "deq", adapter


def assert_exact(out, deq, adapter, dtype) -> None:
    got = read_tensors(out)
    ref = reference_merge(deq, [adapter], out_dtype=torch.float64)
    assert set(got) == set(ref.tensors), set(got) ^ set(ref.tensors)
    assert ref.touched
    for name, exact in ref.tensors.items():
        assert torch.equal(got[name], round_once(exact, dtype)), name


def test_kimi_shaped_int4_experts_to_bfloat16_is_exact(kimi):
    tmp, base, deq, adapter = kimi
    out = tmp / "out"
    shardmerge.merge(base, [adapter], out, device="cpu", dtype="bfloat16")
    assert_exact(out, deq, adapter, torch.bfloat16)
    names = set(read_tensors(out))
    assert set(read_index(out)["weight_map"]) == names
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in names
    assert not any(n.endswith(("_packed", "_scale", "_shape", "_zero_point")) for n in names)
    report = verify(out, base, [adapter])
    assert report.ok, report.summary()


def test_untouched_tensors_equal_compressed_tensors_decompressing_the_folder(kimi):
    """transformers + the compressed-tensors package decompress the folder (in the bf16
    scales' dtype: one rounding of (q - zero) * scale); the untouched experts must match."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    tmp, base, deq, adapter = kimi
    out = tmp / "out-ct"
    shardmerge.merge(base, [adapter], out, device="cpu", dtype="bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=CompressedTensorsConfig(run_compressed=False),
        dtype=torch.float32,
    ).state_dict()  # fmt: skip
    ours = read_tensors(out)
    # transformers fuses the routed experts on load; the dense and shared MLPs keep names.
    packed = [n for n in ours if ".mlp." in n and ".experts." not in n and "proj.weight" in n]
    assert len(packed) == 6
    for name in packed:
        assert torch.equal(theirs[name], ours[name].float()), name


def test_asymmetric_int8_channels_with_packed_zero_points(tmp_path):
    src = save_tiny(tmp_path / "src", llama_config(), seed=7)
    ct_quantize_model(src, tmp_path / "int8", tmp_path / "deq", bits=8, group=0, symmetric=False)
    adapter = make_adapter(
        tmp_path / "deq", tmp_path / "lora", target_modules=["q_proj", "down_proj"]
    )
    out = tmp_path / "out"
    shardmerge.merge(tmp_path / "int8", [adapter], out, device="cpu", dtype="float16")
    assert_exact(out, tmp_path / "deq", adapter, torch.float16)
    assert verify(out, tmp_path / "int8", [adapter]).ok


M = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def asym4(tmp_path_factory):
    """An asymmetric INT4 Llama (groups of 16, packed zero points) and a LoRA on q_proj."""
    tmp = tmp_path_factory.mktemp("ct-bad")
    src = save_tiny(tmp / "src", llama_config(), seed=8)
    ct_quantize_model(src, tmp / "int4", tmp / "deq", bits=4, group=16, symmetric=False)
    return tmp / "int4", make_adapter(tmp / "deq", tmp / "lora", target_modules=["q_proj"])


def _weights(qc: dict) -> dict:
    return qc["config_groups"]["group_0"]["weights"]


def _set(key, value):
    return lambda t: t.update({key: value(t[key])})


CASES = {
    "two_bits": (None, lambda q: _weights(q).update(num_bits=2), ["pack-quantized 2-bit int"]),
    "tensor_strategy": (None, lambda q: _weights(q).update(strategy="tensor"), ["'tensor'"]),
    "group_size_zero": (None, lambda q: _weights(q).update(group_size=0), ["group_size 0"]),
    "group_size_mismatch": (
        None,
        lambda q: _weights(q).update(group_size=32),
        [".weight_scale: has shape", "group 32"],
    ),
    "no_config": (None, lambda q: q.clear(), ["weight_packed", "no quantization_config"]),
    "scales_wrong_shape": (
        _set(f"{M}.weight_scale", lambda t: t[:, :-1].contiguous()),
        None,
        [f"{M}.weight_scale: has shape [64, 3]"],
    ),
    "shape_disagrees": (
        _set(f"{M}.weight_shape", lambda t: t + 8),
        None,
        [f"{M}.weight_shape", "says the weight is [72, 72]", "64 rows"],
    ),
    "zero_point_wrong_packing": (
        _set(f"{M}.weight_zero_point", lambda t: t[:-1].contiguous()),
        None,
        [f"{M}.weight_zero_point: has shape [7, 4]", "needs [8, 4]"],
    ),
    "scales_infinite": (
        _set(f"{M}.weight_scale", lambda t: t.index_fill(0, torch.tensor([2]), float("inf"))),
        None,
        [f"{M}.weight_scale", "NaN or infinite"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_pack_quantized_base_is_refused(asym4, tmp_path, case):
    from test_q4_bad_input import assert_refused, edit_tensors_of

    base0, adapter = asym4
    tensors_edit, config_edit, phrases = CASES[case]
    base = shutil.copytree(base0, tmp_path / "base")
    if tensors_edit:
        edit_tensors_of(base, f"{M}.weight_packed", tensors_edit)
    if config_edit:
        config = json.loads((base / "config.json").read_text())
        config_edit(config["quantization_config"])
        if not config["quantization_config"]:
            del config["quantization_config"]
        (base / "config.json").write_text(json.dumps(config))
    assert_refused(base, adapter, tmp_path / "out", phrases)
