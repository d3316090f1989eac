"""Bad input, through the CLI: a clear message, a non-zero exit, no traceback,
nothing in OUT that looks like a finished model, and the inputs untouched.

The fixtures are written by hand (safetensors.torch.save_file or raw bytes, a
tiny config.json, a hand-made PEFT LoRA folder), so these tests need neither
transformers nor peft and run in a few seconds. Most run the CLI in-process
with click's CliRunner; a few run ``python -m shardmerge`` for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_safetensors_io import CORRUPT

from shardmerge.cli import EXIT_INTERNAL, main

HID = 8
R = 2
ALPHA = 4
PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"

# Base tensors, split over two shards as save_pretrained would.
BASE_SHAPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "model.embed_tokens.weight": (SHARD1, (16, HID)),
    f"{Q}.weight": (SHARD1, (HID, HID)),
    f"{V}.weight": (SHARD1, (4, HID)),
    "model.layers.0.input_layernorm.weight": (SHARD2, (HID,)),
    "model.norm.weight": (SHARD2, (HID,)),
    "lm_head.weight": (SHARD2, (16, HID)),
}


def _rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_base(folder: Path, *, sharded: bool = True) -> Path:
    """A tiny llama-like model folder: config.json, two shards and an index (or one file)."""
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    tensors = {name: _rand(shape, i) for i, (name, (_, shape)) in enumerate(BASE_SHAPES.items())}
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    for shard in (SHARD1, SHARD2):
        part = {n: t for n, t in tensors.items() if BASE_SHAPES[n][0] == shard}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": {n: s for n, (s, _) in BASE_SHAPES.items()},
    }
    (folder / INDEX).write_text(json.dumps(index))
    return folder


def write_adapter(
    folder: Path,
    *,
    modules: dict[str, tuple[int, int]] | None = None,
    r: int = R,
    config: dict | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    seed: int = 100,
) -> Path:
    """A PEFT LoRA folder: adapter_config.json and adapter_model.safetensors.

    ``modules`` maps module names to (out, in); the default targets q_proj and
    v_proj of the base above.
    """
    folder.mkdir(parents=True)
    modules = {Q: (HID, HID), V: (4, HID)} if modules is None else modules
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": ALPHA,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for i, (module, (out_f, in_f)) in enumerate(modules.items()):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = _rand((r, in_f), seed + 2 * i)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = _rand((out_f, r), seed + 2 * i + 1)
    tensors.update(extra or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: the sha256 of regular files, the kind of anything else."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                snap[rel] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return snap


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Workspace:
    """Inputs under ``in/`` (a sharded base and one adapter), the output at ``out``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.inputs = tmp / "in"
        self.base = write_base(self.inputs / "base")
        self.adapter = write_adapter(self.inputs / "lora")
        self.out = tmp / "out"

    def adapter_dir(self, name: str, **kw) -> Path:
        return write_adapter(self.inputs / name, **kw)

    def merge(self, *args: str, base=None, adapters=None, out=None) -> Run:
        """Run ``shardmerge merge`` in-process; check the inputs are unchanged after it."""
        base = self.base if base is None else base
        adapters = [self.adapter] if adapters is None else adapters
        out = self.out if out is None else out
        argv = ["merge", str(base), *map(str, adapters), "-o", str(out), "-q", *args]
        before = _snapshot(self.inputs)
        result = CliRunner().invoke(main, argv, catch_exceptions=True)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"uncaught {result.exception!r}\n{result.output}"
        )
        assert _snapshot(self.inputs) == before, "an input file was changed"
        return Run(result.exit_code, result.stdout, result.stderr)

    def refused(self, run: Run, *phrases: str, code: int | None = None, out=None) -> None:
        """The merge was refused cleanly: see the module docstring."""
        out = self.out if out is None else Path(out)
        print(run.stderr)  # shown by pytest on failure (and with -rP)
        assert run.code != 0, run.output
        assert run.code != EXIT_INTERNAL, (
            f"internal error instead of a clear message:\n{run.output}"
        )
        if code is not None:
            assert run.code == code, run.output
        assert "Traceback" not in run.output
        assert run.stderr.startswith("error: "), run.output
        for phrase in phrases:
            assert phrase in run.stderr, f"{phrase!r} not in:\n{run.stderr}"
        if _inside(out, self.inputs):
            return  # OUT is (in) an input: the snapshot in merge() shows nothing was written
        assert_not_complete(out)
        if out.is_dir():
            leftovers = {p.name for p in out.iterdir()} - {".shardmerge"}
            assert not leftovers, f"a refused merge wrote {leftovers} into OUT"


