"""4-bit bases: the weights a QLoRA adapter saw during training, and pre-quantized folders.

An adapter trained with QLoRA saw each quantized Linear weight not as the
16-bit checkpoint value but as bitsandbytes' NF4 round trip of it: the
flattened tensor cut into blocks of 64 values, each block scaled by its
absolute maximum, every value replaced by the nearest of 16 NF4 code values
and multiplied back. ``--qlora-base nf4`` merges into those values; a folder
saved from a 4-bit model (``save_pretrained`` of a bitsandbytes model) is
dequantized while merging. Either way every output element is the correctly
rounded value of (dequantized base + LoRA delta).

Semantics follow bitsandbytes 0.48 (``csrc/kernels.cu``, the CUDA kernels a
QLoRA run uses; ``backends/default/ops.py``, its CPU reference):

* absmax: max |x| of each block of ``blocksize`` consecutive values of the
  flattened tensor, in float32 (exact); the last block may be partial.
* scaled value: ``x * (1 / absmax)`` in float32 (a reciprocal, then a product,
  each rounded once; as both kernels do).
* code: the CUDA decision tree ``dQuantizeNF4``: the number of its 15 float32
  thresholds that the scaled value is strictly greater than (a value exactly
  on a threshold takes the lower code). An all-zero block scales to NaN and
  gets code 0 (-1.0), dequantizing to -0.0, as the kernel does.
* dequantized value: ``code_value * absmax`` in float32, rounded once to the
  tensor's dtype (bfloat16/float16/float32), as ``kDequantizeBlockwise``.
* double quantization (a pre-quantized folder only): the block absmax is
  ``nested_code[q] * nested_absmax + offset``, each step in float32.

Where bitsandbytes' CPU backend differs from its CUDA kernels we follow CUDA,
which is what trained the adapter: its CPU ``dequantize_4bit`` to a 16-bit
dtype rounds the code value to that dtype before scaling, and its CPU
quantizer picks the nearest code by float32 distances, which disagrees with
the CUDA tree on six single float32 values (one on each of six thresholds).
Not reproduced: the CUDA build's fast-math reciprocal (``rcp.approx``, within
1 ulp of the exact one used here) and flushing of subnormals.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CorruptFileError, InputError
from ..io.safetensors import DTYPES, read_tensor
from ..options import REFUSED_CHOICES
from ..terms import TensorRef

# transformers' BitsAndBytesConfig has no block size: Linear4bit's default (64 on CUDA).
BLOCKSIZE = 64
# bitsandbytes' largest block size (quantize_blockwise / quantize_4bit): a stored one above it is
# damage, and would make each block that many float32 values wide.
MAX_BLOCKSIZE = 4096
# A quant_state blob is a few hundred bytes of JSON; far larger is not one.
MAX_STATE_BYTES = 1 << 16

# NF4 code values (bitsandbytes' nf4_dequantization_lut / CODE["nf4"]), float32.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# The decision thresholds of bitsandbytes' CUDA dQuantizeNF4, as float32, ascending:
# code k is taken when the scaled value is > exactly k of them.
NF4_THRESHOLDS = torch.tensor(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=torch.float32,
)
_NUMBERED_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
# Weights inside a layer stack that are not nn.Linear in transformers 5: norms,
# embeddings, and MoE routers (``gate``: a plain Parameter in transformers 5).
_NOT_LINEAR = re.compile(r"(norm|^ln_|^ln\d|embed|^wte$|^wpe$|relative_attention_bias|^gate$)")
_QUANT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_AUX_NAMES = tuple(f".weight.{s}" for s in _AUX_SUFFIXES)
_STATE_KEY = re.compile(r"^(.+)\.quant_state\.bitsandbytes__(\w+)$")
_METHOD_NAMES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "hqq": "HQQ",
    "quanto": "Quanto",
    "fbgemm_fp8": "FBGEMM FP8",
    "fp8": "FP8",
    "compressed-tensors": "compressed-tensors",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "gguf": "GGUF",
    "mxfp4": "MXFP4",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
}


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor's base values are made before the LoRA terms are added.

    ``method`` "nf4": a 16-bit base tensor, round-tripped through NF4.
    ``method`` "bnb4": packed 4-bit data of a pre-quantized folder, dequantized;
    the job's byte range is the packed data and ``absmax`` (and, with double
    quantization, the ``nested_*`` fields) name the scale tensors.
    """

    method: str
    dtype: str  # safetensors dtype of the base values (the round trip's, or dequantized)
    blocksize: int = BLOCKSIZE
    absmax: TensorRef | None = None
    nested_absmax: TensorRef | None = None
    nested_code: TensorRef | None = None
    nested_blocksize: int = 0
    nested_offset: float = 0.0

    @property
    def packed(self) -> bool:
        return self.method == "bnb4"

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block must be a multiple of this so blocks hold whole quantization blocks."""
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        return self.blocksize // math.gcd(cols, self.blocksize)

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Memory held per tensor: the float32 absmax of every block (bnb4)."""
        if not self.packed:
            return 0
        blocks = -(-math.prod(shape) // self.blocksize)
        return 8 * blocks  # the absmax, and its 8-bit source while decoding it


# --------------------------------------------------------------------------- the numbers


def nf4_codes(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """NF4 code index (int32) of every value of ``blocks`` (float32, one block per row)."""
    scaled = blocks * torch.reciprocal(absmax).unsqueeze(1)
    codes = torch.searchsorted(
        NF4_THRESHOLDS.to(scaled.device), scaled, right=False, out_int32=True
    )
    # NaN (an all-zero block: 0 * inf) fails every comparison of the CUDA tree: code 0.
    return codes.masked_fill_(scaled.isnan(), 0)


def nf4_quantize(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per value) and float32 block absmax of ``x`` flattened."""
    blocks = _blocks(x.reshape(-1).to(torch.float32), blocksize)
    absmax = blocks.abs().amax(dim=1)
    codes = nf4_codes(blocks, absmax).reshape(-1)[: x.numel()]
    return codes.to(torch.uint8), absmax


def nf4_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """Values ``NF4_CODE[codes] * absmax`` in float32, rounded once to ``dtype`` (flat)."""
    n = codes.numel()
    values = NF4_CODE.to(absmax.device)[codes.reshape(-1).to(torch.int32)]
    values = _blocks(values, blocksize).mul_(absmax.unsqueeze(1))
    return values.reshape(-1)[:n].to(dtype)


def nf4_roundtrip(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """``x`` as a QLoRA run sees it: NF4-quantized and dequantized, same dtype and shape.

    ``x`` must start on a quantization block boundary of its tensor (and end
    on one, or at the tensor's end).
    """
    codes, absmax = nf4_quantize(x, blocksize)
    return nf4_dequantize(codes, absmax, x.dtype, blocksize).view(x.shape)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes of packed bytes, high nibble first (bitsandbytes' order)."""
    packed = packed.reshape(-1).view(torch.uint8)
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[:n]


def nested_absmax(
    q: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: float, blocksize2: int
) -> torch.Tensor:
    """Double quantization's block absmax: ``code[q] * absmax2 + offset``, each in float32."""
    values = code.to(torch.float32)[q.reshape(-1).long()]
    n = values.numel()
    values = _blocks(values, blocksize2).mul_(absmax2.to(torch.float32).unsqueeze(1))
    return values.reshape(-1)[:n].add_(torch.tensor(offset, dtype=torch.float32))


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return flat.view(-1, blocksize)


class QuantRows:
    """Base rows of one tensor as the adapter saw them (used by the worker and by verify)."""

    def __init__(
        self, spec: QuantSpec, shape: tuple[int, ...], load: Callable[[TensorRef], torch.Tensor]
    ):
        self.spec = spec
        self.shape = shape
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        self.dtype = DTYPES[spec.dtype]
        self.absmax: torch.Tensor | None = None
        if spec.packed:
            absmax = load(spec.absmax).reshape(-1)
            if spec.nested_absmax is not None:
                absmax = nested_absmax(
                    absmax,
                    load(spec.nested_code),
                    load(spec.nested_absmax).reshape(-1),
                    spec.nested_offset,
                    spec.nested_blocksize,
                )
            self.absmax = absmax.to(torch.float32)

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1): ``raw`` is the 16-bit rows ("nf4") or their packed bytes ("bnb4")."""
        bs = self.spec.blocksize
        e0, e1 = row0 * self.cols, row1 * self.cols
        assert e0 % bs == 0, "row blocks must start on a quantization block"
        shape = (row1 - row0, *self.shape[1:])
        if not self.spec.packed:
            return nf4_roundtrip(raw, bs)
        codes = unpack_4bit(raw, e1 - e0)
        absmax = self.absmax[e0 // bs : -(-e1 // bs)]
        return nf4_dequantize(codes, absmax, self.dtype, bs).view(shape)


# --------------------------------------------------------------------------- planning


def nf4_targets(ckpt, edits: dict | None = None) -> list[str]:
    """The base tensors a transformers QLoRA setup quantizes (by name, without transformers).

    transformers replaces every nn.Linear but the output embedding (and
    ``llm_int8_skip_modules``) with a bitsandbytes Linear4bit. From a
    checkpoint we take: 2-D floating-point ``*.weight`` tensors inside a
    numbered layer stack (``layers.N``, ``h.N``, ``blocks.N``...), minus norms,
    embeddings and MoE routers (``gate``), which are not nn.Linear there.
    Embeddings, lm_head, biases and norms are never quantized. Nor are the
    per-expert tensors of models whose experts transformers 5 fuses into 3-D
    parameters at load (``experts.N.w1`` of Mixtral, ``experts.N.gate_proj`` of
    Qwen2-MoE...: adapters/moe.py FAMILIES): no nn.Linear holds them. Unless
    ``edits`` (base tensor -> TensorEdit) has LoRA on one of them as a Linear
    module rather than a parameter: such an adapter was trained with
    transformers 4, whose experts were nn.Linear modules, quantized like the rest.
    """
    from ..adapters.moe import EXPERT_MODULE, FAMILIES

    family = FAMILIES.get(str(ckpt.config.get("model_type", "")))
    fused = {p for parts in family.parts.values() for p in parts} if family else set()
    if fused and edits:
        expert_modules = [
            n
            for n, e in edits.items()
            if n.removesuffix(".weight").rsplit(".", 1)[-1] in fused and EXPERT_MODULE.search(n)
            for t in e.terms
            if t.kind != "expert"
        ]
        if expert_modules:
            fused = set()
    out = []
    for name, shard in ckpt.weight_map.items():
        info = ckpt.headers[shard].tensors[name]
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = name[: -len(".weight")]
        if info.dtype not in ("BF16", "F16", "F32") or not _NUMBERED_BLOCK.search(module + "."):
            continue
        if _NOT_LINEAR.search(module.rsplit(".", 1)[-1]):
            continue
        if module.rsplit(".", 1)[-1] in fused and EXPERT_MODULE.search(module + "."):
            continue
        out.append(name)
    return sorted(out)


@dataclass(frozen=True)
class Bnb4Base:
    """A pre-quantized bitsandbytes 4-bit folder, as the planner needs it."""

    specs: dict[str, QuantSpec]  # packed weight name -> how to dequantize it
    shapes: dict[str, tuple[int, ...]]  # packed weight name -> its real shape
    storage: dict[str, str]  # packed weight name -> its stored dtype (U8, or quant_storage)
    aux: frozenset[str]  # the quantization tensors, dropped from the output


def base_quantization(ckpt) -> str | None:
    """None for an ordinary base, "bnb4" for a bitsandbytes 4-bit folder; refuses the rest."""
    qc = ckpt.config.get("quantization_config")
    names = ckpt.weight_map
    packed = any(_STATE_KEY.match(n) for n in names)
    if not qc and not packed:
        if any(n.endswith((".SCB", ".weight_format")) for n in names):
            raise _refuse(ckpt, "bitsandbytes 8-bit (LLM.int8)")
        if any(n.endswith((".qweight", ".qzeros")) for n in names):
            raise _refuse(ckpt, "GPTQ/AWQ-style packed weights (qweight, qzeros)")
        orphans = sorted(n for n in names if n.endswith(_AUX_NAMES))
        if orphans:
            raise CorruptFileError(
                f"{ckpt.path}: holds bitsandbytes 4-bit quantization tensors ({', '.join(orphans[:3])}) "
                "but no *.quant_state.bitsandbytes__nf4 saying how to read them.",
                hint="Is a shard missing from the index? Re-save the 4-bit model with save_pretrained().",
            )
        return None
    qc = qc if isinstance(qc, dict) else {}
    method = str(qc.get("quant_method", "bitsandbytes" if packed else "")).lower()
    if method == "bitsandbytes":
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise _refuse(ckpt, "bitsandbytes 8-bit (LLM.int8)")
        if packed or qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            if not packed:
                raise CorruptFileError(
                    f"{ckpt.path}: config.json says bitsandbytes 4-bit but the weights hold no "
                    "packed 4-bit tensors (no *.quant_state.bitsandbytes__nf4).",
                    hint="Re-save the model, or remove quantization_config from config.json.",
                )
            return "bnb4"
    raise _refuse(ckpt, _METHOD_NAMES.get(method, method or "an unknown method"))


def _refuse(ckpt, what: str) -> InputError:
    return InputError(
        f"{ckpt.path}: the base model is quantized with {what}; shardmerge merges into 16-bit "
        "bases and bitsandbytes 4-bit (NF4) folders only.",
        hint="Merge into the original 16-bit model (add --qlora-base nf4 if the adapter was "
        "trained with QLoRA on a 4-bit base).",
    )


def open_bnb4(ckpt) -> Bnb4Base:
    """Check every packed weight of a bitsandbytes 4-bit folder; raise on the first problem.

    transformers saves ``W.weight`` (packed codes, two per byte), ``W.weight.absmax``,
    ``W.weight.quant_map`` and, with double quantization, ``W.weight.nested_absmax``
    and ``W.weight.nested_quant_map``, plus ``W.weight.quant_state.bitsandbytes__nf4``:
    a JSON blob (uint8) with quant_type, blocksize, dtype, shape and the nested
    fields (bitsandbytes QuantState.as_dict(packed=True)).
    """
    specs: dict[str, QuantSpec] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    storage: dict[str, str] = {}
    aux: set[str] = set()
    names = ckpt.weight_map
    for key in sorted(names):
        m = _STATE_KEY.match(key)
        if not m:
            continue
        weight, qtype = m.group(1), m.group(2)
        where = f"{ckpt.path / names[key]}: {weight}"

        def bad(what: str, where=where) -> CorruptFileError:
            return CorruptFileError(
                f"{where}: {what}", hint="Re-save the 4-bit model with save_pretrained()."
            )

        blob = ckpt.tensor(key)
        if blob.dtype not in ("U8", "I8") or blob.nbytes > MAX_STATE_BYTES:
            raise bad(
                f"its quant_state is {blob.dtype} {list(blob.shape)}, not a short uint8 JSON blob."
            )
        try:
            state = json.loads(_load(ckpt, key).numpy().tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise bad("its quant_state is not a JSON object.") from None
        if not isinstance(state, dict):
            raise bad("its quant_state is not a JSON object.")
        # The key's suffix and the blob's quant_type must both say nf4.
        qtype = next((q for q in (qtype, str(state.get("quant_type", qtype))) if q != "nf4"), "nf4")
        if qtype != "nf4":
            raise InputError(
                f"{where} is quantized as bitsandbytes {qtype}; only NF4 is supported "
                f"({REFUSED_CHOICES['fp4'] if qtype == 'fp4' else 'unknown quant type'}).",
                hint="Merge into the original 16-bit model instead.",
            )
        if weight not in names:
            raise bad("the packed weight itself is missing.")
        present = {s for s in _AUX_SUFFIXES if f"{weight}.{s}" in names}
        unknown = [n for n in names if n.startswith(weight + ".") and n != key]
        unknown = [n for n in unknown if n[len(weight) + 1 :] not in _AUX_SUFFIXES]
        if unknown:
            raise bad(f"unexpected quantization tensors {unknown[:3]}.")
        has_nested = "nested_absmax" in present
        if "nested_quant_map" in present and not has_nested:
            raise bad(f"has {weight}.nested_quant_map but no {weight}.nested_absmax.")
        need = {"absmax", "quant_map"} | ({"nested_quant_map"} if has_nested else set())
        if need - present:
            raise bad(f"missing {', '.join(sorted(f'{weight}.{s}' for s in need - present))}.")
        shape = state.get("shape")
        blocksize = state.get("blocksize")
        dtype = _QUANT_DTYPES.get(str(state.get("dtype")))
        if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
            raise bad(f"quant_state shape {shape!r} is not a list of positive sizes.")
        if not _valid_blocksize(blocksize):
            raise bad(
                f"quant_state blocksize {blocksize!r} is not a power of two from 2 to {MAX_BLOCKSIZE}."
            )
        if dtype is None:
            raise bad(
                f"quant_state dtype {state.get('dtype')!r} is not bfloat16, float16 or float32."
            )
        shape = tuple(shape)
        n = math.prod(shape)
        info = ckpt.tensor(weight)
        if info.nbytes != -(-n // 2):
            raise bad(
                f"holds {info.nbytes} bytes of packed codes but its shape {list(shape)} needs {-(-n // 2)}."
            )
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) != 2 or cols % 2:
            raise bad(
                f"shape {list(shape)}: only 2-D weights with an even number of columns are supported."
            )
        blocks = -(-n // blocksize)
        quant_map = _load(ckpt, f"{weight}.quant_map")
        if quant_map.dtype != torch.float32 or not torch.equal(quant_map.reshape(-1), NF4_CODE):
            raise bad(
                "its quant_map is not bitsandbytes' NF4 code (a custom code is not supported)."
            )
        absmax = _ref(ckpt, f"{weight}.absmax")
        nested: dict = {}
        if has_nested:
            nbs = state.get("nested_blocksize")
            offset = state.get("nested_offset")
            if not _valid_blocksize(nbs) or not _is_number(offset):
                raise bad(
                    f"quant_state nested_blocksize {nbs!r} or nested_offset {offset!r} is missing "
                    f"or invalid (a power of two up to {MAX_BLOCKSIZE}; a finite number)."
                )
            if absmax.dtype != "U8" or absmax.numel != blocks:
                raise bad(
                    f"nested absmax must be {blocks} uint8 values, not {absmax.dtype} {list(absmax.shape)}."
                )
            n_abs = _ref(ckpt, f"{weight}.nested_absmax")
            code = _ref(ckpt, f"{weight}.nested_quant_map")
            if n_abs.dtype != "F32" or n_abs.numel != -(-blocks // nbs):
                raise bad(f"nested_absmax must be {-(-blocks // nbs)} float32 values.")
            if code.dtype != "F32" or code.numel != 256:
                raise bad("nested_quant_map must be 256 float32 values.")
            nested = dict(
                nested_absmax=n_abs,
                nested_code=code,
                nested_blocksize=nbs,
                nested_offset=float(offset),
            )
        elif absmax.dtype != "F32" or absmax.numel != blocks:
            raise bad(
                f"absmax must be {blocks} float32 values, not {absmax.dtype} {list(absmax.shape)}."
            )
        specs[weight] = QuantSpec("bnb4", dtype, blocksize, absmax, **nested)
        shapes[weight] = shape
        storage[weight] = info.dtype
        aux |= {key} | {f"{weight}.{s}" for s in present}
    # Quantization tensors without a quant_state, or a packed-looking weight without any,
    # would be copied into the 16-bit output as they are.
    strays = [n for n in names if n.endswith(_AUX_NAMES) and n not in aux]
    strays += [
        n
        for n in names
        if n.endswith(".weight") and n not in specs and ckpt.tensor(n).dtype == "U8"
    ]
    if strays:
        more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
        raise CorruptFileError(
            f"{ckpt.path}: bitsandbytes 4-bit data without a *.quant_state.bitsandbytes__nf4 "
            f"to read it by: {', '.join(sorted(strays)[:3])}{more}.",
            hint="Is a shard missing from the index? Re-save the 4-bit model with save_pretrained().",
        )
    return Bnb4Base(specs, shapes, storage, frozenset(aux))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_blocksize(v: object) -> bool:
    return _is_int(v) and 2 <= v <= MAX_BLOCKSIZE and not v & (v - 1)


def _ref(ckpt, name: str) -> TensorRef:
    info = ckpt.tensor(name)
    path = str(ckpt.path / ckpt.weight_map[name])
    return TensorRef(path, name, info.dtype, info.shape, "safetensors", info.start, info.end)


def _load(ckpt, name: str) -> torch.Tensor:
    return read_tensor(str(ckpt.path / ckpt.weight_map[name]), ckpt.tensor(name))


def dequantized_view(ckpt, bnb4: Bnb4Base):
    """``ckpt`` as the merge sees it: each packed weight a tensor of its real shape and
    dtype (still at its packed bytes), the quantization tensors gone."""
    from dataclasses import replace

    from ..io.safetensors import TensorInfo

    headers = {}
    for shard, header in ckpt.headers.items():
        tensors = {}
        for name, t in header.tensors.items():
            if name in bnb4.aux:
                continue
            spec = bnb4.specs.get(name)
            if spec is not None:
                t = TensorInfo(name, spec.dtype, bnb4.shapes[name], t.start, t.end)
            tensors[name] = t
        if tensors:  # a shard of quantization tensors only is dropped
            headers[shard] = replace(header, tensors=tensors)
    weight_map = {n: s for n, s in ckpt.weight_map.items() if n not in bnb4.aux}
    shards = tuple(s for s in ckpt.shards if s in headers)
    return replace(ckpt, headers=headers, weight_map=weight_map, shards=shards)
