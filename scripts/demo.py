"""Demo: build a small Llama-style model and a LoRA adapter, merge them, check the result.

Run with ./scripts/demo.sh (which sets up .venv). Everything is generated
locally (random weights, no downloads) under ./demo-out/ unless --workdir.
Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")


def build(workdir: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=False,
    )
    base = workdir / "base"
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="2MB")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # random, non-zero B: the merge visibly changes weights
    )
    adapter = workdir / "adapter"
    get_peft_model(model, lora).save_pretrained(adapter)
    return base, adapter


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype with one correct rounding.

    torch converts float64 to bfloat16 through float32, rounding twice; going
    through float32 with round-to-odd instead makes the second rounding exact.
    """
    if dtype in (torch.float64, torch.float32):
        return x.to(dtype)
    x32 = x.to(torch.float32)
    inexact = x32.double() != x
    bits = x32.view(torch.int32)
    bits = bits - (inexact & (x32.double().abs() > x.abs())).int()  # truncate toward zero
    bits = bits | inexact.int()  # and make it odd when inexact
    return bits.view(torch.float32).to(dtype)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                out[k] = f.get_tensor(k)
    return out


def check(base: Path, adapter: Path, merged: Path) -> bool:
    ok = True
    b, a, m = tensors(base), tensors(adapter), tensors(merged)
    scale = 16 / 8
    exact = changed = copied = 0
    for name, w in b.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in a:
            ref = w.double() + scale * (
                a[f"{key}.lora_B.weight"].double() @ a[f"{key}.lora_A.weight"].double()
            )
            exact += int(torch.equal(m[name], round_once(ref, w.dtype)))
            changed += 1
        else:
            copied += int(torch.equal(m[name].view(torch.uint8), w.view(torch.uint8)))
    print(f"merged tensors equal to the float64 formula rounded once: {exact}/{changed}")
    print(f"untouched tensors byte-identical to the base: {copied}/{len(b) - changed}")
    ok &= exact == changed and copied == len(b) - changed and set(m) == set(b)

    ids = torch.randint(0, 2048, (1, 32))
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        got, want = merged_model(ids).logits, peft_model(ids).logits
    err = (got - want).abs().max().item() / want.abs().max().item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(
        f"logits vs the unmerged PEFT model: max relative error {err:.2e}, argmax agreement {agree:.0%}"
    )
    ok &= err < 2e-2 and agree > 0.9
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("demo-out"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    base, adapter = build(args.workdir)
    out = args.workdir / "merged"
    cmd = [sys.executable, "-m", "shardmerge", "merge", str(base), str(adapter), "-o", str(out)]
    print("$ shardmerge merge", base, adapter, "-o", out)
    subprocess.run(cmd, check=True)
    ok = check(base, adapter, out)
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
