"""Adapter formats, each translated into neutral TensorEdits (see shardmerge.terms)."""
