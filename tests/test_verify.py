"""``shardmerge verify`` and ``merge --verify``: passes on a good merge, names what is wrong otherwise.

The damaged outputs are made by editing a good merge's files directly: one
element's bits moved by one ulp, a byte flipped in a copied tensor, a LoRA
tensor smuggled in, a dtype or shape changed, a wrong index total_size.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from test_resume import INDEX, WORK, Model, build_model, snapshot

import shardmerge
from shardmerge.cli import main as cli_main
from shardmerge.errors import InputError, Interrupted

ULP = 0.5 + 1e-6
MERGED = "model.layers.1.mlp.up_proj.weight"
COPIED = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    return build_model(tmp_path_factory.mktemp("verify_model"), seed=11)


@pytest.fixture(scope="module")
def good(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    shardmerge.merge(model.base, [model.adapter], out)
    return out


@pytest.fixture
def out(good, tmp_path) -> Path:
    """A private copy of the good merge, to damage."""
    copy = tmp_path / "out"
    shutil.copytree(good, copy)
    return copy


def cli(*args: str):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def verify_cli(model: Model, out: Path, *extra: str):
    return cli("verify", out, "--base", model.base, "--adapter", model.adapter, *extra)


def header(path: Path) -> tuple[int, dict]:
    """(start of the data section, header) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def locate(out: Path, name: str) -> tuple[Path, int, dict]:
    """The file holding tensor ``name``, its absolute offset, and its header entry."""
    shard = json.loads((out / INDEX).read_text())["weight_map"][name]
    start, hdr = header(out / shard)
    return out / shard, start + hdr[name]["data_offsets"][0], hdr[name]


