"""Every merge option once: its name, type, default, help, choices and checks.

The three faces of shardmerge build one ``MergeOptions`` from here: the click
commands (cli.py generates their flags from ``OPTIONS``), YAML job files
(jobs.py) and the Python API (api.py). Importing this module loads no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .errors import InputError, count

# Output dtype choices and the safetensors dtype each one writes (None: keep each tensor's).
DTYPE_CHOICES = {"auto": None, "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DTYPES = tuple(DTYPE_CHOICES)
# The torch_dtype name config.json gets for a safetensors dtype.
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

QLORA_BASE_CHOICES = ("none", "nf4")
# Where shard jobs run: worker processes here, or tasks on a Ray cluster (execute/ray_executor.py).
EXECUTOR_CHOICES = ("local", "ray")
# --quantize: none keeps each tensor's format; fp8-block writes compressed-tensors FP8,
# 128x128 weight blocks (llm-compressor's FP8_BLOCK), from a 16-bit base.
QUANTIZE_CHOICES = ("none", "fp8-block")
# --requant-scales: the scales of requantized FP8 blocks: the base's kept (a block that
# would exceed 448 gets a fresh one) or every touched block's fresh (amax / 448).
REQUANT_SCALES_CHOICES = ("kept", "fresh")
# Asked for often; refused with the reason (see the README).
REFUSED_CHOICES = {
    "nf4-dq": "double quantization stores each block's absmax as 8 bits around a float32 mean "
    "of all absmax values of the tensor; that mean's last bits depend on the GPU's reduction "
    "order, and bitsandbytes' CPU and CUDA kernels quantize the absmax differently, so the "
    "values the adapter saw cannot be reproduced reliably. Merge into the 4-bit folder saved "
    "from the training run instead (exact), or use --qlora-base nf4 (no double quantization)",
    "fp4": "bitsandbytes' CPU and CUDA kernels use different FP4 code values, so there is no "
    "single reference to follow; only NF4 is supported",
}

# MergeOptions.source of options given as flags (jobs.py words their problems as flags).
COMMAND_LINE = "command line"
OFFLINE_HELP = "Hub ids only from the local cache (as HF_HUB_OFFLINE=1)."
WEIGHTS_HELP = "One weight per adapter, comma-separated (default 1 each)."
MAX_MEMORY_HELP = "Memory budget, e.g. 4GiB (default: half the available RAM)."
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
ALLOW_NONFINITE_HELP = (
    "Merge adapters holding NaN/Inf, and write NaN/Inf the merge makes (an overflow of the "
    "output dtype), instead of refusing them."
)
QLORA_BASE_HELP = (
    "For an adapter trained with QLoRA: nf4 merges into the weights as training saw them "
    "(the quantized Linear weights NF4-quantized and dequantized); none into the 16-bit weights. "
    "A bitsandbytes 4-bit BASE folder is always dequantized."
)


def check_qlora_choice(choice: str) -> None:
    """Refuse an unknown or unsupported ``--qlora-base`` value, with the reason."""
    if choice in QLORA_BASE_CHOICES:
        return
    if choice in REFUSED_CHOICES:
        raise InputError(
            f"--qlora-base {choice} is not supported: {REFUSED_CHOICES[choice]}.",
            hint=f"Choose one of: {', '.join(QLORA_BASE_CHOICES)}.",
        )
    raise InputError(
        f"unknown --qlora-base {choice!r}; choose one of: {', '.join(QLORA_BASE_CHOICES)}."
    )


def _dtype_problem(value: str) -> str | None:
    return None if value in DTYPES else f"must be one of {', '.join(DTYPES)}, not {value!r}"


def _qlora_problem(value: str) -> str | None:
    if value in QLORA_BASE_CHOICES:
        return None
    if value in REFUSED_CHOICES:
        check_qlora_choice(value)  # refused with the reason
    return f"must be one of {', '.join(QLORA_BASE_CHOICES)}, not {value!r}"


def _choice_problem(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def problem(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"

    return problem


def _workers_problem(value: int) -> str | None:
    if value < 0:
        return f"must be 0 or more (0 merges in this process, N runs N shards at once), not {value}"
    return None


def _executor_problem(value: str) -> str | None:
    if value in EXECUTOR_CHOICES:
        return None
    return f"must be one of {', '.join(EXECUTOR_CHOICES)}, not {value!r}"


def _address_problem(value: str) -> str | None:
    return None if value.strip() else "must be auto, host:port or ray://host:port, not empty"


@dataclass(frozen=True)
class Option:
    """One merge option as a job-file field and as a command-line flag.

    ``kind`` is the job-file value type; ``check`` returns what is wrong with a
    value of that type (or raises a refusal that needs its own reason). ``flag``
    holds click's declarations; ``click`` the settings every command shares and
    ``per_command`` those that differ in one command (help, default, ...).
    """

    name: str
    kind: type | tuple[type, ...] | None = None  # None: not a job-file field
    default: object = None
    flag: tuple[str, ...] = ()
    click: Mapping[str, object] = field(default_factory=dict)
    per_command: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    check: Callable[[object], str | None] | None = None

    def click_settings(self, command: str) -> dict[str, object]:
        """click.option keyword arguments of this flag in ``command``."""
        return {**self.click, **self.per_command.get(command, {})}


def _table(*options: Option) -> Mapping[str, Option]:
    return MappingProxyType({o.name: o for o in options})


# In job-file type-check order; cli.COMMAND_FLAGS orders them per command.
OPTIONS: Mapping[str, Option] = _table(
    Option(
        "separate",
        bool,
        False,
        ("--separate",),
        {
            "is_flag": True,
            "help": "One merged model per adapter, in OUT/<adapter folder name>, reading the base once.",
        },
    ),
    Option(
        "dtype",
        str,
        "auto",
        ("--dtype",),
        {"choices": DTYPES, "default": "auto"},
        {
            "merge": {
                "show_default": True,
                "help": "Dtype of floating-point tensors in the output; auto keeps each tensor's.",
            },
            "verify": {
                "default": None,
                "help": "The merge's --dtype (default: as recorded in the output).",
            },
        },
        _dtype_problem,
    ),
    Option(
        "device",
        str,
        "auto",
        ("--device",),
        {"default": "auto", "show_default": True, "help": DEVICE_HELP},
    ),
    Option(
        "max_memory",
        (str, int),
        None,
        ("--max-memory",),
        {"help": MAX_MEMORY_HELP},
        {"verify": {"help": "Memory budget, e.g. 4GiB."}},
    ),
    Option(
        "workers",
        int,
        None,
        ("--workers",),
        {"type": int, "default": None, "help": "As for merge."},
        {
            "merge": {
                "help": "Shards merged at once, each in a worker process (capped by the budget); "
                "0 = in-process."
            }
        },
        _workers_problem,
    ),
    Option(
        "overwrite",
        bool,
        False,
        ("--overwrite",),
        {"is_flag": True, "help": "Replace a model already in the output folder."},
        {"plan": {"help": "As for merge: plan as if replacing OUT."}},
    ),
    Option(
        "resume",
        bool,
        True,
        ("--no-resume",),
        {"is_flag": True, "help": "Start over even if an earlier run of this job left work."},
    ),
    Option(
        "verify",
        bool,
        False,
        ("--verify", "then_verify"),
        {"is_flag": True, "help": "Verify the output after merging."},
    ),
    Option(
        "executor",
        str,
        "local",
        ("--executor",),
        {
            "choices": EXECUTOR_CHOICES,
            "default": "local",
            "show_default": True,
            "help": "Where shard jobs run: local worker processes, or tasks on a Ray cluster "
            "(inputs and OUT on a filesystem every node sees; pip install 'shardmerge[ray]').",
        },
        check=_executor_problem,
    ),
    Option(
        "ray_address",
        str,
        "auto",
        ("--ray-address",),
        {
            "default": "auto",
            "show_default": True,
            "help": "With --executor ray: the cluster's head, host:port or ray://host:port; auto "
            "is the cluster this process is attached to (RAY_ADDRESS, or one started on this "
            "machine), else a new local one.",
        },
        check=_address_problem,
    ),
    Option("offline", bool, None, ("--offline",), {"is_flag": True, "help": OFFLINE_HELP}),
    Option(
        "qlora_base",
        str,
        "none",
        ("--qlora-base",),
        {"default": "none", "metavar": "[none|nf4]", "help": "As for merge."},
        {"merge": {"show_default": True, "help": QLORA_BASE_HELP}},
        _qlora_problem,
    ),
    Option(
        "quantize",
        str,
        "none",
        ("--quantize",),
        {"choices": QUANTIZE_CHOICES, "default": "none", "help": "As for merge."},
        {
            "merge": {
                "show_default": True,
                "help": "fp8-block: write the merged model as compressed-tensors FP8 with "
                "128x128 weight blocks (the decoder layers' Linear weights), vLLM-ready.",
            },
            "verify": {"default": None, "help": "The merge's --quantize (default: as recorded)."},
        },
        _choice_problem(QUANTIZE_CHOICES),
    ),
    Option(
        "requant_scales",
        str,
        "kept",
        ("--requant-scales",),
        {"choices": REQUANT_SCALES_CHOICES, "default": "kept", "help": "As for merge."},
        {
            "merge": {
                "show_default": True,
                "help": "Scales of requantized FP8 blocks: kept from the base (a block that would "
                "exceed 448 gets a fresh one) or fresh (amax / 448 for every touched block).",
            },
            "verify": {
                "default": None,
                "help": "The merge's --requant-scales (default: as recorded).",
            },
        },
        _choice_problem(REQUANT_SCALES_CHOICES),
    ),
    Option(
        "allow_nonfinite",
        bool,
        False,
        ("--allow-nonfinite",),
        {"is_flag": True, "help": "As for merge."},
        {"merge": {"help": ALLOW_NONFINITE_HELP}},
    ),
    # Flags only: the job file names the output and gives weights per adapter.
    Option(
        "out",
        flag=("-o", "--out"),
        click={"help": "Output folder, to check it and the free disk there."},
        per_command={"merge": {"required": True, "path": True, "help": "Output model folder."}},
    ),
    Option(
        "weights",
        flag=("--weights",),
        click={"help": WEIGHTS_HELP},
        per_command={"verify": {"help": "Adapter weights (default: as recorded in the output)."}},
    ),
)
JOB_OPTIONS = tuple(o for o in OPTIONS.values() if o.kind is not None)
# Job-file value checks run after every type check, in this order (that of their messages).
CHECKED_FIELDS = (
    "dtype",
    "qlora_base",
    "quantize",
    "requant_scales",
    "workers",
    "executor",
    "ray_address",
)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a merge: a folder or Hub id, and the weight of its update."""

    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class MergeOptions:
    """One merge (or, with ``separate``, one merge per adapter) as the user asked for it.

    Built alike from command-line flags, a YAML job file and the Python API;
    ``resolved()`` turns Hub ids into local folders.
    """

    base: str
    adapters: tuple[AdapterSpec, ...]
    output: str
    separate: bool = False
    dtype: str = "auto"
    device: str = "auto"
    max_memory: str | int | None = None
    workers: int | None = None
    overwrite: bool = False
    resume: bool = True
    verify: bool = False
    offline: bool | None = None  # Hub ids: None follows HF_HUB_OFFLINE
    qlora_base: str = "none"  # "nf4": the base weights as a QLoRA run saw them (quant.py)
    quantize: str = "none"  # "fp8-block": compressed-tensors FP8 output
    requant_scales: str = "kept"  # FP8 outputs: the base's scales kept, or fresh ones
    allow_nonfinite: bool = False  # NaN/Inf in adapters or made by the merge: write, not refuse
    executor: str = "local"  # "ray": shard jobs as tasks on a Ray cluster
    ray_address: str = "auto"  # the Ray cluster (executor "ray" only)
    source: str = field(default=COMMAND_LINE, compare=False)  # where it came from, for messages

    @classmethod
    def from_lists(
        cls,
        base: str | os.PathLike,
        adapters: list,
        output: str | os.PathLike,
        *,
        weights: list[float] | None = None,
        **options: object,
    ) -> MergeOptions:
        """Options from the Python API's form: adapters and weights as parallel lists."""
        return cls(os.fspath(base), per_adapter(adapters, weights), os.fspath(output), **options)

    @property
    def weights(self) -> list[float]:
        return [a.weight for a in self.adapters]

    @property
    def adapter_paths(self) -> list[str]:
        return [a.path for a in self.adapters]

    def resolved(self) -> MergeOptions:
        """These options with every Hub id (base and adapters) as a local folder."""
        base, adapters = resolve_inputs(self.base, self.adapter_paths, offline=self.offline)
        specs = tuple(replace(a, path=p) for a, p in zip(self.adapters, adapters, strict=True))
        return replace(self, base=base, adapters=specs)


