"""The command line: thin wrappers over shardmerge.api that turn errors into one clear paragraph."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import click

from .errors import ShardmergeError, count
from .options import COMMAND_LINE, OPTIONS, MergeOptions, parse_weights, per_adapter
from .runtime import EXIT_INTERRUPTED, raise_on_interrupt
from .version import __version__

EXIT_INTERNAL = 70
EXIT_VERIFY_FAILED = 1


def _friendly(fn):
    """Run a command; print our errors as a paragraph (no traceback) and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardmergeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException:
            raise  # a usage error: click prints it and exits 2
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted; the output folder is incomplete and does not look like a model.",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Output piped into `head` and the like: stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}.", err=True)
            if e.errno == 28:  # ENOSPC
                click.echo(
                    "The disk is full: free some space or choose another output folder.", err=True
                )
            sys.exit(1)
        except Exception:
            if os.environ.get("SHARDMERGE_DEBUG"):
                raise
            import traceback

            click.echo(
                "internal error in shardmerge (a bug); please report it with this output:", err=True
            )
            click.echo(traceback.format_exc().strip().splitlines()[-1], err=True)
            click.echo("Run again with SHARDMERGE_DEBUG=1 for the full traceback.", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


def _weights(text: str | None) -> list[float] | None:
    """--weights as numbers; unreadable ones are a usage error (click prints it, exit 2)."""
    try:
        return parse_weights(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--weights'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardmerge")
def main() -> None:
    """Fold PEFT adapters (LoRA and kin) into a model's safetensors shards, streaming, with bounded memory."""


# The merge options each command takes, in its --help order (options.OPTIONS holds them).
COMMAND_FLAGS = {
    "merge": (
        "out", "offline", "weights", "dtype", "device", "max_memory",
        "overwrite", "resume", "workers", "separate", "qlora_base", "quantize",
        "requant_scales", "allow_nonfinite", "verify", "executor", "ray_address",
    ),
    "plan": (
        "out", "offline", "weights", "dtype", "device", "max_memory",
        "workers", "overwrite", "qlora_base", "quantize", "requant_scales", "allow_nonfinite",
    ),
    "verify": ("weights", "dtype", "quantize", "requant_scales", "max_memory", "offline"),
}  # fmt: skip


def option_flags(command: str) -> Callable[[Callable], Callable]:
    """The click options of ``command``'s merge options, generated from the option table."""

    def decorate(fn):
        for name in reversed(COMMAND_FLAGS[command]):
            option = OPTIONS[name]
            settings = option.click_settings(command)
            if "choices" in settings:
                settings["type"] = click.Choice(list(settings.pop("choices")))
            if settings.pop("path", False):
                settings["type"] = click.Path()
            fn = click.option(*option.flag, **settings)(fn)
        return fn

    return decorate


def output_flags(fn: Callable) -> Callable:
    """-q, --report and --json: how a merge (merge, run) reports."""
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Progress and result as JSON lines on stdout."
    )(fn)
    fn = click.option(
        "--report", "report_path", type=click.Path(), help="Also write the JSON report here."
    )(fn)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(fn)


@main.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@option_flags("merge")
@output_flags
@_friendly
def merge(base, adapters, quiet, report_path, as_json, **flags) -> None:
    """Merge ADAPTERS (PEFT adapter folders: LoRA, DoRA, LoHa, LoKr, IA3, trainable tokens) into BASE (a Hugging Face model folder), writing OUT.

    BASE and ADAPTERS may also be Hub ids, org/name or org/name@revision."""
    from .jobs import job_from_dict

    specs = per_adapter(adapters, _weights(flags["weights"]))
    doc = {
        "base": base,
        "adapters": [{"path": a.path, "weight": a.weight} for a in specs],
        "output": flags["out"],
        "separate": flags["separate"],
        "dtype": flags["dtype"],
        "device": flags["device"],
        "max_memory": flags["max_memory"],
        "workers": flags["workers"],
        "overwrite": flags["overwrite"],
        "resume": not flags["no_resume"],
        "verify": flags["then_verify"],
        "offline": True if flags["offline"] else None,  # None: follow HF_HUB_OFFLINE
        "qlora_base": flags["qlora_base"],
        "allow_nonfinite": flags["allow_nonfinite"],
        "executor": flags["executor"],
        "ray_address": flags["ray_address"],
        "quantize": flags["quantize"],
        "requant_scales": flags["requant_scales"],
    }
    # Checked like a job file's fields, so flags and job files give the same messages.
    _run_job(job_from_dict(doc, COMMAND_LINE), quiet, report_path, as_json)


@main.command()
@click.argument("job_file")
@output_flags
@_friendly
def run(job_file, quiet, report_path, as_json) -> None:
    """Run the merge described in a YAML job file (see configs/ for examples)."""
    from .jobs import load_job

    _run_job(load_job(job_file), quiet, report_path, as_json)


def _echo_event(event: dict) -> None:
    import json

    click.echo(json.dumps(event))
    sys.stdout.flush()


def _run_job(job, quiet: bool, report_path=None, as_json: bool = False) -> None:
    from .api import prepare, run_job

    prepare(job)  # refusals without torch, then its import while Ctrl-C still exits at once
    # Merging writes OUT: from here Ctrl-C unwinds (locks released, OUT marked incomplete).
    raise_on_interrupt()
    results = run_job(
        job,
        progress=not quiet and not as_json and sys.stderr.isatty(),
        report=report_path,
        events=_echo_event if as_json else None,
    )
    if as_json:
        failed = False
        for result in results:
            _survival_lines(result, summary=False)
            if result.verify is not None:
                ok = result.verify.ok
                _echo_event(
                    {
                        "event": "verify",
                        "out": result.out,
                        "ok": ok,
                        "summary": result.verify.summary(),
                    }
                )
                failed |= not ok
        if failed:
            sys.exit(EXIT_VERIFY_FAILED)
        return
    failed = False
    for result in results:
        click.echo(_merge_summary(result))
        if not result.already_complete:  # an earlier run reported its figures
            _survival_lines(result, summary=True)
        if result.verify is not None:
            click.echo(result.verify.summary())
            failed |= not result.verify.ok
    if failed:
        sys.exit(EXIT_VERIFY_FAILED)


def _survival_lines(result, *, summary: bool) -> None:
    """The worst tensors' survival (stdout, with ``summary``) and the warning (stderr)."""
    from .report import survival_lines

    for line in survival_lines(result.survival):
        if line.startswith("warning:"):
            click.echo(line, err=True)
        elif summary:
            click.echo(line)


def _merge_summary(result) -> str:
    """What a merge did, for people: written, resumed, or already complete."""
    from .io.output import fmt_bytes

    if result.already_complete:
        return (
            f"{result.out} is already complete: an earlier run of this job merged all "
            f"{count(result.shards, 'shard')}; nothing was written."
        )
    modules = ", ".join(f"{n} {k}" for k, n in sorted(result.modules.items()))
    tensors = ", ".join(f"{n} {k}" for k, n in sorted(result.tensors.items()))
    lines = []
    if result.shards_resumed:
        done = result.shards_resumed
        lines.append(
            f"resumed: {done} of {count(result.shards, 'shard')} "
            f"{'was' if done == 1 else 'were'} already done."
        )
    lines.append(
        f"merged into {result.out} in {result.seconds:.1f} s: "
        f"{fmt_bytes(result.bytes_written)} written; tensors: {tensors}; "
        f"adapter modules: {modules}."
    )
    return "\n".join(lines)


@main.command()
@click.argument("out")
@click.option(
    "--base", required=True, help="The base model folder (or Hub id) the output was merged from."
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    help="An adapter folder or Hub id (repeat).",
)
@option_flags("verify")
@_friendly
def verify(
    out, base, adapters, weights, dtype, quantize, requant_scales, max_memory, offline
) -> None:
    """Check every tensor of OUT against BASE + adapters: merged ones against the formula
    (correct rounding), untouched ones byte for byte; plus index, shapes and dtypes."""
    from .api import verify as api_verify

    report = api_verify(
        out,
        base,
        list(adapters),
        weights=_weights(weights),
        dtype=dtype,
        max_memory=max_memory,
        offline=True if offline else None,
        quantize=quantize,
        requant_scales=requant_scales,
    )
    click.echo(report.summary())
    if not report.ok:
        sys.exit(EXIT_VERIFY_FAILED)


@main.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@option_flags("plan")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_friendly
def plan(base, adapters, out, weights, as_json, offline, **options):
    """Check a merge and print its schedule; reads only headers and configs, writes nothing."""
    import json

    from .api import plan_options
    from .planner.describe import describe

    merge_options = MergeOptions.from_lists(
        base,
        adapters,
        out if out else ".",
        weights=_weights(weights),
        offline=True if offline else None,
        **options,
    )
    d = describe(plan_options(merge_options, check_out=bool(out)))
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(format_plan(d, has_out=bool(out)))
    if not d["fits"]:
        sys.exit(6)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def inspect(path, as_json) -> None:
    """Summarise a model folder or a PEFT adapter folder (reads only headers and configs)."""
    import json

    from .inspect_folder import inspect_folder

    d = inspect_folder(path)
    click.echo(json.dumps(d, indent=2) if as_json else format_inspect(d))


def format_inspect(d: dict) -> str:
    """An inspect summary for people."""
    from .io.output import fmt_bytes

    if d["kind"] == "model":
        dtypes = ", ".join(
            f"{k} {v['tensors']} ({fmt_bytes(v['bytes'])})" for k, v in d["dtypes"].items()
        )
        lines = [
            f"model {d['path']}: model_type {d['model_type']}, dtype {d['dtype']}",
            f"{count(d['shards'], 'shard')}, {count(d['tensors'], 'tensor')}, "
            f"{fmt_bytes(d['total_bytes'])}",
            f"dtypes: {dtypes}",
            f"tied embeddings: {d['tie_word_embeddings']}",
        ]
        if d.get("quantization"):
            q = d["quantization"]
            settings = ", ".join(f"{k} {v}" for k, v in q.items() if k != "quant_method")
            lines.append(f"quantization: {q.get('quant_method', 'none')}; {settings}")
        lines.append("largest tensors:")
        lines += [
            f"  {t['name']} {t['shape']} {t['dtype']} {fmt_bytes(t['bytes'])}"
            for t in d["largest_tensors"]
        ]
        return "\n".join(lines)
    modules = ", ".join(f"{n} {k}" for k, n in d["modules"].items()) or "none"
    lines = [
        f"adapter {d['path']}: {d['peft_type']}, r {d['r']}, lora_alpha {d['lora_alpha']}, "
        f"rsLoRA {d['use_rslora']}, DoRA {d['use_dora']}",
        f"target_modules: {d['target_modules']}",
        f"modules: {modules}; ranks found: {d['ranks']}; scaling: {d['scaling']}",
        f"weights: {d['weights_file']}, {count(d['tensors'], 'tensor')}, "
        f"{fmt_bytes(d['weights_bytes'])}, "
        f"dtypes {d['dtypes']}",
    ]
    if d["rank_pattern"] or d["alpha_pattern"]:
        lines.append(f"rank_pattern: {d['rank_pattern']}; alpha_pattern: {d['alpha_pattern']}")
    if d["modules_to_save"]:
        lines.append(f"modules_to_save: {d['modules_to_save']}")
    if d["unknown_keys"]:
        lines.append(f"keys not understood: {d['unknown_keys']}")
    return "\n".join(lines)


def format_plan(d: dict, *, has_out: bool) -> str:
    """The plan for people: what happens, with what resources, how long."""
    from .io.output import fmt_bytes

    r = d["resources"]
    n = len(d["adapters"])
    workers = (
        "in this process"
        if d["workers"] == 0
        else count(d["workers"], "worker process", "worker processes")
    )
    lines = [
        f"plan: {d['base']} + {n} adapter{'s' if n != 1 else ''}"
        + (f" -> {d['out']}" if has_out else ""),
        f"device {d['device']}, {workers}; memory budget {fmt_bytes(d['budget'])}, estimated peak "
        f"{fmt_bytes(d['estimated_peak_memory'])}: {'fits' if d['fits'] else 'DOES NOT FIT'}",
    ]
    if r:
        gpus = ", ".join(f"{g['name']} {fmt_bytes(g['free'])} free" for g in r["gpus"]) or "none"
        disk = (
            f"; disk {fmt_bytes(r['disk_free'])} free at output, needs {fmt_bytes(d['bytes_out'])}"
        )
        lines.append(
            f"resources: RAM {fmt_bytes(r['ram_available'])} available of {fmt_bytes(r['ram_total'])}, "
            f"{r['cpus']} CPUs{disk if has_out else ''}; GPUs: {gpus}"
        )
    modules = ", ".join(f"{v} {k}" for k, v in sorted(d["modules"].items()))
    lines.append(f"adapter modules: {modules}")
    if d.get("qlora_base", "none") != "none":
        how = {
            "nf4": "NF4 round-tripped",
            "bnb4": "dequantized from 4-bit",
            "fp8": "dequantized from FP8",
            "ct-fp8": "dequantized from compressed-tensors FP8",
            "gptq": "dequantized from GPTQ",
            "awq": "dequantized from AWQ",
            "ct-int": "dequantized from compressed-tensors INT",
            "mxfp4": "dequantized from MXFP4",
        }[d["qlora_base"]]
        lines.append(
            f"quantized base: {count(d['quantized_tensors'], 'tensor')} {how} before merging"
        )
    for method, e in d.get("encoded_outputs", {}).items():
        lines.append(
            f"{method} output: {count(e['tensors'], 'tensor')} as e4m3 codes with block scales "
            f"({e['fresh_scales']} with fresh scales, {e['kept_scales']} keeping the base's)"
        )
    if d["resumable_shards"]:
        lines.append(f"resumes: {count(len(d['resumable_shards']), 'shard')} already done")
    width = max(len(s["name"]) for s in d["shards"])
    lines.append(
        f"{'shard':<{width}}  {'in':>9}  {'out':>9}  merged  copied  block rows  {'peak':>9}"
    )
    for s in d["shards"]:
        merged = s["tensors_merged"] + s["tensors_converted"]
        lines.append(
            f"{s['name']:<{width}}  {fmt_bytes(s['bytes_in']):>9}  {fmt_bytes(s['bytes_out']):>9}  "
            f"{merged:>6}  {s['tensors_copied']:>6}  {s['max_block_rows']:>10}  "
            f"{fmt_bytes(s['peak_memory']):>9}"
        )
    secs = d["estimated_seconds"]
    lines.append(f"estimated time: {int(secs // 60)} min {secs % 60:.0f} s (rough)")
    return "\n".join(lines)
