"""A checkpoint's tensors under the names the loaded model gives them (transformers' rules applied).

``key_map(ckpt)`` applies the rules of arch/rules.py to every stored tensor
name as transformers' loader does (``rename_source_key``: every renaming in
turn, then at most one converter) and records, per loaded name, where its
value comes from: one stored tensor (renamed, or transposed), the per-expert
tensors a converter stacks (and concatenates) into one fused parameter, or a
conversion shardmerge cannot invert (then a reason, for a refusal by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..io.checkpoint import Checkpoint
from .rules import BASE_MODEL_PREFIX, Rule, builtin_table, rule_table, rules_for

# A per-expert tensor on disk: (module path).(expert).(part).weight.
NUMBERED_WEIGHT = re.compile(r"^(.+)\.(\d+)\.([^.]+)\.weight$")
_STACK = ("MergeModulelist",)
_STACK_CONCAT = ("MergeModulelist", "Concatenate")


@dataclass(frozen=True)
class Origin:
    """Where a loaded parameter's value is stored.

    kind: "tensor" (``disk``, as stored), "transposed" (``disk`` with its last
    two dimensions swapped; ``by_shape``: only when its shape differs from
    the parameter's, transformers' ``Transpose(check_dims=True)``), "experts"
    (the tensors ``module.N.part.weight``, stacked over N and concatenated
    over ``parts`` in this order), "parts" (the stored stacked tensors
    ``parts``, [E, rows, cols] each, concatenated along the rows) or
    "refused" (``reason`` says why).
    """

    kind: str
    disk: str = ""
    module: str = ""
    parts: tuple[str, ...] = ()
    by_shape: bool = False
    reason: str = ""


@dataclass(frozen=True)
class KeyMap:
    """A checkpoint's loaded names -> origins, and the renamings for other names."""

    origins: dict[str, Origin]
    renamings: tuple[Rule, ...]
    trivial: bool  # no rule changes any stored name

    def canonical(self, name: str) -> str:
        """``name`` (an older transformers' parameter name) renamed as the rules rename it."""
        return apply_renamings(name, self.renamings, set())

    def origin(self, name: str) -> Origin | None:
        """The origin of loaded parameter ``name``, tried with and without the base model prefix."""
        for n in _prefix_variants(name):
            if n in self.origins:
                return self.origins[n]
        return None


def _prefix_variants(name: str) -> list[str]:
    names = [name]
    head, _, rest = name.partition(".")
    if rest:
        names.append(rest)
    if head != BASE_MODEL_PREFIX:
        names.append(f"{BASE_MODEL_PREFIX}.{name}")
    return names


def _match(rule: Rule, key: str) -> tuple[str | None, str, re.Match] | None:
    """transformers' ``_scoped_match``: the prefix taken off, the rest, and the match."""
    prefix = None
    if rule.scope is not None:
        scope = f"{rule.scope}." if rule.scope else ""
        if key.startswith(f"{BASE_MODEL_PREFIX}.{scope}"):
            prefix = f"{BASE_MODEL_PREFIX}.{scope}"
        elif key.startswith(scope):
            prefix = scope
        else:
            return None
        key = key.removeprefix(prefix)
    m = re.search(rule.pattern, key)
    return None if m is None else (prefix, key, m)


def _branch(m: re.Match) -> int:
    return int(next(n for n, v in m.groupdict().items() if v is not None)[1:])


def apply_rule(rule: Rule, key: str, active: set[int]) -> tuple[str, int | None]:
    """(renamed key, index of the source pattern that matched) as transformers renames ``key``."""
    found = _match(rule, key)
    if found is None:
        return key, None
    prefix, rest, m = found
    branch = _branch(m)
    if rule.group and branch != 0 and id(rule) not in active:
        return key, None  # GroupWeightRename: the others only once the guard was seen
    start = m.re.groupindex[f"g{branch}"]
    target = rule.targets[branch if rule.group else 0]
    if rule.offset:
        target = target.replace(r"\1", str(int(m.group(start + 1)) + rule.offset))
    elif re.search(r"\\\d", target):
        target = re.sub(r"\\(\d+)", lambda g: m.group(start + int(g.group(1))) or "", target)
    renamed = rest.replace(m.group(0), target, 1)
    return (prefix or "") + renamed, branch


def apply_renamings(key: str, renamings: tuple[Rule, ...], active: set[int]) -> str:
    for rule in renamings:
        key, _ = apply_rule(rule, key, active)
    return key