def output_folders(job: MergeOptions) -> list[str]:
    """The folders a job writes: OUT, or with ``separate`` OUT/<adapter folder name> each.

    Names are made unique (``name-2``); a Hub id ``org/name@rev`` gives ``name``.
    """
    if not job.separate:
        return [job.output]
    seen: dict[str, int] = {}
    outputs = []
    for a in job.adapters:
        name = os.path.basename(os.path.normpath(a.path.split("@")[0])) or "adapter"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        outputs.append(os.path.join(job.output, name))
    return outputs


def per_adapter(adapters: list, weights: list[float] | None) -> tuple[AdapterSpec, ...]:
    """Pair adapters with their weights (1.0 each when none are given)."""
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(
            f"{count(len(weights), 'weight')} given for {count(len(adapters), 'adapter')}; "
            "give one per adapter."
        )
    return tuple(AdapterSpec(os.fspath(a), w) for a, w in zip(adapters, weights, strict=True))


def parse_weights(text: str | None) -> list[float] | None:
    """``--weights 0.7,0.3`` as numbers (None when not given); ValueError says what is wrong."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{text!r}: give comma-separated numbers such as 0.7,0.3")
    return weights


def weight_problem(value: object) -> str | None:
    """What is wrong with a job file's adapter weight, if anything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, not {value!r}"
    return None


