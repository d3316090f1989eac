"""Merging into GPTQ and AWQ bases with --dtype: a dequantized model, every tensor rounded once.

A tiny Llama is quantized and packed here (q4_builders.py): GPTQ in 4 bits
with desc_act (scattered g_idx groups) and v1 zero points, GPTQ in 8 and 2
bits in the gptq_v2 convention, AWQ in the GEMM order; side tensors sit in
either shard. The LoRA is made by PEFT on the dequantized twin. Every output
tensor must equal the float64 reference (exact dequantization + PEFT's
formula) rounded once; verify re-derives it.
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
from fp8_builders import save_tiny
from q4_builders import llama_config, quantize_model
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.cli import main
from shardmerge.codecs import open_base_format
from shardmerge.io.checkpoint import open_checkpoint
from shardmerge.verifier.check import verify

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = {
    "gptq4-desc-act": ("gptq", dict(bits=4, group=16, desc_act=True)),
    "gptq8-v2": ("gptq", dict(bits=8, group=32, checkpoint_format="gptq_v2")),
    "gptq2-one-group": ("gptq", dict(bits=2, group=-1, checkpoint_format="gptq_v2")),
    "awq": ("awq", dict(bits=4, group=16)),
    "gptq4-f32-scales": ("gptq", dict(bits=4, group=16, wide=True)),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(tmp, float32 source) of the tiny Llama."""
    tmp = tmp_path_factory.mktemp("q4")
    return tmp, save_tiny(tmp / "src", llama_config(), seed=1)


def packed(llama, variant):
    """(quantized folder, dequantized twin, LoRA made on the twin) of one variant."""
    tmp, src = llama
    base = tmp / variant
    if not base.exists():
        method, kw = VARIANTS[variant]
        quantize_model(src, base, tmp / f"{variant}-deq", method, **kw)
        make_adapter(tmp / f"{variant}-deq", tmp / f"{variant}-lora", target_modules=TARGETS)
    return base, tmp / f"{variant}-deq", tmp / f"{variant}-lora"


def assert_exact(out, deq, adapter, dtype: torch.dtype) -> None:
    """Every output tensor is the float64 reference (dequantized base + LoRA) rounded once."""
    got = read_tensors(out)
    ref = reference_merge(deq, [adapter], out_dtype=torch.float64)
    assert set(got) == set(ref.tensors), set(got) ^ set(ref.tensors)
    assert ref.touched
    for name, exact in ref.tensors.items():
        assert torch.equal(got[name], round_once(exact, dtype)), name


@pytest.mark.parametrize(
    "variant, dtype",
    [
        ("gptq4-desc-act", "bfloat16"),
        ("gptq8-v2", "float16"),
        ("gptq2-one-group", "bfloat16"),
        ("awq", "float32"),
        ("gptq4-f32-scales", "float32"),
    ],
)
def test_packed_base_to_dtype_is_exact(llama, variant, dtype):
    base, deq, adapter = packed(llama, variant)
    out = base.parent / f"out-{variant}-{dtype}"
    shardmerge.merge(base, [adapter], out, device="cpu", dtype=dtype)
    assert_exact(out, deq, adapter, DTYPES[dtype])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype
    names = set(read_tensors(out))
    assert set(read_index(out)["weight_map"]) == names  # the renamed m.weight included
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in names)
    report = verify(out, base, [adapter])
    assert report.ok, report.summary()
    assert report.tensors["merge"] > 0 and report.tensors["convert"] > 0
    # float16 scales decode exactly to float32 (the fast path); float32 ones need float64
    _, stored = open_base_format(open_checkpoint(base))
    assert {c.dtype for c in stored.specs.values()} == {"F64" if "f32" in variant else "F32"}


def test_logits_match_the_unmerged_peft_model_on_the_dequantized_base(llama):
    base, deq, adapter = packed(llama, "awq")
    out = base.parent / "out-logits"
    shardmerge.merge(base, [adapter], out, device="cpu", dtype="float32")
    want = peft_logits(deq, [adapter], dtype=torch.float64)
    got = logits_of(load_model(out, torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    unmerged = logits_of(load_model(deq, torch.float64))
    assert not torch.allclose(unmerged, want, rtol=1e-4, atol=1e-4)  # the adapter matters


def test_gptq_without_dtype_is_refused_until_mixed_output_exists(llama):
    base, _, adapter = packed(llama, "gptq4-desc-act")
    out = base.parent / "out-nodtype"
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert "GPTQ model" in result.stderr and "--dtype bfloat16" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    "variant, name",
    [
        ("gptq4-desc-act", "model.layers.1.mlp.gate_proj.weight"),  # dequantized only
        ("awq", "model.layers.1.self_attn.q_proj.weight"),  # dequantized and merged
    ],
)
def test_verify_catches_one_changed_value(llama, variant, name):
    base, _, adapter = packed(llama, variant)
    out = base.parent / f"out-tamper-{variant}"
    shardmerge.merge(base, [adapter], out, device="cpu", dtype="float32")
    assert verify(out, base, [adapter]).ok
    index = read_index(out)
    file = out / (index["weight_map"][name] if index else "model.safetensors")
    tensors = load_file(str(file))
    bits = tensors[name].view(torch.int32).clone()
    bits.view(-1)[37] += 1  # one ulp
    tensors[name] = bits.view(torch.float32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    report = verify(out, base, [adapter])
    assert not report.ok
    assert any(name in p for p in report.problems), report.problems


def test_verify_decodes_by_its_own_arithmetic(llama):
    """verify's reference decoder is not the codec's, and both give the builder's values."""
    from shardmerge.codecs.int_open import load_ref
    from shardmerge.verifier.dequant import reference_decoder

    for variant in ("gptq4-desc-act", "awq"):
        base, deq, _ = packed(llama, variant)
        view, stored = open_base_format(open_checkpoint(base))
        exact = read_tensors(deq)
        for name, codec in stored.specs.items():
            info = view.tensor(name)
            raw = torch.from_file(
                str(base / view.weight_map[name]), size=info.end, dtype=torch.uint8
            )[info.start : info.end]
            ours = reference_decoder(codec, info.shape, load_ref)
            assert type(ours) is not type(codec.decoder(info.shape, load_ref))
            rows = info.shape[0]
            got = torch.cat([ours(raw, r, min(rows, r + 24)) for r in range(0, rows, 24)])
            assert torch.equal(got, exact[name]), name


@pytest.mark.parametrize("variant, what", [("gptq4-desc-act", "GPTQ"), ("awq", "AWQ")])
def test_plan_counts_the_dequantized_tensors(llama, variant, what):
    base, _, adapter = packed(llama, variant)
    argv = ["plan", str(base), str(adapter), "--dtype", "bfloat16"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert f"quantized base: 14 tensors dequantized from {what} before merging" in result.output
