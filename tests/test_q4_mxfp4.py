"""Merging into MXFP4 (gpt-oss) bases with --dtype: experts dequantized exactly, LoRA on attention
and on the experts (target_parameters), every tensor rounded once.

A tiny gpt-oss is quantized here (q4_builders.py): E2M1 codes from their bit
fields, a power of two per 32 inputs of an output row, blocks and scales in
different shards; its exact twin keeps the 16-bit layout ``[E, in, out]``
with gate and up interleaved.
"""

from __future__ import annotations

import pytest
import torch
from builders import make_adapter, read_index, read_tensors, round_once
from fp8_builders import save_tiny
from q4_builders import gpt_oss_config, mxfp4_quantize_model
from safetensors.torch import load_file

import shardmerge
from shardmerge.verifier.check import verify

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oss")
    src = save_tiny(tmp / "src", gpt_oss_config(), seed=9)
    mxfp4_quantize_model(src, tmp / "mxfp4", tmp / "deq")
    adapter = make_adapter(
        tmp / "deq", tmp / "lora", target_modules=["q_proj", "v_proj"],
        target_parameters=EXPERTS, seed=10,
    )  # fmt: skip
    return tmp, adapter


def test_attention_and_expert_lora_to_bfloat16_is_exact(gpt_oss):
    """The bytes of merging into the exact dequantized twin (a plain float64 base, whose
    expert merges test_moe.py checks against PEFT), and verify's float64 re-derivation."""
    tmp, adapter = gpt_oss
    out = tmp / "out"
    shardmerge.merge(tmp / "mxfp4", [adapter], out, device="cpu", dtype="bfloat16")
    twin = tmp / "out-twin"
    shardmerge.merge(tmp / "deq", [adapter], twin, device="cpu", dtype="bfloat16")
    got, want = read_tensors(out), read_tensors(twin)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    base = read_tensors(tmp / "deq")
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert got[gate_up].shape == base[gate_up].shape  # [E, in, out], gate/up interleaved
    assert not torch.equal(got[gate_up], round_once(base[gate_up], torch.bfloat16))  # merged
    assert set(read_index(out)["weight_map"]) == set(got)
    assert not any(n.endswith(("_blocks", "_scales")) for n in got)
    report = verify(out, tmp / "mxfp4", [adapter])
    assert report.ok, report.summary()
    assert report.tensors["merge"] >= 8  # q, v and both expert tensors of two layers


def test_experts_equal_transformers_own_mxfp4_dequantization(gpt_oss):
    """transformers' convert_moe_packed_tensors (its CPU dequantization of gpt-oss) gives the
    values the merge starts from: exact in float32 either way."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from shardmerge.codecs import open_base_format
    from shardmerge.codecs.int_open import load_ref
    from shardmerge.io.checkpoint import open_checkpoint

    tmp, _ = gpt_oss
    stored = {}
    for f in sorted((tmp / "mxfp4").glob("*.safetensors")):
        stored.update(load_file(str(f)))
    view, base = open_base_format(open_checkpoint(tmp / "mxfp4"))
    assert len(base.specs) == 4
    for name, codec in base.specs.items():
        theirs = convert_moe_packed_tensors(
            stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32
        )
        e, cols, rows = base.shapes[name]
        decode = codec.decoder(base.shapes[name], load_ref)
        ours = torch.cat([decode(None, r, min(e * cols, r + 40)) for r in range(0, e * cols, 40)])
        assert torch.equal(ours.view(e, cols, rows), theirs), name


def test_verify_decodes_experts_by_its_own_arithmetic(gpt_oss):
    from shardmerge.codecs import open_base_format
    from shardmerge.codecs.int_open import load_ref
    from shardmerge.io.checkpoint import open_checkpoint
    from shardmerge.verifier.dequant import reference_decoder

    tmp, _ = gpt_oss
    _, base = open_base_format(open_checkpoint(tmp / "mxfp4"))
    exact = read_tensors(tmp / "deq")
    for name, codec in base.specs.items():
        e, cols, rows = base.shapes[name]
        ref = reference_decoder(codec, base.shapes[name], load_ref)
        assert type(ref) is not type(codec.decoder(base.shapes[name], load_ref))
        got = torch.cat([ref(None, r, min(e * cols, r + 48)) for r in range(0, e * cols, 48)])
        assert torch.equal(got.view(e, cols, rows), exact[name]), name


G = "model.layers.0.mlp.experts.gate_up_proj"
CASES = {
    "nan_scale": (
        lambda t: t[f"{G}_scales"].view(-1).__setitem__(7, 255),
        None,
        [f"{G}_scales", "255 (NaN in E8M0)"],
    ),
    "scales_wrong_shape": (
        lambda t: t.update({f"{G}_scales": t[f"{G}_scales"][:, :-1].contiguous()}),
        None,
        [f"{G}_scales: has shape [4, 127, 2]", "[4, 128, 2]"],
    ),
    "blocks_wrong_packing": (
        lambda t: t.update({f"{G}_blocks": t[f"{G}_blocks"][..., :8].contiguous()}),
        None,
        [f"{G}_blocks", "expected uint8 [experts, rows, blocks, 16]"],
    ),
    "scales_missing": (lambda t: t.pop(f"{G}_scales"), None, [f"{G}_scales", "no shard"]),
    "other_model_type": (None, lambda c: c.update(model_type="mixtral"), ["MXFP4 mixtral"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_mxfp4_base_is_refused(gpt_oss, tmp_path, case):
    import json
    import shutil

    from safetensors.torch import save_file
    from test_q4_bad_input import assert_refused

    tmp, adapter = gpt_oss
    tensors_edit, config_edit, phrases = CASES[case]
    base = shutil.copytree(tmp / "mxfp4", tmp_path / "base")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    if tensors_edit:
        tensors, owner = {}, {}
        for f in sorted(base.glob("*.safetensors")):
            part = load_file(str(f))
            tensors.update(part)
            owner.update(dict.fromkeys(part, f.name))
        tensors_edit(tensors)
        for f in sorted(base.glob("*.safetensors")):
            part = {n: t for n, t in tensors.items() if owner.get(n) == f.name}
            save_file(part, str(f), metadata={"format": "pt"})
        index["weight_map"] = {n: s for n, s in index["weight_map"].items() if n in tensors}
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    if config_edit:
        config = json.loads((base / "config.json").read_text())
        config_edit(config)
        (base / "config.json").write_text(json.dumps(config))
    assert_refused(base, adapter, tmp_path / "out", phrases)


def test_one_expert_in_memory_at_a_time(gpt_oss):
    """The decoder reads one expert's blocks per load, and the planner is told so."""
    from shardmerge.codecs import open_base_format
    from shardmerge.codecs.int_open import load_ref
    from shardmerge.io.checkpoint import open_checkpoint

    tmp, _ = gpt_oss
    _, base = open_base_format(open_checkpoint(tmp / "mxfp4"))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    codec, shape = base.specs[name], base.shapes[name]
    e, cols, rows = shape
    loaded = []

    def load(ref):
        loaded.append(ref.end - ref.start)
        return load_ref(ref)

    decode = codec.decoder(shape, load)
    for r in range(0, e * cols, 16):
        decode(None, r, r + 16)
    whole = codec.blocks.end - codec.blocks.start
    assert max(loaded) == whole // e  # one expert's blocks
    assert len(loaded) == 2 * e  # blocks and scales, once per expert
    assert codec.state_bytes((100 * e, cols, rows)) == codec.state_bytes(shape)  # not per expert
