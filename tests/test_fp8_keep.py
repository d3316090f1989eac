"""Merging into an FP8 base without --dtype: the output keeps the base's FP8 format.

Tiny DeepSeek-V3 (fine-grained ``weight_scale_inv``) and Qwen3 compressed-tensors
(``weight_scale`` in bf16) bases are quantized here (fp8_builders.py) in 16x16
blocks over dims that are not multiples of 16, with a scale in another shard.
Every code and scale of a touched tensor is checked against an independent
float64 reference (kept scale unless the block would exceed 448, then amax/448
in the scale's dtype; every touched block's under --requant-scales fresh);
untouched tensors and their scales must be byte-identical to the base.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import make_adapter, read_raw, read_tensors, reference_merge
from click.testing import CliRunner
from fp8_builders import deepseek_config, quantize_model, qwen3_config, save_tiny

import shardmerge
from shardmerge.cli import main

F8 = torch.float8_e4m3fn
BLOCK = 16
MLA = ["q_a_proj", "kv_b_proj", "o_proj"]


def e4m3_values() -> torch.Tensor:
    """The finite non-negative e4m3 values in code order, from the format's definition."""
    vals = [
        (c & 7) / 8 * 2.0**-6 if c >> 3 == 0 else (1 + (c & 7) / 8) * 2.0 ** ((c >> 3) - 7)
        for c in range(0x7F)
    ]
    return torch.tensor(vals, dtype=torch.float64)


def nearest_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest e4m3 values of float64 ``x`` (ties to the even code); and where x is within
    a hair of a midpoint, which a float64 reference cannot settle."""
    mags = e4m3_values()
    a = x.abs()
    hi = torch.bucketize(a, mags).clamp(1, 126)
    below, above = mags[hi - 1], mags[hi]
    mid = (below + above) / 2
    value = torch.where((a > mid) | ((a == mid) & (hi % 2 == 0)), above, below)
    value = torch.where(a >= 448.0, torch.full_like(a, 448.0), value)
    return value * x.sign(), (a - mid).abs() <= 1e-9 * mid


def spread(s: torch.Tensor, shape) -> torch.Tensor:
    full = s.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return full[: shape[0], : shape[1]]


def block_amax(x: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(x.abs(), (0, -x.shape[1] % BLOCK, 0, -x.shape[0] % BLOCK))
    r, c = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
    return padded.reshape(r, BLOCK, c, BLOCK).amax(dim=(1, 3))


def expected_scales(exact: torch.Tensor, kept: torch.Tensor, fresh: bool) -> torch.Tensor:
    """Kept scales, except blocks past 448 (every block when ``fresh``): amax/448 in the
    scale's own dtype."""
    amax = block_amax(exact)
    new = (amax / 448).to(kept.dtype)
    over = torch.ones_like(amax, dtype=torch.bool) if fresh else amax / kept.double() > 448
    return torch.where(over, new, kept)


def check_touched(out, fp8, deq, adapter, suffix: str, fresh=False, weight=1.0) -> int:
    """Every code and scale of each touched FP8 tensor against the float64 reference, and
    report.json's count of new scales per tensor; returns how many blocks got a new one."""
    survival = json.loads((out / ".shardmerge" / "report.json").read_text())["survival"]
    got, base = read_tensors(out), read_tensors(fp8)
    ref = reference_merge(deq, [adapter], [weight], out_dtype=torch.float64)
    touched = [n for n in ref.touched if base[n].dtype == F8]
    assert touched
    renewed = unsure_total = 0
    for name in touched:
        exact, kept = ref.tensors[name], base[name + suffix]
        want_scale = expected_scales(exact, kept, fresh)
        scale = got[name + suffix]
        assert scale.dtype == kept.dtype and torch.equal(scale, want_scale), name
        renewed += int((scale != kept).sum())
        if not fresh:  # each tensor's entry counts its blocks past 448 (the new scale may
            # round to the kept one in bf16)
            past = int((block_amax(exact) / kept.double() > 448).sum())
            assert survival[name]["new_scales"] == past, name
        else:
            assert "new_scales" not in survival[name]
        want, unsure = nearest_e4m3(exact / spread(scale, exact.shape))
        have = got[name].double()
        assert got[name].dtype == F8
        assert torch.equal(have[~unsure], want[~unsure]), name
        unsure_total += int(unsure.sum())
    assert unsure_total <= 2
    return renewed