def build_key_map(names: list[str], rules: list[Rule]) -> KeyMap:
    """The loaded name of every stored tensor ``names`` under ``rules``, with its origin."""
    renamings = tuple(r for r in rules if not r.converts)
    converters = [r for r in rules if r.converts]
    # GroupWeightRename applies its dependent renamings only in a checkpoint that has its guard.
    active = {id(r) for r in renamings if r.group and any(_guard(r, n) for n in names)}
    origins: dict[str, Origin] = {}
    # loaded name -> source pattern index -> (module, part) of per-expert tensors,
    # or ("", stored tensor) of stacked tensors concatenated whole
    pending: dict[str, dict[int, tuple[str, str]]] = {}
    trivial = True
    for disk in sorted(names):
        key = apply_renamings(disk, renamings, active)
        for rule in converters:
            new, branch = apply_rule(rule, key, active)
            if branch is not None:
                _converted(rule, disk, new, branch, origins, pending)
                trivial = False
                break
        else:
            trivial = trivial and key == disk
            origins.setdefault(key, Origin("tensor", disk=disk))
    for name, parts in pending.items():
        origins[name] = _pending_origin(name, parts)
    return KeyMap(origins, renamings, trivial)


def _guard(rule: Rule, name: str) -> bool:
    found = _match(rule, name)
    return found is not None and _branch(found[2]) == 0


def converter_layout(rule: Rule) -> str:
    """What a converter makes, by its operations alone: "experts" (stacks per-expert tensors,
    concatenating several parts along the rows), "parts" (concatenates stacked expert tensors
    along each expert's rows), "transposed" (swaps a fused tensor's last two dimensions) or
    "refused" (anything else: splits, interleaving, permutations...)."""
    ops = tuple(name for name, _ in rule.ops)
    args = [dict(a) for _, a in rule.ops]
    if len(rule.targets) != 1:
        return "refused"
    if ops == _STACK or (ops == _STACK_CONCAT and args[1].get("dim") == 1):
        return "experts" if args[0].get("dim") == 0 else "refused"
    if ops == ("Transpose",) and {args[0].get("dim0"), args[0].get("dim1")} == {1, 2}:
        return "transposed"
    if ops == ("Concatenate",) and args[0].get("dim") == 1:
        return "parts"  # stacked [E, rows, cols] tensors concatenated along each expert's rows
    return "refused"


def _converted(
    rule: Rule,
    disk: str,
    new: str,
    branch: int,
    origins: dict[str, Origin],
    pending: dict[str, dict[int, tuple[str, str]]],
) -> None:
    """Record what converter ``rule`` makes of stored tensor ``disk`` (loaded name ``new``)."""
    layout = converter_layout(rule)
    m = NUMBERED_WEIGHT.match(disk)
    if layout == "experts" and m:
        pending.setdefault(new, {})[branch] = (m[1], m[3])
        return
    if layout == "parts":
        pending.setdefault(new, {})[branch] = ("", disk)
        return
    if layout == "transposed":
        check = bool(dict(rule.ops[0][1]).get("check_dims"))
        origins[new] = Origin("transposed", disk=disk, by_shape=check)
        return
    origins[new] = _refused(disk, new, rule)
    # A one-to-many converter names its other outputs by the other targets.
    for target in rule.targets[1:]:
        other = new.replace(rule.targets[0], target, 1)
        origins.setdefault(other, _refused(disk, other, rule))


def _refused(disk: str, new: str, rule: Rule) -> Origin:
    ops = ", ".join(f"{n}({', '.join(f'{k}={v}' for k, v in a)})" for n, a in rule.ops)
    return Origin(
        "refused",
        disk=disk,
        reason=f"transformers builds {new} from the stored {disk} with {ops} at load, "
        "which shardmerge cannot fold a LoRA delta back through",
    )


def _pending_origin(name: str, parts: dict[int, tuple[str, str]]) -> Origin:
    """The origin of a parameter a converter builds from several stored tensors."""
    modules = {module for module, _ in parts.values()}
    order = [parts[i][1] for i in sorted(parts)]
    if modules == {""}:
        if sorted(parts) != list(range(len(parts))) or len(parts) < 2:
            return Origin("refused", reason=f"the base lacks a stored part of {name}")
        return Origin("parts", parts=tuple(order))
    if len(modules) != 1 or len(set(order)) != len(order):
        return Origin(
            "refused", reason=f"the stored per-expert tensors of {name} do not form one stack"
        )
    return Origin("experts", module=modules.pop(), parts=tuple(order))


_CACHE: dict[tuple[int, bool], tuple[Checkpoint, KeyMap]] = {}


def key_map(ckpt: Checkpoint, *, builtin: bool = False) -> KeyMap:
    """The checkpoint's key map under the rules of its config.json (cached per checkpoint).

    ``builtin``: under the snapshot's rules (never imports transformers);
    otherwise under transformers' own when it is installed.
    """
    hit = _CACHE.get((id(ckpt), builtin))
    if hit is not None and hit[0] is ckpt:
        return hit[1]
    table = builtin_table() if builtin else rule_table()
    names = list(ckpt.weight_map)
    km = build_key_map(names, rules_for(ckpt.config, table, names))
    if len(_CACHE) >= 8:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[(id(ckpt), builtin)] = (ckpt, km)
    return km


def renamed(ckpt: Checkpoint) -> bool:
    """Whether transformers renames or converts any of the checkpoint's tensors at load.

    Decided on the built-in snapshot, so a checkpoint it leaves alone (most
    dense models) never imports transformers.
    """
    return not key_map(ckpt, builtin=True).trivial
