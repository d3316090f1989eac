"""The codecs seam: a stored base format plugs in by one registry entry.

A toy format (int8 codes, one float32 scale per row in a side tensor) is
registered in ``shardmerge.codecs.BASE_FORMATS`` for the test; the planner,
the pipeline and verify then merge into it with no other change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from builders import (
    assert_matches_reference,
    make_adapter,
    make_base,
    read_tensors,
    reference_merge,
)
from safetensors.torch import save_file

import shardmerge
import shardmerge.codecs as codecs
from shardmerge.codecs import StoredBase
from shardmerge.errors import ShardmergeError
from shardmerge.terms import TensorRef
from shardmerge.verifier.check import verify

SMALL = dict(hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class RowScaled:
    """int8 codes times a float32 scale per row, rounded once to ``dtype``."""

    dtype: str
    scale: TensorRef
    blocksize: int = 1
    method: ClassVar[str] = "toy8"
    packed: ClassVar[bool] = True
    bytes_per_element: ClassVar[int] = 16

    def row_align(self, shape: tuple[int, ...]) -> int:
        return 1

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * shape[0]

    def decoder(self, shape, load):
        scale = load(self.scale).reshape(-1, 1)

        def rows(raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
            codes = raw.view(torch.int8).view(row1 - row0, *shape[1:]).to(torch.float32)
            return (codes * scale[row0:row1]).to(torch.bfloat16)

        return rows


class Toy8Folder:
    name = "toy8"
    title = "toy 8-bit"
    quant_method = "toy8"

    def marked(self, ckpt) -> bool:
        return False

    def check_unmarked(self, ckpt) -> None:
        return None

    def accepts(self, ckpt, settings: dict, marked: bool) -> bool:
        return True

    def open(self, ckpt) -> StoredBase:
        specs, shapes, storage = {}, {}, {}
        for name in ckpt.weight_map:
            if name + ".row_scale" in ckpt.weight_map:
                info, s = ckpt.tensor(name), ckpt.tensor(name + ".row_scale")
                path = str(ckpt.path / ckpt.weight_map[s.name])
                ref = TensorRef(path, s.name, s.dtype, s.shape, "safetensors", s.start, s.end)
                specs[name] = RowScaled("BF16", ref)
                shapes[name], storage[name] = info.shape, info.dtype
        aux = frozenset(n + ".row_scale" for n in specs)
        return StoredBase(self.name, specs, shapes, storage, aux)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A LoRA adapter, the toy-coded base, and the bf16 values its codes decode to."""
    tmp = tmp_path_factory.mktemp("toy8")
    base = make_base(tmp / "base", dtype=torch.bfloat16, seed=3, **SMALL)
    tensors = read_tensors(base)
    coded, decoded = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(("q_proj.weight", "down_proj.weight"))]:
        w = tensors[name].float()
        scale = w.abs().amax(dim=1) / 127
        codes = (w / scale[:, None]).round().to(torch.int8)
        coded[name], coded[name + ".row_scale"] = codes, scale
        decoded[name] = (codes.float() * scale[:, None]).to(torch.bfloat16)
    config = json.loads((base / "config.json").read_text())
    folders = []
    for label, content, qc in (("coded", coded, {"quant_method": "toy8"}), ("deq", decoded, None)):
        folder = tmp / label
        folder.mkdir()
        save_file(content, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(config, quantization_config=qc) if qc else config
        (folder / "config.json").write_text(json.dumps(cfg))
        folders.append(folder)
    adapter = make_adapter(base, tmp / "ad", target_modules=["q_proj", "v_proj"], seed=5)
    return adapter, folders[0], folders[1]


def test_unregistered_format_is_refused(folders):
    adapter, coded, _ = folders
    with pytest.raises(ShardmergeError, match="quantized with toy8"):
        shardmerge.plan(coded, [adapter], coded.parent / "x", device="cpu")


def test_registered_format_merges_exactly(folders, monkeypatch):
    adapter, coded, deq = folders
    monkeypatch.setattr(codecs, "BASE_FORMATS", (*codecs.BASE_FORMATS, Toy8Folder()))
    out = coded.parent / "out"
    shardmerge.merge(coded, [adapter], out, device="cpu")
    got = read_tensors(out)
    assert not any(n.endswith(".row_scale") for n in got)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ref = reference_merge(deq, [adapter])
    assert_matches_reference(got, ref)
    want = read_tensors(deq)
    for name in [n for n in want if n.endswith("down_proj.weight")]:  # decoded, no LoRA
        assert torch.equal(got[name], want[name]), name
    assert verify(out, coded, [adapter]).ok