def _inside(child: Path, parent: Path) -> bool:
    return child.resolve().is_relative_to(parent.resolve())


def assert_not_complete(out: Path) -> None:
    """OUT does not look like a finished model folder."""
    if not out.is_dir():
        return
    assert not (out / INDEX).exists(), f"{out} has an index after a failed merge"
    assert not (out / "model.safetensors").exists(), f"{out} has model.safetensors"


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


ERR_INPUT, ERR_INCOMPATIBLE, ERR_UNSUPPORTED, ERR_OUTPUT, ERR_RESOURCE = 2, 3, 4, 5, 6


# --- the fixtures themselves are good -------------------------------------------------


def test_fixture_merges_cleanly(ws):
    """The good workspace merges, so every refusal below is caused by its one defect."""
    run = ws.merge()
    assert run.code == 0, run.output
    assert (ws.out / INDEX).is_file() and (ws.out / SHARD2).is_file()
    merged = load_file(str(ws.out / SHARD1))
    a = load_file(str(ws.adapter / "adapter_model.safetensors"))
    base = load_file(str(ws.base / SHARD1))
    delta = (ALPHA / R) * a[f"{PREFIX}{Q}.lora_B.weight"] @ a[f"{PREFIX}{Q}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + delta)


def test_fixture_single_file_base_merges(tmp_path):
    base = write_base(tmp_path / "in" / "base1", sharded=False)
    ws = Workspace(tmp_path)
    run = ws.merge(base=base)
    assert run.code == 0, run.output
    assert (ws.out / "model.safetensors").is_file()


# --- missing or unusable folders and files ----------------------------------------------


def test_missing_base_folder(ws):
    missing = ws.inputs / "no-such-model"
    run = ws.merge(base=missing)
    ws.refused(run, str(missing), "does not exist", "config.json", code=ERR_INPUT)


def test_base_is_a_file(ws):
    f = ws.inputs / "model.txt"
    f.write_text("hello")
    run = ws.merge(base=f)
    ws.refused(run, str(f), "not a folder", code=ERR_INPUT)


def test_missing_config_json(ws):
    (ws.base / "config.json").unlink()
    run = ws.merge()
    ws.refused(run, str(ws.base / "config.json"), "is missing", "save_pretrained", code=ERR_INPUT)


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\xff"])
def test_bad_config_json(ws, text):
    (ws.base / "config.json").write_bytes(text.encode("latin-1"))
    run = ws.merge()
    ws.refused(run, str(ws.base / "config.json"), code=ERR_INPUT)


def test_base_without_safetensors(ws):
    for name in (SHARD1, SHARD2, INDEX):
        (ws.base / name).unlink()
    run = ws.merge()
    ws.refused(
        run, str(ws.base), "no safetensors weights", "model.safetensors.index.json", code=ERR_INPUT
    )


def test_base_with_only_pytorch_bin(ws):
    for name in (SHARD1, SHARD2, INDEX):
        (ws.base / name).unlink()
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, ws.base / "pytorch_model.bin")
    run = ws.merge()
    ws.refused(run, str(ws.base), "only PyTorch .bin", "convert them to safetensors", code=2)


def test_missing_adapter_folder(ws):
    missing = ws.inputs / "no-such-lora"
    run = ws.merge(adapters=[missing])
    ws.refused(run, str(missing), "does not exist", "adapter_config.json", code=ERR_INPUT)


def test_missing_adapter_config(ws):
    (ws.adapter / "adapter_config.json").unlink()
    run = ws.merge()
    ws.refused(run, str(ws.adapter / "adapter_config.json"), "is missing", code=ERR_INPUT)


def test_adapter_without_weights(ws):
    (ws.adapter / "adapter_model.safetensors").unlink()
    run = ws.merge()
    ws.refused(
        run,
        str(ws.adapter),
        "no adapter weights",
        "adapter_model.safetensors",
        "save_pretrained",
        code=ERR_INPUT,
    )


def test_adapter_with_empty_weights_file(ws):
    save_file({}, str(ws.adapter / "adapter_model.safetensors"))
    run = ws.merge()
    ws.refused(run, str(ws.adapter / "adapter_model.safetensors"), "no tensors", code=ERR_INPUT)


