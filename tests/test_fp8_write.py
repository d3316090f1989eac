"""--quantize fp8-block: a 16-bit base and a LoRA written as compressed-tensors FP8.

Checked against an independent float64 reference of every code and scale, against
compressed-tensors' own config and transformers' compressed-tensors loader, by verify,
and for the things a merge promises: untouched tensors byte for byte, bytes that do not
depend on the block size, a fingerprint that covers the new options, clear refusals.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from builders import make_adapter, make_base, read_raw, read_tensors, reference_merge
from click.testing import CliRunner

import shardmerge
from shardmerge.cli import main
from shardmerge.errors import ShardmergeError

F8 = torch.float8_e4m3fn
BLOCK = 128
DIMS = dict(hidden_size=144, intermediate_size=260, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8w")
    base = make_base(root / "base", dtype=torch.bfloat16, max_shard_size="200KB", **DIMS)
    ada = make_adapter(base, root / "ada", target_modules=["q_proj", "down_proj", "lm_head"])
    out = root / "out"
    shardmerge.merge(base, [ada], out, quantize="fp8-block", max_memory="600MiB")
    return base, ada, out


def _e4m3_magnitudes() -> torch.Tensor:
    """The 127 finite non-negative e4m3 values, from the format's definition (code order)."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def _reference_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest e4m3 values of float64 ``x`` (ties to the even code), and where x is within
    a hair of a midpoint (where a float64 reference cannot decide)."""
    mags = _e4m3_magnitudes()
    a = x.abs().clamp(max=464.0)
    hi = torch.bucketize(a, mags).clamp(1, 126)
    lo = hi - 1
    below, above = mags[lo], mags[hi]
    mid = (below + above) / 2
    pick_hi = (a > mid) | ((a == mid) & (hi % 2 == 0))
    value = torch.where(pick_hi, above, below)
    value = torch.where(a >= 448.0, torch.full_like(a, 448.0), value)
    return value * x.sign(), (a - mid).abs() <= 1e-9 * mid


def _spread(s: torch.Tensor, shape) -> torch.Tensor:
    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return full[: shape[0], : shape[1]]


def test_every_code_and_scale_matches_a_float64_reference(merged):
    base, ada, out = merged
    ref = reference_merge(base, [ada])
    got = read_tensors(out)
    quantized = [n for n, t in got.items() if t.dtype == F8]
    assert len(quantized) == 14  # 7 Linear weights in each of 2 layers
    ambiguous = 0
    for name in quantized:
        exact = ref.exact.get(name, ref.base[name].double())
        scale = got[name.removesuffix(".weight") + ".weight_scale"]
        assert scale.dtype == torch.bfloat16
        assert tuple(scale.shape) == (-(-exact.shape[0] // BLOCK), -(-exact.shape[1] // BLOCK))
        amax = torch.nn.functional.pad(
            exact.abs(), (0, -exact.shape[1] % BLOCK, 0, -exact.shape[0] % BLOCK)
        )
        amax = amax.reshape(scale.shape[0], BLOCK, scale.shape[1], BLOCK).amax(dim=(1, 3))
        assert torch.equal(scale, (amax / 448).to(torch.bfloat16))  # no double rounding here
        want, unsure = _reference_codes(exact / _spread(scale.double(), exact.shape))
        have = got[name].double()
        assert torch.equal(have[~unsure], want[~unsure]), name
        if name in ref.exact:  # merged: float64 is not the exact value; near-ties are rare
            ambiguous += int(unsure.sum())
            continue
        # Untouched weights are exact in float64: settle their ties with rationals.
        s_full = _spread(scale.double(), exact.shape)
        for x, s, y in zip(
            exact[unsure].tolist(), s_full[unsure].tolist(), have[unsure].tolist(), strict=True
        ):
            assert Fraction(y) == _nearest_even(Fraction(x) / Fraction(s)), (name, x, s, y)
    assert ambiguous <= 2


def _nearest_even(q: Fraction) -> Fraction:
    """The e4m3 value nearest to q, ties to the even code."""
    mags = [Fraction(v) for v in _e4m3_magnitudes().tolist()]
    k = min(range(len(mags)), key=lambda i: (abs(mags[i] - abs(q)), i & 1))
    return mags[k] if q >= 0 else -mags[k]


def test_untouched_tensors_are_byte_identical_and_lm_head_is_merged(merged):
    base, ada, out = merged
    raw_base, raw_out = read_raw(base), read_raw(out)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert raw_out[name].data == raw_base[name].data
    ref = reference_merge(base, [ada], out_dtype=torch.bfloat16)
    assert raw_out["lm_head.weight"].dtype == "BF16"  # stays 16-bit, merged and rounded once
    assert torch.equal(read_tensors(out)["lm_head.weight"], ref.tensors["lm_head.weight"])


def test_config_is_the_one_compressed_tensors_builds_for_fp8_block(merged):
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        preset_name_to_scheme,
    )

    _, _, out = merged
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    ignore = config["ignore"]
    assert "lm_head" in ignore and "model.embed_tokens" in ignore
    assert not any("proj" in n for n in ignore)
    theirs = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_BLOCK", ["Linear"])},
        ignore=ignore,
        format="float-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
    ).model_dump()
    ours = {k: v for k, v in config.items() if k in theirs}
    assert ours == json.loads(json.dumps(theirs))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.down_proj.weight_scale" in index["weight_map"]
    card = (out / "README.md").read_text()
    assert "--quantize fp8-block -o OUT" in card and "compressed-tensors FP8" in card


def test_transformers_compressed_tensors_loader_dequantizes_to_codes_times_scales(merged):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _, _, out = merged
    model, info = AutoModelForCausalLM.from_pretrained(
        out,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    got = read_tensors(out)
    for name, codes in got.items():
        if codes.dtype != F8:
            continue
        scale = got[name.removesuffix(".weight") + ".weight_scale"].double()
        # One rounding of code * scale (exact in float64) to the model's dtype.
        want = (codes.double() * _spread(scale, codes.shape)).to(torch.bfloat16)
        assert torch.equal(state[name], want), name


def test_verify_re_derives_codes_and_scales_and_catches_a_changed_code(merged, tmp_path):
    base, ada, out = merged
    report = shardmerge.verify(out, base, [ada])
    assert report.ok, report.summary()
    assert report.max_ulp["fp8:linear"] <= 0.5 + 1e-6
    # Flip one code of a merged tensor in a copy of the output: verify must notice.
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = bad / index["weight_map"][name]
    tensors = load_file(shard)
    codes = tensors[name].view(torch.uint8).clone()
    codes[3, 5] ^= 1
    tensors[name] = codes.view(F8)
    save_file(tensors, shard, metadata=json.loads(json.dumps(_metadata(shard))))
    report = shardmerge.verify(bad, base, [ada])
    assert not report.ok and any(name in p for p in report.problems)


def _metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def test_bytes_do_not_depend_on_the_block_size(merged, tmp_path):
    base, ada, out = merged
    plan = shardmerge.plan(
        base, [ada], tmp_path / "small", quantize="fp8-block", max_memory="400MiB"
    )
    rows = [t.block_rows for s in plan.shards for t in s.tensors if t.encode is not None]
    assert rows and all(r % BLOCK == 0 or r == t for r, t in zip(rows, rows, strict=True))
    shardmerge.merge(base, [ada], tmp_path / "small", quantize="fp8-block", max_memory="400MiB")
    for name in (p.name for p in out.glob("*.safetensors")):
        assert (tmp_path / "small" / name).read_bytes() == (out / name).read_bytes()


def test_fingerprint_covers_quantize_and_requant_scales(merged, tmp_path):
    base, ada, _ = merged
    prints = {
        shardmerge.plan(base, [ada], tmp_path / "o", **kw).fingerprint
        for kw in ({}, {"quantize": "fp8-block"}, {"requant_scales": "fresh"})
    }
    assert len(prints) == 3


def test_cli_takes_the_flags_and_refuses_unknown_values(merged, tmp_path):
    base, ada, _ = merged
    out = tmp_path / "cli"
    runner = CliRunner()
    r = runner.invoke(
        main, ["merge", str(base), str(ada), "-o", str(out), "--quantize", "fp8-block", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == (
        "float-quantized"
    )
    r = runner.invoke(main, ["merge", str(base), str(ada), "-o", str(out), "--quantize", "fp8"])
    assert r.exit_code != 0 and "fp8-block" in r.output
    r = runner.invoke(main, ["verify", str(out), "--base", str(base), "--adapter", str(ada)])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_dora_on_a_quantized_weight_is_refused_before_writing(merged, tmp_path):
    base, _, _ = merged
    dora = make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ShardmergeError, match="DoRA"):
        shardmerge.merge(base, [dora], tmp_path / "o", quantize="fp8-block")
    assert not (tmp_path / "o").exists()


def test_a_base_without_a_layer_stack_is_refused(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "flat"
    base.mkdir()
    save_file({"proj.weight": torch.randn(8, 8)}, str(base / "model.safetensors"))
    (base / "config.json").write_text('{"model_type": "llama"}')
    ada = tmp_path / "ada"
    ada.mkdir()
    save_file(
        {
            "base_model.model.proj.lora_A.weight": torch.randn(2, 8),
            "base_model.model.proj.lora_B.weight": torch.randn(8, 2),
        },
        str(ada / "adapter_model.safetensors"),
    )
    (ada / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["proj"]})
    )
    with pytest.raises(ShardmergeError, match="numbered layer stack"):
        shardmerge.merge(base, [ada], tmp_path / "o", quantize="fp8-block")


def test_plan_says_what_is_written_as_fp8(merged):
    base, ada, _ = merged
    r = CliRunner().invoke(main, ["plan", str(base), str(ada), "--quantize", "fp8-block"])
    assert r.exit_code == 0, r.output
    assert "fp8-block output: 14 tensors as e4m3 codes with block scales (14 with fresh" in r.output


def test_kept_scales_through_the_codec_count_the_blocks_that_needed_fresh_ones():
    from shardmerge.codecs import Fp8BlockOut
    from shardmerge.terms import TensorRef

    kept = torch.tensor([[1.0 / 64], [1.0 / 64], [1.0 / 64]], dtype=torch.float32)
    ref = TensorRef("unused", "x.weight_scale_inv", "F32", (3, 1))
    spec = Fp8BlockOut("x.weight_scale_inv", "F32", (128, 128), kept=ref)
    enc = spec.encoder((300, 100), lambda r: kept if r == ref else None)
    base = torch.full((300, 100), 0.5, dtype=torch.bfloat16)
    base[200, 7] = 8.0  # 8 * 64 = 512 > 448: the second block needs a fresh scale
    codes = torch.cat([enc(base[a:b], [], a, b) for a, b in ((0, 256), (256, 300))])
    ((name, scales),) = enc.side_tensors()
    assert name == "x.weight_scale_inv" and scales.dtype == torch.float32
    fresh = float(torch.tensor(8.0 / 448, dtype=torch.float64).to(torch.float32))
    assert scales[:, 0].tolist() == [1.0 / 64, fresh, 1.0 / 64]
    assert enc.fresh_blocks == 1
    values = enc.values(codes, 0, 300)
    assert values[0, 0] == 0.5 and values[299, 99] == 0.5
    assert values[200, 7] == 448 * fresh  # the block's amax lands on 448 exactly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_writes_the_same_fp8_bytes_as_the_cpu(merged, tmp_path):
    base, ada, out = merged
    shardmerge.merge(base, [ada], tmp_path / "gpu", quantize="fp8-block", device="cuda")
    for name in (p.name for p in out.glob("*.safetensors")):
        assert (tmp_path / "gpu" / name).read_bytes() == (out / name).read_bytes()


def test_moe_routers_stay_16_bit_and_the_model_loads_without_missing_keys(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    base = make_base(tmp_path / "base", "qwen2_moe", dtype=torch.bfloat16)
    ada = make_adapter(base, tmp_path / "ada", target_modules=["q_proj", "shared_expert.up_proj"])
    out = tmp_path / "out"
    shardmerge.merge(base, [ada], out, quantize="fp8-block")
    got = read_tensors(out)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    for router in ("model.layers.0.mlp.gate", "model.layers.1.mlp.shared_expert_gate"):
        assert got[router + ".weight"].dtype == torch.bfloat16 and router in ignore
    assert got["model.layers.1.mlp.shared_expert.up_proj.weight"].dtype == F8
    _, info = AutoModelForCausalLM.from_pretrained(
        out,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert shardmerge.verify(out, base, [ada]).ok


def test_an_interrupted_fp8_merge_resumes_to_the_same_bytes_and_refuses_another_format(
    merged, tmp_path
):
    import os
    import subprocess
    import sys

    base, ada, out = merged
    dest = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "shardmerge", "merge", str(base), str(ada), "-o", str(dest)]
    cmd += ["--quantize", "fp8-block", "-q", "--workers", "0"]
    env = {**os.environ, "SHARDMERGE_CRASH_AT": "12"}  # killed mid-merge, after some shards
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    done_before = json.loads((dest / ".shardmerge" / "journal.json").read_text())["shards"]
    assert 0 < len(done_before) < len(list(out.glob("*.safetensors")))
    other = subprocess.run(cmd[:-5] + ["-q"], capture_output=True, text=True)
    assert other.returncode != 0 and "different job" in other.stderr + other.stdout
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    for name in (p.name for p in out.glob("*.safetensors")):
        assert (dest / name).read_bytes() == (out / name).read_bytes()


def test_scales_take_the_output_dtype_and_a_job_file_names_the_options(tmp_path):
    from shardmerge.jobs import job_from_dict

    base = make_base(tmp_path / "base", dtype=torch.float32)  # 64 x 64 and 128 x 64 weights
    ada = make_adapter(base, tmp_path / "ada", target_modules=["q_proj"])
    for dtype, scale in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / dtype
        shardmerge.merge(base, [ada], out, quantize="fp8-block", dtype=dtype)
        got = read_tensors(out)
        assert got["model.layers.0.self_attn.q_proj.weight_scale"].dtype == scale
        assert got["model.norm.weight"].dtype == (scale if dtype != "auto" else torch.float32)
        assert shardmerge.verify(out, base, [ada]).ok
    doc = {"base": str(base), "adapters": [str(ada)], "output": str(tmp_path / "j")}
    job = job_from_dict({**doc, "quantize": "fp8-block", "requant_scales": "fresh"}, "job.yaml")
    assert (job.quantize, job.requant_scales) == ("fp8-block", "fresh")
    with pytest.raises(ShardmergeError, match="quantize.*fp8-block"):
        job_from_dict({**doc, "quantize": "fp8"}, "job.yaml")


def test_a_scale_stored_in_another_shard_is_replaced_beside_its_weight(merged, tmp_path):
    """What an FP8 base with a scale in another shard needs: one scale, next to its weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, ada, _ = merged
    stray = tmp_path / "base"
    shutil.copytree(base, stray)
    index = json.loads((stray / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    last = sorted(set(index["weight_map"].values()))[-1]
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] != last
    tensors = load_file(stray / last)
    tensors[name] = torch.ones(2, 2, dtype=torch.bfloat16)
    save_file(tensors, stray / last, metadata={"format": "pt"})
    index["weight_map"][name] = last
    (stray / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    shardmerge.merge(stray, [ada], out, quantize="fp8-block")
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"][name] == out_index["weight_map"][name[: -len("_scale")]]
    holders = [p.name for p in out.glob("*.safetensors") if name in load_file(p)]
    assert holders == [out_index["weight_map"][name]]
    assert shardmerge.verify(out, stray, [ada]).ok
