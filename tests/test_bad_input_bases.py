"""Broken and hostile BASE folders on the MoE and 4-bit paths, through the CLI.

Same contract as tests/test_bad_input.py (whose Workspace and checks are
reused): a refused merge exits non-zero with a clear message naming the
problem and the file, without a traceback, leaves nothing in OUT that looks
finished, and changes no input; an input that is legitimately fine merges
to the correctly rounded result. The fixtures are tiny and written by hand
(a Mixtral-style MoE in both disk layouts, bitsandbytes-style 4-bit folders
packed with shardmerge.codecs.nf4's NF4 code), then damaged by editing their files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import (
    ERR_INCOMPATIBLE,
    ERR_INPUT,
    ERR_OUTPUT,
    ERR_RESOURCE,
    HID,
    INDEX,
    PREFIX,
    SHARD1,
    SHARD2,
    Q,
    V,
    Workspace,
    _rand,
    write_base,
)

import shardmerge
from shardmerge.codecs.nf4 import NF4_CODE, nf4_dequantize, nf4_quantize, nf4_roundtrip
from shardmerge.kernel.spans import RowSpans

E, INTER, R, ALPHA = 4, 6, 2, 4  # experts, expert intermediate size, rank, lora_alpha
S = ALPHA / R
L0 = "model.layers.0"
FUSED = f"{L0}.mlp.experts"  # the fused parameters' module, as the adapter names it
DISK = f"{L0}.block_sparse_moe.experts"  # Mixtral's per-expert modules on disk
GATE_UP, DOWN = f"{FUSED}.gate_up_proj", f"{FUSED}.down_proj"
# The adapter's keys: the outer ParamWrapper is down_proj's, the nested one gate_up_proj's.
A_DOWN, B_DOWN = f"{PREFIX}{FUSED}.lora_A.weight", f"{PREFIX}{FUSED}.lora_B.weight"
A_GU, B_GU = (
    f"{PREFIX}{FUSED}.base_layer.lora_A.weight",
    f"{PREFIX}{FUSED}.base_layer.lora_B.weight",
)
W = f"{Q}.weight"
STATE = f"{W}.quant_state.bitsandbytes__nf4"


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


# --------------------------------------------------------------------------- fixtures


def _all_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a model folder and the file holding it."""
    if (folder / INDEX).exists():
        where = json.loads((folder / INDEX).read_text())["weight_map"]
    else:
        where = dict.fromkeys(load_file(str(folder / "model.safetensors")), "model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(where.values())):
        tensors.update(load_file(str(folder / shard)))
    return tensors, where


def edit_tensors(folder: Path, fn) -> Path:
    """Rewrite ``folder``'s files after ``fn(tensors)``; new tensors go to the last shard."""
    tensors, where = _all_tensors(folder)
    fn(tensors)
    files = sorted(set(where.values()))
    where = {n: where.get(n, files[-1]) for n in tensors}
    for f in files:
        part = {n: t.clone() for n, t in tensors.items() if where[n] == f}  # no shared memory
        save_file(part, str(folder / f), metadata={"format": "pt"})
    if (folder / INDEX).exists():
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return folder


def edit_config(folder: Path, fn) -> Path:
    config = json.loads((folder / "config.json").read_text())
    fn(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def moe_base(folder: Path, layout: str, *, dtype=torch.float32, experts: int = E) -> Path:
    """A one-layer Mixtral: per expert (``block_sparse_moe.experts.N.w1/w3/w2``) or fused."""
    folder.mkdir(parents=True)
    config = {
        "model_type": "mixtral",
        "num_local_experts": experts,
        "hidden_size": HID,
        "intermediate_size": INTER,
        "num_hidden_layers": 1,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    t = {
        "model.embed_tokens.weight": _rand((16, HID), 1),
        f"{L0}.self_attn.q_proj.weight": _rand((HID, HID), 2),
        "model.norm.weight": _rand((HID,), 3),
        "lm_head.weight": _rand((16, HID), 4),
    }
    gate_up, down = _rand((experts, 2 * INTER, HID), 5), _rand((experts, HID, INTER), 6)
    if layout == "fused":
        t.update({f"{L0}.mlp.gate.weight": _rand((experts, HID), 7), GATE_UP: gate_up, DOWN: down})
    else:
        t[f"{L0}.block_sparse_moe.gate.weight"] = _rand((experts, HID), 7)
        for e in range(experts):
            t[f"{DISK}.{e}.w1.weight"] = gate_up[e, :INTER].clone()
            t[f"{DISK}.{e}.w3.weight"] = gate_up[e, INTER:].clone()
            t[f"{DISK}.{e}.w2.weight"] = down[e].clone()
    t = {n: v.to(dtype) for n, v in t.items()}
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def moe_adapter(
    folder: Path,
    *,
    experts: int = E,
    targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    replace: dict[str, torch.Tensor | None] | None = None,
) -> Path:
    """PEFT target_parameters LoRA on both fused expert parameters (A [r*E, in], B [out, r*E])."""
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": ALPHA,
        "target_modules": [],
        "target_parameters": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        A_GU: _rand((R * experts, HID), 50),
        B_GU: _rand((2 * INTER, R * experts), 51),
        A_DOWN: _rand((R * experts, INTER), 52),
        B_DOWN: _rand((HID, R * experts), 53),
    }
    for name, value in (replace or {}).items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def expert_reference(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Fused [E, ...] expected values: W + s * B[:, e::E] @ A[e*r:(e+1)*r], float64."""
    a = load_file(str(adapter / "adapter_model.safetensors"))
    tensors, _ = _all_tensors(base)
    out = {}
    for param, ak, bk in ((GATE_UP, A_GU, B_GU), (DOWN, A_DOWN, B_DOWN)):
        if param in tensors:
            w = tensors[param].double()
        else:  # per expert: stack (and concatenate w1/w3) as transformers does at load
            parts = ("w1", "w3") if param == GATE_UP else ("w2",)
            w = torch.stack(
                [torch.cat([tensors[f"{DISK}.{e}.{p}.weight"] for p in parts]) for e in range(E)]
            ).double()
        A, B = a[ak].double(), a[bk].double()
        out[param] = w + S * torch.stack(
            [B[:, e::E] @ A[e * R : (e + 1) * R] for e in range(w.shape[0])]
        )
    return out


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, high nibble first, as [n, 1] uint8 (bitsandbytes' layout)."""
    c = codes.reshape(-1)
    if c.numel() % 2:
        c = torch.cat((c, c.new_zeros(1)))
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def _blob(state: dict | str) -> torch.Tensor:
    text = state if isinstance(state, str) else json.dumps(state)
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def quantize_into(tensors: dict[str, torch.Tensor], weight: str, blocksize: int = 64) -> None:
    """Replace float ``weight`` by its packed NF4 codes and quantization tensors."""
    w = tensors[weight]
    codes, absmax = nf4_quantize(w, blocksize)
    tensors[weight] = _pack(codes)
    tensors[f"{weight}.absmax"] = absmax
    tensors[f"{weight}.quant_map"] = NF4_CODE.clone()
    state = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    tensors[f"{weight}.quant_state.bitsandbytes__nf4"] = _blob(state)


def bnb4_base(folder: Path) -> Path:
    """write_base's model with q_proj and v_proj stored as bitsandbytes NF4 (their quantization
    tensors in the other shard than q_proj's packed codes)."""
    write_base(folder)

    def quantize(t):
        for mod in (Q, V):
            quantize_into(t, f"{mod}.weight")

    edit_tensors(folder, quantize)
    return edit_config(
        folder,
        lambda c: c.update(
            quantization_config={
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
            }
        ),
    )


def dequantized(tensors: dict[str, torch.Tensor], weight: str) -> torch.Tensor:
    """shardmerge.codecs' reading of a packed weight (checked against bitsandbytes in test_qlora)."""
    state = json.loads(
        bytes(tensors[f"{weight}.quant_state.bitsandbytes__nf4"].reshape(-1).tolist())
    )
    shape, n = state["shape"], state["shape"][0] * state["shape"][1]
    packed = tensors[weight].reshape(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 15), 1).reshape(-1)[:n]
    absmax = tensors[f"{weight}.absmax"]
    return nf4_dequantize(codes, absmax, torch.float32, state["blocksize"]).view(shape)


def lora_reference(base_values: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """W + s * B @ A in float64 for the Workspace adapter's modules."""
    a = load_file(str(adapter / "adapter_model.safetensors"))
    return {
        f"{m}.weight": base_values[f"{m}.weight"].double()
        + S * a[f"{PREFIX}{m}.lora_B.weight"].double() @ a[f"{PREFIX}{m}.lora_A.weight"].double()
        for m in (Q, V)
    }


def merged(out: Path) -> dict[str, torch.Tensor]:
    return _all_tensors(out)[0]


# --------------------------------------------------------------------------- MoE: good inputs


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_moe_fixture_merges_exactly(ws, layout):
    base = moe_base(ws.inputs / "moe", layout)
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(base=base, adapters=[adapter])
    assert run.code == 0, run.output
    got, ref = merged(ws.out), expert_reference(base, adapter)
    if layout == "fused":
        for name in (GATE_UP, DOWN):
            assert torch.equal(got[name], ref[name].float()), name
    else:
        for e in range(E):
            assert torch.equal(got[f"{DISK}.{e}.w1.weight"], ref[GATE_UP][e, :INTER].float())
            assert torch.equal(got[f"{DISK}.{e}.w3.weight"], ref[GATE_UP][e, INTER:].float())
            assert torch.equal(got[f"{DISK}.{e}.w2.weight"], ref[DOWN][e].float())


def test_weight_parameter_of_a_dense_model_merges(ws):
    """target_parameters may name a 2-D Linear weight: PEFT's ParamWrapper is then B @ A."""
    a = load_file(str(ws.adapter / "adapter_model.safetensors"))
    adapter = moe_adapter(
        ws.inputs / "param_lora",
        targets=("self_attn.q_proj.weight",),
        replace={
            A_GU: None,
            B_GU: None,
            A_DOWN: None,
            B_DOWN: None,
            f"{PREFIX}{Q}.lora_A.weight": a[f"{PREFIX}{Q}.lora_A.weight"],
            f"{PREFIX}{Q}.lora_B.weight": a[f"{PREFIX}{Q}.lora_B.weight"],
        },
    )
    run = ws.merge(adapters=[adapter])
    assert run.code == 0, run.output
    ref = lora_reference(_all_tensors(ws.base)[0], ws.adapter)
    assert torch.equal(merged(ws.out)[W], ref[W].float())


def test_absurd_expert_count_stays_bounded_and_exact(ws):
    """1000 tiny experts in one fused tensor: blocks stay within one expert's rows (no block
    holding a padded copy of every expert's factors), the result is exact and verifies."""
    experts, r = 1000, 1
    base = ws.inputs / "many"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    save_file({DOWN: _rand((experts, 2, 2), 1)}, str(base / "model.safetensors"))
    adapter = moe_adapter(
        ws.inputs / "many_lora",
        targets=("mlp.experts.down_proj",),
        replace={
            A_GU: None,
            B_GU: None,
            A_DOWN: _rand((experts, 2), 2),
            B_DOWN: _rand((2, experts), 3),
        },
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": r}))
    plan = shardmerge.plan(base, [adapter], ws.out)
    (job,) = plan.shards[0].tensors
    assert 1 <= job.block_rows <= 2  # one expert's rows of the [E*2, 2] matrix view
    run = ws.merge(base=base, adapters=[adapter])
    assert run.code == 0, run.output
    a = load_file(str(adapter / "adapter_model.safetensors"))
    w = load_file(str(base / "model.safetensors"))[DOWN].double()
    A, B = a[A_DOWN].double(), a[B_DOWN].double()
    ref = w + (ALPHA / r) * torch.einsum("oe,ei->eoi", B, A)
    assert torch.equal(merged(ws.out)[DOWN], ref.float())
    assert shardmerge.verify(ws.out, base, [adapter]).ok


def test_row_spans_find_exactly_the_terms_meeting_a_block():
    class Item:
        def __init__(self, rows):
            self.rows = rows

    rng = random.Random(0)
    items = [Item(None)] + [Item((s, s + rng.randint(1, 9))) for s in rng.sample(range(200), 60)]
    items.insert(30, Item(None))
    spans = RowSpans(items)
    for _ in range(300):
        row0 = rng.randrange(0, 210)
        row1 = row0 + rng.randint(1, 15)
        want = [it for it in items if it.rows is None or (it.rows[0] < row1 and it.rows[1] > row0)]
        assert spans.meeting(row0, row1) == want


# --------------------------------------------------------------------------- MoE: bad adapters


BAD_MOE_ADAPTERS = {
    # lora_A rows not a multiple of r (and lora_B to match, so it is a pair).
    "rows_not_multiple_of_r": (
        {A_DOWN: _rand((R * E + 1, INTER), 1), B_DOWN: _rand((HID, R * E + 1), 2)},
        ["lora_A has 9 rows", "4.5 experts", "the base has 4 experts"],
    ),
    "adapter_for_3_experts": (
        {A_DOWN: _rand((R * 3, INTER), 1), B_DOWN: _rand((HID, R * 3), 2)},
        ["LoRA for 3 experts", "the base has 4 experts"],
    ),
    "lora_b_columns": ({B_DOWN: _rand((HID, R * E + 2), 2)}, ["do not make a LoRA pair"]),
    "lora_b_rows": ({B_DOWN: _rand((HID + 1, R * E), 2)}, ["each expert's delta is [9, 6]"]),
    "lora_a_3d": ({A_DOWN: _rand((E, R, INTER), 2)}, ["do not make a LoRA pair"]),
    "lora_b_missing": ({B_DOWN: None}, ["lora_A or lora_B is missing"]),
}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("case", sorted(BAD_MOE_ADAPTERS))
def test_bad_moe_adapter_refused(ws, layout, case):
    replace, phrases = BAD_MOE_ADAPTERS[case]
    base = moe_base(ws.inputs / "moe", layout)
    adapter = moe_adapter(ws.inputs / "bad", replace=replace)
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(adapter), DOWN, *phrases, code=ERR_INCOMPATIBLE)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_parameter_the_base_lacks(ws, layout):
    """No guessing which nested wrapper is whose: both are listed as unmatched."""
    base = moe_base(ws.inputs / "moe", layout)
    both = moe_adapter(ws.inputs / "both", targets=("mlp.experts.gate_up_proj", "mlp.experts.nope"))
    run = ws.merge(base=base, adapters=[both])
    ws.refused(run, str(both), "2 match no tensor of the base", "parameter nope", code=3)
    assert "each expert's delta" not in run.stderr
    alone = moe_adapter(
        ws.inputs / "alone", targets=("mlp.experts.nope",), replace={A_GU: None, B_GU: None}
    )
    run = ws.merge(base=base, adapters=[alone])
    ws.refused(run, str(alone), f"{FUSED} (LoRA on parameter nope)", code=ERR_INCOMPATIBLE)


def test_expert_parameters_on_a_dense_model(ws):
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(adapters=[adapter])
    ws.refused(run, str(adapter), "match no tensor", f"{FUSED}.base_layer", "gate_up_proj", code=3)


# --------------------------------------------------------------------------- MoE: broken bases

_EXPERT_PARTS = ("w1", "w2", "w3")

BROKEN_PER_EXPERT = {
    "middle_expert_w3_missing": (
        lambda t: t.pop(f"{DISK}.2.w3.weight"),
        None,
        [f"{DISK}.2.w3.weight", "experts 0 to 3 are stored"],
    ),
    "first_expert_w1_missing": (
        lambda t: t.pop(f"{DISK}.0.w1.weight"),
        None,
        [f"{DISK}.0.w1.weight"],
    ),
    "last_expert_w2_missing": (
        lambda t: t.pop(f"{DISK}.3.w2.weight"),
        None,
        [f"{DISK}.3.w2.weight", "num_local_experts = 4"],
    ),
    "last_expert_missing": (
        lambda t: [t.pop(f"{DISK}.3.{p}.weight") for p in _EXPERT_PARTS],
        None,
        [f"{DISK}.3.w1.weight", f"{DISK}.3.w2.weight", "num_local_experts = 4"],
    ),
    # Expert 5 stored, expert 4 not: a gap, whatever the config says.
    "gap_in_expert_numbers": (
        lambda t: t.update(
            {f"{DISK}.5.{p}.weight": t[f"{DISK}.0.{p}.weight"] for p in _EXPERT_PARTS}
        ),
        None,
        [f"{DISK}.4.w2.weight", "experts 0 to 5 are stored"],
    ),
    # config.json says 8 experts per layer; 4 are stored.
    "config_says_more_experts": (
        None,
        lambda c: c.update(num_local_experts=8),
        ["num_local_experts = 8", f"{DISK}.4.w1.weight", "and 2 more"],
    ),
    "config_says_a_huge_number": (
        None,
        lambda c: c.update(num_local_experts=10**12),
        [f"{DISK}.4.w2.weight", "and 999999999990 more"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PER_EXPERT))
def test_per_expert_base_missing_expert_tensors(ws, case):
    """A missing expert is an error listing its tensors, never a silently unmerged expert."""
    edit, config, phrases = BROKEN_PER_EXPERT[case]
    base = moe_base(ws.inputs / "moe", "per_expert")
    if edit:
        edit_tensors(base, edit)
    if config:
        edit_config(base, config)
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(base), "the base lacks", *phrases, "Re-download", code=ERR_INPUT)


BROKEN_PER_EXPERT_SHAPES = {
    "an_extra_expert": (
        lambda t: t.update(
            {f"{DISK}.4.{p}.weight": t[f"{DISK}.0.{p}.weight"] for p in _EXPERT_PARTS}
        ),
        ["the base has 5 experts"],
    ),
    "expert_tensor_3d": (
        lambda t: t.update({f"{DISK}.1.w1.weight": _rand((1, INTER, HID), 1)}),
        [f"{DISK}.1.w1.weight has shape [1, 6, 8], not 2-D"],
    ),
    "expert_widths_differ": (
        lambda t: t.update({f"{DISK}.1.w3.weight": _rand((INTER, HID + 1), 1)}),
        ["differ in shape"],
    ),
    "expert_not_float": (
        lambda t: t.update({f"{DISK}.0.w1.weight": torch.zeros(INTER, HID, dtype=torch.int32)}),
        ["is not floating point"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PER_EXPERT_SHAPES))
def test_per_expert_base_bad_shapes(ws, case):
    edit, phrases = BROKEN_PER_EXPERT_SHAPES[case]
    base = edit_tensors(moe_base(ws.inputs / "moe", "per_expert"), edit)
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(adapter), *phrases, code=ERR_INCOMPATIBLE)


BROKEN_FUSED = {
    "down_proj_2d": (_rand((HID, INTER), 1), ["the base has 1 experts"]),
    "down_proj_4d": (_rand((E, 1, HID, INTER), 1), ["has shape [4, 1, 8, 6], not 2-D or 3-D"]),
    "down_proj_1d": (_rand((E * HID * INTER,), 1), ["has shape [192], not 2-D or 3-D"]),
    "down_proj_stored_in_out": (_rand((E, INTER, HID), 1), ["stores as [experts, out, in]"]),
    "down_proj_int": (torch.zeros(E, HID, INTER, dtype=torch.int8), ["is not floating point"]),
    "down_proj_no_experts": (torch.zeros(0, HID, INTER), ["has shape [0, 8, 6]: no experts"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FUSED))
def test_fused_base_tensor_of_unexpected_shape(ws, case):
    value, phrases = BROKEN_FUSED[case]
    base = edit_tensors(moe_base(ws.inputs / "moe", "fused"), lambda t: t.update({DOWN: value}))
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(adapter), DOWN, *phrases, code=ERR_INCOMPATIBLE)


def test_fused_base_without_experts_and_adapter_for_none(ws):
    """A [0, out, in] expert tensor and an adapter with r*0 rows: refused, not a silent no-op."""
    base = edit_tensors(
        moe_base(ws.inputs / "moe", "fused"),
        lambda t: t.update(
            {DOWN: torch.zeros(0, HID, INTER), GATE_UP: torch.zeros(0, 2 * INTER, HID)}
        ),
    )
    adapter = moe_adapter(ws.inputs / "moe_lora", experts=0)
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(adapter), "no experts", code=ERR_INCOMPATIBLE)


@pytest.mark.parametrize("experts", [8, 0, "four"])
def test_fused_base_config_count_disagrees(ws, experts):
    """A fused tensor holds its experts whole: the tensors, not config.json, decide (exotic
    models such as LongCat pad their fused gate_up_proj beyond the config's count)."""
    base = edit_config(
        moe_base(ws.inputs / "moe", "fused"), lambda c: c.update(num_local_experts=experts)
    )
    adapter = moe_adapter(ws.inputs / "moe_lora")
    run = ws.merge(base=base, adapters=[adapter])
    assert run.code == 0, run.output
    assert torch.equal(merged(ws.out)[DOWN], expert_reference(base, adapter)[DOWN].float())


# --------------------------------------------------------------------------- 4-bit: good inputs


def _bnb4_expected(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    tensors, _ = _all_tensors(base)
    values = {f"{m}.weight": dequantized(tensors, f"{m}.weight") for m in (Q, V)}
    return {n: v.float() for n, v in lora_reference(values, adapter).items()}


def test_bnb4_fixture_merges_exactly(ws):
    base = bnb4_base(ws.inputs / "q4")
    run = ws.merge(base=base)
    assert run.code == 0, run.output
    got = merged(ws.out)
    for name, want in _bnb4_expected(base, ws.adapter).items():
        assert torch.equal(got[name], want), name
    assert set(got) == set(_all_tensors(ws.base)[0])  # quantization tensors gone
    assert "quantization_config" not in json.loads((ws.out / "config.json").read_text())


def _requantize(blocksize: int):
    def edit(t):
        w = dequantized(t, W)
        for s in ("absmax", "quant_map", "quant_state.bitsandbytes__nf4"):
            t.pop(f"{W}.{s}")
        t[W] = w
        quantize_into(t, W, blocksize)

    return edit


FINE_BNB4 = {
    "blocksize_32": _requantize(32),  # two blocks per 8 x 8 weight: row blocks of 4 rows
    "blocksize_128": _requantize(128),  # one partial block
    "blocksize_4096": _requantize(4096),
    "bf16_storage": lambda t: t.update({W: t[W].reshape(-1).view(torch.bfloat16).reshape(-1, 1)}),
    "float32_storage": lambda t: t.update({W: t[W].reshape(-1).view(torch.float32).reshape(-1, 1)}),
    "state_blob_2d": lambda t: t.update({STATE: t[STATE].reshape(-1, 1)}),
    "state_without_quant_type": lambda t: t.update(
        {STATE: _blob({k: v for k, v in _state(t).items() if k != "quant_type"})}
    ),
}


def _state(t) -> dict:
    return json.loads(bytes(t[STATE].reshape(-1).tolist()))


@pytest.mark.parametrize("case", sorted(FINE_BNB4))
def test_unusual_but_valid_4bit_folders_merge(ws, case):
    base = edit_tensors(bnb4_base(ws.inputs / "q4"), FINE_BNB4[case])
    run = ws.merge(base=base)
    assert run.code == 0, run.output
    got = merged(ws.out)
    for name, want in _bnb4_expected(base, ws.adapter).items():  # the inputs are unchanged
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("where", ["no_quantization_config", "index_omits_absmax"])
def test_4bit_folder_read_from_its_tensors(ws, where):
    """The tensors say it is 4-bit; the shards hold what the index leaves out."""
    base = bnb4_base(ws.inputs / "q4")
    if where == "no_quantization_config":
        edit_config(base, lambda c: c.pop("quantization_config"))
    else:
        index = json.loads((base / INDEX).read_text())
        del index["weight_map"][f"{W}.absmax"]
        (base / INDEX).write_text(json.dumps(index))
    run = ws.merge(base=base)
    assert run.code == 0, run.output
    got = merged(ws.out)
    for name, want in _bnb4_expected(base, ws.adapter).items():
        assert torch.equal(got[name], want), name


# --------------------------------------------------------------------------- 4-bit: broken folders


def _set_state(**changes):
    def edit(t):
        t[STATE] = _blob({**_state(t), **changes})

    return edit


def _nested(*more):
    """q_proj double-quantized (absmax as uint8 codes around an offset), then ``more`` edits."""

    def edit(t):
        absmax = t[f"{W}.absmax"]
        offset = float(absmax.mean()) / 2
        scale = absmax.abs().max().reshape(1)
        t[f"{W}.absmax"] = ((absmax - offset) / scale * 127.5 + 127.5).round().to(torch.uint8)
        t[f"{W}.nested_absmax"] = scale
        t[f"{W}.nested_quant_map"] = torch.linspace(-1, 1, 256)
        t[STATE] = _blob({**_state(t), "nested_blocksize": 256, "nested_offset": offset})
        for fn in more:
            fn(t)

    return edit


BROKEN_BNB4 = {
    # The quant_state blob.
    "state_not_json": (lambda t: t.update({STATE: _blob("{nope")}), "not a JSON object"),
    "state_not_utf8": (
        lambda t: t.update({STATE: torch.tensor([255, 254], dtype=torch.uint8)}),
        "not a JSON object",
    ),
    "state_json_list": (lambda t: t.update({STATE: _blob("[1, 2]")}), "not a JSON object"),
    "state_deeply_nested": (
        lambda t: t.update({STATE: _blob("[" * 30000 + "]" * 30000)}),
        "not a JSON object",
    ),
    "state_empty": (
        lambda t: t.update({STATE: torch.zeros(0, dtype=torch.uint8)}),
        "not a JSON object",
    ),
    "state_float32": (lambda t: t.update({STATE: torch.ones(4)}), "not a short uint8 JSON blob"),
    "state_huge": (
        lambda t: t.update({STATE: torch.cat((t[STATE], _blob(" " * (1 << 17))))}),
        "not a short uint8 JSON blob",
    ),
    "state_nan_offset": (
        _nested(
            lambda t: t.update(
                {
                    STATE: _blob(
                        bytes(t[STATE].tolist())
                        .decode()
                        .replace('"nested_offset": ', '"nested_offset": NaN, "x": ')
                    )
                }
            )
        ),
        "nested_offset nan",
    ),  # fmt: skip
    # Shape.
    "shape_wrong": (_set_state(shape=[8, 6]), "holds 32 bytes of packed codes"),
    "shape_3d": (_set_state(shape=[2, 4, 8]), "only 2-D weights"),
    "shape_negative": (_set_state(shape=[-8, -8]), "not a list of positive sizes"),
    "shape_huge": (_set_state(shape=[2**62, 2**62]), "holds 32 bytes of packed codes"),
    "shape_bools": (_set_state(shape=[True, 64]), "not a list of positive sizes"),
    "shape_text": (_set_state(shape="8x8"), "not a list of positive sizes"),
    "shape_missing": (_set_state(shape=None), "not a list of positive sizes"),
    # Block size.
    "blocksize_0": (_set_state(blocksize=0), "blocksize 0 is not a power of two"),
    "blocksize_48": (_set_state(blocksize=48), "blocksize 48 is not a power of two"),
    "blocksize_float": (_set_state(blocksize=64.0), "blocksize 64.0"),
    "blocksize_huge": (_set_state(blocksize=2**40), "from 2 to 4096"),
    "blocksize_32_absmax_for_64": (_set_state(blocksize=32), "absmax must be 2 float32 values"),
    # absmax.
    "absmax_short": (lambda t: t.update({f"{W}.absmax": torch.ones(0)}), "absmax must be 1"),
    "absmax_long": (lambda t: t.update({f"{W}.absmax": torch.ones(2)}), "absmax must be 1"),
    "absmax_float16": (
        lambda t: t.update({f"{W}.absmax": t[f"{W}.absmax"].half()}),
        "not F16 [1]",
    ),
    # Packed data.
    "packed_short": (lambda t: t.update({W: t[W][:-1]}), "holds 31 bytes of packed codes"),
    "packed_long": (lambda t: t.update({W: torch.cat((t[W], t[W]))}), "holds 64 bytes"),
    # Quant type.
    "quant_type_fp4": (_set_state(quant_type="fp4"), "bitsandbytes fp4; only NF4"),
    "quant_type_unknown": (_set_state(quant_type="int2"), "unknown quant type"),
    "key_says_fp4": (
        lambda t: t.update({f"{W}.quant_state.bitsandbytes__fp4": t.pop(STATE)}),
        "bitsandbytes fp4",
    ),
    "dtype_int8": (_set_state(dtype="int8"), "dtype 'int8' is not bfloat16"),
    "quant_map_not_nf4": (
        lambda t: t.update({f"{W}.quant_map": t[f"{W}.quant_map"] * 2}),
        "quant_map is not bitsandbytes' NF4 code",
    ),
    # Double quantization.
    "nested_quant_map_alone": (
        lambda t: t.update({f"{W}.nested_quant_map": torch.linspace(-1, 1, 256)}),
        "nested_quant_map but no",
    ),
    "nested_absmax_alone": (
        lambda t: t.update({f"{W}.nested_absmax": torch.ones(1)}),
        f"missing {W}.nested_quant_map",
    ),
    "nested_blocksize_0": (_nested(_set_state(nested_blocksize=0)), "nested_blocksize 0"),
    "nested_blocksize_huge": (_nested(_set_state(nested_blocksize=2**40)), "nested_blocksize"),
    "nested_blocksize_100": (_nested(_set_state(nested_blocksize=100)), "nested_blocksize 100"),
    "nested_offset_text": (_nested(_set_state(nested_offset="0.1")), "nested_offset '0.1'"),
    "nested_offset_bool": (_nested(_set_state(nested_offset=True)), "nested_offset True"),
    "nested_offset_missing": (_nested(_set_state(nested_offset=None)), "nested_offset None"),
    "nested_absmax_float32": (
        _nested(lambda t: t.update({f"{W}.absmax": t[f"{W}.absmax"].float()})),
        "nested absmax must be 1 uint8",
    ),
    "nested_absmax_too_long": (
        _nested(lambda t: t.update({f"{W}.nested_absmax": torch.ones(3)})),
        "nested_absmax must be 1 float32",
    ),
    "nested_quant_map_255": (
        _nested(lambda t: t.update({f"{W}.nested_quant_map": torch.ones(255)})),
        "nested_quant_map must be 256",
    ),
    # Missing or stray pieces.
    "quant_map_missing": (lambda t: t.pop(f"{W}.quant_map"), f"missing {W}.quant_map"),
    "packed_weight_missing": (lambda t: t.pop(W), "the packed weight itself is missing"),
    "quant_state_missing": (lambda t: t.pop(STATE), "without a *.quant_state"),
    "only_packed_codes_left": (
        lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{W}.")],
        "without a *.quant_state",
    ),
    "int8_scb_beside": (lambda t: t.update({f"{W}.SCB": torch.ones(8)}), "unexpected quantization"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BNB4))
def test_broken_4bit_base_refused(ws, case):
    edit, phrase = BROKEN_BNB4[case]
    base = edit_tensors(bnb4_base(ws.inputs / "q4"), edit)
    # An adapter on v_proj only: q_proj's damage must be found even when no LoRA touches it.
    adapter = ws.adapter_dir("v_only", modules={V: (4, HID)})
    run = ws.merge(base=base, adapters=[adapter])
    ws.refused(run, str(base), Q, phrase, code=ERR_INPUT)


def test_quant_tensors_in_a_shard_the_index_does_not_list(ws):
    base = bnb4_base(ws.inputs / "q4")
    index = json.loads((base / INDEX).read_text())
    tensors = load_file(str(base / SHARD2))
    moved = {n: tensors.pop(n) for n in list(tensors) if n.startswith(f"{W}.")}
    save_file(tensors, str(base / SHARD2), metadata={"format": "pt"})
    save_file(moved, str(base / "model-00003-of-00003.safetensors"), metadata={"format": "pt"})
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if n not in moved}
    (base / INDEX).write_text(json.dumps(index))
    run = ws.merge(base=base)
    ws.refused(run, str(base), W, "without a *.quant_state", "missing from the index", code=2)


def test_quantization_blocks_wider_than_the_budget(ws):
    """Whole 4096-value blocks over rows of 6 values: 2048 rows at once, over a tiny budget."""
    from shardmerge.planner.memory import BASELINE_BYTES

    odd = f"{L0}.mlp.odd_proj.weight"

    def add(t):
        t[odd] = _rand((2048, 6), 9)
        quantize_into(t, odd, 4096)

    base = edit_tensors(bnb4_base(ws.inputs / "q4"), add)
    run = ws.merge("--max-memory", str(BASELINE_BYTES + (256 << 10)), base=base)
    ws.refused(run, odd, "quantization blocks of 4096 values span 2048 rows", code=ERR_RESOURCE)


QUANTIZED_CONFIGS = {
    "int8_with_config": (
        lambda t: t.update({f"{W}.SCB": torch.ones(8), W: t[W].to(torch.int8)}),
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        "bitsandbytes 8-bit",
    ),
    "int8_scb_without_config": (
        lambda t: t.update(
            {f"{V}.weight.SCB": torch.ones(4), f"{V}.weight": t[f"{V}.weight"].to(torch.int8)}
        ),
        None,
        "bitsandbytes 8-bit",
    ),
    "gptq_config": (None, {"quant_method": "gptq", "bits": 4}, "GPTQ"),
    "gptq_tensors_without_config": (
        lambda t: [
            t.pop(W),
            t.update(
                {
                    f"{Q}.qweight": torch.zeros(1, HID, dtype=torch.int32),
                    f"{Q}.qzeros": torch.zeros(1, 1, dtype=torch.int32),
                    f"{Q}.scales": torch.ones(1, HID, dtype=torch.float16),
                }
            ),
        ],
        None,
        "GPTQ/AWQ-style packed weights",
    ),
    "bnb_4bit_config_no_tensors": (
        None,
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        "no packed 4-bit tensors",
    ),
    "config_not_an_object": (None, "gptq", "an unknown method"),
    "unknown_method": (None, {"quant_method": "zzz"}, "quantized with zzz"),
    "bnb_without_bits": (None, {"quant_method": "bitsandbytes"}, "quantized with bitsandbytes"),
    "absmax_without_quant_state": (
        lambda t: t.update({f"{W}.absmax": torch.ones(1), f"{W}.quant_map": NF4_CODE.clone()}),
        None,
        "no *.quant_state.bitsandbytes__nf4",
    ),
}


@pytest.mark.parametrize("case", sorted(QUANTIZED_CONFIGS))
def test_other_quantized_bases_refused(ws, case):
    edit, qc, phrase = QUANTIZED_CONFIGS[case]
    if edit:
        edit_tensors(ws.base, edit)
    if qc is not None:
        edit_config(ws.base, lambda c: c.update(quantization_config=qc))
    run = ws.merge(adapters=[ws.adapter_dir("v_only", modules={V: (4, HID)})])
    ws.refused(run, str(ws.base), phrase, code=ERR_INPUT)


@pytest.mark.parametrize("qc", [None, {}])
def test_empty_quantization_config_is_an_ordinary_base(ws, qc):
    edit_config(ws.base, lambda c: c.update(quantization_config=qc))
    run = ws.merge()
    assert run.code == 0, run.output
    ref = lora_reference(_all_tensors(ws.base)[0], ws.adapter)
    assert torch.equal(merged(ws.out)[W], ref[W].float())


# --------------------------------------------------------------------------- --qlora-base


@pytest.mark.parametrize(
    "value, phrase",
    [
        ("NF4", "must be one of none, nf4"),
        ("", "must be one of none, nf4"),
        ("nf4 ", "must be one of none, nf4"),
        ("bnb4", "must be one of none, nf4"),
        ("fp4", "FP4 code values"),
        ("nf4-dq", "double quantization"),
    ],
)
def test_qlora_base_bad_values(ws, value, phrase):
    run = ws.merge("--qlora-base", value)
    ws.refused(run, phrase, code=ERR_INPUT)


def test_qlora_base_on_a_model_with_no_eligible_weights(ws):
    base = ws.inputs / "flat"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"proj.weight": _rand((HID, HID), 1)}, str(base / "model.safetensors"))
    adapter = ws.adapter_dir("flat_lora", modules={"proj": (HID, HID)})
    run = ws.merge("--qlora-base", "nf4", base=base, adapters=[adapter])
    ws.refused(run, "--qlora-base nf4", str(base), "numbered layer stack", code=ERR_INPUT)