# We run as root, so chmod 000 does not stop reads. A file is made unreadable
# instead by putting a folder where it is expected; FIFOs are covered below.
@pytest.mark.parametrize(
    "where",
    [
        "base/config.json",
        "base/" + INDEX,
        "base/" + SHARD2,
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
    ],
)
def test_folder_where_a_file_is_expected(ws, where):
    p = ws.inputs / where
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")
    run = ws.merge()
    ws.refused(run, str(p), "not a regular file", code=ERR_INPUT)


def test_folder_named_model_safetensors(tmp_path):
    base = write_base(tmp_path / "in" / "base1", sharded=False)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").mkdir()
    ws = Workspace(tmp_path)
    run = ws.merge(base=base)
    ws.refused(run, str(base / "model.safetensors"), "not a regular file", code=ERR_INPUT)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SHARDMERGE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "shardmerge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("where", ["base/config.json", "lora/adapter_model.safetensors"])
def test_fifo_where_a_file_is_expected(ws, where):
    """A FIFO would block a reader forever: refused without opening it (real subprocess)."""
    p = ws.inputs / where
    p.unlink()
    os.mkfifo(p)
    before = _snapshot(ws.inputs)
    proc = _cli("merge", str(ws.base), str(ws.adapter), "-o", str(ws.out), timeout=30)
    assert proc.returncode == ERR_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(p) in proc.stderr and "not a regular file" in proc.stderr
    assert _snapshot(ws.inputs) == before
    assert not ws.out.exists()


# --- an adapter made for another base ---------------------------------------------------


def test_target_module_not_in_base(ws):
    gate = "model.layers.0.mlp.gate_proj"
    a = ws.adapter_dir("other", modules={Q: (HID, HID), gate: (16, HID)})
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a), gate, "made for this base model", code=ERR_INCOMPATIBLE)


def test_shape_mismatch(ws):
    a = ws.adapter_dir("wide", modules={Q: (2 * HID, HID)})
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a), Q, "[16, 8]", "[8, 8]", "made for this base model", code=3)


def test_rank_in_config_disagrees_with_lora_a(ws):
    a = ws.adapter_dir("rank", config={"r": 4})
    run = ws.merge(adapters=[a])
    ws.refused(
        run,
        str(a / "adapter_model.safetensors"),
        "rank 2",
        "r=4",
        "re-save the adapter",
        code=ERR_INPUT,
    )


def test_lora_a_and_b_ranks_disagree(ws):
    a = ws.adapter_dir("ab")
    save_file(
        {
            f"{PREFIX}{Q}.lora_A.weight": torch.zeros(R, HID),
            f"{PREFIX}{Q}.lora_B.weight": torch.zeros(HID, R + 1),
        },
        str(a / "adapter_model.safetensors"),
    )
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a), Q, "lora_A has rank 2 but lora_B has 3", code=ERR_INCOMPATIBLE)


def test_lora_a_without_b(ws):
    a = ws.adapter_dir("half", modules={}, extra={f"{PREFIX}{Q}.lora_A.weight": torch.zeros(R, 8)})
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a), Q, "complete A/B pair", code=ERR_INCOMPATIBLE)


def test_all_problems_reported_at_once(ws):
    a1 = ws.adapter_dir("one", modules={"model.layers.0.mlp.up_proj": (16, HID)})
    a2 = ws.adapter_dir("two", modules={"model.layers.0.mlp.down_proj": (HID, 16)})
    run = ws.merge(adapters=[a1, a2])
    ws.refused(
        run,
        "2 problems found",
        str(a1),
        "model.layers.0.mlp.up_proj",
        str(a2),
        "model.layers.0.mlp.down_proj",
        code=ERR_INCOMPATIBLE,
    )


def test_problems_of_different_kinds_reported_together(ws):
    missing = ws.inputs / "gone"
    bad = ws.adapter_dir("bad", modules={"model.layers.0.mlp.up_proj": (16, HID)})
    (ws.out).mkdir()
    (ws.out / "notes.txt").write_text("mine")
    run = ws.merge(adapters=[missing, bad])
    assert run.code not in (0, EXIT_INTERNAL) and "Traceback" not in run.output
    # One adapter cannot be opened: the output problem is reported in the same message.
    assert "2 problems found" in run.stderr, run.stderr
    assert str(missing) in run.stderr and "is not empty" in run.stderr
    assert (ws.out / "notes.txt").read_text() == "mine"


