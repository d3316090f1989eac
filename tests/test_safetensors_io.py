"""Unit tests of the strict safetensors header parser (shardmerge.io.safetensors).

Good files come from ``safetensors.torch.save_file``, the reference writer;
corrupt ones are written byte by byte. ``CORRUPT`` is shared with
test_bad_input.py, which feeds the same files through the CLI.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardmerge.errors import CorruptFileError
from shardmerge.io.safetensors import (
    DTYPES,
    ITEMSIZE,
    OutEntry,
    encode_header,
    parse_header,
    read_header,
    read_tensor,
)


def st_bytes(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian length, the JSON header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def f32(begin: int, end: int, shape: list | None = None) -> dict:
    """A header entry for a float32 vector over data bytes [begin, end)."""
    return {
        "dtype": "F32",
        "shape": [(end - begin) // 4] if shape is None else shape,
        "data_offsets": [begin, end],
    }


# name -> (file bytes, a phrase the error message must contain)
CORRUPT: dict[str, tuple[bytes, str]] = {
    "header_length_beyond_file": (st_bytes(b"{}", length=1000), "claims 1000 bytes"),
    "header_length_huge": (struct.pack("<Q", 2**63) + b"{}", "claims"),
    "header_length_zero": (struct.pack("<Q", 0) + bytes(8), "not valid JSON"),
    "empty_file": (b"", "too short"),
    "shorter_than_8_bytes": (b"\x05\x00\x00", "too short"),
    "invalid_json": (st_bytes(b'{"a": {"dtype": '), "not valid JSON"),
    "invalid_utf8": (st_bytes(b'{"\xff\xfe": 1}'), "not valid JSON"),
    "not_an_object": (st_bytes(b"[1, 2]"), "not a JSON object"),
    "entry_not_an_object": (st_bytes({"a": [0, 4]}, bytes(4)), "exactly dtype, shape"),
    "entry_missing_field": (
        st_bytes({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        "exactly dtype, shape",
    ),
    "entry_extra_field": (
        st_bytes({"a": {**f32(0, 4), "stride": [1]}}, bytes(4)),
        "exactly dtype, shape",
    ),
    "unknown_dtype": (
        st_bytes({"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "unknown dtype 'F12'",
    ),
    "shape_offsets_mismatch": (
        st_bytes({"a": f32(0, 12, [2, 2])}, bytes(12)),
        "spans 12 bytes but shape [2, 2] of F32 needs 16",
    ),
    "offsets_out_of_range": (st_bytes({"a": f32(0, 16)}, bytes(8)), "ends at byte 16"),
    "offsets_reversed": (st_bytes({"a": f32(8, 0, [2])}, bytes(8)), "invalid data_offsets"),
    "offsets_negative": (st_bytes({"a": f32(-4, 4, [2])}, bytes(8)), "invalid data_offsets"),
    "offsets_three_numbers": (
        st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, bytes(8)),
        "invalid data_offsets",
    ),
    "offsets_not_integers": (
        st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, bytes(8)),
        "invalid data_offsets",
    ),
    "overlapping_tensors": (
        st_bytes({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12)),
        "overlaps",
    ),
    "gap_between_tensors": (
        st_bytes({"a": f32(0, 8), "b": f32(12, 20)}, bytes(20)),
        "gap of 4 bytes",
    ),
    "duplicate_keys": (
        st_bytes(
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            bytes(8),
        ),
        "duplicate key 'a'",
    ),
    "negative_dim": (st_bytes({"a": f32(0, 8, [-1, -2])}, bytes(8)), "invalid shape"),
    "float_dim": (st_bytes({"a": f32(0, 8, [2.0])}, bytes(8)), "invalid shape"),
    "string_dim": (st_bytes({"a": f32(0, 8, ["2"])}, bytes(8)), "invalid shape"),
    "bool_dim": (st_bytes({"a": f32(0, 4, [True])}, bytes(4)), "invalid shape"),
    "shape_not_a_list": (st_bytes({"a": f32(0, 8, 2)}, bytes(8)), "invalid shape"),
    "trailing_bytes": (st_bytes({"a": f32(0, 8)}, bytes(12)), "trailing bytes"),
    "metadata_value_not_str": (
        st_bytes({"__metadata__": {"format": 1}, "a": f32(0, 4)}, bytes(4)),
        "__metadata__ must map strings to strings",
    ),
    "metadata_not_an_object": (
        st_bytes({"__metadata__": ["format", "pt"], "a": f32(0, 4)}, bytes(4)),
        "__metadata__ must map strings to strings",
    ),
    "metadata_empty_list": (
        st_bytes({"__metadata__": [], "a": f32(0, 4)}, bytes(4)),
        "__metadata__ must map strings to strings",
    ),
    "metadata_string": (
        st_bytes({"__metadata__": "", "a": f32(0, 4)}, bytes(4)),
        "__metadata__ must map strings to strings",
    ),
}


def _every_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype that both torch and safetensors' torch binding know."""
    from safetensors.torch import _TYPES  # the reference binding's table

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in _TYPES.items():
        if dtype is None:
            continue
        raw = torch.randint(0, 256, (3, 5 * torch.empty((), dtype=dtype).element_size()))
        tensors[f"t.{name}"] = raw.to(torch.uint8).view(dtype)
        tensors[f"scalar.{name}"] = torch.zeros((), dtype=dtype)
        tensors[f"empty.{name}"] = torch.zeros((0, 4), dtype=dtype)
    tensors["f32.3d"] = torch.randn(2, 3, 4, generator=g)
    tensors["f32.empty_inner"] = torch.zeros(3, 0)
    return tensors


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.reshape(-1).view(torch.uint8).tolist())


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("st") / "all.safetensors"
    tensors = _every_dtype_tensors()
    save_file(tensors, str(path), metadata={"format": "pt", "note": "ünïcode"})
    return path, tensors


