"""transformers' checkpoint conversion rules: how it renames and fuses a checkpoint's keys at load.

transformers v5 loads a checkpoint through per-model rules
(transformers/conversion_mapping.py): renamings (NemotronH's ``backbone.`` ->
``model.``, Llava's ``language_model.model.`` -> ``model.language_model.``,
Mixtral's ``block_sparse_moe`` -> ``mlp``) and converters that build a
parameter from several tensors (per-expert ``experts.N.w1``/``w3`` stacked and
concatenated into ``experts.gate_up_proj``). A PEFT adapter names the loaded
model's modules, so matching it to a checkpoint means applying those rules.

The rules are read from transformers when it is importable (lazily: only a
plan that needs them imports it) and otherwise from ``conversion_rules.json``,
a snapshot of transformers 5.23's rules in the same neutral form
(``scripts/conversion_rules.py`` writes it; tests/test_moe_rules.py fails when
the installed transformers' rules differ from it). Either way the rules that
apply to one checkpoint are collected here as transformers collects them for
the model it builds (``get_model_conversion_mapping``), from config.json alone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("conversion_rules.json")
# The prefix transformers' task models keep their base model under.
BASE_MODEL_PREFIX = "model"
# Class-name suffixes of task models whose base model sits at ``model``.
_TASK_SUFFIXES = ("ForConditionalGeneration", "ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class Rule:
    """One transformers WeightTransform in neutral form.

    ``pattern`` is the transform's compiled source regex (named branches
    ``g0``, ``g1``... one per source pattern); ``targets`` its processed
    target patterns; ``ops`` the converter's operations as (name, args), empty
    for a renaming; ``group``/``offset`` mark GroupWeightRename and
    index-shifting renamings. ``scope`` is set when the rule applies only
    under a sub-model's prefix (as transformers scopes sub-model rules).
    """

    pattern: str
    targets: tuple[str, ...]
    ops: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    group: bool = False
    offset: int = 0
    scope: str | None = None

    @property
    def converts(self) -> bool:
        return bool(self.ops)

    def as_json(self) -> dict:
        d: dict = {"pattern": self.pattern, "targets": list(self.targets)}
        if self.ops:
            d["ops"] = [[name, dict(args)] for name, args in self.ops]
        if self.group:
            d["group"] = True
        if self.offset:
            d["offset"] = self.offset
        return d

    @classmethod
    def from_json(cls, d: dict) -> Rule:
        ops = tuple((str(n), tuple(sorted(a.items()))) for n, a in d.get("ops", []))
        return cls(
            str(d["pattern"]),
            tuple(map(str, d["targets"])),
            ops,
            bool(d.get("group", False)),
            int(d.get("offset", 0)),
        )


# Operation arguments kept in the neutral form (the ones that decide a layout).
_OP_ARGS = ("dim", "dim0", "dim1", "check_dims")


def _op_args(op) -> tuple[tuple[str, object], ...]:
    return tuple(
        sorted(
            (k, getattr(op, k)) for k in _OP_ARGS if isinstance(getattr(op, k, None), (int, bool))
        )
    )


def translate(transform) -> Rule:
    """A transformers WeightTransform as a Rule (no scope)."""
    ops = tuple((type(op).__name__, _op_args(op)) for op in getattr(transform, "operations", ()))
    kind = type(transform).__name__
    return Rule(
        transform.compiled_sources.pattern,
        tuple(transform.target_patterns),
        ops,
        group=kind == "GroupWeightRename",
        offset=int(getattr(transform, "offset", 0) or 0),
    )


def live_table() -> dict[str, tuple[Rule, ...]] | None:
    """Every identifier's rules as the installed transformers has them; None without transformers."""
    try:
        from transformers import conversion_mapping

        # The identifiers get_checkpoint_conversion_mapping knows (no public list exists).
        names = sorted(conversion_mapping._build_checkpoint_conversion_mapping())
        return {
            name: tuple(
                translate(t)
                for t in conversion_mapping.get_checkpoint_conversion_mapping(name) or []
            )
            for name in names
        }
    except (ImportError, AttributeError, TypeError):
        # No transformers, or one whose rules are not v5's as read here: the snapshot.
        return None