def test_qlora_base_on_a_4bit_folder(ws):
    base = bnb4_base(ws.inputs / "q4")
    run = ws.merge("--qlora-base", "nf4", base=base)
    ws.refused(run, str(base), "already a bitsandbytes 4-bit", code=ERR_INPUT)


def _bf16_base(ws) -> Path:
    return edit_tensors(ws.base, lambda t: t.update({n: v.bfloat16() for n, v in t.items()}))


def test_qlora_base_with_float32_output(ws):
    """The round trip is in the tensor's own dtype (bf16, as bitsandbytes dequantizes to the
    stored dtype); the delta is then added and rounded once to float32."""
    base = _bf16_base(ws)
    run = ws.merge("--qlora-base", "nf4", "--dtype", "float32")
    assert run.code == 0, run.output
    tensors, _ = _all_tensors(base)
    seen = {n: nf4_roundtrip(tensors[n]) for n in (W, f"{V}.weight")}
    got = merged(ws.out)
    for name, want in lora_reference(seen, ws.adapter).items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want.float()), name
    assert torch.equal(got["lm_head.weight"], tensors["lm_head.weight"].float())  # never quantized


def test_qlora_base_with_separate_outputs(ws):
    _bf16_base(ws)
    other = ws.adapter_dir("other", modules={Q: (HID, HID)}, seed=7)
    run = ws.merge("--qlora-base", "nf4", "--separate", adapters=[ws.adapter, other])
    assert run.code == 0, run.output
    for adapter in (ws.adapter, other):
        alone = ws.tmp / f"alone_{adapter.name}"
        assert ws.merge("--qlora-base", "nf4", adapters=[adapter], out=alone).code == 0
        for f in (SHARD1, SHARD2):
            assert (ws.out / adapter.name / f).read_bytes() == (alone / f).read_bytes()


