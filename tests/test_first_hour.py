"""A new user's first hour: README in hand, the demo, the first mistakes and their messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import shardmerge
from shardmerge.cli import main
from shardmerge.errors import OutputError, count
from shardmerge.io.journal import OutputLock

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def write_base(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    tensors = {f"{m}.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16) for m in MODULES}
    tensors["model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    return folder


def write_adapter(folder: Path, peft_type: str = "LORA") -> Path:
    g = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True)
    lora = {}
    for m in MODULES:
        lora[f"base_model.model.{m}.lora_A.weight"] = torch.randn(2, 16, generator=g) * 0.1
        lora[f"base_model.model.{m}.lora_B.weight"] = torch.randn(16, 2, generator=g) * 0.1
    save_file(lora, folder / "adapter_model.safetensors")
    config = {"peft_type": peft_type, "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    return write_base(tmp_path / "base"), write_adapter(tmp_path / "lora")


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def model_files(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of OUT but the work folder: modification time and bytes."""
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".shardmerge" not in p.parts
    }


# --------------------------------------------------------------------------- README and demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's model and adapter, built by scripts/demo.py itself."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo as demo_script
    finally:
        sys.path.pop(0)
    return demo_script.build(tmp_path_factory.mktemp("demo"))


def test_readme_states_the_demo_shard_count_and_installs_from_a_clone(demo):
    base, _ = demo
    shards = len(list(base.glob("*.safetensors")))
    assert f"in {shards} shards" in README
    assert "pip install shardmerge" not in README  # not published
    assert "pip install -e ." in README and "git clone" in README


def test_the_stated_max_memory_minimum_merges_the_demo(demo, tmp_path):
    base, adapter = demo
    refused = cli(
        "merge", str(base), str(adapter), "-o", str(tmp_path / "a"), "--max-memory", "64MiB"
    )
    assert refused.exit_code == 6, refused.output
    stated = re.search(r"at least (\d+\.\d) MiB", refused.output)
    assert stated, refused.output
    r = cli("merge", str(base), str(adapter), "-o", str(tmp_path / "b"), "--max-memory", f"{stated[1]}MiB", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- messages


def test_negative_workers_is_a_usage_error_about_workers(inputs, tmp_path):
    base, adapter = inputs
    r = cli("merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--workers", "-1")
    assert r.exit_code == 2
    assert r.output.startswith("error: --workers must be 0 or more") and "not -1" in r.output
    assert "job file" not in r.output and "field" not in r.output
    assert not (tmp_path / "out").exists()


def test_counts_agree_with_their_nouns():
    assert count(1, "shard") == "1 shard" and count(6, "shard") == "6 shards"
    assert count(1, "entry") == "1 entry" and count(3, "entry") == "3 entries"
    assert count(2, "worker process", "worker processes") == "2 worker processes"


def test_one_entry_in_a_non_empty_out_is_singular(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("merge", str(base), str(adapter), "-o", str(out))
    assert r.exit_code == 5 and "(1 entry)" in r.output, r.output


def test_oft_refusal_lists_what_shardmerge_merges(tmp_path, inputs):
    base, _ = inputs
    oft = write_adapter(tmp_path / "oft", peft_type="OFT")
    r = cli("plan", str(base), str(oft))
    assert r.exit_code == 4, r.output
    assert "LoRA (with DoRA" in r.output and "LoHa, LoKr, IA3" in r.output
    assert "merges LoRA adapters." not in r.output


def test_verify_of_a_folder_shardmerge_did_not_write_says_so(inputs):
    base, adapter = inputs
    r = cli("verify", str(base), "--base", str(base), "--adapter", str(adapter))
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {base} is not a shardmerge output")
    assert "ulp" not in r.output and len(r.output.splitlines()) == 1


def test_a_different_job_into_an_unfinished_out_says_what_differs(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    assert cli("merge", str(base), str(adapter), "-o", str(out), "-q").exit_code == 0
    journal_path = out / ".shardmerge" / "journal.json"
    journal = json.loads(journal_path.read_text())
    journal["status"], journal["shards"] = "running", {}  # as if interrupted
    journal_path.write_text(json.dumps(journal))
    r = cli("merge", str(base), str(adapter), "-o", str(out), "--weights", "0.5", "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 5, r.output
    assert "an unfinished merge of a different job: --weights 1.0 -> 0.5; --dtype auto -> float32." in r.output  # fmt: skip


def test_a_rerun_of_a_finished_merge_writes_nothing(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    assert cli("merge", str(base), str(adapter), "-o", str(out), "-q").exit_code == 0
    before = model_files(out)
    r = cli("merge", str(base), str(adapter), "-o", str(out), "-q", "--report", str(tmp_path / "r.json"))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output == f"{out} is already complete: an earlier run of this job merged all 1 shard; nothing was written.\n"  # fmt: skip
    assert model_files(out) == before
    assert json.loads((tmp_path / "r.json").read_text())["bytes_written"] == 0


def test_the_lock_is_checked_before_anything_slow(inputs, tmp_path):
    """A held lock refuses at once: before the inputs are read (the base here does not exist)."""
    _, adapter = inputs
    out = tmp_path / "out"
    (out / ".shardmerge").mkdir(parents=True)
    lock = OutputLock(out / ".shardmerge")
    lock.acquire()
    try:
        start = time.monotonic()
        r = cli("merge", str(tmp_path / "no-such-base"), str(adapter), "-o", str(out))
        assert time.monotonic() - start < 1.0
        assert r.exit_code == 5 and "another shardmerge (pid" in r.output, r.output
        with pytest.raises(OutputError, match="another shardmerge"):
            shardmerge.merge(tmp_path / "no-such-base", [adapter], out)
        # The command line refuses before it imports torch.
        probe = (
            "import sys\nfrom shardmerge.cli import main\n"
            f"try:\n    main(['merge', 'nothing', {str(adapter)!r}, '-o', {str(out)!r}])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert run.stdout.split() == ["5", "False"], run.stdout + run.stderr
    finally:
        lock.release()


# --------------------------------------------------------------------------- what the output names


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A local Hub cache holding org/tiny-base and org/tiny-lora; offline."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for repo_id, commit, write in (
        ("org/tiny-base", "a" * 40, write_base),
        ("org/tiny-lora", "b" * 40, write_adapter),
    ):
        repo = root / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        write(repo / "snapshots" / commit)
    return root


def test_model_card_names_hub_ids(hub_cache, tmp_path):
    out = tmp_path / "out"
    shardmerge.merge("org/tiny-base", ["org/tiny-lora"], out)
    card = (out / "README.md").read_text()
    assert 'base_model: "org/tiny-base"' in card
    assert "| org/tiny-lora | 1.0 |" in card
    assert "shardmerge merge org/tiny-base org/tiny-lora" in card
    assert "snapshots" not in card and "a" * 40 not in card


def test_shard_bytes_do_not_depend_on_input_folder_names(tmp_path):
    outs = []
    for i, (b, a) in enumerate((("base", "lora"), ("other-base", "renamed-lora"))):
        base, adapter = write_base(tmp_path / b), write_adapter(tmp_path / a)
        outs.append(tmp_path / f"out{i}")
        shardmerge.merge(base, [adapter], outs[-1])
    first, second = ((o / "model.safetensors").read_bytes() for o in outs)
    assert first == second
    header = second[8 : 8 + int.from_bytes(second[:8], "little")]
    assert b"shardmerge" in header and b"lora" not in header  # no folder name in the metadata
    # The names go to the card instead.
    assert "| renamed-lora |" in (outs[1] / "README.md").read_text()
