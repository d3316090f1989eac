"""A Hugging Face model folder: its config, shards, weight map and the other files to carry over."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InputError, shown
from .jsonfile import read_json
from .safetensors import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Weights in other formats are stale once merged: never copied to the output.
_OTHER_WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".safetensors",
)
_OTHER_WEIGHT_NAMES = (
    "pytorch_model.bin.index.json",
    "tf_model.h5.index.json",
    "flax_model.msgpack.index.json",
)


@dataclass(frozen=True)
class Checkpoint:
    """What the planner needs to know about a base model folder; no weight bytes."""

    path: Path
    config: dict
    shards: tuple[str, ...]  # relative file names, in index order
    headers: dict[str, Header]  # shard name -> header
    weight_map: dict[str, str]  # tensor name -> shard name
    index: dict | None  # the parsed index, None for a single-file model
    extra_files: tuple[str, ...]  # relative names of non-weight files to copy

    def tensor(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]].tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(h.size for h in self.headers.values())


def not_a_regular_file(path: Path, what: str) -> InputError:
    """The error for a folder or FIFO found where a weights file belongs (never opened)."""
    return InputError(
        f"{path}: {what} is not a regular file.",
        hint="Replace it with the real file (re-download or re-export it).",
    )


def safe_relative(folder: Path, name: object, source: Path) -> str:
    """Check that ``name`` (from ``source``) names a file inside ``folder``; return it normalized."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise InputError(f"{source}: invalid file name {shown(name)}.")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise InputError(
            f"{source} names {name!r}, which is outside the model folder {folder}; "
            "refusing to read it.",
            hint="An index may only name files inside its own folder.",
        )
    return str(pure)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a base model folder's config, index and every shard header.

    >>> ckpt = open_checkpoint("Llama-3-8B")   # doctest: +SKIP
    >>> ckpt.shards                             # doctest: +SKIP
    ('model-00001-of-00004.safetensors', ...)
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"base model folder {folder} does not exist or is not a folder.",
            hint="Give the folder that holds config.json and the .safetensors files.",
        )
    config = read_json(
        folder / CONFIG_NAME,
        "the model config (config.json)",
        hint="Give a Hugging Face model folder as written by save_pretrained(), with its "
        "config.json.",
    )
    index, weight_map, shards = _shard_list(folder)
    headers = _shard_headers(folder, shards, index is not None)
    return Checkpoint(
        path=folder,
        config=config,
        shards=tuple(sorted(shards)),
        headers=headers,
        weight_map=_tensor_map(folder, headers, weight_map),
        index=index,
        extra_files=tuple(_extra_files(folder, set(shards))),
    )


def _shard_list(folder: Path) -> tuple[dict | None, dict[str, str], list[str]]:
    """(index or None, the index's weight_map, shard names in first-use order)."""
    index_path = folder / INDEX_NAME
    if index_path.exists():
        index = read_json(
            index_path, "the shard index", hint="Re-download the model or re-export it."
        )
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(
                f"{index_path}: 'weight_map' is missing or empty.",
                hint="Re-download the model or re-export it.",
            )
        if not isinstance(index.get("metadata", {}), (dict, type(None))):
            raise InputError(
                f"{index_path}: 'metadata' must be a JSON object, not {shown(index['metadata'])}.",
                hint="Re-download the model or re-export it.",
            )
        shards: list[str] = []
        for tensor_name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(
                    f"{index_path}: weight_map[{shown(tensor_name)}] must be a shard file name, "
                    f"not {shown(shard)}.",
                    hint="Re-download the model or re-export it.",
                )
            shard = safe_relative(folder, shard, index_path)
            weight_map[tensor_name] = shard
            if shard not in shards:
                shards.append(shard)
        return index, weight_map, shards
    if (folder / SINGLE_NAME).exists():
        return None, {}, [SINGLE_NAME]
    legacy = [p.name for p in folder.glob("pytorch_model*.bin")]
    hint = (
        "This folder has only PyTorch .bin weights; convert them to safetensors first "
        "(load with transformers and save_pretrained(..., safe_serialization=True))."
        if legacy
        else "Give a folder with model.safetensors or model.safetensors.index.json and its shards."
    )
    raise InputError(f"{folder}: no safetensors weights found.", hint=hint)


def _shard_headers(folder: Path, shards: list[str], indexed: bool) -> dict[str, Header]:
    """Every shard's header, each file checked to be a regular file that exists."""
    headers: dict[str, Header] = {}
    for shard in shards:
        file = folder / shard
        try:
            exists, regular = file.exists(), file.is_file()
        except OSError as e:  # a name too long for the filesystem, say
            raise InputError(
                f"{folder / INDEX_NAME}: names shard {shown(shard)}, which cannot be opened "
                f"({e.strerror or e}).",
                hint="Re-download the model or re-export it.",
            ) from None
        if exists and not regular:
            raise not_a_regular_file(file, f"shard {shard}")
        if not regular:
            where = f"named in {folder / INDEX_NAME}" if indexed else "expected"
            raise InputError(
                f"shard {shard} ({where}) is missing from {folder}.",
                hint="Re-download the missing file(s).",
            )
        headers[shard] = read_header(file)
    return headers


def _tensor_map(
    folder: Path, headers: dict[str, Header], weight_map: dict[str, str]
) -> dict[str, str]:
    """Tensor name -> shard, from the headers; the index must agree with it."""
    full_map: dict[str, str] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            if name in full_map:
                raise InputError(
                    f"{folder}: tensor {name!r} appears in both {full_map[name]} and {shard}.",
                    hint="The shards do not belong together; re-download the model.",
                )
            full_map[name] = shard
    for name, shard in weight_map.items():
        if full_map.get(name) != shard:
            raise InputError(
                f"{folder / INDEX_NAME}: tensor {name!r} is mapped to {shard} but that file does not hold it.",
                hint="The index and the shards disagree; re-download the model.",
            )
    return full_map


def _extra_files(folder: Path, shards: set[str]) -> list[str]:
    """Top-level files to copy as they are: tokenizer, generation config, model card..."""
    names = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") or not entry.is_file() or name in shards:
            continue
        if name in (INDEX_NAME, CONFIG_NAME) or name in _OTHER_WEIGHT_NAMES:
            continue
        if name.endswith(_OTHER_WEIGHT_SUFFIXES):
            continue
        names.append(name)
    return names