def table_as_json(table: dict[str, tuple[Rule, ...]]) -> str:
    """The table as conversion_rules.json stores it: one identifier a line, repeats as aliases."""
    lines, seen = [], {}
    for name in sorted(table):
        rules = [r.as_json() for r in table[name]]
        key = json.dumps(rules, sort_keys=True)
        value = {"same_as": seen[key]} if key in seen and rules else rules
        seen.setdefault(key, name)
        lines.append(f"{json.dumps(name)}: {json.dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@functools.lru_cache(maxsize=1)
def builtin_table() -> dict[str, tuple[Rule, ...]]:
    """The snapshot shipped with shardmerge (conversion_rules.json)."""
    from ..errors import CorruptFileError
    from ..io.jsonfile import parse_json

    def damaged(what: str) -> CorruptFileError:
        return CorruptFileError(f"{TABLE}: {what}.", hint="Reinstall shardmerge.")

    raw = parse_json(TABLE.read_bytes(), damaged)
    table: dict[str, tuple[Rule, ...]] = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            value = raw[value["same_as"]]
        table[name] = tuple(Rule.from_json(d) for d in value)
    return table


@functools.lru_cache(maxsize=1)
def rule_table() -> dict[str, tuple[Rule, ...]]:
    """The rules by identifier (class name or model_type): transformers', else the snapshot."""
    live = live_table()
    return live if live is not None else builtin_table()


def _scoped(rules: tuple[Rule, ...], scope: str) -> list[Rule]:
    return [Rule(r.pattern, r.targets, r.ops, r.group, r.offset, scope) for r in rules]


def rules_for(
    config: dict, table: dict[str, tuple[Rule, ...]] | None = None, names: list[str] = ()
) -> list[Rule]:
    """The rules transformers applies when it loads a checkpoint of this config.json.

    As ``get_model_conversion_mapping`` collects them over the model's
    sub-models, with the sub-models read from config.json: the task model
    (its class name, else its model_type), the base model under ``model``
    (by class name), the language model under ``model.language_model`` and
    the vision model under ``model.vision_tower``, ``model.vision_model`` or
    ``model.visual``, whichever the tensor ``names`` use (each by its
    config's class, else model_type), and transformers' "legacy" renamings
    last.
    """
    table = rule_table() if table is None else table
    model_type = config.get("model_type")
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    text = config.get("text_config")
    rules: list[Rule] = []
    if arch and arch in table:
        rules += table[arch]
    elif isinstance(model_type, str) and model_type in table:
        rules += table[model_type]
    if arch and arch.endswith(_TASK_SUFFIXES):
        # A multimodal task model holds XModel; a text-only one XModel or XTextModel, and
        # only the latter can be told apart by name (Gemma3ForCausalLM's is Gemma3TextModel).
        stem = arch[: -len(next(s for s in _TASK_SUFFIXES if arch.endswith(s)))]
        inner = f"{stem}Model" if isinstance(text, dict) else f"{stem}TextModel"
        rules += _scoped(table.get(inner, ()), "")
    text_type = text.get("model_type") if isinstance(text, dict) else None
    if text_type != model_type:
        rules += _scoped(_sub_model_rules(text, table), "language_model")
    vision = _sub_model_rules(config.get("vision_config"), table)
    rules += _scoped(vision, _vision_scope(names))
    return rules + list(table.get("legacy", ()))


# Where VLMs keep their vision model (under ``model.`` once loaded).
_VISION_SCOPES = ("vision_tower", "vision_model", "visual")


def _sub_model_rules(sub: object, table: dict[str, tuple[Rule, ...]]) -> tuple[Rule, ...]:
    """The rules of the model transformers builds for a sub-config: by its class, found by
    name (``clip_vision_model`` is CLIPVisionModel, ``molmo2_text`` Molmo2TextModel), else
    by its model_type."""
    kind = sub.get("model_type") if isinstance(sub, dict) else None
    if not isinstance(kind, str):
        return ()
    wanted = {kind.replace("_", "").lower(), kind.replace("_", "").lower() + "model"}
    by_class = next((name for name in table if name.lower() in wanted), None)
    return table[by_class] if by_class else table.get(kind, ())


def _vision_scope(names: list[str]) -> str:
    for scope in _VISION_SCOPES:
        if any(n.startswith((f"{scope}.", f"{BASE_MODEL_PREFIX}.{scope}.")) for n in names):
            return scope
    return _VISION_SCOPES[0]
