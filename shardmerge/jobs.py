"""The merge job schema, shared by the CLI flags and YAML job files.

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

Relative paths in a job file are relative to the file's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .codecs import QLORA_BASE_CHOICES, REFUSED_CHOICES, check_choice
from .errors import InputError

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class AdapterSpec:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class MergeJob:
    """One merge (or, with ``separate``, one merge per adapter) as the user asked for it."""

    base: str
    adapters: tuple[AdapterSpec, ...]
    output: str
    separate: bool = False
    dtype: str = "auto"
    device: str = "auto"
    max_memory: str | None = None
    workers: int | None = None
    overwrite: bool = False
    resume: bool = True
    verify: bool = False
    offline: bool | None = None  # Hub ids: None follows HF_HUB_OFFLINE
    qlora_base: str = "none"  # "nf4": the base weights as a QLoRA run saw them (quant.py)
    source: str = field(default="command line", compare=False)  # where it came from, for messages

    @property
    def weights(self) -> list[float]:
        return [a.weight for a in self.adapters]


_OPTIONAL = {
    "separate": bool,
    "dtype": str,
    "device": str,
    "max_memory": (str, int),
    "workers": int,
    "overwrite": bool,
    "resume": bool,
    "verify": bool,
    "offline": bool,
    "qlora_base": str,
}


def job_from_dict(doc: object, source: str, root: Path | None = None) -> MergeJob:
    """Validate a parsed job document; every problem names its field.

    ``root`` resolves relative local paths (a job file's folder).
    """

    def bad(field_name: str, what: str) -> InputError:
        return InputError(
            f"{source}: field '{field_name}' {what}.",
            hint="See configs/ for examples of job files.",
        )

    if not isinstance(doc, dict):
        raise InputError(
            f"{source}: a job must be a mapping of fields (base, adapters, output, ...)."
        )
    known = {f.name for f in fields(MergeJob)} - {"source"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise bad(unknown[0], f"is not a job field (known: {', '.join(sorted(known))})")
    for required in ("base", "adapters", "output"):
        if doc.get(required) in (None, "", []):
            raise bad(required, "is required")

    def path_field(name: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(name, f"must be a path or Hub id, not {value!r}")
        return _resolve(value, root)

    adapters_doc = doc["adapters"]
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
        extra = sorted(set(item) - {"path", "weight"})
        if extra:
            raise bad(f"{where}.{extra[0]}", "is not an adapter field (path, weight)")
        weight = item.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise bad(f"{where}.weight", f"must be a finite number, not {weight!r}")
        adapters.append(AdapterSpec(path_field(f"{where}.path", item.get("path")), float(weight)))

    options = {}
    for name, kind in _OPTIONAL.items():
        if name not in doc or doc[name] is None:
            continue
        value = doc[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = {bool: "true or false", int: "a whole number", str: "text"}.get(
                kind, "a size like 4GiB"
            )
            raise bad(name, f"must be {expected}, not {value!r}")
        options[name] = value
    if options.get("dtype", "auto") not in DTYPES:
        raise bad("dtype", f"must be one of {', '.join(DTYPES)}, not {options['dtype']!r}")
    if options.get("qlora_base", "none") not in QLORA_BASE_CHOICES:
        if options["qlora_base"] in REFUSED_CHOICES:
            check_choice(options["qlora_base"])  # refused with the reason
        raise bad(
            "qlora_base",
            f"must be one of {', '.join(QLORA_BASE_CHOICES)}, not {options['qlora_base']!r}",
        )
    if "workers" in options and options["workers"] < 0:
        raise bad("workers", "must be 0 or more")
    if "max_memory" in options:
        options["max_memory"] = str(options["max_memory"])
    return MergeJob(
        base=path_field("base", doc["base"]),
        adapters=tuple(adapters),
        output=path_field("output", doc["output"]),
        source=source,
        **options,
    )


def _resolve(value: str, root: Path | None) -> str:
    """Relative local paths are taken from the job file's folder; Hub ids stay as they are."""
    if root is None or Path(value).is_absolute():
        return value
    local = root / value
    return str(local) if local.exists() or value.startswith(".") or "/" not in value else value


def load_job(path: str | Path) -> MergeJob:
    """Read and validate a YAML job file.

    >>> job = load_job("configs/workstation-70b.yaml")   # doctest: +SKIP
    >>> job.max_memory                                    # doctest: +SKIP
    '24GiB'
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read job file {path}: {e}.") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(
            f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}).",
            hint="Check the indentation and quoting; see configs/ for examples.",
        ) from None
    return job_from_dict(doc, str(path), path.parent)
