"""DoRA (use_dora) merges: exact against a high-precision reference, close to PEFT.

PEFT (0.21) merges the adapters of a layer one after another: plain LoRA adds
its delta, DoRA adapter j turns the weight so far into
``m_j / ||W + delta_j|| * (weight so far + delta_j)``, its norm on the unmerged
base W (one per output row of a Linear, per stored column of a Conv1D or an
embedding). Its eval-mode forward with several active adapters composes the
same way; both are checked here. The references below read the files with the
safetensors library and evaluate that formula independently of shardmerge.
"""

from __future__ import annotations

import importlib
import json
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from builders import (
    KEY_PREFIX,
    LLAMA_TARGETS,
    folder_files,
    load_model,
    logits_of,
    make_adapter,
    make_base,
    peft_logits,
    peft_merged_state,
    peft_model,
    read_adapter,
    read_tensors,
    round_once,
    ulp_distance,
)
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.errors import ShardmergeError
from shardmerge.kernel import dora, dora_exact

memory = importlib.import_module("shardmerge.planner.memory")

INT_TYPE = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


# --------------------------------------------------------------------------- references


def _terms_by_tensor(base: Path, adapters: list[Path], weights: list[float] | None = None):
    """{tensor: (start W, [(A, B, scale, m or None, kind)])} in merge order, from the files."""
    weights = weights or [1.0] * len(adapters)
    base_t = read_tensors(base)
    out: dict[str, tuple[torch.Tensor, list]] = {}
    for folder, weight in zip(adapters, weights, strict=True):
        cfg, tensors = read_adapter(folder)
        roles: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            rest = key[len(KEY_PREFIX) :]
            for role, pat in (
                ("A", r"(.+)\.lora_A\.weight"),
                ("B", r"(.+)\.lora_B\.weight"),
                ("eA", r"(.+)\.lora_embedding_A"),
                ("eB", r"(.+)\.lora_embedding_B"),
                ("m", r"(.+)\.lora_magnitude_vector"),
                ("base", r"(.+)\.base_layer\.weight"),
            ):
                if (hit := re.fullmatch(pat, rest)) is not None:
                    roles.setdefault(hit.group(1), {})[role] = t
                    break
            else:
                raise AssertionError(key)
        for module, r in roles.items():
            name = f"{module}.weight"
            start = r["base"] if "base" in r else base_t[name]
            emb = "eA" in r
            a, b = (r["eA"], r["eB"]) if emb else (r["A"], r["B"])
            # GPT-2's c_attn/c_fc/c_proj are Conv1D (weight stored [in, out]).
            conv1d = module.rsplit(".", 1)[-1] in ("c_attn", "c_fc", "c_proj")
            kind = "embedding" if emb else ("conv1d" if conv1d else "linear")
            scale = weight * cfg["lora_alpha"] / cfg["r"]
            out.setdefault(name, (start, []))[1].append((a, b, scale, r.get("m"), kind))
    return out


def _delta64(a, b, scale, kind) -> torch.Tensor:
    d = scale * (b.double() @ a.double())
    return d if kind == "linear" else d.T


def reference64(base: Path, adapters: list[Path], weights=None) -> dict[str, torch.Tensor]:
    """PEFT's sequential merge in float64 for every touched tensor (not rounded)."""
    out = {}
    for name, (start, terms) in _terms_by_tensor(base, adapters, weights).items():
        w = start.double()
        value = w.clone()
        for a, b, scale, m, kind in terms:
            d = _delta64(a, b, scale, kind)
            if m is None:
                value = value + d
            else:
                dim = 1 if kind == "linear" else 0
                f = m.double() / torch.linalg.vector_norm(w + d, dim=dim)
                value = (f[:, None] if dim == 1 else f[None, :]) * (value + d)
        out[name] = value
    return out