def rewrite(path: Path, change) -> None:
    """Load a shard with safetensors, let ``change`` edit the dict, save it (metadata kept)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, path, metadata=meta)


def expect_failure(model: Model, out: Path, *needles: str) -> None:
    """Both the Python API and the CLI fail and name what is wrong."""
    report = shardmerge.verify(out, model.base, [model.adapter])
    assert not report.ok
    text = "\n".join(report.problems)
    for needle in needles:
        assert needle in text, (needle, report.problems)
    r = verify_cli(model, out)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output


# --------------------------------------------------------------------------- passing


def test_verify_passes_on_a_good_merge(model, good):
    report = shardmerge.verify(good, model.base, [model.adapter])
    assert report.ok, report.problems
    assert dict(report.tensors) == {"merge": 9, "copy": 6}
    assert report.max_ulp and all(0 <= v <= ULP for v in report.max_ulp.values()), report.max_ulp
    r = verify_cli(model, good)
    assert r.exit_code == 0, r.output
    assert f"verify {good}: OK" in r.output
    assert "tensors checked: 6 copy, 9 merge" in r.output
    assert "max error in ulp:" in r.output
    model.assert_inputs_unchanged()


def test_merge_with_verify_prints_the_summary(model, tmp_path):
    out = tmp_path / "out"
    r = cli("merge", model.base, model.adapter, "-o", out, "-q", "--verify")
    assert r.exit_code == 0, r.output
    assert "merged into" in r.output
    assert f"verify {out}: OK" in r.output and "tensors checked:" in r.output


def test_verify_other_dtype_and_weights(model, tmp_path):
    """dtype and weights default to what the output records; naming others fails."""
    out = tmp_path / "out"
    r = cli(
        "merge",
        model.base,
        model.adapter,
        "-o",
        out,
        "-q",
        "--dtype",
        "float32",
        "--weights",
        "0.5",
    )
    assert r.exit_code == 0, r.output
    report = shardmerge.verify(out, model.base, [model.adapter])
    assert report.ok, report.problems
    assert dict(report.tensors) == {"merge": 9, "convert": 6}
    assert all(v <= ULP for v in report.max_ulp.values())
    assert verify_cli(model, out, "--dtype", "float32", "--weights", "0.5").exit_code == 0
    r = verify_cli(model, out, "--weights", "1")
    assert r.exit_code == 1 and "ulp from the formula" in r.output
    r = verify_cli(model, out, "--dtype", "bfloat16")
    assert r.exit_code == 1 and "expected BF16" in r.output


def test_verify_fails_against_another_adapter(model, good):
    report = shardmerge.verify(good, model.base, [model.root / "lora_other"])
    assert not report.ok
    assert all("ulp from the formula" in p for p in report.problems)
    assert len(report.problems) == 9  # every merged tensor, and only those


# --------------------------------------------------------------------------- failing


def _bf16_bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int16).view(torch.bfloat16).item()


def test_merged_tensor_off_by_one_ulp(model, out):
    path, offset, entry = locate(out, MERGED)
    assert entry["dtype"] == "BF16"
    rows, cols = entry["shape"]
    # The exact value of element (row, col): W + (alpha / r) * (B @ A).
    with safe_open(model.adapter / "adapter_model.safetensors", "pt") as f:
        key = "base_model.model." + MERGED.removesuffix(".weight")
        a = f.get_tensor(key + ".lora_A.weight").double()
        b = f.get_tensor(key + ".lora_B.weight").double()
    shard = json.loads((model.base / INDEX).read_text())["weight_map"][MERGED]
    with safe_open(model.base / shard, "pt") as f:
        w = f.get_tensor(MERGED).double()
    exact = w + 2.0 * (b @ a)
    data = bytearray(path.read_bytes())
    # An element away from a binade edge, moved one ulp further from the exact value.
    for row, col in ((r, c) for r in range(3, rows) for c in range(cols)):
        pos = offset + 2 * (row * cols + col)
        bits = struct.unpack("<H", data[pos : pos + 2])[0]
        if 2 <= (bits & 0x7F) <= 0x7D and (bits & 0x7F80) not in (0, 0x7F80):
            break
    y = _bf16_bits_to_float(struct.unpack("<h", data[pos : pos + 2])[0])
    up = y >= exact[row, col].item()  # move the value up when it is already above
    bits += 1 if up == (y > 0) else -1
    data[pos : pos + 2] = struct.pack("<H", bits)
    path.write_bytes(bytes(data))
    report = shardmerge.verify(out, model.base, [model.adapter])
    assert not report.ok
    assert len(report.problems) == 1 and MERGED in report.problems[0], report.problems
    assert max(report.max_ulp.values()) > ULP
    expect_failure(model, out, MERGED, "ulp from the formula")


def test_copied_tensor_with_a_flipped_byte(model, out):
    path, offset, entry = locate(out, COPIED)
    data = bytearray(path.read_bytes())
    data[offset + (entry["data_offsets"][1] - entry["data_offsets"][0]) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expect_failure(model, out, COPIED, "differ from the base")


def test_leftover_lora_tensor(model, out):
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    path, _, _ = locate(out, "model.layers.0.self_attn.q_proj.weight")
    rewrite(path, lambda t: t.update({name: torch.zeros(4, 32, dtype=torch.bfloat16)}))
    expect_failure(model, out, "LoRA tensors remain", name)


def test_tensor_with_another_dtype(model, out):
    path, _, _ = locate(out, COPIED)
    rewrite(path, lambda t: t.update({COPIED: t[COPIED].float()}))
    expect_failure(model, out, COPIED, "is F32 [32], expected BF16 [32]")


def test_tensor_with_another_shape(model, out):
    name = "model.layers.2.self_attn.v_proj.weight"
    path, _, _ = locate(out, name)
    rewrite(path, lambda t: t.update({name: t[name].reshape(16, 64).contiguous()}))
    expect_failure(model, out, name, "[16, 64], expected BF16 [32, 32]")


def test_wrong_index_total_size(model, out):
    index = json.loads((out / INDEX).read_text())
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 2
    (out / INDEX).write_text(json.dumps(index, indent=2))
    expect_failure(model, out, f"total_size is {right + 2}, expected {right}")


def test_missing_shard(model, out):
    shard = json.loads((out / INDEX).read_text())["weight_map"][COPIED]
    (out / shard).unlink()
    r = verify_cli(model, out)
    assert r.exit_code != 0 and shard in r.output and "Traceback" not in r.output


def test_verify_refuses_an_unfinished_merge(model, tmp_path, monkeypatch):
    """Ctrl-C (as raised at a crash point) after two shards: verify says to finish it first."""
    import shardmerge.execute.driver as ex

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 5:  # extras, then commit + record of two shards
            raise KeyboardInterrupt

    monkeypatch.setattr(ex, "crashpoint", interrupt)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        shardmerge.merge(model.base, [model.adapter], out)
    monkeypatch.undo()
    assert not (out / INDEX).exists()
    with pytest.raises(InputError, match="unfinished merge"):
        shardmerge.verify(out, model.base, [model.adapter])
    r = verify_cli(model, out)
    assert r.exit_code == 2 and "unfinished merge" in r.output and "Traceback" not in r.output
    # Finishing it makes it verify.
    assert shardmerge.merge(model.base, [model.adapter], out).shards_resumed == 2
    assert shardmerge.verify(out, model.base, [model.adapter]).ok
    assert sorted(snapshot(out)) == sorted(
        p.relative_to(out).as_posix() for p in out.iterdir() if p.name != WORK
    )
    model.assert_inputs_unchanged()
