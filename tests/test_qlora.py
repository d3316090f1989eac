"""QLoRA bases: the NF4 round trip (--qlora-base nf4) and pre-quantized bitsandbytes 4-bit folders.

The oracle is bitsandbytes itself (its CPU backend): codes and block absmax
from ``quantize_4bit``, values from ``dequantize_4bit`` taken in float32 and
rounded once to the tensor's dtype, which is what its CUDA kernel does (its
CPU backend's direct 16-bit dequantization rounds the code value first; we
follow CUDA, see shardmerge/codecs/nf4.py). Merges must equal the float64
reference built from those dequantized weights plus the LoRA delta, rounded
once.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import bitsandbytes.functional as bnb_f
import numpy as np
import pytest
import torch
from builders import (
    make_adapter,
    make_base,
    read_index,
    read_raw,
    read_tensors,
    reference_merge,
)
from click.testing import CliRunner

import shardmerge
from shardmerge.cli import main
from shardmerge.codecs import nf4_targets
from shardmerge.codecs.nf4 import (
    NF4_CODE,
    NF4_THRESHOLDS,
    nf4_quantize,
    nf4_roundtrip,
    unpack_4bit,
)
from shardmerge.errors import ShardmergeError
from shardmerge.io.checkpoint import open_checkpoint
from shardmerge.verifier.check import verify

# bitsandbytes calls torch._check_is_size, which torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
memory = importlib.import_module("shardmerge.planner.memory")

# hidden 40 (not a multiple of 64): row blocks must be 8 rows to hold whole
# quantization blocks, and k_proj (20 x 40 = 12.5 blocks) ends in a partial one.
SMALL = dict(hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "down_proj"]
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("qbase"), dtype=torch.bfloat16, seed=3, **SMALL)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base) -> Path:
    return make_adapter(base, tmp_path_factory.mktemp("qad"), target_modules=TARGETS, seed=5)


def _linear_names(tensors) -> list[str]:
    return sorted(n for n in tensors if n.split(".")[-2] in QUANTIZED)


def bnb_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 quantize + dequantize (float32 values, rounded once to x's dtype)."""
    packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    state.dtype = torch.float32
    return bnb_f.dequantize_4bit(packed, state).to(x.dtype)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _with_tensors(src: Path, dst: Path, replace: dict[str, torch.Tensor]) -> Path:
    """A copy of model folder ``src`` (one file) with some tensors replaced: a reference base."""
    from safetensors.torch import save_file

    dst.mkdir()
    tensors = read_tensors(src)
    tensors.update(replace)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


# --------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_roundtrip_equals_bitsandbytes(dtype):
    """Codes, absmax and values of many blocks equal bitsandbytes', bit for bit."""
    g = torch.Generator().manual_seed(11)
    parts = [
        torch.randn(40000, generator=g) * 0.02,  # weight-like
        torch.randn(6400, generator=g) ** 3,  # heavy tails: one value dominates its block
        torch.rand(6400, generator=g) * 1e-3 + 1e-4,  # one sign, small
        torch.zeros(128),  # all-zero blocks: code 0 (-1.0) times 0 gives -0.0
        torch.tensor([0.0] * 63 + [-3.0]),  # a lone value
        # exact code values times a power of two: on the codes, never near a threshold
        (NF4_CODE.repeat(4) * 0.25)[torch.randperm(64, generator=g)],
        torch.randn(38, generator=g),  # a partial last block (bnb packs an even count)
    ]
    if dtype == torch.float16:
        parts.append(torch.full((64,), 60000.0) * torch.linspace(-1, 1, 64))  # near fp16's max
    x = torch.cat(parts).to(dtype)
    packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    codes, absmax = nf4_quantize(x)
    assert torch.equal(codes, unpack_4bit(packed, x.numel()))
    assert torch.equal(absmax, state.absmax)
    got = nf4_roundtrip(x)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(bnb_roundtrip(x)))
    assert torch.equal(
        _bits(got[40000 + 12800 : 40000 + 12800 + 128]), _bits(-torch.zeros(128, dtype=dtype))
    )