def test_every_reference_dtype_is_known():
    """Every dtype the reference writer can produce from torch is readable here."""
    from safetensors.torch import _TYPES

    missing = sorted(n for n, dt in _TYPES.items() if dt is not None and n not in DTYPES)
    assert not missing, f"dtypes save_file writes but read_header refuses: {missing}"
    for name, dtype in DTYPES.items():
        assert ITEMSIZE[name] == torch.empty((), dtype=dtype).element_size()


def test_read_header_accepts_reference_file(good_file):
    path, tensors = good_file
    h = read_header(path)
    assert h.path == str(path)
    assert h.size == path.stat().st_size
    assert h.metadata == {"format": "pt", "note": "ünïcode"}
    assert set(h.tensors) == set(tensors)
    starts = [t.start for t in h.tensors.values()]
    assert starts == sorted(starts), "tensors are listed in file order"
    for name, t in tensors.items():
        info = h.tensors[name]
        assert DTYPES[info.dtype] == t.dtype, name
        assert info.shape == tuple(t.shape), name
        assert info.nbytes == t.numel() * t.element_size(), name
        assert h.data_start <= info.start <= info.end <= h.size


def test_read_tensor_returns_the_saved_bytes(good_file):
    path, tensors = good_file
    h = read_header(path)
    for name, t in tensors.items():
        got = read_tensor(str(path), h.tensors[name])
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert _bytes(got) == _bytes(t), name


def test_parse_header_matches_read_header(good_file):
    path, _ = good_file
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert parse_header(str(path), len(data), data[8 : 8 + n]) == read_header(path)


def test_encode_header_round_trips(good_file, tmp_path):
    path, tensors = good_file
    h = read_header(path)
    entries = [OutEntry(t.name, t.dtype, t.shape) for t in h.tensors.values()]
    header = encode_header(entries, h.metadata)
    assert len(header) % 8 == 0, "data must start 8-byte aligned"
    src = path.read_bytes()
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(header + b"".join(src[t.start : t.end] for t in h.tensors.values()))
    h2 = read_header(copy)
    assert h2.metadata == h.metadata
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in h2.tensors.values()] == [
        (t.name, t.dtype, t.shape, t.nbytes) for t in h.tensors.values()
    ]
    # The reference reader agrees, byte for byte.
    back = load_file(str(copy))
    for name, t in tensors.items():
        assert _bytes(back[name]) == _bytes(t), name


def test_encode_header_without_metadata_and_empty(tmp_path):
    header = encode_header([], {})
    p = tmp_path / "empty.safetensors"
    p.write_bytes(header)
    h = read_header(p)
    assert h.tensors == {} and h.metadata == {}
    assert load_file(str(p)) == {}


def test_null_metadata_is_accepted(tmp_path):
    """The reference reader treats "__metadata__": null as no metadata."""
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_bytes({"__metadata__": None, "a": f32(0, 4)}, bytes(4)))
    h = read_header(p)
    assert h.metadata == {} and list(h.tensors) == ["a"]


def test_zero_size_tensors_share_offsets(tmp_path):
    p = tmp_path / "z.safetensors"
    p.write_bytes(
        st_bytes(
            {"e1": f32(0, 0, [0, 3]), "a": f32(0, 8), "e2": f32(8, 8, [2, 0]), "s": f32(8, 12, [])},
            bytes(12),
        )
    )
    h = read_header(p)
    assert h.tensors["s"].shape == () and h.tensors["s"].numel == 1
    assert h.tensors["e2"].nbytes == 0


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_read_header_rejects_corrupt_file(case, tmp_path):
    data, phrase = CORRUPT[case]
    p = tmp_path / f"{case}.safetensors"
    p.write_bytes(data)
    with pytest.raises(CorruptFileError) as err:
        read_header(p)
    msg = str(err.value)
    assert str(p) in msg
    assert phrase in msg
    assert "Re-download or re-export" in msg
    assert p.read_bytes() == data


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_read_header_rejects_truncated_reference_file(good_file, tmp_path, cut):
    path, _ = good_file
    data = path.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:-cut])
    with pytest.raises(CorruptFileError) as err:
        read_header(p)
    assert str(p) in str(err.value) and "truncated" in str(err.value)


def test_read_header_on_a_folder_is_an_input_error(tmp_path):
    from shardmerge.errors import InputError

    d = tmp_path / "model.safetensors"
    d.mkdir()
    with pytest.raises(InputError) as err:
        read_header(d)
    assert str(d) in str(err.value)
