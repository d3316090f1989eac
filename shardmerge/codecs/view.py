"""A stored base as the merge sees it: decoded tensors, side tensors gone."""

from __future__ import annotations

from dataclasses import replace

from ..io.checkpoint import Checkpoint
from ..io.safetensors import TensorInfo
from .protocol import StoredBase


def decoded_view(ckpt: Checkpoint, stored: StoredBase) -> Checkpoint:
    """``ckpt`` with each coded tensor of its decoded name, shape and dtype (still at its
    stored bytes), and the side tensors (scales, code tables) gone."""
    headers = {}
    for shard, header in ckpt.headers.items():
        tensors = {}
        for name, t in header.tensors.items():
            if name in stored.aux:
                continue
            name = stored.names.get(name, name)
            spec = stored.specs.get(name)
            if spec is not None:
                t = TensorInfo(name, spec.dtype, stored.shapes[name], t.start, t.end)
            tensors[name] = t
        if tensors:  # a shard of side tensors only is dropped
            headers[shard] = replace(header, tensors=tensors)
    weight_map = {
        stored.names.get(n, n): s for n, s in ckpt.weight_map.items() if n not in stored.aux
    }
    shards = tuple(s for s in ckpt.shards if s in headers)
    return replace(ckpt, headers=headers, weight_map=weight_map, shards=shards)