def exact_rounded(base: Path, adapters: list[Path], name: str, dtype, weights=None) -> torch.Tensor:
    """One tensor merged in exact rationals (square roots to 60 digits), rounded once."""
    start, terms = _terms_by_tensor(base, adapters, weights)[name]
    frac = lambda t: [[Fraction(x) for x in row] for row in t.double().tolist()]  # noqa: E731
    w = frac(start)
    rows, cols = len(w), len(w[0])
    with localcontext() as ctx:
        ctx.prec = 60
        value = [[Decimal(x.numerator) / Decimal(x.denominator) for x in row] for row in w]
        for a, b, scale, m, kind in terms:
            # The delta's orientation as stored, exactly: left (rows, r) @ right (r, cols).
            left, right = (frac(b), frac(a)) if kind == "linear" else (frac(a.T), frac(b.T))
            s = Fraction(scale)
            d = [[s * sum(x * y for x, y in zip(left[i], [rr[j] for rr in right], strict=True))
                  for j in range(cols)] for i in range(rows)]  # fmt: skip
            dec = lambda q: Decimal(q.numerator) / Decimal(q.denominator)  # noqa: E731
            if m is None:
                value = [[value[i][j] + dec(d[i][j]) for j in range(cols)] for i in range(rows)]
                continue
            x = [[w[i][j] + d[i][j] for j in range(cols)] for i in range(rows)]
            if kind == "linear":
                sums = [sum(v * v for v in row) for row in x]
            else:
                sums = [sum(x[i][j] ** 2 for i in range(rows)) for j in range(cols)]
            f = [
                Decimal(float(mv)) / dec(sq).sqrt() for mv, sq in zip(m.tolist(), sums, strict=True)
            ]
            value = [[(f[i] if kind == "linear" else f[j]) * (value[i][j] + dec(d[i][j]))
                      for j in range(cols)] for i in range(rows)]  # fmt: skip
    return torch.tensor(
        [[_round_nearest(Fraction(v), dtype) for v in row] for row in value], dtype=torch.float64
    ).to(dtype)


def _round_nearest(x: Fraction, dtype) -> float:
    """x rounded to dtype by comparing it with its neighbours; ties to even."""
    c = torch.tensor([float(x)], dtype=torch.float64).to(dtype)
    it = INT_TYPE[dtype]
    cands = [c] + [(c.view(it) + k).view(dtype) for k in (-1, 1)]
    return min(
        cands,
        key=lambda t: (abs(Fraction(t.double().item()) - x), int(t.view(it).item()) & 1),
    ).item()


def assert_exact(got: dict, ref64: dict, dtype) -> None:
    """Every touched tensor is ref64 rounded once; float64 itself may be off for a vanishing few."""
    total = differ = 0
    for name, r in ref64.items():
        want = round_once(r, dtype)
        d = ulp_distance(got[name], want)
        assert int(d.max()) <= 1, f"{name}: {int(d.max())} ulp from the float64 reference"
        differ += int((d != 0).sum())
        total += d.numel()
    assert differ <= total // 10**5, f"{differ} of {total} elements differ from float64 by 1 ulp"


def assert_close(got: dict, oracle: dict, names, dtype, ulps: float) -> None:
    """Within ``ulps`` output ulps (of each row's largest value) of PEFT, which rounds many times."""
    for name in names:
        g, o = got[name].double(), oracle[name].double()
        tol = ulps * 2.0 ** (1 - PRECISION[dtype]) * g.abs().amax(dim=-1, keepdim=True)
        err = (g - o).abs()
        assert bool((err <= tol).all()), f"{name}: {float((err / tol).max()):.2f}x the tolerance"


def _nudge_one_element(dst: Path, src: Path, name: str) -> None:
    """A copy of output folder ``src`` with one element of ``name`` moved by one ulp."""
    from safetensors import safe_open

    dst.mkdir()
    for f, data in folder_files(src).items():
        (dst / f).write_bytes(data)
    file = next(dst.glob("*.safetensors"))
    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(file))
    t = tensors[name]
    t.view(-1).view(INT_TYPE[t.dtype])[17] += 1
    save_file(tensors, str(file), metadata=meta)


def _merge(base, adapters, out, **kw) -> Path:
    shardmerge.merge(base, adapters, out, **kw)
    return Path(out)


