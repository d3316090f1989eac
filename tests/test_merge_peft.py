"""Merge semantics and exactness: shardmerge against PEFT (the oracle) and a float64 reference.

Every merged tensor must equal the float64 reference rounded once to the
output dtype; PEFT rounds more than once, so against PEFT we allow the error
its own roundings can make. Untouched tensors must be byte-identical.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import (
    LLAMA_TARGETS,
    assert_byte_identical,
    assert_close_to_oracle,
    assert_matches_reference,
    folder_files,
    load_model,
    logits_of,
    make_adapter,
    make_base,
    peft_logits,
    peft_merged_state,
    read_adapter,
    read_index,
    read_raw,
    read_raw_file,
    read_tensors,
    reference_merge,
    round_once,
    shard_files,
)

import shardmerge

# ``shardmerge.plan`` is the api function; the planner module is reached this way.
memory = importlib.import_module("shardmerge.planner.memory")

LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)


def _merge(base, adapters, out, **kwargs):
    adapters = adapters if isinstance(adapters, list) else [adapters]
    shardmerge.merge(base, adapters, out, **kwargs)
    return Path(out)


def _check_against_oracles(base, adapters, out, *, weights=None, roundings=2, dtype="auto"):
    """Output equals the float64 reference exactly, and PEFT's merge within its rounding."""
    ref = reference_merge(base, adapters, weights)
    got = read_tensors(out)
    assert_matches_reference(got, ref)
    oracle = peft_merged_state(base, adapters, dtype)
    assert_close_to_oracle(got, oracle, ref, roundings=roundings)
    return ref, got


# --------------------------------------------------------------------------- the reference itself


def _round_fraction(x: float, dtype: torch.dtype, int_type: torch.dtype) -> float:
    """Round x to dtype by exact rational comparison with its neighbours; ties to even."""
    c = torch.tensor([x], dtype=torch.float64).to(dtype)
    bits = c.view(int_type)
    cands = [c] + [(bits + k).view(dtype) for k in (-1, 1)]
    exact = Fraction(x)

    def key(t):
        v = t.double().item()
        return (abs(Fraction(v) - exact), int(t.view(int_type).item()) & 1)

    return min(cands, key=key).double().item()


@pytest.mark.parametrize(
    ("dtype", "int_type"), [(torch.bfloat16, torch.int16), (torch.float16, torch.int16)]
)
def test_reference_rounds_float64_once(dtype, int_type):
    # torch's float64 -> 16-bit conversion goes through float32 (two
    # roundings); the reference must not. Values at, just off, and 2^-30
    # off the midpoints between neighbours.
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(300, generator=g) * 0.01).to(dtype)
    b = (a.view(int_type) + 1).view(dtype)
    mid = (a.double() + b.double()) / 2
    xs = torch.cat([mid, mid * (1 + 2.0**-52), mid * (1 - 2.0**-52), mid * (1 + 2.0**-30)])
    got = round_once(xs, dtype)
    want = [_round_fraction(x, dtype, int_type) for x in xs.tolist()]
    assert got.double().tolist() == want
    assert not torch.equal(xs.to(dtype), got)  # the double rounding this avoids is real


# --------------------------------------------------------------------------- llama, bf16, sharded