def _cuda_tree(s: float) -> int:
    """bitsandbytes' CUDA dQuantizeNF4 decision tree, ported literally (float32 compares)."""
    f = np.float32
    x = f(s)
    if x > f(0.03979014977812767):
        if x > f(0.3893125355243683):
            if x > f(0.6427869200706482):
                return 0b1111 if x > f(0.8614784181118011) else 0b1110
            return 0b1101 if x > f(0.5016634166240692) else 0b1100
        if x > f(0.2035212516784668):
            return 0b1011 if x > f(0.2920137718319893) else 0b1010
        return 0b1001 if x > f(0.1202552504837513) else 0b1000
    if x > f(-0.33967943489551544):
        if x > f(-0.13791173323988914):
            return 0b0111 if x > f(-0.045525018125772476) else 0b0110
        return 0b0101 if x > f(-0.23460740596055984) else 0b0100
    if x > f(-0.6106329262256622):
        return 0b0011 if x > f(-0.4599952697753906) else 0b0010
    return 0b0001 if x > f(-0.8480964004993439) else 0b0000


def test_ties_follow_the_cuda_kernel():
    """On and next to every threshold the code is the CUDA tree's; bitsandbytes' CPU
    backend (nearest by float32 distance) differs on exactly six threshold values."""
    t = NF4_THRESHOLDS.numpy()
    values = np.concatenate(
        [t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)), NF4_CODE.numpy()]
    ).astype(np.float32)
    # Each value in its own block whose absmax is 1.0, so the scaled value is the value itself.
    x = torch.zeros(values.size, 64)
    x[:, 0] = torch.from_numpy(values)
    x[:, 1] = 1.0
    codes, _ = nf4_quantize(x)
    ours = codes.view(-1, 64)[:, 0].tolist()
    assert ours == [_cuda_tree(v) for v in values]
    packed, _ = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    cpu = unpack_4bit(packed, x.numel()).view(-1, 64)[:, 0].tolist()
    differ = sorted(float(v) for v, a, b in zip(values, ours, cpu, strict=True) if a != b)
    # The thresholds whose float32 value lies above the true midpoint (and one below it,
    # where float32 distances round the tie the other way).
    assert differ == sorted(float(t[k]) for k in (0, 1, 3, 4, 12, 14))


# --------------------------------------------------------------------------- --qlora-base nf4


def test_nf4_merge_equals_reference(base, adapter, tmp_path, monkeypatch):
    """Every quantized Linear weight is NF4 round-tripped (with its LoRA delta added where
    targeted, rounded once); everything else is untouched; block size does not matter."""
    tensors = read_tensors(base)
    linears = _linear_names(tensors)
    assert nf4_targets(open_checkpoint(base)) == linears
    deq = {n: bnb_roundtrip(tensors[n]) for n in linears}
    ref = reference_merge(_with_tensors(base, tmp_path / "deq", deq), [adapter])

    out = tmp_path / "out"
    result = shardmerge.merge(base, [adapter], out, qlora_base="nf4", device="cpu")
    assert result.tensors == {"merge": 6, "convert": 8, "copy": len(tensors) - 14}
    got = read_tensors(out)
    for name, want in ref.tensors.items():
        assert torch.equal(_bits(got[name]), _bits(want)), name
    for name in set(tensors) - set(linears):
        assert torch.equal(_bits(got[name]), _bits(tensors[name])), name
    assert verify(out, base, [adapter]).ok

    # Tiny row blocks (8 rows: whole quantization blocks) give the same bytes.
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", 5 * 72 * memory.MERGE_BYTES_PER_ELEMENT)
    small = tmp_path / "small"
    p = shardmerge.plan(base, [adapter], small, qlora_base="nf4", device="cpu")
    rows = {t.name: t.block_rows for t in p.shards[0].tensors if t.quant}
    assert set(rows.values()) == {8}, rows
    shardmerge.merge(base, [adapter], small, qlora_base="nf4", device="cpu")
    assert read_raw(small) == read_raw(out)

    # verify re-derives the round trip: a changed element of a round-tripped tensor fails.
    name = next(n for n in linears if "v_proj" in n)
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    pos = 8 + int.from_bytes(raw[:8], "little") + header[name]["data_offsets"][0]
    (out / "model.safetensors").write_bytes(raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1 :])
    report = verify(out, base, [adapter])
    assert not report.ok and name in report.summary()


def test_default_merge_unaffected(base, adapter, tmp_path):
    """Without --qlora-base the merge is into the 16-bit weights, as before."""
    ref = reference_merge(base, [adapter])
    shardmerge.merge(base, [adapter], tmp_path / "plain", device="cpu")
    got = read_tensors(tmp_path / "plain")
    for name, want in ref.tensors.items():
        assert torch.equal(_bits(got[name]), _bits(want)), name
    shardmerge.merge(base, [adapter], tmp_path / "nf4", qlora_base="nf4", device="cpu")
    nf4 = read_tensors(tmp_path / "nf4")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(nf4[name], got[name])
    assert shardmerge.plan(base, [adapter], tmp_path / "x", device="cpu").qlora_base == "none"