def check_merge_args(options: MergeOptions) -> None:
    """The argument checks a plan makes before reading anything (adapters, weights, dtype)."""
    if not options.adapters:
        raise InputError("no adapter given; name at least one adapter folder.")
    weights, dtype = options.weights, options.dtype
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"adapter weights must be finite numbers, not {list(weights)}.")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}.")
    if options.executor not in EXECUTOR_CHOICES:
        raise InputError(
            f"unknown executor {options.executor!r}; use one of {', '.join(EXECUTOR_CHOICES)}."
        )
    for name, value, choices in (
        ("--quantize", options.quantize, QUANTIZE_CHOICES),
        ("--requant-scales", options.requant_scales, REQUANT_SCALES_CHOICES),
    ):
        if value not in choices:
            raise InputError(f"unknown {name} {value!r}; use one of {', '.join(choices)}.")


def output_formats(options: MergeOptions) -> dict[str, str]:
    """--quantize and --requant-scales where not at their defaults (fingerprint, provenance)."""
    formats = {}
    if options.quantize != OPTIONS["quantize"].default:
        formats["quantize"] = options.quantize
    if options.requant_scales != OPTIONS["requant_scales"].default:
        formats["requant_scales"] = options.requant_scales
    return formats


def resolve_inputs(
    base: str | os.PathLike, adapters: list, *, offline: bool | None
) -> tuple[str, list[str]]:
    """Base and adapters as local folders: each Hub id fetched (or found cached) once."""
    from .io.hub import resolve

    local: dict[str, str] = {}
    for ref in [os.fspath(base), *map(os.fspath, adapters)]:
        if ref not in local:
            local[ref] = resolve(ref, offline=offline)
    return local[os.fspath(base)], [local[os.fspath(a)] for a in adapters]