# --- adapter kinds shardmerge refuses by name -------------------------------------------

UNSUPPORTED_CONFIGS = {
    "dora_lora_bias": (
        {"use_dora": True, "lora_bias": True},
        "DoRA (use_dora) together with lora_bias",
    ),
    "oft": ({"peft_type": "OFT"}, "OFT"),
    "vera": ({"peft_type": "VERA"}, "VeRA"),
    "adalora": ({"peft_type": "ADALORA"}, "AdaLoRA"),
    "unknown_peft_type": ({"peft_type": "SOMETHING_NEW"}, "SOMETHING_NEW"),
    "target_parameters_fan_in_fan_out": (
        {"target_parameters": ["mlp.experts.down_proj"], "fan_in_fan_out": True},
        "target_parameters together with fan_in_fan_out",
    ),
    "pissa": ({"init_lora_weights": "pissa"}, "pissa"),
    "pissa_niter": ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4"),
    "olora": ({"init_lora_weights": "olora"}, "olora"),
    "loftq": ({"init_lora_weights": "loftq"}, "loftq"),
    "layer_replication": ({"layer_replication": [[0, 1]]}, "layer_replication"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED_CONFIGS))
def test_unsupported_adapter_config(ws, case):
    cfg, name = UNSUPPORTED_CONFIGS[case]
    extra = (
        {f"{PREFIX}{Q}.lora_magnitude_vector": torch.ones(HID)} if case.startswith("dora") else None
    )
    a = ws.adapter_dir(case, config=cfg, extra=extra)
    run = ws.merge(adapters=[a])
    todo = "Convert the adapter to plain LoRA" if "init_lora_weights" in cfg else "merge_and_unload"
    ws.refused(run, str(a / "adapter_config.json"), name, "not supported", todo, code=4)


BAD_CONFIG_VALUES = {
    "alpha_str": ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
    "alpha_null": ({"lora_alpha": None}, "lora_alpha must be a finite number"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "r_str": ({"r": "2"}, "r must be a positive integer"),
    "r_zero": ({"r": 0}, "r must be a positive integer"),
    "rank_pattern_list": ({"rank_pattern": ["q_proj"]}, "rank_pattern must map"),
    "rank_pattern_bad_regex": ({"rank_pattern": {"q_proj(": 2}}, "not a valid regular expression"),
    "alpha_pattern_str": ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj']"),
    "modules_to_save_str": ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    "use_rslora_str": ({"use_rslora": "no"}, "use_rslora must be true or false"),
    "fan_in_fan_out_str": ({"fan_in_fan_out": "false"}, "fan_in_fan_out must be true or false"),
    "trainable_token_indices_str": (
        {"trainable_token_indices": "1,2"},
        "trainable_token_indices must be a list of integers",
    ),
    "trainable_token_indices_dict_of_str": (
        {"trainable_token_indices": {"embed_tokens": "1"}},
        "trainable_token_indices['embed_tokens'] must be a list of integers",
    ),
    "target_parameters_str": (
        {"target_parameters": "mlp.experts.down_proj"},
        "target_parameters must be a list",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_VALUES))
def test_bad_adapter_config_values(ws, case):
    """Values that would crash the arithmetic or be silently misread ("no" is truthy)."""
    cfg, phrase = BAD_CONFIG_VALUES[case]
    a = ws.adapter_dir(case, config=cfg)
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a / "adapter_config.json"), phrase, "Fix adapter_config.json", code=2)


def test_adapter_config_without_peft_type(ws):
    a = ws.adapter_dir("nopeft", config={"peft_type": None})
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a / "adapter_config.json"), "no peft_type", "save_pretrained", code=2)


@pytest.mark.parametrize(
    "key",
    [
        f"{PREFIX}{Q}.lora_magnitude_vector",  # DoRA weights, config not saying so
        f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta",
    ],
)
def test_unsupported_keys_without_config_flag(ws, key):
    """Keys of an unsupported method are refused even when the config does not announce it."""
    a = ws.adapter_dir("sneaky", extra={key: torch.ones(HID)})
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a / "adapter_model.safetensors"), key.rsplit(".", 1)[-1])


