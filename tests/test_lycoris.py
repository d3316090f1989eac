"""LoHa, LoKr and IA3 adapters: shardmerge against PEFT's merge_and_unload and an exact reference.

The reference here is independent of shardmerge: PEFT's formulas evaluated in
float64 straight from the saved files, rounded once; elements whose float64
value is too close to a rounding boundary to tell are evaluated exactly with
Fractions. Merged tensors must equal it bit for bit. Against PEFT (which
rounds several times) the tolerance is its own rounding error.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from builders import (
    LLAMA_TARGETS,
    Reference,
    _pattern_value,
    assert_byte_identical,
    assert_close_to_oracle,
    diff_stats,
    load_model,
    make_adapter,
    make_base,
    peft_merged_state,
    read_adapter,
    read_raw,
    read_tensors,
    round_once,
)
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    ShardmergeError,
    UnsupportedAdapterError,
)
from shardmerge.execute import policy
from shardmerge.io.sources import RefLoader
from shardmerge.kernel import factors
from shardmerge.terms import TensorEdit, TensorRef, Term

P = "base_model.model."


# --------------------------------------------------------------------------- building adapters


def make_lycoris(base: Path, folder: Path, config, *, seed: int = 1) -> Path:
    """A PEFT LoHa/LoKr/IA3 adapter on the model in ``base``, with non-trivial weights."""
    from peft import get_peft_model

    model = load_model(base)
    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "ia3_l" in name:  # initialised to ones: make every factor count
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    pm.save_pretrained(folder)
    return Path(folder)


def loha(**kw):
    from peft import LoHaConfig

    return LoHaConfig(**{"r": 4, "alpha": 8, "init_weights": False, **kw})


def lokr(**kw):
    from peft import LoKrConfig

    return LoKrConfig(**{"r": 4, "alpha": 8, "init_weights": False, **kw})


def ia3(**kw):
    from peft import IA3Config

    return IA3Config(**kw)


# --------------------------------------------------------------------------- exact reference

F = Fraction


def _modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        assert key.startswith(P), key
        module, role = key[len(P) :].rsplit(".", 1)
        out.setdefault(module, {})[role] = t
    return out


def _round_fraction(x: Fraction, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype``, to nearest, ties to even (by exact comparison)."""
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    c = round_once(torch.tensor([float(x)], dtype=torch.float64), dtype)
    bits = c.view(int_type[dtype])
    cands = [c] + [(bits + k).view(dtype) for k in (-1, 1)]
    cands = [t for t in cands if torch.isfinite(t).all()]  # around zero, a step is a NaN

    def key(t):
        return (abs(F(t.double().item()) - x), int(t.view(int_type[dtype]).item()) & 1)

    return min(cands, key=key).double().item()