def _dora_adapter(base, folder, targets, seed=1, **kw) -> Path:
    return make_adapter(base, folder, target_modules=targets, use_dora=True, seed=seed, **kw)


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("fixture", ["llama_bf16", "llama_fp32"])
def test_linear_dora_exact_close_to_peft_and_verified(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    dtype = torch.bfloat16 if fixture == "llama_bf16" else torch.float32
    adapter = _dora_adapter(base, tmp_path / "a", LLAMA_TARGETS)
    out = _merge(base, [adapter], tmp_path / "out")
    got = read_tensors(out)
    ref = reference64(base, [adapter])
    assert len(ref) == 14
    assert_exact(got, ref, dtype)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(got[name], exact_rounded(base, [adapter], name, dtype))
    # DoRA changed the weights beyond the plain LoRA delta (m / ||W + delta|| != 1).
    start, terms = _terms_by_tensor(base, [adapter])[name]
    plain = round_once(start.double() + _delta64(*terms[0][:3], "linear"), dtype)
    assert int((got[name] != plain).sum()) > got[name].numel() // 2
    assert_close(
        got, peft_merged_state(base, [adapter]), ref, dtype, 2 if dtype == torch.bfloat16 else 8
    )
    report = shardmerge.verify(out, base, [adapter])
    assert report.ok, report.summary()
    assert report.max_ulp["linear"] <= 0.5 + 1e-5
    if dtype == torch.float32:
        merged = load_model(out)
        torch.testing.assert_close(
            logits_of(merged), peft_logits(base, [adapter]), atol=1e-4, rtol=1e-4
        )


def test_dora_weight_multiplies_scaling_inside_the_norm(llama_fp32, tmp_path):
    adapter = _dora_adapter(llama_fp32, tmp_path / "a", ["q_proj", "down_proj"], seed=5)
    out = _merge(llama_fp32, [adapter], tmp_path / "out", weights=[0.6])
    got = read_tensors(out)
    ref = reference64(llama_fp32, [adapter], [0.6])
    assert_exact(got, ref, torch.float32)
    # PEFT: scale_layer multiplies each active adapter's scaling, norm included.
    pm = peft_model(llama_fp32, [adapter])
    for module in pm.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lora_magnitude_vector"):
            module.scale_layer(0.6)
    oracle = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    assert_close(got, oracle, ref, torch.float32, 8)
    unweighted = reference64(llama_fp32, [adapter])
    assert all(not torch.equal(ref[n], unweighted[n]) for n in ref)


# --------------------------------------------------------------------------- Conv1D, embedding


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("gpt2") / "base", "gpt2", seed=7)


def test_gpt2_conv1d_dora_norm_down_columns(gpt2_base, tmp_path, monkeypatch):
    adapter = _dora_adapter(gpt2_base, tmp_path / "a", ["c_attn", "c_fc", "c_proj"])
    out = _merge(gpt2_base, [adapter], tmp_path / "out")
    got = read_tensors(out)
    ref = reference64(gpt2_base, [adapter])
    assert len(ref) == 8
    assert_exact(got, ref, torch.float32)
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(got[name], exact_rounded(gpt2_base, [adapter], name, torch.float32))
    assert_close(got, peft_merged_state(gpt2_base, [adapter]), ref, torch.float32, 8)
    torch.testing.assert_close(
        logits_of(load_model(out)), peft_logits(gpt2_base, [adapter]), atol=1e-4, rtol=1e-4
    )
    assert shardmerge.verify(out, gpt2_base, [adapter]).ok
    _nudge_one_element(tmp_path / "nudged", out, "transformer.h.1.mlp.c_fc.weight")
    report = shardmerge.verify(tmp_path / "nudged", gpt2_base, [adapter])
    assert not report.ok and "c_fc.weight: off by" in report.summary()
    # Row blocks of 3 rows: the column pass spans ~22 blocks; same bytes.
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", 3 * 256 * memory.MERGE_BYTES_PER_ELEMENT)
    small = _merge(gpt2_base, [adapter], tmp_path / "small", workers=0)
    plan = shardmerge.plan(gpt2_base, [adapter], tmp_path / "x", workers=0)
    spans = [t.rows / t.block_rows for s in plan.shards for t in s.tensors if t.edit]
    assert len(spans) == 8 and min(spans) >= 10
    assert folder_files(small) == folder_files(out)


def test_embedding_dora_sharded_base_small_blocks(llama_bf16_sharded, tmp_path, monkeypatch):
    """Embedding DoRA: one norm per embedding column, over the whole vocabulary."""
    base = llama_bf16_sharded
    adapter = _dora_adapter(base, tmp_path / "a", ["embed_tokens", "lm_head", "v_proj"])
    cfg, tensors = read_adapter(adapter)
    m = tensors[f"{KEY_PREFIX}model.embed_tokens.lora_magnitude_vector"]
    assert m.shape == (64,)  # one per embedding dimension (column of [vocab, dim])
    out = _merge(base, [adapter], tmp_path / "out")
    got = read_tensors(out)
    ref = reference64(base, [adapter])
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(ref)
    assert_exact(got, ref, torch.bfloat16)
    name = "model.embed_tokens.weight"
    assert torch.equal(got[name], exact_rounded(base, [adapter], name, torch.bfloat16))
    assert_close(got, peft_merged_state(base, [adapter]), ref, torch.bfloat16, 2)
    assert shardmerge.verify(out, base, [adapter]).ok
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", 5 * 64 * memory.MERGE_BYTES_PER_ELEMENT)
    small = _merge(base, [adapter], tmp_path / "small", workers=0)
    assert folder_files(small) == folder_files(out)


# --------------------------------------------------------------------------- several adapters