@pytest.fixture(scope="module")
def llama_main(llama_bf16_sharded, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_main")
    adapter = make_adapter(llama_bf16_sharded, root / "adapter", target_modules=LLAMA_TARGETS)
    out = _merge(llama_bf16_sharded, adapter, root / "out")
    ref = reference_merge(llama_bf16_sharded, [adapter])
    return SimpleNamespace(base=llama_bf16_sharded, adapter=adapter, out=out, ref=ref)


def test_llama_bf16_merged_tensors_equal_float64_reference(llama_main):
    c = llama_main
    expected = {
        f"model.layers.{i}.{part}.{m}.weight"
        for i in range(2)
        for part, mods in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for m in [f"{x}_proj" for x in mods]
    }
    assert c.ref.touched == expected
    assert_matches_reference(read_tensors(c.out), c.ref)


def test_llama_bf16_untouched_tensors_byte_identical(llama_main):
    c = llama_main
    base, out = read_raw(c.base), read_raw(c.out)
    untouched = set(base) - c.ref.touched
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched
    assert_byte_identical(out, base, untouched)


def test_llama_bf16_same_shards_and_weight_map(llama_main):
    c = llama_main
    assert len(shard_files(c.base)) >= 3
    assert shard_files(c.out) == shard_files(c.base)
    assert read_index(c.out)["weight_map"] == read_index(c.base)["weight_map"]
    for shard in shard_files(c.base):
        assert read_raw_file(c.out / shard).names == read_raw_file(c.base / shard).names


def test_llama_bf16_index_total_size(llama_main):
    c = llama_main
    data_bytes = sum(len(t.data) for t in read_raw(c.out).values())
    assert read_index(c.out)["metadata"]["total_size"] == data_bytes
    assert read_index(c.base)["metadata"]["total_size"] == data_bytes


def test_llama_bf16_config_and_side_files_copied(llama_main):
    c = llama_main
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (c.out / name).read_bytes() == (c.base / name).read_bytes(), name


def test_llama_bf16_output_has_no_lora_keys(llama_main):
    c = llama_main
    names = set(read_raw(c.out))
    assert names == set(read_raw(c.base))
    assert not [n for n in names if "lora" in n or "base_layer" in n or "base_model" in n]


def test_llama_bf16_loads_with_transformers(llama_main):
    c = llama_main
    model = load_model(c.out)
    assert next(model.parameters()).dtype == torch.bfloat16
    state = model.state_dict()
    for name, t in read_tensors(c.out).items():
        assert torch.equal(state[name], t), name


def test_llama_bf16_close_to_peft_merge_and_unload(llama_main):
    c = llama_main
    oracle = peft_merged_state(c.base, [c.adapter])
    assert_close_to_oracle(read_tensors(c.out), oracle, c.ref, roundings=2)


# --------------------------------------------------------------------------- llama fp32 / fp16


@pytest.fixture(scope="module")
def llama_fp32_case(llama_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_fp32_case")
    adapter = make_adapter(llama_fp32, root / "adapter", target_modules=LLAMA_TARGETS, seed=11)
    out = _merge(llama_fp32, adapter, root / "out")
    return SimpleNamespace(base=llama_fp32, adapter=adapter, out=out)


def test_fp32_model_merged_equals_reference(llama_fp32_case):
    c = llama_fp32_case
    _check_against_oracles(c.base, [c.adapter], c.out)


def test_fp32_merged_logits_match_unmerged_peft_model(llama_fp32_case):
    c = llama_fp32_case
    want = peft_logits(c.base, [c.adapter])
    got = logits_of(load_model(c.out))
    assert not torch.allclose(want, logits_of(load_model(c.base)), atol=1e-3)
    torch.testing.assert_close(got, want, **LOGITS_TOL)


def test_fp16_model_merged_equals_reference(tmp_path):
    base = make_base(tmp_path / "base", "llama", dtype=torch.float16, seed=7)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=LLAMA_TARGETS, seed=12)
    out = _merge(base, adapter, tmp_path / "out")
    assert {t.dtype for t in read_raw(out).values()} == {"F16"}
    _check_against_oracles(base, [adapter], out)


# --------------------------------------------------------------------------- qwen2 biases


def test_qwen2_lora_bias_adds_scaled_lora_B_bias(qwen2_fp32, tmp_path):
    adapter = make_adapter(
        qwen2_fp32,
        tmp_path / "adapter",
        target_modules=["q_proj", "k_proj", "v_proj"],
        lora_bias=True,
    )
    _, tensors = read_adapter(adapter)
    assert any(k.endswith("q_proj.lora_B.bias") for k in tensors)
    out = _merge(qwen2_fp32, adapter, tmp_path / "out")
    ref, _ = _check_against_oracles(qwen2_fp32, [adapter], out)
    assert "model.layers.1.self_attn.v_proj.bias" in ref.merged
    assert not ref.replaced


def test_qwen2_bias_all_replaces_base_biases(qwen2_fp32, tmp_path):
    adapter = make_adapter(
        qwen2_fp32,
        tmp_path / "adapter",
        target_modules=["q_proj", "o_proj"],
        bias="all",
        perturb_base=True,
    )
    _, tensors = read_adapter(adapter)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert prefix + "q_proj.base_layer.bias" in tensors  # targeted module
    assert prefix + "k_proj.bias" in tensors  # other modules: plain names
    out = _merge(qwen2_fp32, adapter, tmp_path / "out")
    ref, got = _check_against_oracles(qwen2_fp32, [adapter], out)
    biases = {f"model.layers.{i}.self_attn.{m}_proj.bias" for i in range(2) for m in "qkv"}
    assert ref.replaced == biases
    base = read_tensors(qwen2_fp32)
    for name in biases:
        assert not torch.equal(got[name], base[name]), f"{name} was not replaced"


# --------------------------------------------------------------------------- gpt2 Conv1D


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    # gpt2 ties its embeddings: wte / lm_head are not targeted.
    base = make_base(root / "base", "gpt2", tie=True, seed=8)
    adapter = make_adapter(base, root / "adapter", target_modules=["c_attn", "c_proj", "c_fc"])
    out = _merge(base, adapter, root / "out")
    return SimpleNamespace(base=base, adapter=adapter, out=out)


def test_gpt2_conv1d_merge_transposed_delta(gpt2_case):
    c = gpt2_case
    config, _ = read_adapter(c.adapter)
    assert config["fan_in_fan_out"] is True
    ref, _ = _check_against_oracles(c.base, [c.adapter], c.out)
    assert "transformer.h.0.attn.c_attn.weight" in ref.merged  # [in, out] = [64, 192]
    assert "transformer.h.1.mlp.c_fc.weight" in ref.merged
    assert "transformer.h.1.mlp.c_proj.weight" in ref.merged


def test_gpt2_merged_logits_match_unmerged_peft_model(gpt2_case):
    c = gpt2_case
    torch.testing.assert_close(
        logits_of(load_model(c.out)), peft_logits(c.base, [c.adapter]), **LOGITS_TOL
    )


# --------------------------------------------------------------------------- mixture of experts


def test_qwen2_moe_attention_and_shared_expert_lora(qwen2_moe_fp32, tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + [
        f"shared_expert.{m}_proj" for m in ("gate", "up", "down")
    ]
    adapter = make_adapter(qwen2_moe_fp32, tmp_path / "adapter", target_modules=targets)
    out = _merge(qwen2_moe_fp32, adapter, tmp_path / "out")
    ref, _ = _check_against_oracles(qwen2_moe_fp32, [adapter], out)
    assert "model.layers.1.mlp.shared_expert.down_proj.weight" in ref.merged
    base_raw, out_raw = read_raw(qwen2_moe_fp32), read_raw(out)
    experts = {n for n in base_raw if ".mlp.experts." in n or n.endswith("mlp.gate.weight")}
    assert len(experts) == 2 * (4 * 3 + 1)
    assert_byte_identical(out_raw, base_raw, set(base_raw) - ref.touched)


def test_moe_expert_target_parameters_planned(qwen2_moe_fp32, tmp_path):
    """LoRA on expert parameters (target_parameters) is merged: one term per expert (tests/test_moe.py)."""
    adapter = make_adapter(
        qwen2_moe_fp32,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    p = shardmerge.plan(qwen2_moe_fp32, [adapter], tmp_path / "out")
    assert p.counts == {"linear": 2, "expert": 2 * 4 * 2}


# --------------------------------------------------------------------------- LoRA variants


def test_rslora_scaling(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    _check_against_oracles(llama_bf16, [adapter], out)


def test_rank_and_alpha_patterns(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16,
        tmp_path / "adapter",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 8, "^model.layers.1.self_attn.k_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    _, tensors = read_adapter(adapter)
    layer = "base_model.model.model.layers.{}.self_attn.{}.lora_A.weight"
    assert tensors[layer.format(0, "q_proj")].shape[0] == 8
    assert tensors[layer.format(1, "k_proj")].shape[0] == 2
    assert tensors[layer.format(0, "k_proj")].shape[0] == 4
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    _check_against_oracles(llama_bf16, [adapter], out)


def test_layers_to_transform(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16,
        tmp_path / "adapter",
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[1],
    )
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    ref, _ = _check_against_oracles(llama_bf16, [adapter], out)
    assert ref.touched == {f"model.layers.1.self_attn.{m}_proj.weight" for m in "qv"}
    base_raw = read_raw(llama_bf16)
    assert_byte_identical(read_raw(out), base_raw, set(base_raw) - ref.touched)


def test_embedding_lora_untied_replaces_base_layer(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16,
        tmp_path / "adapter",
        target_modules=["embed_tokens", "q_proj"],
        perturb_base=True,
    )
    _, tensors = read_adapter(adapter)
    saved = tensors["base_model.model.model.embed_tokens.base_layer.weight"]
    assert not torch.equal(saved, read_tensors(llama_bf16)["model.embed_tokens.weight"])
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    ref, _ = _check_against_oracles(llama_bf16, [adapter], out)
    assert "model.embed_tokens.weight" in ref.merged & ref.replaced


def test_embedding_lora_fp32_base_layer_into_bf16_base(llama_bf16, tmp_path):
    # Trained on a float32 copy of the bf16 base: the saved base_layer.weight
    # is float32 and replaces the bf16 tensor before the delta is added.
    adapter = make_adapter(
        llama_bf16,
        tmp_path / "adapter",
        target_modules=["embed_tokens", "q_proj"],
        perturb_base=True,
        model_dtype=torch.float32,
    )
    _, tensors = read_adapter(adapter)
    assert tensors["base_model.model.model.embed_tokens.base_layer.weight"].dtype == torch.float32
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    assert read_raw(out)["model.embed_tokens.weight"].dtype == "BF16"
    # PEFT rounds the float32 base_layer.weight into the bf16 model first.
    ref, _ = _check_against_oracles(llama_bf16, [adapter], out, roundings=3)
    assert "model.embed_tokens.weight" in ref.merged & ref.replaced


def test_lm_head_lora_untied(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16, tmp_path / "adapter", target_modules=["lm_head", "q_proj"], perturb_base=True
    )
    _, tensors = read_adapter(adapter)
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    ref, _ = _check_against_oracles(llama_bf16, [adapter], out)
    assert "lm_head.weight" in ref.merged & ref.replaced


def test_modules_to_save_lm_head_replaces_base(llama_bf16, tmp_path):
    adapter = make_adapter(
        llama_bf16,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        perturb_saved_modules=True,
    )
    _, tensors = read_adapter(adapter)
    saved = tensors["base_model.model.lm_head.weight"]
    out = _merge(llama_bf16, adapter, tmp_path / "out")
    ref, got = _check_against_oracles(llama_bf16, [adapter], out)
    assert ref.replaced == {"lm_head.weight"}
    assert saved.dtype == torch.bfloat16
    assert torch.equal(got["lm_head.weight"], saved)
    assert not torch.equal(got["lm_head.weight"], read_tensors(llama_bf16)["lm_head.weight"])


# --------------------------------------------------------------------------- several adapters


@pytest.fixture(scope="module")
def two_adapters_bf16(llama_bf16, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_bf16")
    a = make_adapter(llama_bf16, root / "a", target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_adapter(
        llama_bf16, root / "b", target_modules=["q_proj", "o_proj"], r=2, lora_alpha=6, seed=2
    )
    return SimpleNamespace(base=llama_bf16, adapters=[a, b], root=root)


def test_two_adapters_weighted_match_reference(two_adapters_bf16):
    # PEFT has no merge of W + sum_i w_i s_i B_i A_i with arbitrary weights
    # (add_weighted_adapter builds a new adapter, rounding on the way), so the
    # float64 reference is the oracle here.
    c = two_adapters_bf16
    out = _merge(c.base, c.adapters, c.root / "weighted", weights=[0.7, 0.3])
    ref = reference_merge(c.base, c.adapters, weights=[0.7, 0.3])
    assert "model.layers.0.self_attn.q_proj.weight" in ref.merged  # both adapters
    assert_matches_reference(read_tensors(out), ref)


def test_two_adapters_unweighted_match_peft(llama_fp32, tmp_path):
    a = make_adapter(llama_fp32, tmp_path / "a", target_modules=["q_proj", "v_proj"], seed=21)
    b = make_adapter(llama_fp32, tmp_path / "b", target_modules=["q_proj", "k_proj"], seed=22)
    out = _merge(llama_fp32, [a, b], tmp_path / "out")
    # PEFT: both adapters loaded, merge_and_unload(adapter_names=[a0, a1]):
    # one rounding per adapter plus the delta roundings.
    _check_against_oracles(llama_fp32, [a, b], out, roundings=4)
    torch.testing.assert_close(
        logits_of(load_model(out)), peft_logits(llama_fp32, [a, b]), **LOGITS_TOL
    )


# --------------------------------------------------------------------------- adapter file format


def test_legacy_bin_adapter_gives_same_tensor_bytes(llama_bf16, tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj", "lm_head"], seed=31, perturb_base=True)
    st = make_adapter(llama_bf16, tmp_path / "st" / "adapter", **kwargs)
    legacy = make_adapter(
        llama_bf16, tmp_path / "bin" / "adapter", safe_serialization=False, **kwargs
    )
    assert (legacy / "adapter_model.bin").exists()
    assert not (legacy / "adapter_model.safetensors").exists()
    out_st = _merge(llama_bf16, st, tmp_path / "out_st")
    out_bin = _merge(llama_bf16, legacy, tmp_path / "out_bin")
    # The shard metadata records each adapter's sha256, which differs between
    # the two weight files; every tensor's bytes and the layout must not.
    assert shard_files(out_st) == shard_files(out_bin)
    for shard in shard_files(out_st):
        a, b = read_raw_file(out_st / shard), read_raw_file(out_bin / shard)
        assert a.names == b.names
        for name in a.names:
            assert a.tensors[name] == b.tensors[name], name
    assert (out_st / "config.json").read_bytes() == (out_bin / "config.json").read_bytes()


# --------------------------------------------------------------------------- --dtype conversion


def _config_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    assert keys
    values = {config[k] for k in keys}
    assert len(values) == 1
    return values.pop()


@pytest.mark.parametrize(
    ("base_fixture", "out_dtype", "st_name"),
    [("llama_bf16", torch.float32, "F32"), ("llama_fp32", torch.bfloat16, "BF16")],
    ids=["bf16-to-float32", "fp32-to-bfloat16"],
)
def test_dtype_conversion(request, tmp_path, base_fixture, out_dtype, st_name):
    base = request.getfixturevalue(base_fixture)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    name = str(out_dtype).removeprefix("torch.")
    out = _merge(base, adapter, tmp_path / "out", dtype=name)
    assert {t.dtype for t in read_raw(out).values()} == {st_name}
    ref = reference_merge(base, [adapter], out_dtype=out_dtype)
    got = read_tensors(out)
    assert_matches_reference(got, ref)
    # Untouched tensors: converted with one (round-to-nearest-even) rounding.
    for n, w in read_tensors(base).items():
        if n not in ref.touched:
            assert torch.equal(got[n], w.to(out_dtype)), n
    assert _config_dtype(out) == name


# --------------------------------------------------------------------------- CLI


def test_cli_module_merge_matches_api(two_adapters_bf16, tmp_path):
    c = two_adapters_bf16
    api_out = _merge(c.base, c.adapters, tmp_path / "api", weights=[0.7, 0.3])
    cli_out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "shardmerge", "merge", str(c.base)]
    cmd += [str(a) for a in c.adapters] + ["-o", str(cli_out), "--weights", "0.7,0.3", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert folder_files(cli_out) == folder_files(api_out)


def test_console_script_merge_matches_api(llama_main, tmp_path):
    c = llama_main
    script = Path(sys.executable).parent / "shardmerge"
    assert script.exists()
    out = tmp_path / "cli"
    proc = subprocess.run(
        [str(script), "merge", str(c.base), str(c.adapter), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged into" in proc.stdout
    assert folder_files(out) == folder_files(c.out)


# --------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def determinism_case(llama_bf16_sharded, tmp_path_factory):
    """LoRA on every Linear plus embedding and lm_head, merged once with default settings."""
    root = tmp_path_factory.mktemp("determinism")
    adapter = make_adapter(
        llama_bf16_sharded,
        root / "adapter",
        target_modules=LLAMA_TARGETS + ["embed_tokens", "lm_head"],
        perturb_base=True,
        seed=41,
    )
    out = _merge(llama_bf16_sharded, adapter, root / "out")
    ref = reference_merge(llama_bf16_sharded, [adapter])
    assert_matches_reference(read_tensors(out), ref)
    return SimpleNamespace(
        base=llama_bf16_sharded, adapter=adapter, out=out, files=folder_files(out)
    )


def test_merging_twice_gives_identical_bytes(determinism_case, tmp_path):
    c = determinism_case
    assert folder_files(_merge(c.base, c.adapter, tmp_path / "again")) == c.files


def test_small_memory_budget_gives_identical_bytes(determinism_case, tmp_path):
    c = determinism_case
    budget = memory.BASELINE_BYTES + (64 << 10)
    p = shardmerge.plan(c.base, [c.adapter], tmp_path / "small", max_memory=budget)
    processed = [t for s in p.shards for t in s.tensors if t.action != "copy"]
    assert processed and all(t.block_rows < t.rows for t in processed)
    out = _merge(c.base, c.adapter, tmp_path / "small", max_memory=budget)
    assert folder_files(out) == c.files


@pytest.mark.parametrize("block_bytes", [1, 20000], ids=["1-row", "2-4-rows"])
def test_tiny_row_blocks_give_identical_bytes(determinism_case, tmp_path, monkeypatch, block_bytes):
    c = determinism_case
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", block_bytes)
    p = shardmerge.plan(c.base, [c.adapter], tmp_path / "out")
    rows = {t.block_rows for s in p.shards for t in s.tensors if t.action != "copy"}
    assert max(rows) <= 4
    assert folder_files(_merge(c.base, c.adapter, tmp_path / "out")) == c.files


def test_thread_count_gives_identical_bytes(determinism_case, tmp_path):
    c = determinism_case
    before = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outputs.append(folder_files(_merge(c.base, c.adapter, tmp_path / f"threads{n}")))
    finally:
        torch.set_num_threads(before)
    assert outputs[0] == outputs[1] == c.files