def test_conv_lora_refused(ws):
    a = ws.adapter_dir("conv", modules={})
    save_file(
        {
            f"{PREFIX}{Q}.lora_A.weight": torch.zeros(R, HID, 3, 3),
            f"{PREFIX}{Q}.lora_B.weight": torch.zeros(HID, R, 1, 1),
        },
        str(a / "adapter_model.safetensors"),
    )
    run = ws.merge(adapters=[a])
    ws.refused(run, str(a / "adapter_model.safetensors"), Q, "convolution", code=ERR_UNSUPPORTED)


def test_unknown_keys_refused(ws):
    weird = [f"{PREFIX}{Q}.lora_C.scale", "something_else"]
    a = ws.adapter_dir("weird", extra={k: torch.zeros(2) for k in weird})
    run = ws.merge(adapters=[a])
    ws.refused(
        run,
        str(a / "adapter_model.safetensors"),
        "does not understand",
        *weird,
        code=ERR_UNSUPPORTED,
    )


# --- corrupt safetensors files -------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("target", ["base_shard", "adapter"])
def test_corrupt_safetensors_header(ws, case, target):
    data, phrase = CORRUPT[case]
    p = ws.base / SHARD2 if target == "base_shard" else ws.adapter / "adapter_model.safetensors"
    p.write_bytes(data)
    run = ws.merge()
    ws.refused(run, str(p), phrase, "Re-download or re-export", code=ERR_INPUT)


@pytest.mark.parametrize("target", ["base_shard", "adapter"])
def test_truncated_in_tensor_data(ws, target):
    p = ws.base / SHARD1 if target == "base_shard" else ws.adapter / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 37])
    run = ws.merge()
    ws.refused(run, str(p), "truncated", "Re-download", code=ERR_INPUT)


def test_corrupt_single_file_base(tmp_path):
    base = write_base(tmp_path / "in" / "base1", sharded=False)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:4])
    ws = Workspace(tmp_path)
    run = ws.merge(base=base)
    ws.refused(run, str(f), "too short", code=ERR_INPUT)


# --- the shard index -------------------------------------------------------------------


def _edit_index(ws: Workspace, fn) -> Path:
    p = ws.base / INDEX
    index = json.loads(p.read_text())
    fn(index["weight_map"])
    p.write_text(json.dumps(index))
    return p


def test_index_names_missing_file(ws):
    (ws.base / SHARD2).unlink()
    run = ws.merge()
    ws.refused(run, SHARD2, str(ws.base / INDEX), "Re-download", code=ERR_INPUT)


@pytest.mark.parametrize("name", ["../x.safetensors", "sub/../../x.safetensors", "/abs"])
def test_index_names_path_outside_folder(ws, name):
    outside = ws.inputs / "x.safetensors"
    outside.write_bytes((ws.base / SHARD2).read_bytes())
    if name == "/abs":
        name = str(outside)
    p = _edit_index(ws, lambda wm: wm.update({"model.norm.weight": name}))
    run = ws.merge()
    ws.refused(run, str(p), name, "outside the model folder", code=ERR_INPUT)


def test_index_maps_tensor_to_wrong_shard(ws):
    p = _edit_index(ws, lambda wm: wm.update({"model.norm.weight": SHARD1}))
    run = ws.merge()
    ws.refused(run, str(p), "model.norm.weight", SHARD1, "disagree", code=ERR_INPUT)


def test_index_names_tensor_no_shard_holds(ws):
    p = _edit_index(ws, lambda wm: wm.update({"model.ghost.weight": SHARD1}))
    run = ws.merge()
    ws.refused(run, str(p), "model.ghost.weight", code=ERR_INPUT)


def test_same_tensor_in_two_shards(ws):
    extra = load_file(str(ws.base / SHARD1))
    extra["model.norm.weight"] = torch.zeros(HID)
    save_file(extra, str(ws.base / SHARD1))
    run = ws.merge()
    ws.refused(run, str(ws.base), "model.norm.weight", SHARD1, SHARD2, "re-download", code=2)


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": [1]}', '{"metadata": {}}']
)
def test_index_invalid(ws, text):
    (ws.base / INDEX).write_text(text)
    run = ws.merge()
    ws.refused(run, str(ws.base / INDEX), code=ERR_INPUT)


