"""Broken GPTQ and AWQ bases: one clear refusal each, exit 2, no traceback, nothing written.

Each case edits a freshly packed tiny Llama (q4_builders.py): its config.json
(bit widths, group sizes, layouts) or its tensors (packing sizes, scale
shapes and values, g_idx entries, missing and stray side tensors).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from builders import make_adapter
from click.testing import CliRunner
from fp8_builders import save_tiny
from q4_builders import llama_config, quantize_model
from safetensors.torch import load_file, save_file

from shardmerge.cli import main

M = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{method: packed folder} and a LoRA on q_proj, made once."""
    tmp = tmp_path_factory.mktemp("q4bad")
    src = save_tiny(tmp / "src", llama_config(), seed=3)
    built = {}
    for method in ("gptq", "awq"):
        quantize_model(src, tmp / method, tmp / f"{method}-deq", method, bits=4, group=16)
        built[method] = tmp / method
    adapter = make_adapter(tmp / "gptq-deq", tmp / "lora", target_modules=["q_proj"])
    return built, adapter


def edit_tensors(folder, edit) -> None:
    """Apply ``edit`` to the tensors of the shard holding ``M``'s qweight."""
    edit_tensors_of(folder, f"{M}.qweight", edit)


def edit_tensors_of(folder, name: str, edit) -> None:
    """Apply ``edit`` to the tensors of the shard holding tensor ``name``."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _set(key, value):
    return lambda t: t.update({key: value(t[key])})


CASES = {
    "gptq_3_bits": ("gptq", None, lambda q: q.update(bits=3), ["GPTQ with bits 3", "2 or 4 or 8"]),
    "gptq_group_0": ("gptq", None, lambda q: q.update(group_size=0), ["group_size 0"]),
    "gptq_marlin": (
        "gptq",
        None,
        lambda q: q.update(checkpoint_format="marlin"),
        ["'marlin' checkpoint format"],
    ),
    "gptq_bits_do_not_match": (
        "gptq",
        None,
        lambda q: q.update(bits=8),
        [".scales: has shape", "8 bits", "bit width or group size"],
    ),
    "gptq_group_does_not_match": (
        "gptq",
        None,
        lambda q: q.update(group_size=32),
        [".scales: has shape", "group_size 32"],
    ),
    "qweight_not_int32": (
        "gptq",
        _set(f"{M}.qweight", lambda t: t.to(torch.int64)),
        None,
        [f"{M}.qweight", "expected a 2-D int32"],
    ),
    "qzeros_wrong_packing": (
        "gptq",
        _set(f"{M}.qzeros", lambda t: t[:, :-1].contiguous()),
        None,
        [f"{M}.qzeros", "has shape [4, 7]", "needs [4, 8]"],
    ),
    "scales_wrong_shape": (
        "gptq",
        _set(f"{M}.scales", lambda t: t[:-1].contiguous()),
        None,
        [f"{M}.scales", "has shape [3, 64]", "needs [4, 64]"],
    ),
    "scales_nan": (
        "gptq",
        _set(f"{M}.scales", lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))),
        None,
        [f"{M}.scales", "NaN or infinite"],
    ),
    "g_idx_out_of_range": (
        "gptq",
        _set(f"{M}.g_idx", lambda t: t.index_fill(0, torch.tensor([5]), 99)),
        None,
        ["g_idx names group 99 for input column 5", "4 groups (0..3)"],
    ),
    "g_idx_wrong_length": (
        "gptq",
        _set(f"{M}.g_idx", lambda t: t[:-8].contiguous()),
        None,
        [f"{M}.g_idx", "has 56 entries", "64 input columns"],
    ),
    "qzeros_missing": ("gptq", lambda t: t.pop(f"{M}.qzeros"), None, [f"{M}.qzeros", "no shard"]),
    "stray_qzeros": (
        "gptq",
        lambda t: t.update({"model.extra.qzeros": torch.zeros(1, 1, dtype=torch.int32)}),
        None,
        ["without a qweight", "model.extra.qzeros"],
    ),
    "qweight_and_weight": (
        "gptq",
        lambda t: t.update({f"{M}.weight": torch.zeros(64, 64)}),
        None,
        ["both a packed qweight and a weight"],
    ),
    "awq_gemv": ("awq", None, lambda q: q.update(version="gemv"), ["'gemv' layout"]),
    "awq_8_bits": ("awq", None, lambda q: q.update(bits=8), ["AWQ with bits 8"]),
    "awq_no_zero_point": ("awq", None, lambda q: q.update(zero_point=False), ["zero_point false"]),
    "awq_scales_wrong_shape": (
        "awq",
        _set(f"{M}.scales", lambda t: t[:, :-8].contiguous()),
        None,
        [f"{M}.scales", "has shape [4, 56]", "needs [4, 64]"],
    ),
}


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_refused(base, adapter, out, phrases) -> None:
    """A merge of ``base`` to bf16 is refused: exit 2, every phrase said, no traceback,
    no shard written, the base untouched."""
    before = digest(base)
    argv = ["merge", str(base), str(adapter), "-o", str(out), "--dtype", "bfloat16", "-q"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.glob("*.safetensors"))
    assert digest(base) == before  # inputs untouched


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_packed_base_is_refused(folders, tmp_path, case):
    built, adapter = folders
    method, tensors_edit, config_edit, phrases = CASES[case]
    base = shutil.copytree(built[method], tmp_path / "base")
    if tensors_edit:
        edit_tensors(base, tensors_edit)
    if config_edit:
        edit_config(base, config_edit)
    assert_refused(base, adapter, tmp_path / "out", phrases)