def test_two_dora_adapters_and_a_plain_one_compose_in_order(llama_fp32, tmp_path):
    targets = ["q_proj", "v_proj", "up_proj"]
    first = _dora_adapter(llama_fp32, tmp_path / "d1", targets, seed=11)
    plain = make_adapter(llama_fp32, tmp_path / "p", target_modules=["q_proj", "up_proj"], seed=12)
    second = _dora_adapter(llama_fp32, tmp_path / "d2", targets, seed=13, r=2, lora_alpha=3)
    adapters = [first, plain, second]
    out = _merge(llama_fp32, adapters, tmp_path / "out")
    got = read_tensors(out)
    ref = reference64(llama_fp32, adapters)
    assert_exact(got, ref, torch.float32)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], exact_rounded(llama_fp32, adapters, name, torch.float32))
    # PEFT's merge_and_unload and its unmerged forward with all three active agree with us.
    assert_close(got, peft_merged_state(llama_fp32, adapters), ref, torch.float32, 8)
    torch.testing.assert_close(
        logits_of(load_model(out)), peft_logits(llama_fp32, adapters), atol=1e-4, rtol=1e-4
    )
    # The order matters: the other order is a different model.
    swapped = reference64(llama_fp32, [second, plain, first])
    assert not torch.allclose(swapped[name], ref[name], rtol=1e-4, atol=0)
    report = shardmerge.verify(out, llama_fp32, adapters)
    assert report.ok, report.summary()


# --------------------------------------------------------------------------- the exact path