# --- the output folder -------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_equal_to_base(ws, overwrite):
    run = ws.merge(*(["--overwrite"] if overwrite else []), out=ws.base)
    ws.refused(run, str(ws.base), "never writes into its inputs", code=ERR_OUTPUT, out=ws.base)


def test_out_symlink_to_base_with_overwrite(ws):
    link = ws.tmp / "link"
    link.symlink_to(ws.base, target_is_directory=True)
    run = ws.merge("--overwrite", out=link)
    ws.refused(run, "never writes into its inputs", code=ERR_OUTPUT, out=ws.base)


def test_out_inside_base(ws):
    out = ws.base / "merged"
    run = ws.merge(out=out)
    ws.refused(run, str(out), "inside", str(ws.base), code=ERR_OUTPUT, out=out)
    assert not out.exists()


@pytest.mark.parametrize("sub", ["", "merged"])
def test_out_equal_to_or_inside_adapter(ws, sub):
    out = ws.adapter / sub if sub else ws.adapter
    run = ws.merge("--overwrite", out=out)
    ws.refused(run, str(ws.adapter), "never writes into its inputs", code=ERR_OUTPUT, out=out)


def test_base_inside_out(ws):
    run = ws.merge(out=ws.inputs)
    ws.refused(run, str(ws.base), "inside the output folder", code=ERR_OUTPUT, out=ws.inputs)


def test_out_is_an_existing_file(ws):
    ws.out.write_text("precious")
    run = ws.merge()
    ws.refused(run, str(ws.out), "not a folder", code=ERR_OUTPUT)
    assert ws.out.read_text() == "precious"


def test_out_is_a_dangling_symlink(ws):
    ws.out.symlink_to(ws.tmp / "nowhere")
    run = ws.merge()
    ws.refused(run, str(ws.out), "does not exist", "choose another path", code=ERR_OUTPUT)
    assert ws.out.is_symlink() and not (ws.tmp / "nowhere").exists()


def test_out_under_a_file(ws):
    (ws.tmp / "afile").write_text("x")
    out = ws.tmp / "afile" / "merged"
    run = ws.merge(out=out)
    ws.refused(run, str(out), str(ws.tmp / "afile"), "is a file", code=ERR_OUTPUT, out=out)
    assert (ws.tmp / "afile").read_text() == "x"


