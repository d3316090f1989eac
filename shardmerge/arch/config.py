"""config.json as a model's settings: keys that may sit in a nested text_config, set or read."""

from __future__ import annotations

# What config_value returns for a key config.json does not have.
MISSING = object()


def apply_config_update(config: dict, items) -> None:
    """Set config.json keys; a dotted key reaches into a nested object (text_config.vocab_size)."""
    for key, value in items:
        *path, last = key.split(".")
        where = config
        for part in path:
            nested = where.get(part)
            if not isinstance(nested, dict):
                break
            where = nested
        else:
            where[last] = value


def config_value(config: dict, key: str):
    """The value at a dotted key of config.json, or a sentinel object when absent."""
    where = config
    for part in key.split("."):
        if not isinstance(where, dict) or part not in where:
            return MISSING
        where = where[part]
    return where