def test_fingerprint_and_resume_refusal(base, adapter, tmp_path):
    """The choice is part of the job: resuming OUT with another choice is refused."""
    out = tmp_path / "out"
    none = shardmerge.plan(base, [adapter], out, device="cpu")
    nf4 = shardmerge.plan(base, [adapter], out, device="cpu", qlora_base="nf4")
    assert none.fingerprint != nf4.fingerprint
    assert "qlora_base" not in json.loads(none.provenance)  # earlier jobs keep their fingerprint
    assert json.loads(nf4.provenance)["qlora_base"] == "nf4"
    shardmerge.merge(base, [adapter], out, qlora_base="nf4", device="cpu")
    with pytest.raises(ShardmergeError, match="different job") as e:
        shardmerge.merge(base, [adapter], out, device="cpu")
    assert "--qlora-base" in str(e.value)
    # The same choice again is a finished job: it resumes (nothing to redo).
    assert (
        shardmerge.merge(base, [adapter], out, qlora_base="nf4", device="cpu").shards_resumed == 1
    )


def test_cli_and_job_file(base, adapter, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(
        main,
        [
            "merge",
            str(base),
            str(adapter),
            "-o",
            str(out),
            "--qlora-base",
            "nf4",
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main, ["plan", str(base), str(adapter), "--qlora-base", "nf4", "--device", "cpu"]
    )
    assert r.exit_code == 0 and "14 tensors NF4 round-tripped" in r.output, r.output
    job = tmp_path / "job.yaml"
    job.write_text(
        f"base: {base}\nadapters: [{adapter}]\noutput: {tmp_path / 'job'}\nqlora_base: nf4\ndevice: cpu\n"
    )
    r = runner.invoke(main, ["run", str(job), "-q"])
    assert r.exit_code == 0, r.output
    assert read_raw(tmp_path / "job") == read_raw(out)
    r = runner.invoke(main, ["verify", str(out), "--base", str(base), "--adapter", str(adapter)])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    for choice, needle in (
        ("nf4-dq", "double quantization"),
        ("fp4", "FP4"),
        ("int3", "must be one of"),
    ):
        r = runner.invoke(
            main,
            ["merge", str(base), str(adapter), "-o", str(tmp_path / "no"), "--qlora-base", choice],
        )
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    job.write_text(
        f"base: {base}\nadapters: [{adapter}]\noutput: {tmp_path / 'x'}\nqlora_base: nf4-dq\n"
    )
    r = runner.invoke(main, ["run", str(job)])
    assert r.exit_code == 2 and "double quantization" in r.output, r.output


# --------------------------------------------------------------------------- pre-quantized folders


def make_bnb4_folder(
    src: Path, dst: Path, *, double_quant: bool, storage: torch.dtype = torch.uint8
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bitsandbytes 4-bit folder as transformers saves it, built with bnb's functional API.

    Two shards with an index; the quantization tensors of one weight sit in the
    other shard than its packed codes. Returns the folder and bnb's
    dequantization of every packed weight (float32 values rounded once).
    """
    from safetensors.torch import save_file

    tensors = read_tensors(src)
    out: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name not in _linear_names(tensors):
            out[name] = w
            continue
        packed, state = bnb_f.quantize_4bit(
            w,
            blocksize=64,
            quant_type="nf4",
            compress_statistics=double_quant,
            quant_storage=storage,
        )
        out[name] = packed
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.{k}"] = v
        # bnb's own reading of the saved state, dequantized in float32.
        qs = bnb_f.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
        qs.dtype = torch.float32
        deq[name] = bnb_f.dequantize_4bit(packed.view(torch.uint8), qs).to(w.dtype)
    dst.mkdir()
    names = sorted(out)
    moved = "model.layers.1.mlp.down_proj.weight"
    # The packed codes of ``moved`` in the first shard, its absmax etc. in the second.
    first = {n: out[n] for n in names if "layers.0" in n or n == moved}
    second = {n: out[n] for n in names if n not in first}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {}
    for fname, part in files.items():
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": str(storage).removeprefix("torch."),
        "llm_int8_skip_modules": None,
    }
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "tokenizer.json").write_text("{}")
    return dst, deq


@pytest.mark.parametrize(
    "double_quant, storage", [(False, torch.uint8), (True, torch.uint8), (True, torch.bfloat16)]
)
def test_prequantized_folder_merges(base, adapter, tmp_path, double_quant, storage):
    """Packed weights come out 16-bit, equal to bnb's dequantization + delta rounded once;
    the quantization tensors and quantization_config are gone; the index agrees."""
    q4, deq = make_bnb4_folder(base, tmp_path / "q4", double_quant=double_quant, storage=storage)
    ref = reference_merge(_with_tensors(base, tmp_path / "deq", deq), [adapter])
    out = tmp_path / "out"
    result = shardmerge.merge(q4, [adapter], out, device="cpu")
    assert result.tensors == {"merge": 6, "convert": 8, "copy": 7}
    got = read_tensors(out)
    original = read_tensors(base)
    assert set(got) == set(original)  # no absmax, quant_map, quant_state...
    for name, t in got.items():
        want = ref.tensors[name] if name in ref.tensors else deq.get(name, original[name])
        assert t.dtype == torch.bfloat16 and t.shape == original[name].shape, name
        assert torch.equal(_bits(t), _bits(want)), name
    index = read_index(out)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (out / "tokenizer.json").exists()
    report = verify(out, q4, [adapter])
    assert report.ok, report.summary()
    # It loads as an ordinary 16-bit model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)


def test_folder_saved_by_transformers(base, adapter, tmp_path):
    """A folder written by transformers' save_pretrained of a bnb 4-bit model (on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    m = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16
    )
    m.save_pretrained(tmp_path / "q4")
    plan = shardmerge.plan(tmp_path / "q4", [adapter], tmp_path / "out", device="cpu")
    assert plan.qlora_base == "bnb4"
    assert sum(1 for t in plan.shards[0].tensors if t.quant) == 14
    shardmerge.merge(tmp_path / "q4", [adapter], tmp_path / "out", device="cpu")
    assert verify(tmp_path / "out", tmp_path / "q4", [adapter]).ok
    # transformers' own dequantization agrees up to its CPU backend's rounding of the code
    # to bfloat16 (within one NF4 step of a block, far below it in practice).
    m.dequantize(dtype=torch.bfloat16)
    ref = m.model.layers[1].self_attn.v_proj.weight.float()
    got = read_tensors(tmp_path / "out")["model.layers.1.self_attn.v_proj.weight"].float()
    assert (got - ref).abs().max() <= 0.01 * ref.abs().max()


def _corrupt(folder: Path, dst: Path, edit) -> Path:
    """A copy of 4-bit ``folder`` with ``edit(tensors, config)`` applied (one file)."""
    from safetensors.torch import save_file

    tensors = read_tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


W = "model.layers.0.self_attn.q_proj.weight"


def _set_state(tensors, **changes):
    key = f"{W}.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist()))
    state.update(changes)
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda t, c: c["quantization_config"].update(load_in_4bit=False, load_in_8bit=True),
            "8-bit",
        ),
        (lambda t, c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "GPTQ"),
        (lambda t, c: c.update(quantization_config={"quant_method": "awq"}), "AWQ"),
        (lambda t, c: c.update(quantization_config={"quant_method": "hqq"}), "HQQ"),
        (lambda t, c: t.pop(f"{W}.absmax"), f"{W}.absmax"),
        (lambda t, c: _set_state(t, quant_type="fp4"), "fp4"),
        (lambda t, c: _set_state(t, shape=[40, 41]), "packed codes"),
        (lambda t, c: _set_state(t, dtype="int8"), "dtype"),
        (lambda t, c: t.update({f"{W}.quant_map": t[f"{W}.quant_map"] * 2}), "quant_map"),
        (
            lambda t, c: t.update(
                {f"{W}.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)}
            ),
            "JSON",
        ),
        (lambda t, c: t.update({f"{W}.SCB": torch.ones(4)}), "unexpected"),
    ],
)
def test_bad_quantized_bases_refused(base, adapter, tmp_path, edit, needle):
    q4, _ = make_bnb4_folder(base, tmp_path / "q4", double_quant=False)
    bad = _corrupt(q4, tmp_path / "bad", edit)
    with pytest.raises(ShardmergeError, match="(?s)" + __import__("re").escape(needle)) as e:
        shardmerge.plan(bad, [adapter], tmp_path / "out", device="cpu")
    assert str(bad) in str(e.value) or "--qlora-base" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_qlora_base_on_a_4bit_folder_refused(base, adapter, tmp_path):
    q4, _ = make_bnb4_folder(base, tmp_path / "q4", double_quant=False)
    with pytest.raises(ShardmergeError, match="already a bitsandbytes 4-bit"):
        shardmerge.plan(q4, [adapter], tmp_path / "out", device="cpu", qlora_base="nf4")