def test_qlora_base_resumed_with_another_choice(ws):
    assert ws.merge("--qlora-base", "nf4").code == 0
    before = {f: (ws.out / f).read_bytes() for f in (SHARD1, SHARD2, INDEX)}
    run = ws.merge()
    assert run.code == ERR_OUTPUT and "--qlora-base" in run.stderr, run.output
    assert "Traceback" not in run.output
    assert {f: (ws.out / f).read_bytes() for f in before} == before


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_qlora_base_leaves_fused_experts_alone(ws, layout):
    """transformers 5 fuses Mixtral's per-expert w1/w2/w3 into 3-D parameters, which
    bitsandbytes does not quantize: with nf4 they merge exactly as without it, in both
    layouts, while the attention Linear is round-tripped."""
    base = moe_base(ws.inputs / "moe", layout, dtype=torch.bfloat16)
    adapter = moe_adapter(ws.inputs / "moe_lora")
    plain, nf4 = ws.tmp / "plain", ws.tmp / "nf4"
    assert ws.merge(base=base, adapters=[adapter], out=plain).code == 0
    run = ws.merge("--qlora-base", "nf4", base=base, adapters=[adapter], out=nf4)
    assert run.code == 0, run.output
    a, b = merged(plain), merged(nf4)
    experts = [n for n in a if ".experts." in n]
    assert len(experts) == (3 * E if layout == "per_expert" else 2)
    for name in experts:
        assert torch.equal(a[name], b[name]), name
    q = f"{L0}.self_attn.q_proj.weight"
    assert torch.equal(b[q], nf4_roundtrip(_all_tensors(base)[0][q]))
    assert not torch.equal(a[q], b[q])