def check_untouched(out, fp8, adapter_touched: set[str]) -> None:
    raw_base, raw_out = read_raw(fp8), read_raw(out)
    scales = {n + s for n in adapter_touched for s in ("_scale_inv", "_scale")}
    same = [n for n in raw_base if n not in adapter_touched and n not in scales]
    assert any(n.endswith(("_scale_inv", "_scale")) for n in same)
    for name in same:
        assert raw_out[name].data == raw_base[name].data, name
        assert raw_out[name].dtype == raw_base[name].dtype, name


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keep-ds")
    src = save_tiny(tmp / "src", deepseek_config(), seed=1)
    quantize_model(src, tmp / "fp8", tmp / "deq")
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=MLA, seed=2)
    return tmp, adapter


def test_deepseek_keeps_fp8_codes_and_scales_exactly(deepseek):
    tmp, adapter = deepseek
    out = tmp / "out"
    shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu")
    check_touched(out, tmp / "fp8", tmp / "deq", adapter, "_scale_inv")
    ref = reference_merge(tmp / "deq", [adapter], out_dtype=torch.float64)
    check_untouched(out, tmp / "fp8", set(ref.touched))
    base_config = json.loads((tmp / "fp8" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == base_config["quantization_config"]
    # The scale stored in another shard is written beside its (touched) weight, once.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(read_raw(tmp / "fp8"))
    report = shardmerge.verify(out, tmp / "fp8", [adapter])
    assert report.ok, report.summary()


def test_a_block_past_448_gets_a_new_scale_and_fresh_renews_every_block(deepseek):
    tmp, adapter = deepseek
    fp8, deq = tmp / "fp8", tmp / "deq"
    out, fresh = tmp / "out-big", tmp / "out-fresh"
    # A weight of 40 makes the LoRA delta push some blocks past the kept scale's range.
    shardmerge.merge(fp8, [adapter], out, device="cpu", weights=[40.0])
    assert check_touched(out, fp8, deq, adapter, "_scale_inv", weight=40.0) > 0
    assert shardmerge.verify(out, fp8, [adapter], weights=[40.0]).ok
    shardmerge.merge(fp8, [adapter], fresh, device="cpu", requant_scales="fresh")
    assert check_touched(fresh, fp8, deq, adapter, "_scale_inv", fresh=True) > 0
    assert shardmerge.verify(fresh, fp8, [adapter]).ok


@pytest.fixture(scope="module")
def qwen3_ct(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keep-qw")
    src = save_tiny(tmp / "src", qwen3_config(), seed=3)
    block = (BLOCK, BLOCK)
    kw = dict(convention="ct", block=block, scale_dtype=torch.bfloat16)
    quantize_model(src, tmp / "fp8", tmp / "deq", **kw)
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = make_adapter(tmp / "deq", tmp / "lora", target_modules=targets, seed=4)
    return tmp, adapter


def test_qwen3_compressed_tensors_keeps_bf16_weight_scales(qwen3_ct):
    tmp, adapter = qwen3_ct
    out = tmp / "out"
    argv = ["merge", str(tmp / "fp8"), str(adapter), "-o", str(out), "-q", "--device", "cpu"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    check_touched(out, tmp / "fp8", tmp / "deq", adapter, "_scale")
    ref = reference_merge(tmp / "deq", [adapter], out_dtype=torch.float64)
    check_untouched(out, tmp / "fp8", set(ref.touched))
    assert any(n.endswith(".input_scale") for n in read_raw(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert shardmerge.verify(out, tmp / "fp8", [adapter]).ok


def test_fused_3d_expert_tensors_are_refused_by_name_in_keep_format(deepseek):
    tmp, _ = deepseek
    src = tmp / "src"
    quantize_model(src, tmp / "fused", tmp / "fused-deq", fused=True, seed=5)
    experts = ["mlp.experts.down_proj"]
    adapter = make_adapter(
        tmp / "fused-deq", tmp / "lora-experts", target_modules=[], target_parameters=experts
    )
    out = tmp / "out-fused"
    argv = ["merge", str(tmp / "fused"), str(adapter), "-o", str(out), "-q", "--device", "cpu"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0, result.output
    assert "fused 3-D expert tensor" in result.stderr and "--dtype" in result.stderr
    assert "model.layers.1.mlp.experts" in result.stderr
    assert "Traceback" not in result.output
    assert not (out / "model.safetensors.index.json").exists()


def test_ue8m0_new_scales_are_powers_of_two(deepseek):
    tmp, adapter = deepseek
    fp8, deq, out = tmp / "ue8m0", tmp / "ue8m0-deq", tmp / "out-ue8m0"
    quantize_model(tmp / "src", fp8, deq, ue8m0=True, seed=6)
    shardmerge.merge(fp8, [adapter], out, device="cpu", weights=[40.0])
    got, base = read_tensors(out), read_tensors(fp8)
    ref = reference_merge(deq, [adapter], [40.0], out_dtype=torch.float64)
    renewed = 0
    for name in (n for n in ref.touched if base[n].dtype == F8):
        exact, kept = ref.tensors[name], base[name + "_scale_inv"]
        amax = block_amax(exact)
        pow2 = torch.exp2(torch.ceil(torch.log2(amax / 448))).to(kept.dtype)
        scale = got[name + "_scale_inv"]
        assert torch.equal(scale, torch.where(amax / kept.double() > 448, pow2, kept)), name
        renewed += int((scale != kept).sum())
        want, unsure = nearest_e4m3(exact / spread(scale, exact.shape))
        assert torch.equal(got[name].double()[~unsure], want[~unsure]), name
    assert renewed > 0
    assert shardmerge.verify(out, fp8, [adapter], weights=[40.0]).ok


def test_compressed_tensors_loader_reads_the_kept_format(qwen3_ct):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tmp, adapter = qwen3_ct
    out = tmp / "out-load"
    shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu")
    model, info = AutoModelForCausalLM.from_pretrained(
        out,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        output_loading_info=True,
    )
    # Dequantizing, the loader drops the static activation scales (of the base too).
    assert not info["missing_keys"]
    assert all(k.endswith(".input_scale") for k in info["unexpected_keys"])
    state, got = model.state_dict(), read_tensors(out)
    checked = 0
    for name, codes in got.items():
        if codes.dtype == F8:
            scale = got[name.removesuffix(".weight") + ".weight_scale"]
            # The loader multiplies in the scale's dtype (bf16): one rounding of the exact product.
            want = (codes.double() * spread(scale, codes.shape)).to(scale.dtype)
            assert torch.equal(state[name], want.to(state[name].dtype)), name
            checked += 1
    assert checked > 0


def test_an_interrupted_merge_resumes_to_the_same_bytes_and_fresh_is_another_job(deepseek):
    import os
    import subprocess
    import sys

    tmp, adapter = deepseek
    out, dest = tmp / "out", tmp / "out-resumed"
    if not out.exists():
        shardmerge.merge(tmp / "fp8", [adapter], out, device="cpu")
    cmd = [sys.executable, "-m", "shardmerge", "merge", str(tmp / "fp8"), str(adapter)]
    cmd += ["-o", str(dest), "-q", "--workers", "0", "--device", "cpu"]
    killed = subprocess.run(
        cmd, env={**os.environ, "SHARDMERGE_CRASH_AT": "40"}, capture_output=True, text=True
    )
    assert killed.returncode == -9
    assert len(json.loads((dest / ".shardmerge" / "journal.json").read_text())["shards"]) == 1
    other = subprocess.run(cmd + ["--requant-scales", "fresh"], capture_output=True, text=True)
    assert other.returncode != 0 and "different job" in other.stderr + other.stdout
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    for path in out.glob("*.safetensors"):
        assert (dest / path.name).read_bytes() == path.read_bytes()