def test_out_holding_another_model_needs_overwrite(ws):
    ws.out.mkdir()
    (ws.out / "config.json").write_text('{"model_type": "other"}')
    save_file({"x": torch.zeros(3)}, str(ws.out / "model.safetensors"))
    (ws.out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    run = ws.merge()
    assert run.code == ERR_OUTPUT, run.output
    assert "Traceback" not in run.output
    assert str(ws.out) in run.stderr and "holds a model" in run.stderr
    assert "--overwrite" in run.stderr
    assert json.loads((ws.out / "config.json").read_text()) == {"model_type": "other"}
    assert list(load_file(str(ws.out / "model.safetensors"))) == ["x"]

    run = ws.merge("--overwrite")
    assert run.code == 0, run.output
    assert json.loads((ws.out / "config.json").read_text())["model_type"] == "llama"
    assert not (ws.out / "model.safetensors").exists(), "stale single-file weights left behind"
    assert not (ws.out / "model-00009-of-00009.safetensors").exists()
    assert (ws.out / INDEX).is_file()


def test_out_non_empty_folder_refused(ws):
    ws.out.mkdir()
    (ws.out / "notes.txt").write_text("mine")
    (ws.out / "data").mkdir()
    run = ws.merge()
    assert run.code == ERR_OUTPUT and "Traceback" not in run.output
    assert str(ws.out) in run.stderr and "not empty" in run.stderr
    assert "--overwrite" in run.stderr and "another folder" in run.stderr
    assert {p.name for p in ws.out.iterdir()} == {"notes.txt", "data"}


def test_out_empty_folder_is_fine(ws):
    ws.out.mkdir()
    assert ws.merge().code == 0


# --- options ----------------------------------------------------------------------------


def test_weights_count_mismatch(ws):
    a2 = ws.adapter_dir("second", seed=7)
    run = ws.merge("--weights", "0.5", adapters=[ws.adapter, a2])
    ws.refused(run, "1 weight given for 2 adapters", "one per adapter", code=ERR_INPUT)


@pytest.mark.parametrize("text", ["abc", "0.5,,1", "nan", "inf", "1e999"])
def test_weights_not_numbers(ws, text):
    run = ws.merge("--weights", text)
    assert run.code == 2 and "Traceback" not in run.output  # click's usage error
    assert "--weights" in run.stderr and "comma-separated numbers" in run.stderr
    assert not ws.out.exists()


@pytest.mark.parametrize("text", ["lots", "4XB", "-1G", "1.5.2G", "iB"])
def test_bad_max_memory(ws, text):
    run = ws.merge("--max-memory", text)
    ws.refused(run, repr(text), "4GiB", code=ERR_INPUT)


def test_max_memory_below_baseline(ws):
    from shardmerge.io.output import fmt_bytes
    from shardmerge.planner.memory import BASELINE_BYTES

    run = ws.merge("--max-memory", "1MiB")
    ws.refused(
        run, "memory budget 1.0 MiB", fmt_bytes(BASELINE_BYTES), "Raise --max-memory", code=6
    )


def test_max_memory_too_small_for_a_row(ws):
    """Just above the fixed overhead: q_proj's factors and one row do not fit; named with numbers."""
    from shardmerge.planner.memory import BASELINE_BYTES, MERGE_BYTES_PER_ELEMENT

    run = ws.merge("--max-memory", str(BASELINE_BYTES + 100))
    ws.refused(run, "memory budget is too small", f"{Q}.weight [8, 8]", "--max-memory", code=6)
    need = f"needs {BASELINE_BYTES + 8 * MERGE_BYTES_PER_ELEMENT + 8 * (2 * 8 + 8 * 2) * 2:,} bytes"
    assert need in run.stderr and f"budget is {BASELINE_BYTES + 100:,} bytes" in run.stderr


def test_api_refuses_non_finite_weight(ws):
    import shardmerge
    from shardmerge.errors import InputError

    with pytest.raises(InputError, match="finite"):
        shardmerge.merge(ws.base, [ws.adapter], ws.out, weights=[float("nan")])
    assert not ws.out.exists()


def test_bad_device(ws):
    run = ws.merge("--device", "tpu")
    ws.refused(run, "'tpu'", "cpu", code=ERR_INPUT)


def test_replacing_adapter_with_weight_not_one(ws):
    a = ws.adapter_dir(
        "mts",
        config={"modules_to_save": ["lm_head"]},
        extra={f"{PREFIX}lm_head.weight": torch.zeros(16, HID)},
    )
    run = ws.merge("--weights", "0.5", adapters=[a])
    ws.refused(run, str(a), "lm_head.weight", "weight of 0.5", "1.0", code=ERR_UNSUPPORTED)


def test_two_adapters_replacing_the_same_tensor(ws):
    extra = {f"{PREFIX}lm_head.weight": torch.zeros(16, HID)}
    cfg = {"modules_to_save": ["lm_head"]}
    a1 = ws.adapter_dir("m1", config=cfg, extra=extra)
    a2 = ws.adapter_dir("m2", config=cfg, extra=extra)
    run = ws.merge(adapters=[a1, a2])
    ws.refused(run, "m1", "m2", "lm_head.weight", "separate runs", code=ERR_UNSUPPORTED)


# --- legacy .bin adapters are loaded with weights_only=True ---------------------------------


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "raw_pickle"])
def test_malicious_pickle_adapter_is_not_run(ws, fmt):
    import pickle

    marker = ws.tmp / "pwned"
    (ws.adapter / "adapter_model.safetensors").unlink()
    payload = {f"{PREFIX}{Q}.lora_A.weight": _Evil(str(marker))}
    bin_path = ws.adapter / "adapter_model.bin"
    if fmt == "zip":
        torch.save(payload, bin_path)
    else:
        bin_path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    run = ws.merge()
    ws.refused(run, str(bin_path), "weights_only=True", "adapter_model.safetensors", code=2)
    assert not marker.exists(), "the pickle ran code"


