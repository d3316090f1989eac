"""YAML job files: read one, check every field against the option table, build MergeOptions.

A job file looks like this (every key but base, adapters and output is optional)::

    base: /models/Llama-3.1-70B          # a folder, or a Hub id org/name[@revision]
    adapters:
      - path: ./lora-support              # or just "./lora-support" (weight 1)
        weight: 0.7
      - ./lora-tone
    output: /models/merged
    separate: false                       # true: one merged model per adapter under output/
    dtype: auto                           # auto | float32 | float16 | bfloat16
    device: auto                          # auto | cpu | cuda | cuda:N
    max_memory: 24GiB
    workers: 1
    overwrite: false
    resume: true
    verify: false
    offline: false                        # true: Hub ids only from the local cache
    qlora_base: none                      # none | nf4 (merge into the NF4 weights QLoRA saw)
    allow_nonfinite: false                # true: merge NaN/Inf instead of refusing them
    executor: local                       # local | ray (shard jobs as tasks on a Ray cluster)
    ray_address: auto                     # with executor ray: host:port, ray://host:port or auto
    quantize: none                        # none | fp8-block (compressed-tensors FP8 output)
    requant_scales: kept                  # kept | fresh (scales of requantized FP8 blocks)

Relative paths in a job file are relative to the file's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import InputError, shown
from .io.jsonfile import read_regular_file
from .options import (
    CHECKED_FIELDS,
    COMMAND_LINE,
    JOB_OPTIONS,
    OPTIONS,
    AdapterSpec,
    MergeOptions,
    weight_problem,
)

# A job is the merge options it asks for: one class for flags, job files and the API.
MergeJob = MergeOptions

REQUIRED_FIELDS = ("base", "adapters", "output")
JOB_FIELDS = frozenset(REQUIRED_FIELDS) | {o.name for o in JOB_OPTIONS}
# A job file is a screenful of YAML; anything this large is not one.
MAX_JOB_BYTES = 1_000_000
_LARGEST_WEIGHT = 2**1000
_EXPECTED = {bool: "true or false", int: "a whole number", str: "text"}

FieldError = Callable[[str, str], InputError]


def _field_error(source: str) -> FieldError:
    def bad(field_name: str, what: str) -> InputError:
        option = OPTIONS.get(field_name)
        if source == COMMAND_LINE and option is not None and option.flag:
            # A flag, not a job file: name the flag, and no job-file advice.
            return InputError(f"{option.flag[0]} {what}.")
        return InputError(
            f"{source}: field '{field_name}' {what}.",
            hint="See configs/ for examples of job files.",
        )

    return bad


def job_from_dict(doc: object, source: str, root: Path | None = None) -> MergeOptions:
    """Validate a parsed job document; every problem names its field.

    ``root`` resolves relative local paths (a job file's folder).
    """
    bad = _field_error(source)
    if not isinstance(doc, dict):
        raise InputError(
            f"{source}: a job must be a mapping of fields (base, adapters, output, ...)."
        )
    unknown = sorted(set(doc) - JOB_FIELDS, key=str)
    if unknown:
        raise bad(unknown[0], f"is not a job field (known: {', '.join(sorted(JOB_FIELDS))})")
    for required in REQUIRED_FIELDS:
        if doc.get(required) in (None, "", []):
            raise bad(required, "is required")

    def path_field(name: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(name, f"must be a path or Hub id, not {shown(value)}")
        return _resolve(value, root)

    adapters = _adapters(doc["adapters"], path_field, bad)
    return MergeOptions(
        base=path_field("base", doc["base"]),
        adapters=adapters,
        output=path_field("output", doc["output"]),
        source=source,
        **_options(doc, bad),
    )


def _adapters(
    adapters_doc: object, path_field: Callable[[str, object], str], bad: FieldError
) -> tuple[AdapterSpec, ...]:
    """The ``adapters`` field: paths, or {path, weight} mappings."""
    if isinstance(adapters_doc, (str, dict)):
        adapters_doc = [adapters_doc]
    if not isinstance(adapters_doc, list):
        raise bad("adapters", "must be a list of adapter paths or {path, weight} mappings")
    adapters = []
    for i, item in enumerate(adapters_doc):
        where = f"adapters[{i}]"
        if isinstance(item, str):
            adapters.append(AdapterSpec(path_field(where, item)))
            continue
        if not isinstance(item, dict):
            raise bad(where, "must be a path or a mapping with 'path' and 'weight'")
        extra = sorted(set(item) - {"path", "weight"}, key=str)
        if extra:
            raise bad(f"{where}.{extra[0]}", "is not an adapter field (path, weight)")
        weight = item.get("weight", 1.0)
        # An integer beyond float range would overflow inside the check itself.
        too_big = isinstance(weight, int) and abs(weight) > _LARGEST_WEIGHT
        problem = (
            f"must be a finite number, not {shown(weight)}" if too_big else weight_problem(weight)
        )
        if problem:
            raise bad(f"{where}.weight", problem)
        adapters.append(AdapterSpec(path_field(f"{where}.path", item.get("path")), float(weight)))
    return tuple(adapters)


def _options(doc: dict, bad: FieldError) -> dict[str, object]:
    """The optional fields given (not null), type-checked, then value-checked."""
    options = {}
    for option in JOB_OPTIONS:
        value = doc.get(option.name)
        if value is None:
            continue
        kind = option.kind
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = _EXPECTED.get(kind, "a size like 4GiB")
            raise bad(option.name, f"must be {expected}, not {shown(value)}")
        options[option.name] = value
    for name in CHECKED_FIELDS:
        problem = OPTIONS[name].check(options[name]) if name in options else None
        if problem:
            raise bad(name, problem)
    if "max_memory" in options:
        options["max_memory"] = str(options["max_memory"])
    return options


def _resolve(value: str, root: Path | None) -> str:
    """Relative local paths are taken from the job file's folder; Hub ids stay as they are."""
    if root is None or Path(value).is_absolute():
        return value
    local = root / value
    return str(local) if local.exists() or value.startswith(".") or "/" not in value else value


def load_job(path: str | Path) -> MergeOptions:
    """Read and validate a YAML job file.

    >>> job = load_job("configs/workstation-70b.yaml")   # doctest: +SKIP
    >>> job.max_memory                                    # doctest: +SKIP
    '24GiB'
    """
    import yaml

    path = Path(path)

    def unusable(problem: str) -> InputError:
        return InputError(f"cannot read job file {path}: {problem}.")

    try:
        text = read_regular_file(path, unusable, MAX_JOB_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise unusable(str(e)) from None
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise unusable("it nests too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(
            f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}).",
            hint="Check the indentation and quoting; see configs/ for examples.",
        ) from None
    return job_from_dict(doc, str(path), path.parent)
