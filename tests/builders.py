"""Reusable builders for shardmerge tests: tiny models, PEFT adapters, oracles and comparisons.

Everything here is independent of shardmerge's own code: the float64
reference merger reads the base and adapter files with the ``safetensors``
library (or ``torch.load`` for legacy ``.bin`` adapters) and applies PEFT's
merge formula directly, and the raw-bytes reader parses safetensors headers
itself. Models are tiny (hidden 64, 2 layers, vocab 256) with random weights;
adapters use ``init_lora_weights=False`` so that B is non-zero.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

KEY_PREFIX = "base_model.model."

# Unit roundoff (half an ulp at 1.0) per float dtype.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


# --------------------------------------------------------------------------- models


def tiny_config(model_type: str, *, tie: bool = False, **overrides):
    """A tiny transformers config of ``model_type`` ("llama", "qwen2", "gpt2", "qwen2_moe", "mixtral")."""
    from transformers import (
        GPT2Config,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
    )

    if model_type == "llama":
        kw = dict(_TINY)
        cls = LlamaConfig
    elif model_type == "qwen2":
        kw = dict(_TINY)
        cls = Qwen2Config
    elif model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
        cls = GPT2Config
    elif model_type == "qwen2_moe":
        kw = dict(
            _TINY,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
        )
        cls = Qwen2MoeConfig
    elif model_type == "mixtral":
        kw = dict(_TINY, num_local_experts=4, num_experts_per_tok=2)
        cls = MixtralConfig
    else:
        raise ValueError(model_type)
    kw.update(overrides)
    kw["tie_word_embeddings"] = tie
    return cls(**kw)


def make_base(
    folder: Path,
    model_type: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    extra_files: dict[str, str] | None = None,
    **overrides,
) -> Path:
    """Write a tiny random model of ``model_type`` in ``dtype`` to ``folder``; return the folder.

    Biases and norms, which transformers initialises to constants, are
    randomised too so that replacing them is observable.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie=tie, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    for name, text in (extra_files or {}).items():
        (Path(folder) / name).write_text(text)
    return Path(folder)