class _Exact:
    """Per base tensor: float64 value, magnitude bound, and an exact evaluator per element."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.x = w.double().clone()
        self.mag = self.x.abs()
        self.parts = []  # functions (i, j) -> Fraction added to W

    def value(self, i: int, j: int) -> Fraction:
        return F(self.w[i, j].item()) + sum((f(i, j) for f in self.parts), F(0))


def _dot(a: torch.Tensor, b: torch.Tensor, i: int, j: int) -> Fraction:
    return sum((F(x) * F(y) for x, y in zip(a[i].tolist(), b[:, j].tolist(), strict=True)), F(0))


def exact_reference(
    base: Path, adapters: list[Path], weights: list[float] | None = None, out_dtype=None
) -> Reference:
    """PEFT's LoHa/LoKr/IA3 merge, exact, rounded once to the output dtype."""
    weights = weights or [1.0] * len(adapters)
    base_t = read_tensors(base)
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    ref = Reference(base=base_t)
    acc: dict[str, _Exact] = {}
    scaled: dict[str, torch.Tensor] = {}
    for folder, weight in zip(adapters, weights, strict=True):
        cfg, tensors = read_adapter(folder)
        kind = cfg["peft_type"]
        for module, roles in _modules(tensors).items():
            name = f"{module}.weight"
            if kind == "IA3":
                w, v = base_t[name], roles["ia3_l"].double()
                ff = v.shape[0] == 1 and v.shape[1] != 1
                conv1d = model_type == "gpt2"
                # Linear (out, in): per row unless feedforward; Conv1D (in, out) the other way.
                per_row = ff == conv1d
                vec = v.reshape(-1)
                scaled[name] = w.double() * (vec[:, None] if per_row else vec[None, :])
                bias = f"{module}.bias"
                if not ff and bias in base_t:
                    scaled[bias] = base_t[bias].double() * vec
                continue
            if "weight" in roles:  # modules_to_save
                ref.replaced.add(name)
                scaled[name] = roles["weight"].double()
                continue
            r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["alpha"])
            s = weight * (alpha / r)
            e = acc.setdefault(name, _Exact(base_t[name]))
            if kind == "LOHA":
                w1a, w1b, w2a, w2b = (
                    roles[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
                )
                e.x += s * ((w1a @ w1b) * (w2a @ w2b))
                e.mag += abs(s) * ((w1a.abs() @ w1b.abs()) * (w2a.abs() @ w2b.abs()))
                ref.max_rank = max(ref.max_rank, 2 * r + 2)

                def part(i, j, s=s, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b):
                    return F(s) * _dot(w1a, w1b, i, j) * _dot(w2a, w2b, i, j)

            else:
                sides, bounds, exacts = [], [], []
                for k in (1, 2):
                    if f"lokr_w{k}" in roles:
                        m = roles[f"lokr_w{k}"].double()
                        sides.append(m)
                        bounds.append(m.abs())
                        exacts.append(lambda i, j, m=m: F(m[i, j].item()))
                    else:
                        a, b = roles[f"lokr_w{k}_a"].double(), roles[f"lokr_w{k}_b"].double()
                        sides.append(a @ b)
                        bounds.append(a.abs() @ b.abs())
                        exacts.append(lambda i, j, a=a, b=b: _dot(a, b, i, j))
                e.x += s * torch.kron(sides[0], sides[1])
                e.mag += abs(s) * torch.kron(bounds[0], bounds[1])
                ref.max_rank = max(ref.max_rank, 2 * r + 2)
                rb, cb = sides[1].shape

                def part(i, j, s=s, ex=exacts, rb=rb, cb=cb):
                    return F(s) * ex[0](i // rb, j // cb) * ex[1](i % rb, j % cb)

            e.parts.append(part)

    for name, w in base_t.items():
        dtype = out_dtype if (out_dtype is not None and w.is_floating_point()) else w.dtype
        if name in scaled:  # IA3 products and saved tensors: exact in float64
            assert name not in acc, name
            ref.exact[name] = scaled[name]
            ref.magnitude[name] = scaled[name].abs()
            ref.tensors[name] = round_once(scaled[name], dtype)
            ref.touched.add(name)
        elif name in acc:
            e = acc[name]
            y = round_once(e.x, dtype)
            # float64 is within far less than 2^-40 of the magnitudes: where that
            # does not settle the rounding, evaluate exactly.
            slack = e.mag * 2.0**-40
            doubt = round_once(e.x - slack, dtype) != round_once(e.x + slack, dtype)
            for i, j in doubt.nonzero().tolist():
                y[i, j] = _round_fraction(e.value(i, j), dtype)
            ref.exact[name], ref.magnitude[name], ref.tensors[name] = e.x, e.mag, y
            ref.touched.add(name)
            ref.merged.add(name)
        else:
            ref.tensors[name] = w.to(dtype)
    return ref


def assert_exact(out: dict[str, torch.Tensor], ref: Reference) -> None:
    assert ref.touched
    for name in sorted(ref.touched):
        got, want = out[name], ref.tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        n, ulp = diff_stats(got, want)
        assert n == 0, f"{name}: {n} elements differ from the exact reference, up to {ulp} ulp"


def check(base: Path, adapters: list[Path], out: Path, *, weights=None, peft=True, **kw):
    """Merge, then: exact vs the reference, close to PEFT, untouched bytes, verify()."""
    result = shardmerge.merge(base, adapters, out, weights=weights, **kw)
    got = read_tensors(out)
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(kw.get("dtype"))
    ref = exact_reference(base, adapters, weights, dtype)
    assert_exact(got, ref)
    if peft:
        oracle = peft_merged_state(base, adapters)
        assert_close_to_oracle(got, oracle, ref, roundings=2)
        # The adapter did something PEFT sees too.
        assert any(not torch.equal(oracle[n], ref.base[n]) for n in ref.merged | ref.touched)
    base_raw, out_raw = read_raw(base), read_raw(out)
    if dtype is None:
        assert_byte_identical(out_raw, base_raw, set(base_raw) - ref.touched)
    report = shardmerge.verify(out, base, adapters)
    assert report.ok, report.summary()
    return result, ref


# --------------------------------------------------------------------------- LoHa


def test_loha_bf16_all_targets_with_modules_to_save(llama_bf16, tmp_path):
    a = make_lycoris(
        llama_bf16, tmp_path / "a", loha(target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"])
    )
    result, ref = check(llama_bf16, [a], tmp_path / "out")
    assert result.modules == {"loha": 14, "modules_to_save": 1}
    assert "lm_head.weight" in ref.replaced and len(ref.merged) == 14
    assert result.max_delta["loha"] > 0


def test_loha_fp32_rank_alpha_patterns_and_dropouts(llama_fp32, tmp_path):
    cfg = loha(
        target_modules=LLAMA_TARGETS,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "down_proj": 5},
        rank_dropout=0.2,
        module_dropout=0.1,
    )
    a = make_lycoris(llama_fp32, tmp_path / "a", cfg, seed=2)
    tensors = load_file(str(a / "adapter_model.safetensors"))
    assert tensors[f"{P}model.layers.0.self_attn.q_proj.hada_w1_a"].shape[1] == 2
    assert tensors[f"{P}model.layers.1.mlp.down_proj.hada_w2_b"].shape[0] == 6
    check(llama_fp32, [a], tmp_path / "out")


def test_loha_float16_output(llama_fp32, tmp_path):
    """16-bit output from the float64 accumulator, subnormal float16 results included."""
    a = make_lycoris(llama_fp32, tmp_path / "a", loha(target_modules=["o_proj", "up_proj"]))
    _, ref = check(llama_fp32, [a], tmp_path / "out", dtype="float16", peft=False)
    tiny = [(ref.tensors[n].abs() < 2.0**-14).sum() for n in ref.merged]
    assert sum(int(t) for t in tiny) > 0  # subnormal outputs were exercised


# --------------------------------------------------------------------------- LoKr

LOKR_CASES = {
    # q/k/v/o: w1 and w2 both whole (dense kron); MLP: whole w1, low-rank w2.
    "default_fp32": ("llama_fp32", {}),
    # r=2 < max(a, c)/2: w1 = w1_a @ w1_b as well.
    "decompose_both_bf16": ("llama_bf16", {"r": 2, "alpha": 4, "decompose_both": True}),
    "factor_patterns_fp32": (
        "llama_fp32",
        {
            "decompose_factor": 4,
            "rank_pattern": {"down_proj": 2, "q_proj": 16},
            "alpha_pattern": {"gate_proj": 3},
            "rank_dropout": 0.1,
            "rank_dropout_scale": True,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(LOKR_CASES))
def test_lokr(case, request, tmp_path):
    fixture, kw = LOKR_CASES[case]
    base = request.getfixturevalue(fixture)
    a = make_lycoris(base, tmp_path / "a", lokr(target_modules=LLAMA_TARGETS, **kw), seed=5)
    keys = load_file(str(a / "adapter_model.safetensors"))
    if case.startswith("decompose_both"):
        assert f"{P}model.layers.0.self_attn.q_proj.lokr_w1_a" in keys
    else:
        assert f"{P}model.layers.0.self_attn.q_proj.lokr_w2" in keys
        assert f"{P}model.layers.0.mlp.up_proj.lokr_w2_a" in keys
    result, _ = check(base, [a], tmp_path / "out")
    assert result.modules == {"lokr": 14}


def test_loha_and_lokr_weighted_on_the_same_tensors(llama_bf16, tmp_path):
    targets = ["q_proj", "down_proj"]
    a = make_lycoris(llama_bf16, tmp_path / "a", loha(target_modules=targets), seed=7)
    b = make_lycoris(llama_bf16, tmp_path / "b", lokr(target_modules=targets), seed=8)
    result, _ = check(llama_bf16, [a, b], tmp_path / "out", weights=[0.5, -1.5], peft=False)
    assert result.modules == {"loha": 4, "lokr": 4}


# --------------------------------------------------------------------------- exact factors


def _ref(tmp: dict, key: str, t: torch.Tensor) -> TensorRef:
    tmp[key] = t
    return TensorRef("mem", key, "F32", tuple(t.shape), fmt="torch")


class _MemLoader(RefLoader):
    def __init__(self, tensors):
        super().__init__()
        self.tensors = tensors

    def load(self, ref):
        return self.tensors[ref.key]


def _ints(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-9, 10, shape, generator=g).to(torch.float32)


@pytest.mark.parametrize(
    ("w1", "w2", "dense"),
    [
        ((6, 4), (5, 3), True),  # both whole, dense smaller
        ((12, 1), (1, 10), False),  # both whole, low rank (1) smaller
        ((6, 4), ("a", 5, 3, 2), False),  # whole w1: identity on its smaller side
        (("a", 6, 4, 3), ("a", 5, 3, 2), False),
    ],
)
def test_lokr_factors_are_kron(w1, w2, dense):
    """L @ R equals kron(w1, w2) (integers: every step exact), dense only where smaller."""
    tensors: dict = {}
    sides = []
    for k, spec in enumerate((w1, w2)):
        if spec[0] == "a":
            _, rows, cols, r = spec
            a, b = _ints(rows, r, seed=k), _ints(r, cols, seed=k + 9)
            sides.append(((_ref(tensors, f"a{k}", a), _ref(tensors, f"b{k}", b)), a @ b))
        else:
            m = _ints(*spec, seed=k)
            sides.append(((_ref(tensors, f"m{k}", m),), m))
    (s1, m1), (s2, m2) = sides
    term = Term(
        "lokr", "x", "m", s1[0], s1[1] if len(s1) == 2 else None, 1.0, form="kronecker", extra=s2
    )
    left, right = factors.build_factors(term, _MemLoader(tensors))
    want = torch.kron(m1.double(), m2.double())
    got = left if right is None else left @ right
    assert (right is None) == dense
    assert torch.equal(got, want)
    assert factors.built_numel(term) == left.numel() + (right.numel() if right is not None else 0)


def test_loha_factors_are_hadamard():
    tensors: dict = {}
    w1a, w1b, w2a, w2b = (
        _ints(7, 3, seed=1),
        _ints(3, 5, seed=2),
        _ints(7, 2, seed=3),
        _ints(2, 5, seed=4),
    )
    refs = [_ref(tensors, k, t) for k, t in zip("abcd", (w1a, w1b, w2a, w2b), strict=True)]
    term = Term("loha", "x", "m", refs[0], refs[1], 1.0, form="hadamard", extra=(refs[2], refs[3]))
    left, right = factors.build_factors(term, _MemLoader(tensors))
    assert left.shape == (7, 6) and right.shape == (6, 5)
    assert torch.equal(left @ right, ((w1a @ w1b) * (w2a @ w2b)).double())
    # The planner counts the built factors, which outgrow the stored ones.
    edit = TensorEdit(terms=(term,))
    assert policy.held_bytes(edit) >= 8 * (left.numel() + right.numel())
    assert factors.built_numel(term) == 7 * 6 + 6 * 5 > sum(r.numel for r in refs)


def test_products_of_float32_factors_are_exact_in_float64():
    """The premise of the factor rewrite: full-mantissa float32 products lose nothing."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g) * 1e-3
    b = torch.randn(1000, generator=g) * 1e3
    prod = (a.double() * b.double()).tolist()
    assert all(F(p) == F(x) * F(y) for p, x, y in zip(prod, a.tolist(), b.tolist(), strict=True))


# --------------------------------------------------------------------------- IA3


def test_ia3_llama_bf16_attention_and_feedforward(llama_bf16, tmp_path):
    cfg = ia3(target_modules=LLAMA_TARGETS, feedforward_modules=["gate_proj", "down_proj"])
    a = make_lycoris(llama_bf16, tmp_path / "a", cfg, seed=3)
    keys = load_file(str(a / "adapter_model.safetensors"))
    assert keys[f"{P}model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 128)  # input features
    assert keys[f"{P}model.layers.0.mlp.up_proj.ia3_l"].shape == (128, 1)  # output features
    result, _ = check(llama_bf16, [a], tmp_path / "out")
    assert result.modules == {"ia3": 14}


def test_ia3_gpt2_conv1d_scales_columns_and_biases(tmp_path):
    base = make_base(tmp_path / "gpt2", "gpt2", seed=6)
    cfg = ia3(target_modules=["c_attn", "mlp.c_proj", "c_fc"], feedforward_modules=["mlp.c_proj"])
    a = make_lycoris(base, tmp_path / "a", cfg, seed=4)
    result, ref = check(base, [a], tmp_path / "out")
    # c_attn, c_fc: output features (columns of the Conv1D weight) and the bias;
    # mlp.c_proj: input features (rows), its bias untouched.
    assert result.modules == {"ia3": 6, "ia3_bias": 4}
    assert "transformer.h.0.attn.c_attn.bias" in ref.touched
    assert "transformer.h.0.mlp.c_proj.bias" not in ref.touched


def test_ia3_qwen2_linear_bias_scaled(qwen2_fp32, tmp_path):
    cfg = ia3(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    a = make_lycoris(qwen2_fp32, tmp_path / "a", cfg, seed=9)
    result, ref = check(qwen2_fp32, [a], tmp_path / "out", dtype="float16", peft=False)
    assert result.modules == {"ia3": 6, "ia3_bias": 4}
    assert "model.layers.1.self_attn.q_proj.bias" in ref.touched


def test_ia3_and_lora_on_different_tensors(llama_bf16, tmp_path):
    a = make_lycoris(
        llama_bf16, tmp_path / "a", ia3(target_modules=["k_proj"], feedforward_modules=[])
    )
    b = make_adapter(llama_bf16, tmp_path / "b", target_modules=["o_proj"])
    result = shardmerge.merge(llama_bf16, [a, b], tmp_path / "out")
    assert result.modules == {"ia3": 2, "linear": 2}
    assert shardmerge.verify(tmp_path / "out", llama_bf16, [a, b]).ok


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small(tmp_path_factory, llama_fp32):
    """One small LoHa, LoKr and IA3 adapter on q_proj/down_proj, to damage."""
    root = tmp_path_factory.mktemp("lycoris_small")
    t = ["q_proj", "down_proj"]
    return {
        "loha": make_lycoris(llama_fp32, root / "loha", loha(target_modules=t)),
        "lokr": make_lycoris(llama_fp32, root / "lokr", lokr(target_modules=t, r=2, decompose_both=True)),
        "ia3": make_lycoris(llama_fp32, root / "ia3", ia3(target_modules=t, feedforward_modules=["down_proj"])),
    }  # fmt: skip


def _variant(src: Path, dst: Path, *, change=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if change:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        change(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


Q = f"{P}model.layers.0.self_attn.q_proj"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _conv_factor(t):
    t[f"{Q}.hada_w1_a"] = t[f"{Q}.hada_w1_a"][:, :, None, None]


def _f64(t):
    for k in t:
        t[k] = t[k].double()


def _drop(key):
    return lambda t: t.pop(key)


REFUSALS = {
    "loha_cp_conv": ("loha", dict(change=_set(f"{Q}.hada_t1", torch.ones(4, 4, 3, 3))), UnsupportedAdapterError, "hada_t1"),
    "loha_4d_factor": ("loha", dict(change=_conv_factor), UnsupportedAdapterError, "convolution"),
    "lokr_t2_conv": ("lokr", dict(change=_set(f"{Q}.lokr_t2", torch.ones(2, 2, 3, 3))), UnsupportedAdapterError, "lokr_t2"),
    "lokr_float64": ("lokr", dict(change=_f64), UnsupportedAdapterError, "float64"),
    "ia3_float64": ("ia3", dict(change=_f64), UnsupportedAdapterError, "float64"),
    "loha_incomplete": ("loha", dict(change=_drop(f"{Q}.hada_w2_b")), IncompatibleAdapterError, "hada_w2_b"),
    "lokr_both_w1_forms": ("lokr", dict(change=_set(f"{Q}.lokr_w1", torch.ones(8, 8))), IncompatibleAdapterError, "lokr_w1"),
    "loha_rank_vs_config": ("loha", dict(config={"r": 3}), CorruptFileError, "r=3"),
    "lokr_rslora": ("lokr", dict(config={"use_rslora": True}), UnsupportedAdapterError, "use_rslora"),
    "ia3_feedforward_mismatch": ("ia3", dict(config={"feedforward_modules": ["q_proj", "down_proj"]}), CorruptFileError, "feedforward"),
    "loha_foreign_keys": ("loha", dict(change=_set(f"{Q}.lokr_w1", torch.ones(8, 8))), UnsupportedAdapterError, "lokr_w1"),
    "oft": ("loha", dict(config={"peft_type": "OFT"}), UnsupportedAdapterError, "OFT"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_by_name(case, small, llama_fp32, tmp_path):
    kind, how, error, phrase = REFUSALS[case]
    a = _variant(small[kind], tmp_path / case, **how)
    with pytest.raises(ShardmergeError) as info:
        shardmerge.plan(llama_fp32, [a], tmp_path / "out")
    problems = getattr(info.value, "errors", [info.value])
    assert all(isinstance(e, error) and phrase in str(e) for e in problems), str(info.value)
    assert str(a) in str(info.value) and "Traceback" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_ia3_weight_other_than_one_refused(small, llama_fp32, tmp_path):
    with pytest.raises(ShardmergeError, match="IA3.*weight of 0.5") as info:
        shardmerge.plan(llama_fp32, [small["ia3"]], tmp_path / "out", weights=[0.5])
    assert [type(e) for e in info.value.errors] == [UnsupportedAdapterError]  # once, not per module


@pytest.mark.parametrize("other", ["ia3", "loha"])
def test_ia3_sharing_a_tensor_refused(other, small, llama_fp32, tmp_path):
    with pytest.raises(ShardmergeError, match="scales it \\(IA3\\)") as info:
        shardmerge.plan(llama_fp32, [small["ia3"], small[other]], tmp_path / "out")
    assert "q_proj.weight" in str(info.value)


def test_plan_counts_and_factor_memory(small, llama_fp32, tmp_path):
    p = shardmerge.plan(llama_fp32, [small["loha"]], tmp_path / "out")
    assert p.counts == {"loha": 4}
    job = next(
        t for s in p.shards for t in s.tensors if t.name.endswith("0.self_attn.q_proj.weight")
    )
    # r=4: the built factors have rank 16: (64 + 64) * 16 elements.
    assert policy.held_bytes(job.edit) == policy.BUILT_BYTES_PER_ELEMENT * 128 * 16
    assert math.prod(job.shape) == 64 * 64


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3"])
def test_verify_catches_one_ulp(kind, small, llama_fp32, tmp_path):
    out = tmp_path / "out"
    shardmerge.merge(llama_fp32, [small[kind]], out)
    assert shardmerge.verify(out, llama_fp32, [small[kind]]).ok
    shard = out / "model.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.1.mlp.down_proj.weight"
    t = tensors[name].reshape(-1)
    t.view(torch.int32)[5] += 1  # one ulp
    save_file(tensors, str(shard), metadata={"format": "pt"})
    report = shardmerge.verify(out, llama_fp32, [small[kind]])
    assert not report.ok and name in report.summary()


def test_float64_accumulator_rounds_16bit_subnormals_correctly():
    """W + L @ R where float64 loses a tiny term and W sits on a float16/bfloat16
    subnormal midpoint: only the exact tier gets the rounding right."""
    from shardmerge.kernel.merge import BlockTerm, merge_block

    for out, unit, tiny in (
        (torch.float16, 2.0**-24, 2.0**-100),
        (torch.bfloat16, 2.0**-133, 2.0**-300),
    ):
        scale = unit * 2**-2
        base = torch.tensor([[2.5 * unit]], dtype=torch.float32)  # a tie between 2 and 3 units
        left = torch.tensor([[scale, tiny, scale]], dtype=torch.float64)
        right = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
        t = BlockTerm(left, right, 1.0, left.abs().amax(1), right.abs().sum(0), True)
        got = merge_block(base, [t], out, torch.float64)
        assert got.double().item() == 3 * unit, out  # just above the tie: rounds up


@pytest.mark.parametrize(("out", "unit"), [(torch.float16, 2.0**-24), (torch.bfloat16, 2.0**-133)])
def test_float64_accumulator_subnormal_block_matches_fractions(out, unit):
    """Random blocks around the 16-bit subnormal range, every element checked exactly."""
    from shardmerge.kernel.merge import BlockTerm, merge_block

    g = torch.Generator().manual_seed(1)
    base = (torch.randn(24, 24, generator=g) * 40 * unit).to(torch.float32)
    # 48-bit entries, as LoHa/LoKr factors have: products of two float32 values.
    left = torch.randn(24, 6, generator=g).double() * torch.randn(24, 6, generator=g).double()
    right = torch.randn(6, 24, generator=g).double() * torch.randn(6, 24, generator=g).double()
    left *= 8 * unit
    t = BlockTerm(left, right, 0.75, left.abs().amax(1), right.abs().sum(0), True)
    got = merge_block(base, [t], out, torch.float64)
    for i in range(24):
        for j in range(24):
            exact = F(base[i, j].item()) + F(0.75) * _dot(left, right, i, j)
            assert got[i, j].double().item() == _round_fraction(exact, out), (i, j)


@pytest.mark.parametrize("axis", [0, 1])
def test_ia3_scaling_does_not_depend_on_blocks(axis):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 6, generator=g).to(torch.bfloat16)
    v = torch.randn(10 if axis == 0 else 6, generator=g).double()
    whole = factors.scale_rows(w, v, axis, 0, 10)
    blocks = torch.cat(
        [factors.scale_rows(w[r : r + 3], v, axis, r, min(r + 3, 10)) for r in range(0, 10, 3)]
    )
    assert torch.equal(whole, blocks)
    assert torch.equal(whole, w.double() * (v[:, None] if axis == 0 else v[None, :]))
    bias = factors.scale_rows(w[:, 0], v[: w.shape[0]], 0, 0, 10) if axis == 0 else None
    if bias is not None:
        assert torch.equal(bias, w[:, 0].double() * v)


@pytest.mark.parametrize(
    "make, kind",
    [
        (loha, "loha"),
        (lokr, "lokr"),
        (lambda **kw: ia3(feedforward_modules=["down_proj"], **kw), "ia3"),
    ],
)
def test_inspect_counts_modules_of_other_methods(llama_fp32, tmp_path, make, kind):
    from shardmerge.inspect_folder import inspect_folder

    targets = ["q_proj", "v_proj", "down_proj"]
    a = make_lycoris(llama_fp32, tmp_path / "a", make(target_modules=targets))
    d = inspect_folder(a)
    assert d["modules"] == {kind: 6}  # 3 targets x 2 layers
    assert d["unknown_keys"] == 0 and d["peft_type"] == kind.upper()
