"""Broken or unsupported FP8 bases get a clear refusal: exit 2, one message, nothing written.

Each case copies a good tiny FP8 folder (Qwen3, ``fp8`` or compressed-tensors
convention, two shards) and breaks one promise in it. Also: what is not a
weight scale is not refused, and the job fingerprint sees a shard of scales.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import make_adapter
from click.testing import CliRunner
from fp8_builders import quantize_model, qwen3_config, save_tiny
from safetensors.torch import load_file, save_file

from shardmerge.cli import main

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(fp8 folder, compressed-tensors folder, adapter)."""
    tmp = tmp_path_factory.mktemp("fp8bad")
    src = save_tiny(tmp / "src", qwen3_config(), seed=7)
    quantize_model(src, tmp / "fp8", tmp / "deq")
    quantize_model(src, tmp / "ct", tmp / "ct-deq", convention="ct")
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=["q_proj", "v_proj"], seed=8)
    return tmp / "fp8", tmp / "ct", adapter


def edit_tensors(folder: Path, fn: Callable[[dict], None]) -> None:
    """Apply ``fn`` to all tensors; rewrite the shards and index (new names: first shard)."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    fn(tensors)
    weight_map = {n: index["weight_map"].get(n, files[0]) for n in tensors}
    for f in files:
        part = {n: t.contiguous() for n, t in tensors.items() if weight_map[n] == f}
        save_file(part, str(folder / f), metadata={"format": "pt"})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def edit_qc(folder: Path, fn: Callable[[dict], object]) -> None:
    config = json.loads((folder / "config.json").read_text())
    fn(config)
    (folder / "config.json").write_text(json.dumps(config))


def set_scale(name: str, value: float) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        s = t[name].clone()
        s.view(-1)[1] = value
        t[name] = s

    return fn


def assert_refused(tmp: Path, base: Path, adapter: Path, *phrases: str) -> None:
    out = tmp / "out"
    argv = ["merge", str(base), str(adapter), "-o", str(out), "-q", "--dtype", "bfloat16"]
    result = CliRunner().invoke(main, argv)
    print(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in {result.stderr}"
    assert not (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()


SI = f"{Q}.weight_scale_inv"
FP8_CASES = {
    "weight_without_scale": (lambda t: t.pop(SI), None, [f"its scale {SI} is in no shard"]),
    "scale_wrong_shape": (
        lambda t: t.update({SI: torch.ones(2, 2)}),
        None,
        ["has shape [2, 2]", "needs a scale of shape [3, 3]", "block size"],
    ),
    "nan_scale": (set_scale(SI, float("nan")), None, ["1 of its 9 scales are NaN"]),
    "inf_scale": (set_scale(SI, float("inf")), None, ["are infinite"]),
    "zero_scale": (set_scale(SI, 0.0), None, ["are zero"]),
    "negative_scale": (set_scale(SI, -0.5), None, ["are negative"]),
    "scale_of_int_dtype": (
        lambda t: t.update({SI: torch.ones(3, 3, dtype=torch.int32)}),
        None,
        ["a scale stored as I32"],
    ),
    "fp8_without_quantization_config": (
        None,
        lambda c: c.pop("quantization_config"),
        ["holds FP8 tensors", "no quantization_config"],
    ),
    "config_says_e5m2": (
        None,
        lambda c: c["quantization_config"].update(fmt="e5m2"),
        ["stored as float8_e4m3fn (e4m3)", "says float8_e5m2"],
    ),
    "unknown_encoding": (
        None,
        lambda c: c["quantization_config"].update(fmt="e3m4"),
        ["quantized with FP8 in the 'e3m4' encoding"],
    ),
    "fnuz_codes": (
        lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float().to(torch.float8_e4m3fnuz)}),
        None,
        ["float8_e4m3fnuz", "reads float8_e4m3fn and float8_e5m2"],
    ),
    "block_size_not_matching": (
        None,
        lambda c: c["quantization_config"].update(weight_block_size=[8, 8]),
        ["with weight_block_size [8, 8] needs a scale of shape", "does not match the tensors"],
    ),
    "block_size_not_positive": (
        None,
        lambda c: c["quantization_config"].update(weight_block_size=[0, 16]),
        ["weight_block_size [0, 16] is not two positive integers"],
    ),
    "unknown_scale_fmt": (
        None,
        lambda c: c["quantization_config"].update(scale_fmt="e4m3"),
        ["scale_fmt 'e4m3'"],
    ),
    "ue8m0_scales_not_powers_of_two": (
        None,
        lambda c: c["quantization_config"].update(scale_fmt="ue8m0"),
        ["scale_fmt is ue8m0 but", "not powers of two"],
    ),
    "stray_scale": (
        lambda t: t.update({"model.layers.0.mlp.nothing.weight_scale_inv": torch.ones(1, 1)}),
        None,
        ["scale tensors without an FP8 weight", "nothing.weight_scale_inv"],
    ),
    "scale_beside_16bit_weight": (
        lambda t: t.update({f"{K}.weight": torch.zeros(40, 72)}),
        None,
        [f"{K}.weight has a scale but is stored as F32"],
    ),
    "one_dimensional_fp8": (
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)}),
        None,
        ["only 2-D weights and 3-D fused"],
    ),
    "fbgemm_fp8_method": (
        None,
        lambda c: c["quantization_config"].update(quant_method="fbgemm_fp8"),
        ["quantized with FBGEMM FP8"],
    ),
}


@pytest.mark.parametrize("case", sorted(FP8_CASES))
def test_fp8_bad_input_refused(good, tmp_path, case):
    fp8, _, adapter = good
    base = tmp_path / "base"
    shutil.copytree(fp8, base)
    tensors, config, phrases = FP8_CASES[case]
    if tensors:
        edit_tensors(base, tensors)
    if config:
        edit_qc(base, config)
    assert_refused(tmp_path, base, adapter, str(base), *phrases)


def _weights(c: dict) -> dict:
    return c["quantization_config"]["config_groups"]["group_0"]["weights"]


CT_CASES = {
    "pack_quantized": (
        lambda c: c["quantization_config"].update(format="pack-quantized"),
        ["compressed-tensors pack-quantized 8-bit float weights"],
    ),
    "int_weights": (
        lambda c: _weights(c).update(type="int", num_bits=4),
        ["compressed-tensors 4-bit int weights"],
    ),
    "asymmetric": (lambda c: _weights(c).update(symmetric=False), ["asymmetric FP8"]),
    "tensor_group_strategy": (
        lambda c: _weights(c).update(strategy="tensor_group"),
        ["the 'tensor_group' weight strategy"],
    ),
    "ignored_module_holds_fp8": (
        lambda c: c["quantization_config"]["ignore"].append("re:.*q_proj$"),
        ["holds FP8 codes, but quantization_config.ignore lists it"],
    ),
    "bad_ignore_regex": (
        lambda c: c["quantization_config"]["ignore"].append("re:(("),
        ["not a valid regular expression"],
    ),
    "block_structure_not_matching": (
        lambda c: _weights(c).update(block_structure=[32, 32]),
        ["needs a scale of shape"],
    ),
    "sparse": (
        lambda c: c["quantization_config"].update(sparsity_config={"format": "sparse-24-bitmask"}),
        ["compressed-tensors sparsity (sparse-24-bitmask)"],
    ),
}


@pytest.mark.parametrize("case", sorted(CT_CASES))
def test_compressed_tensors_bad_input_refused(good, tmp_path, case):
    _, ct, adapter = good
    base = tmp_path / "base"
    shutil.copytree(ct, base)
    config, phrases = CT_CASES[case]
    edit_qc(base, config)
    assert_refused(tmp_path, base, adapter, str(base), *phrases)


def test_compressed_tensors_stray_weight_scale_refused_other_scales_kept(good, tmp_path):
    _, ct, adapter = good
    base = tmp_path / "base"
    shutil.copytree(ct, base)
    edit_tensors(
        base, lambda t: t.update({"model.layers.0.mlp.nothing.weight_scale": torch.ones(1)})
    )
    assert_refused(tmp_path, base, adapter, "nothing.weight_scale")


def test_a_models_own_scale_parameter_is_not_taken_for_a_weight_scale(good, tmp_path):
    """compressed-tensors scales end in .weight_scale; a model's own *_scale tensor is copied."""
    _, ct, adapter = good
    base = tmp_path / "base"
    shutil.copytree(ct, base)
    extra = torch.tensor([0.5, 0.25])
    edit_tensors(base, lambda t: t.update({"model.layers.0.layer_scale": extra}))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["merge", str(base), str(adapter), "-o", str(out), "-q", "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert torch.equal(merged["model.layers.0.layer_scale"], extra)


def test_a_shard_of_scales_only_is_in_the_job_fingerprint(good, tmp_path):
    """A resume must not reuse work done with other scales, even ones in a shard of their own."""
    import shardmerge

    fp8, _, adapter = good
    base = tmp_path / "base"
    shutil.copytree(fp8, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    scale = f"{Q}.weight_scale_inv"
    old_file = base / index["weight_map"][scale]
    rest = load_file(str(old_file))
    value = rest.pop(scale)
    save_file(rest, str(old_file), metadata={"format": "pt"})
    save_file({scale: value}, str(base / "scales.safetensors"), metadata={"format": "pt"})
    index["weight_map"][scale] = "scales.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))

    def fingerprint() -> str:
        plan = shardmerge.plan(base, [adapter], tmp_path / "out", device="cpu", dtype="bfloat16")
        assert "scales.safetensors" not in [s.name for s in plan.shards]
        return plan.fingerprint

    before = fingerprint()
    save_file({scale: value * 2}, str(base / "scales.safetensors"), metadata={"format": "x"})
    assert fingerprint() != before