def test_qlora_base_round_trips_experts_of_a_transformers4_adapter(ws):
    """LoRA on Mixtral's w1 as a Linear module (not a parameter) was trained with
    transformers 4, whose experts were nn.Linear modules and quantized: all are round-tripped."""
    from shardmerge.kernel.merge import cast

    base = moe_base(ws.inputs / "moe", "per_expert", dtype=torch.bfloat16)
    adapter = ws.adapter_dir("v4", modules={f"{DISK}.0.w1": (INTER, HID)})
    run = ws.merge("--qlora-base", "nf4", base=base, adapters=[adapter])
    assert run.code == 0, run.output
    tensors, got = _all_tensors(base)[0], merged(ws.out)
    a = load_file(str(adapter / "adapter_model.safetensors"))
    w1 = f"{DISK}.0.w1.weight"
    lora = (
        a[f"{PREFIX}{DISK}.0.w1.lora_B.weight"].double()
        @ a[f"{PREFIX}{DISK}.0.w1.lora_A.weight"].double()
    )
    want = cast(nf4_roundtrip(tensors[w1]).double() + S * lora, torch.bfloat16)
    assert torch.equal(got[w1], want)
    for e in range(E):
        name = f"{DISK}.{e}.w3.weight"
        assert torch.equal(got[name], nf4_roundtrip(tensors[name])), name
