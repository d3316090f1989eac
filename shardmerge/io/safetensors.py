"""The safetensors format: strict header parsing, row-block reads, a streaming writer.

A file is ``u64 little-endian N | N bytes of JSON header | data``. The header
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
relative to the data area, plus an optional ``"__metadata__"`` of strings.
We check every promise the header makes before trusting any of it, because
the reader seeks by these numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from ..errors import CorruptFileError, InputError, shown
from .dtypes import DTYPES, ITEMSIZE
from .dtypes import FLOAT_DTYPES as FLOAT_DTYPES
from .dtypes import NAME_OF as NAME_OF
from .jsonfile import parse_json

if TYPE_CHECKING:
    import torch

# Largest header we accept: the reference implementation's limit.
MAX_HEADER_BYTES = 100_000_000


def matrix_rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor processed in row blocks: the first axis of a 1-D or 2-D
    tensor; for 3 or more dimensions the leading axes flattened (a fused MoE
    expert tensor [E, out, in] is E*out rows of ``in``), so blocks stay small."""
    if len(shape) >= 3:
        return math.prod(shape[:-1])
    return shape[0] if shape else 1


def block_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """The shape of ``rows`` consecutive rows of a tensor of ``shape`` (see ``matrix_rows``)."""
    if not shape:
        return ()
    return (rows, shape[-1]) if len(shape) >= 3 else (rows, *shape[1:])