def _adversarial(dtype):
    """Rows whose DoRA value sits on, or within 2^-60 of, a rounding midpoint of ``dtype``.

    Row [3/4, 1] has norm 5/4, so with m = 5/4 * b the second element is
    exactly b. b is the midpoint between 1 + g (odd) and 1 + 2g (even).
    """
    g = 2.0 ** (1 - PRECISION[dtype])
    b = 1 + 1.5 * g
    w = torch.tensor(
        [
            [0.75, 1.0, 0.0],  # exactly b: ties to even, 1 + 2g
            [0.75, 1.0, 2.0**-30],  # norm a hair larger: just below b, 1 + g
            [0.75, 1.0, 0.0],  # the delta below makes the norm a hair smaller: 1 + 2g
        ],
        dtype=torch.float64,
    )
    left = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    right = torch.tensor([[-(2.0**-60), 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([1.25 * b] * 3, dtype=torch.float64)
    return w, left, right, m, [1 + 2 * g, 1 + g, 1 + 2 * g]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("norm_dim", [1, 0])
def test_exact_path_settles_values_on_and_next_to_midpoints(dtype, norm_dim):
    w, left, right, m, expect = _adversarial(dtype)
    if norm_dim == 0:  # the same numbers stored transposed, as a Conv1D or embedding would
        w, left, right = w.T.contiguous(), right.T.contiguous(), left.T.contiguous()
    part = dora.DoraPart(left, right, 1.0, m, norm_dim, "test")
    merger = dora.DoraMerger("t", tuple(w.shape), [part], dtype, lambda r0, r1: w[r0:r1], 1)
    out = torch.cat([merger.merge(w[r : r + 1], r, r + 1) for r in range(w.shape[0])])
    got = out if norm_dim == 1 else out.T
    assert got[:, 1].double().tolist() == expect
    # The first element, 3/4 b, is not near a midpoint: the float64 path rounds it.
    b = Fraction(float(m[0])) / Fraction(5, 4)
    assert got[:, 0].double().tolist() == [_round_nearest(Fraction(3, 4) * b, dtype)] * 3
    assert merger.exact_elements >= 3
    # float64 alone gets the two hair cases wrong: that is what the exact path is for.
    f64 = m / torch.linalg.vector_norm(w + part.left @ part.right, dim=norm_dim)
    naive = (f64[:, None] if norm_dim == 1 else f64[None, :]) * (w + left @ right)
    naive = naive if norm_dim == 1 else naive.T
    assert round_once(naive[:, 1], dtype).double().tolist() != expect


def test_exact_path_irrational_tie_and_deep_refinement():
    # Two DoRA factors 1/sqrt(2) each: their product is rational and the value
    # is exactly the midpoint b, which no bracketing of sqrt(2) can settle.
    g = 2.0**-7
    b = Fraction(1) + Fraction(3, 2) * Fraction(g)
    terms = [(Fraction(0), Fraction(1), Fraction(2)), (Fraction(0), 2 * b, Fraction(2))]
    assert dora_exact.round_composition(Fraction(1), terms, torch.bfloat16) == 1 + 2 * g
    assert dora_exact.round_composition(Fraction(-1), terms, torch.bfloat16) == -(1 + 2 * g)
    # A norm 2^-200 (relative) larger: just below b; needs > 200 bits of sqrt.
    near = [terms[0], (Fraction(0), 2 * b, Fraction(2) + Fraction(1, 2**200))]
    assert dora_exact.round_composition(Fraction(1), near, torch.bfloat16) == 1 + g
    # With a plain delta in between that cancels exactly: rational again.
    third = [(Fraction(0), Fraction(1), Fraction(3)), (Fraction(0), Fraction(3), Fraction(3))]
    assert dora_exact.round_composition(b, third, torch.bfloat16) == 1 + 2 * g


def test_zero_norm_refused_by_name():
    w = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    part = dora.DoraPart(
        torch.zeros(2, 1, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        1.0,
        torch.ones(2, dtype=torch.float64),
        1,
        "adapter x, module q",
    )
    merger = dora.DoraMerger("q.weight", (2, 2), [part], torch.bfloat16)
    with pytest.raises(ShardmergeError, match=r"q\.weight.*adapter x, module q.*row 1.*norm is 0"):
        merger.merge(w, 0, 2)


def test_fast_path_bound_holds_and_rarely_doubts():
    """Random float32 outputs: every element correct; few need the exact path."""
    gen = torch.Generator().manual_seed(3)
    rows, cols, r = 96, 384, 8
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16).double()
    parts = [
        dora.DoraPart(
            torch.randn(rows, r, generator=gen).to(torch.float32).double(),
            torch.randn(r, cols, generator=gen).to(torch.float32).double() * 0.01,
            0.5,
            torch.rand(rows, generator=gen).to(torch.float32).double() * 20,
            1,
        ),
        dora.DoraPart(
            torch.randn(rows, r, generator=gen).double(),
            torch.randn(r, cols, generator=gen).double() * 0.01,
            2.0,
        ),
    ]
    merger = dora.DoraMerger("t", (rows, cols), parts, torch.float32)
    out = merger.merge(w, 0, rows)
    p0, p1 = parts
    x = w + 0.5 * p0.left @ p0.right
    v = (p0.magnitude / torch.linalg.vector_norm(x, dim=1))[:, None] * x + 2.0 * p1.left @ p1.right
    assert int(ulp_distance(out, v.to(torch.float32)).max()) <= 1
    assert merger.exact_elements < rows * cols // 1000
    # The bytes do not depend on the block size.
    blocks = torch.cat([merger.merge(w[i : i + 7], i, min(rows, i + 7)) for i in range(0, rows, 7)])
    assert torch.equal(blocks.view(torch.int32), out.view(torch.int32))


# --------------------------------------------------------------------------- refusals


def _edit_adapter(src: Path, dst: Path, *, config=None, drop=(), reshape=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    for k, shape in (reshape or {}).items():
        tensors[k] = torch.ones(shape)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("lora_bias", "DoRA (use_dora) together with lora_bias"),
        ("no_magnitude", "has no lora_magnitude_vector although adapter_config.json sets use_dora"),
        ("bad_shape", "the DoRA magnitude of model.layers.0.self_attn.q_proj has shape [65]"),
        (
            "not_dora",
            "DoRA magnitude vectors (lora_magnitude_vector) but adapter_config.json has no use_dora",
        ),
    ],
)
def test_dora_refusals_name_the_problem(llama_bf16, tmp_path, case, phrase):
    adapter = _dora_adapter(llama_bf16, tmp_path / "a", ["q_proj"])
    key = f"{KEY_PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    edits = {
        "lora_bias": dict(config={"lora_bias": True}),
        "no_magnitude": dict(drop=["layers.0.self_attn.q_proj.lora_magnitude"]),
        "bad_shape": dict(reshape={key: (65,)}),
        "not_dora": dict(config={"use_dora": False}),
    }[case]
    bad = _edit_adapter(adapter, tmp_path / "bad", **edits)
    with pytest.raises(ShardmergeError) as e:
        shardmerge.merge(llama_bf16, [bad], tmp_path / "out")
    assert phrase in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_dora_and_loha_on_one_tensor_refused_at_plan_time(llama_bf16, tmp_path):
    from peft import LoHaConfig, get_peft_model

    adapter = _dora_adapter(llama_bf16, tmp_path / "a", ["q_proj"])
    pm = get_peft_model(load_model(llama_bf16), LoHaConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "loha")
    with pytest.raises(ShardmergeError) as e:
        shardmerge.plan(llama_bf16, [adapter, tmp_path / "loha"], tmp_path / "out")
    assert "q_proj.weight: a DoRA adapter and loha" in str(e.value)
    assert "separate runs" in str(e.value)
