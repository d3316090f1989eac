"""What --qlora-base nf4 buys: logit error of two merges against the model QLoRA trained.

An adapter trained with QLoRA learned its delta on top of the NF4-dequantized
base weights. The "trained model" is that: every quantized Linear weight as
bitsandbytes dequantizes it, plus the LoRA branch evaluated unmerged (as PEFT
runs it during training; emulated here with the dequantized weights, float32
compute). Two merges are compared against it, each written in bfloat16:

  (a) shardmerge merge BASE ADAPTER            # into the 16-bit base weights
  (b) shardmerge merge BASE ADAPTER --qlora-base nf4

and (b) written in float32 (--dtype float32), to show that what is left of
(b)'s error is bfloat16's rounding of the merged weights.

The model is tiny and random (transformers' init), the adapter random too
(B scaled so the delta is a few percent of the weights); the figures show the
size of the effect, not a benchmark of any real model.

    .venv/bin/python scripts/qlora_tradeoff.py [--hidden 256 --layers 4 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shardmerge  # noqa: E402
from shardmerge.codecs import nf4_roundtrip, nf4_targets  # noqa: E402
from shardmerge.io.checkpoint import open_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")


def build(folder: Path, hidden: int, layers: int, vocab: int, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, rank: int, b_scale: float, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed + 1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    pm.save_pretrained(folder)
    return folder


def nf4_dequantized(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 quantize + dequantize of ``w`` (float32 values, rounded to w's dtype,
    as its CUDA kernel does); shardmerge's own implementation without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return nf4_roundtrip(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state.dtype = torch.float32
    return bnb_f.dequantize_4bit(packed, state).to(w.dtype)


def trained_model(base: Path, adapter: Path):
    """The 4-bit base as training saw it (NF4 dequantized) + the LoRA branch, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = set(nf4_targets(open_checkpoint(base)))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.copy_(nf4_dequantized(p.to(torch.bfloat16)).float())
    return PeftModel.from_pretrained(model, adapter).eval(), len(names)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    scale = ref.pow(2).mean().sqrt()
    err = got - ref
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return {
        "max_abs": float(err.abs().max()),
        "rms_rel": float(err.pow(2).mean().sqrt() / scale),
        "kl_mean": float(kl.mean()),
        "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--b-scale", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build(tmp / "base", args.hidden, args.layers, args.vocab, args.seed)
        adapter = make_adapter(base, tmp / "adapter", args.rank, args.b_scale, args.seed)
        ids = torch.randint(0, args.vocab, (8, 64), generator=torch.Generator().manual_seed(7))
        trained, n_quant = trained_model(base, adapter)
        ref = logits(trained, ids)
        rows = {}
        merges = (
            ("16-bit base (default)", {}),
            ("--qlora-base nf4", {"qlora_base": "nf4"}),
            # The same, written in float32: what is left above is bfloat16's rounding.
            ("--qlora-base nf4, float32", {"qlora_base": "nf4", "dtype": "float32"}),
        )
        for label, kwargs in merges:
            out = tmp / f"out{len(rows)}"
            shardmerge.merge(base, [adapter], out, device="cpu", **kwargs)
            merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            rows[label] = compare(logits(merged, ids), ref)
        no_adapter = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        rows["(16-bit base, no adapter)"] = compare(logits(no_adapter, ids), ref)
    if args.json:
        print(json.dumps({"args": vars(args), "quantized_tensors": n_quant, "results": rows}))
        return
    print(
        f"tiny llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, bf16; "
        f"LoRA r={args.rank} on all linears; {n_quant} tensors NF4-quantized; 8 x 64 tokens"
    )
    print("logits vs the trained model (NF4 base + LoRA, unmerged, float32 compute):")
    print(
        f"{'merge':<28} {'max |err|':>10} {'rms err/rms':>12} {'mean KL':>10} {'top-1 agree':>12}"
    )
    for label, r in rows.items():
        print(
            f"{label:<28} {r['max_abs']:>10.4f} {r['rms_rel']:>12.2e} {r['kl_mean']:>10.2e} "
            f"{r['top1_agree']:>12.4f}"
        )


if __name__ == "__main__":
    main()