@dataclass(frozen=True)
class TensorInfo:
    """One header entry, with offsets made absolute within the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows of the tensor as a matrix (see ``matrix_rows``); a scalar counts as one row."""
        return matrix_rows(self.shape)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: str
    size: int  # file size in bytes
    data_start: int  # absolute offset of the data area
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the header bytes: identifies the layout cheaply


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file.

    Raises CorruptFileError naming the file and the broken promise: a length
    beyond the file, invalid JSON, an unknown dtype, a shape that does not
    match its byte range, ranges out of bounds, overlapping or leaving holes,
    or a data area shorter or longer than the header says (a truncated file).

    >>> h = read_header("model.safetensors")  # doctest: +SKIP
    >>> h.tensors["lm_head.weight"].shape     # doctest: +SKIP
    (32000, 4096)
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(
                    f"{path}: {size} bytes is too short to be a safetensors file "
                    "(it needs an 8-byte header length).",
                    hint="Re-download or re-export the file.",
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptFileError(
                    f"{path}: the header claims {n} bytes but the file has {size} bytes; "
                    "the file is truncated or not a safetensors file.",
                    hint="Re-download or re-export the file.",
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}.") from None
    return parse_header(path, size, raw)


def parse_header(path: str, size: int, raw: bytes) -> Header:
    """Validate the JSON header bytes ``raw`` of a file of ``size`` bytes."""

    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(
            f"{path}: corrupt safetensors header: {what}.",
            hint="Re-download or re-export the file.",
        )

    doc = parse_json(raw, bad, object_pairs_hook=_no_duplicate_keys)
    if not isinstance(doc, dict):
        raise bad("the header is not a JSON object")

    metadata = doc.pop("__metadata__", None)
    if metadata is None:  # absent, or null as the reference reader allows
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + len(raw)
    data_len = size - data_start
    entries: list[TensorInfo] = []
    for name, spec in doc.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {shown(name)} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {shown(name)} has unknown dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {shown(name)} has an invalid shape {shown(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
        begin, end = offsets
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise bad(
                f"tensor {shown(name)} spans {end - begin} bytes but shape {shown(shape)} of {dtype} "
                f"needs {expected}"
            )
        if end > data_len:
            raise bad(
                f"tensor {shown(name)} ends at byte {end} of a {data_len}-byte data area "
                "(the file is truncated or the offsets are wrong)"
            )
        entries.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))

    entries.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in entries:
        if t.start < cursor:
            raise bad(f"tensor {shown(t.name)} overlaps the tensor before it")
        if t.start > cursor:
            raise bad(f"a gap of {t.start - cursor} bytes lies before tensor {shown(t.name)}")
        cursor = t.end
    if cursor != size:
        raise bad(
            f"the tensors cover {cursor - data_start} bytes but the data area has {data_len}"
            + (" (trailing bytes)" if cursor < size else "")
        )
    digest = hashlib.sha256(raw).hexdigest()
    return Header(path, size, data_start, {t.name: t for t in entries}, dict(metadata), digest)


def read_rows(
    f: BinaryIO, info: TensorInfo, row0: int, row1: int, out: torch.Tensor
) -> torch.Tensor:
    """Read rows ``[row0, row1)`` of ``info`` into the front of the byte buffer ``out``.

    ``out`` is a reusable 1-D uint8 tensor; the returned tensor is a view of it
    with the tensor's dtype and shape ``(row1 - row0, *shape[1:])``.
    """
    nbytes = (row1 - row0) * info.row_bytes
    view = out[:nbytes]
    pread_into(f, info.start + row0 * info.row_bytes, view)
    return view.view(DTYPES[info.dtype]).view(block_shape(info.shape, row1 - row0))


def pread_into(f: BinaryIO, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 tensor ``buf`` from ``f`` at ``offset``; a short read is an error."""
    mv = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
    fd = f.fileno()
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n == 0:
            raise CorruptFileError(
                f"{f.name}: unexpected end of file at byte {offset + done}; the file was "
                "truncated or changed while being read."
            )
        done += n


def read_tensor(path: str, info: TensorInfo) -> torch.Tensor:
    """Read one whole tensor (for small ones: LoRA factors, biases)."""
    import torch  # not at the top: reading headers must not import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        if not info.shape:
            return _scalar(f, info, buf)
        return read_rows(f, info, 0, info.rows, buf).view(info.shape)


def _scalar(f: BinaryIO, info: TensorInfo, buf: torch.Tensor) -> torch.Tensor:
    pread_into(f, info.start, buf)
    return buf.view(DTYPES[info.dtype]).reshape(())


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output file, in the order it will be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def encode_header(entries: list[OutEntry], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) for ``entries`` laid out in order.

    The JSON is padded with spaces to a multiple of 8 bytes so tensor data is
    aligned, as the reference writer does.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        doc[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class StreamWriter:
    """Writes one safetensors file front to back: header first, then each tensor's bytes.

    Tensors must arrive in the order of ``entries``; each may arrive in several
    pieces (row blocks). ``close`` checks that every promised byte was written.
    ``crc`` is the CRC-32 of the file so far.
    """

    def __init__(self, f: BinaryIO, entries: list[OutEntry], metadata: dict[str, str]):
        self.f = f
        self.entries = entries
        header = encode_header(entries, metadata)
        self.total = len(header) + sum(e.nbytes for e in entries)
        f.write(header)
        self.pos = len(header)
        self.crc = zlib.crc32(header)  # of every byte written, for the resume journal
        self._index = -1
        self._left = 0
        self._crc_buf: bytearray | None = None

    def begin(self, name: str) -> None:
        """Start the next tensor, which must be ``name``."""
        if self._left:
            raise RuntimeError(
                f"tensor {self.entries[self._index].name} is {self._left} bytes short"
            )
        self._index += 1
        entry = self.entries[self._index]
        if entry.name != name:
            raise RuntimeError(f"expected tensor {entry.name}, got {name}")
        self._left = entry.nbytes

    def write(self, data: torch.Tensor | bytes | memoryview) -> None:
        """Append bytes of the current tensor."""
        if not isinstance(data, (bytes, bytearray, memoryview)):  # a torch tensor
            data = memoryview(data.contiguous().reshape(-1).view(DTYPES["U8"]).numpy())
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n > self._left:
            raise RuntimeError(f"too many bytes for tensor {self.entries[self._index].name}")
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.pos += n
        self._left -= n

    def copy_from(self, src: BinaryIO, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``src`` from ``offset`` (kernel-side copy where possible)."""
        if count > self._left:
            raise RuntimeError(f"too many bytes for tensor {self.entries[self._index].name}")
        self.f.flush()
        copy_range(src, offset, self.f, self.pos, count)
        self._crc_range(src, offset, count)
        self.pos += count
        self._left -= count
        self.f.seek(self.pos)

    def _crc_range(self, src: BinaryIO, offset: int, count: int) -> None:
        # The bytes just went through the page cache: reading them back is cheap.
        want = min(_COPY_CHUNK, max(count, 1))
        if self._crc_buf is None or len(self._crc_buf) < want:
            # Grown to the largest copy so far: a buffer sized by a first, tiny tensor
            # (a shape or scale) made every later copy crawl in tiny reads.
            self._crc_buf = bytearray(want)
        view = memoryview(self._crc_buf)
        done = 0
        while done < count:
            n = os.preadv(src.fileno(), [view[: min(len(view), count - done)]], offset + done)
            if n == 0:
                raise CorruptFileError(
                    f"{src.name}: unexpected end of file at byte {offset + done}."
                )
            self.crc = zlib.crc32(view[:n], self.crc)
            done += n

    def close(self) -> None:
        if self._left or self._index != len(self.entries) - 1:
            raise RuntimeError("output file closed before every tensor was written")
        self.f.flush()
        if self.pos != self.total:
            raise RuntimeError(f"wrote {self.pos} bytes, expected {self.total}")


_COPY_CHUNK = 64 << 20


def copy_range(src: BinaryIO, src_off: int, dst: BinaryIO, dst_off: int, count: int) -> None:
    """Copy bytes between files, inside the kernel when it allows (copy_file_range)."""
    sfd, dfd = src.fileno(), dst.fileno()
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    buf = None
    while done < count:
        n = min(_COPY_CHUNK, count - done)
        if use_kernel:
            try:
                got = os.copy_file_range(sfd, dfd, n, src_off + done, dst_off + done)
            except OSError:
                use_kernel = False
                continue
        else:
            if buf is None:
                buf = bytearray(min(_COPY_CHUNK, count))
            mv = memoryview(buf)[:n]
            got = os.preadv(sfd, [mv], src_off + done)
            written = 0
            while written < got:
                written += os.pwrite(dfd, mv[written:got], dst_off + done + written)
        if got == 0:
            raise CorruptFileError(
                f"{src.name}: unexpected end of file at byte {src_off + done}; the file was "
                "truncated or changed while being read."
            )
        done += got