def load_model(folder: Path, dtype: torch.dtype | str = "auto"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def perturb_(tensor: torch.Tensor, seed: int, amount: float = 0.05) -> None:
    """Add deterministic noise to ``tensor`` in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noise = torch.randn(tensor.shape, generator=g, dtype=torch.float32) * amount
        tensor.add_(noise.to(tensor.dtype))


def make_adapter(
    base: Path,
    folder: Path,
    *,
    seed: int = 1,
    b_scale: float = 0.05,
    safe_serialization: bool = True,
    perturb_base: bool = False,
    perturb_saved_modules: bool = False,
    model_dtype: torch.dtype | str = "auto",
    **lora_kwargs,
) -> Path:
    """Build a PEFT LoRA adapter on the model in ``base`` and save it to ``folder``.

    ``lora_kwargs`` go to ``LoraConfig`` (defaults r=4, lora_alpha=8,
    init_lora_weights=False). ``b_scale`` shrinks B so deltas are comparable
    to the weights (rounding of both then matters). ``perturb_base`` changes
    the model's own weights before wrapping it, so that tensors the adapter
    saves whole (``base_layer.weight``, biases with ``bias="all"``) differ
    from the base checkpoint; ``perturb_saved_modules`` changes the
    modules_to_save copies. ``model_dtype`` is the dtype the base is loaded
    in for training (tensors saved whole come out in it).
    """
    from peft import LoraConfig, get_peft_model

    model = load_model(base, model_dtype)
    torch.manual_seed(seed)
    if perturb_base:
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            perturb_(p.data, seed * 1000 + i)
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False)
    cfg.update(lora_kwargs)
    pm = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            if perturb_saved_modules and "modules_to_save" in name:
                perturb_(p.data, seed * 7 + len(name))
    pm.save_pretrained(folder, safe_serialization=safe_serialization)
    return Path(folder)


# --------------------------------------------------------------------------- reading files


@dataclass
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    shard: str


@dataclass
class RawFile:
    names: list[str]  # in header order
    metadata: dict[str, str]
    tensors: dict[str, RawTensor]


def read_raw_file(path: Path) -> RawFile:
    """Parse a safetensors file's header by hand and slice out every tensor's bytes."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    metadata = header.pop("__metadata__", {}) or {}
    data = blob[8 + n :]
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    tensors = {
        k: RawTensor(
            header[k]["dtype"],
            tuple(header[k]["shape"]),
            data[header[k]["data_offsets"][0] : header[k]["data_offsets"][1]],
            Path(path).name,
        )
        for k in names
    }
    return RawFile(names, metadata, tensors)


def shard_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder, by name, sorted."""
    return sorted(p.name for p in Path(folder).glob("*.safetensors"))


def read_raw(folder: Path) -> dict[str, RawTensor]:
    """Every tensor of a model folder (all shards), raw."""
    out: dict[str, RawTensor] = {}
    for name in shard_files(folder):
        out.update(read_raw_file(Path(folder) / name).tensors)
    return out


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, loaded with the safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in shard_files(folder):
        out.update(load_file(str(Path(folder) / name)))
    return out


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder (shardmerge's work folder excluded), by relative name."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".shardmerge" not in p.relative_to(folder).parts
    }


def read_index(folder: Path) -> dict | None:
    p = Path(folder) / "model.safetensors.index.json"
    return json.loads(p.read_text()) if p.exists() else None


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors (safetensors or legacy .bin)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    st = folder / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return config, load_file(str(st))
    return config, torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- float64 reference


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern rule: the first key whose regex matches a dotted tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class Reference:
    """The float64 reference merge of a base model and adapters.

    ``exact``: float64 value of every touched tensor before rounding.
    ``magnitude``: float64 sum of the magnitudes of every addend (|base| and
    |w_i s_i| |B_i| |A_i|), for rounding-error bounds of other mergers.
    ``max_rank``: the largest LoRA rank, for the same purpose.
    ``tensors``: every output tensor in the output dtype (touched ones
    rounded once from ``exact``). ``touched``: names of merged/replaced tensors.
    """

    base: dict[str, torch.Tensor]
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    merged: set[str] = field(default_factory=set)  # touched by a low-rank or bias term
    replaced: set[str] = field(default_factory=set)
    max_rank: int = 1


def reference_merge(
    base: Path,
    adapters: list[Path],
    weights: list[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Reference:
    """Merge in float64 straight from PEFT's formula; round once to the output dtype."""
    weights = weights or [1.0] * len(adapters)
    base_t = read_tensors(base)
    ref = Reference(base=base_t)
    starts: dict[str, torch.Tensor] = {}
    deltas: dict[str, list[torch.Tensor]] = {}
    bounds: dict[str, list[torch.Tensor]] = {}

    for folder, weight in zip(adapters, weights, strict=True):
        cfg, tensors = read_adapter(folder)
        assert cfg["peft_type"] == "LORA"
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            assert key.startswith(KEY_PREFIX), key
            rest = key[len(KEY_PREFIX) :]
            for role, pat in (
                ("A", r"(.+)\.lora_A\.weight"),
                ("B", r"(.+)\.lora_B\.weight"),
                ("B_bias", r"(.+)\.lora_B\.bias"),
                ("emb_A", r"(.+)\.lora_embedding_A"),
                ("emb_B", r"(.+)\.lora_embedding_B"),
                ("base.weight", r"(.+)\.base_layer\.weight"),
                ("base.bias", r"(.+)\.base_layer\.bias"),
                ("saved.weight", r"(.+)\.weight"),
                ("saved.bias", r"(.+)\.bias"),
            ):
                m = re.fullmatch(pat, rest)
                if m:
                    by_module.setdefault(m.group(1), {})[role] = t
                    break
            else:
                raise AssertionError(f"reference: unknown adapter key {key}")
        for module, roles in by_module.items():
            for suffix in ("weight", "bias"):
                for kind in ("base", "saved"):
                    if f"{kind}.{suffix}" in roles:
                        name = f"{module}.{suffix}"
                        assert name in base_t, name
                        assert name not in starts, f"{name} replaced twice"
                        starts[name] = roles[f"{kind}.{suffix}"].double()
                        ref.replaced.add(name)
            if "A" in roles or "emb_A" in roles:
                emb = "emb_A" in roles
                a = roles["emb_A" if emb else "A"].double()
                b = roles["emb_B" if emb else "B"].double()
                r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
                rank = a.shape[0]
                assert rank == r_cfg, (module, rank, r_cfg)
                scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
                ref.max_rank = max(ref.max_rank, rank)
                delta, bound = b @ a, b.abs() @ a.abs()
                if emb or cfg.get("fan_in_fan_out"):
                    delta, bound = delta.T, bound.T
                deltas.setdefault(f"{module}.weight", []).append(weight * scale * delta)
                bounds.setdefault(f"{module}.weight", []).append(abs(weight * scale) * bound)
                if "B_bias" in roles:
                    bias = weight * scale * roles["B_bias"].double()
                    deltas.setdefault(f"{module}.bias", []).append(bias)
                    bounds.setdefault(f"{module}.bias", []).append(bias.abs())

    ref.merged = set(deltas)
    ref.touched = set(starts) | set(deltas)
    for name, w in base_t.items():
        dtype = out_dtype if (out_dtype is not None and w.is_floating_point()) else w.dtype
        if name not in ref.touched:
            ref.tensors[name] = w.to(dtype)
            continue
        start = starts.get(name, w.double())
        exact = start.clone()
        magnitude = start.abs()
        for d, bound in zip(deltas.get(name, []), bounds.get(name, []), strict=True):
            assert d.shape == exact.shape, (name, d.shape, exact.shape)
            exact += d
            magnitude += bound
        ref.exact[name] = exact
        ref.magnitude[name] = magnitude
        ref.tensors[name] = round_once(exact, dtype)
    return ref


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 ``x`` to ``dtype`` once, to nearest, ties to even.

    ``x.to(torch.bfloat16)`` is not that: torch converts float64 to a 16-bit
    float through float32, rounding twice. Going through float32 with
    round-to-odd instead keeps the sticky information, so the second rounding
    is the correct one.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    assert x.dtype == torch.float64
    f = x.to(torch.float32)
    back = f.double()
    bits = f.view(torch.int32)
    # Truncate toward zero (one step down in magnitude where RNE rounded up) ...
    bits = torch.where(back.abs() > x.abs(), bits - 1, bits)
    # ... and make the last bit sticky.
    bits = torch.where(back != x, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


# --------------------------------------------------------------------------- comparisons


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map float bit patterns to int64 so that adjacent floats differ by 1 (+0 == -0)."""
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = x.contiguous().view(int_type).to(torch.int64)
    mag_mask = (1 << (8 * x.element_size() - 1)) - 1
    mag = bits & mag_mask
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in ulps between two tensors of the same float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(number of elements that differ, largest ulp distance)."""
    d = ulp_distance(a, b)
    return int((d != 0).sum()), int(d.max()) if d.numel() else 0


def assert_matches_reference(
    out: dict[str, torch.Tensor], ref: Reference, names: set[str] | None = None
) -> None:
    """Touched tensors equal the once-rounded float64 reference.

    Allows a vanishing number of mismatches (one per million elements; the
    float64 reference itself is not exact), each at most 1 ulp.
    """
    names = ref.touched if names is None else names
    assert names, "nothing to compare"
    total_diff = total = 0
    worst = 0
    for name in sorted(names):
        assert name in out, f"{name} missing from output"
        got, want = out[name], ref.tensors[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        n, ulp = diff_stats(got, want)
        assert ulp <= 1, f"{name}: {n} elements differ, up to {ulp} ulp"
        total_diff += n
        total += got.numel()
        worst = max(worst, ulp)
    assert total_diff <= total // 10**6, f"{total_diff} of {total} elements differ by 1 ulp"


def assert_close_to_oracle(
    out: dict[str, torch.Tensor],
    oracle: dict[str, torch.Tensor],
    ref: Reference,
    roundings: int = 2,
    names: set[str] | None = None,
) -> None:
    """Output within the error PEFT's own merge can make of the exact value.

    PEFT computes B @ A in float32 (error up to rank + 2 float32 unit
    roundoffs of the magnitudes), rounds the delta to the weight dtype and
    rounds again on the add (once more per extra adapter): each rounding
    costs at most one unit roundoff of the magnitudes. ``roundings`` counts
    them.
    """
    names = ref.touched if names is None else names
    for name in sorted(names):
        got, want = out[name], oracle[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        u = UNIT_ROUNDOFF[got.dtype]
        f32 = (ref.max_rank + 2) * UNIT_ROUNDOFF[torch.float32]
        tol = ((roundings + 1) * u + f32) * ref.magnitude[name] + 1e-30
        err = (got.double() - want.double()).abs()
        bad = err > tol
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} elements differ from PEFT by more than its rounding allows "
            f"(max error {float(err.max()):.3g})"
        )


def assert_byte_identical(
    out: dict[str, RawTensor], base: dict[str, RawTensor], names: set[str]
) -> None:
    for name in sorted(names):
        assert out[name].dtype == base[name].dtype, name
        assert out[name].shape == base[name].shape, name
        assert out[name].data == base[name].data, f"{name}: bytes differ from the base"


# --------------------------------------------------------------------------- PEFT oracle


def peft_model(base: Path, adapters: list[Path], dtype: torch.dtype | str = "auto"):
    """The base model with the adapters loaded (names a0, a1, ...), as PEFT loads them."""
    from peft import PeftModel

    model = load_model(base, dtype)
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, folder in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(folder), adapter_name=f"a{i}")
    pm.eval()
    return pm


def peft_merged_state(
    base: Path, adapters: list[Path], dtype: torch.dtype | str = "auto"
) -> dict[str, torch.Tensor]:
    """State dict of PEFT's ``merge_and_unload`` over all the adapters."""
    pm = peft_model(base, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    merged = pm.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def sample_ids(vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=g)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = sample_ids() if ids is None else ids
    return model(input_ids=ids).logits.float()


def peft_logits(base: Path, adapters: list[Path], dtype: torch.dtype | str = "auto"):
    """Logits of the base with the adapter(s) active, unmerged."""
    pm = peft_model(base, adapters, dtype)
    if len(adapters) > 1:
        pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return logits_of(pm)