def test_malicious_pickle_adapter_real_process(ws):
    """The same, through a real ``python -m shardmerge`` process."""
    marker = ws.tmp / "pwned"
    (ws.adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": _Evil(str(marker))}, ws.adapter / "adapter_model.bin")
    before = _snapshot(ws.inputs)
    proc = _cli("merge", str(ws.base), str(ws.adapter), "-o", str(ws.out))
    assert proc.returncode == ERR_INPUT, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert str(ws.adapter / "adapter_model.bin") in proc.stderr
    assert not marker.exists()
    assert _snapshot(ws.inputs) == before
    assert not ws.out.exists()


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", b"PK\x03\x04garbage"])
def test_corrupt_bin_adapter(ws, content):
    (ws.adapter / "adapter_model.safetensors").unlink()
    p = ws.adapter / "adapter_model.bin"
    p.write_bytes(content)
    run = ws.merge()
    ws.refused(run, str(p), "adapter_model.safetensors", code=ERR_INPUT)


def test_bin_adapter_not_a_state_dict(ws):
    (ws.adapter / "adapter_model.safetensors").unlink()
    p = ws.adapter / "adapter_model.bin"
    torch.save([torch.zeros(2)], p)
    run = ws.merge()
    ws.refused(run, str(p), "not a state dict", code=ERR_INPUT)


# --- a merge that fails part-way ------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, code, phrase",
    [
        (RuntimeError("boom"), EXIT_INTERNAL, "internal error"),
        (OSError(28, "No space left on device"), ERR_RESOURCE, "disk is full"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_failure_mid_merge_leaves_out_incomplete(ws, monkeypatch, exc, code, phrase):
    import shardmerge.execute.tensor as worker

    calls = []
    real = worker.merge_block

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second tensor merged: v_proj, in the first shard
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "merge_block", failing)
    run = ws.merge()
    assert run.code == code, run.output
    assert "Traceback" not in run.output and phrase in run.stderr
    assert_not_complete(ws.out)
    assert not (ws.out / SHARD1).exists(), "a half-written shard was committed"

    # A second run, without --overwrite, redoes the unfinished merge.
    monkeypatch.setattr(worker, "merge_block", real)
    run = ws.merge()
    assert run.code == 0, run.output
    assert (ws.out / INDEX).is_file() and (ws.out / SHARD1).is_file()


def test_failure_in_last_shard_leaves_no_index(ws, monkeypatch):
    """Shard 1 is committed, shard 2 fails: OUT holds no index, so it is not a model."""
    import shardmerge.execute.executors as execute

    a = ws.adapter_dir("head", modules={Q: (HID, HID), "lm_head": (16, HID)})
    real = execute.run_shards

    def failing(jobs, dests, device, progress=None):
        if jobs[0].name == SHARD2:
            raise RuntimeError("boom")
        return real(jobs, dests, device, progress)

    monkeypatch.setattr(execute, "run_shards", failing)
    run = ws.merge(adapters=[a])
    assert run.code == EXIT_INTERNAL and "Traceback" not in run.output
    assert (ws.out / SHARD1).exists()
    assert_not_complete(ws.out)


@pytest.mark.parametrize("shard, cut", [(SHARD1, 40), (SHARD2, 4)])
def test_shard_truncated_after_planning(ws, monkeypatch, shard, cut):
    """A shard that shrinks between the plan and the read: caught by the short-read checks
    (a merged tensor in shard 1, a copied one at the end of shard 2)."""
    import shardmerge.api as api

    real = api.execute_many
    victim = ws.base / shard

    def truncate_then_execute(plans, **kwargs):
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - cut])
        return real(plans, **kwargs)

    monkeypatch.setattr(api, "execute_many", truncate_then_execute)
    argv = ["merge", str(ws.base), str(ws.adapter), "-o", str(ws.out), "-q"]
    result = CliRunner().invoke(main, argv)
    print(result.stderr)
    assert result.exit_code == ERR_INPUT, result.output
    assert "Traceback" not in result.output
    assert str(victim) in result.stderr and "truncated or changed while being read" in result.stderr
    assert_not_complete(ws.out)
    assert not (ws.out / shard).exists()


def test_hub_cache_symlinked_shards_are_accepted(tmp_path):
    """Shards that are symlinks to blobs outside the folder (the Hugging Face cache layout)
    are inputs like any other: only names in the index are confined to the folder."""
    ws = Workspace(tmp_path)
    blobs = ws.inputs / "blobs"
    blobs.mkdir()
    for i, name in enumerate((SHARD1, SHARD2, "config.json", INDEX)):
        blob = blobs / f"blob{i}"
        (ws.base / name).rename(blob)
        (ws.base / name).symlink_to(os.path.relpath(blob, ws.base))
    run = ws.merge()
    assert run.code == 0, run.output
    assert (ws.out / SHARD1).is_file() and not (ws.out / SHARD1).is_symlink()
