"""JSON that is deep, huge or of the wrong shape: a refusal naming the file and key, never exit 70.

One test per input that used to end in an internal error (issue 14, item 3),
plus PEFT's own rule for rank_pattern/alpha_pattern keys, checked against
PEFT's ``get_pattern_key`` itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest
from click.testing import CliRunner
from test_bad_input import INDEX, SHARD1, Workspace

from shardmerge.adapters.naming import pattern_value
from shardmerge.cli import main
from shardmerge.io.jsonfile import MAX_JSON_DEPTH, json_depth_problem

DEEP = "[" * 100_000 + "]" * 100_000  # past the stdlib parser's recursion limit
JUST_TOO_DEEP = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # one level past ours, in an object


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def _edit_json(path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _rewrite_header(path, fn) -> None:
    """Apply ``fn`` to a safetensors file's parsed header and write it back, data unchanged."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    fn(doc)
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _first_tensor(doc: dict) -> dict:
    return next(v for k, v in doc.items() if k != "__metadata__")


@pytest.mark.parametrize("nesting", [DEEP, JUST_TOO_DEEP])
@pytest.mark.parametrize("where", ["base/config.json", f"base/{INDEX}", "lora/adapter_config.json"])
def test_deeply_nested_json_file(ws, where, nesting):
    path = ws.inputs / where
    path.write_text('{"x": ' + nesting + "}")
    run = ws.merge()
    ws.refused(run, str(path), f"nests deeper than {MAX_JSON_DEPTH} levels", code=2)


def test_deeply_nested_safetensors_header(ws):
    path = ws.base / SHARD1
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = ('{"__metadata__": ' + DEEP + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    run = ws.merge()
    ws.refused(run, str(path), "corrupt safetensors header", "nests deeper", code=2)


def test_nesting_within_the_limit_is_accepted():
    ok = json.loads("[" * (MAX_JSON_DEPTH - 1) + "{}" + "]" * (MAX_JSON_DEPTH - 1))
    assert json_depth_problem(ok) is None
    assert json_depth_problem([ok]) is not None


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("dtype", ["F32"], "unknown dtype ['F32']"),
        ("dtype", {"F32": 1}, "unknown dtype {'F32': 1}"),
        ("shape", [8.0, 8], "invalid shape"),
        ("shape", "8x8", "invalid shape"),
        ("data_offsets", {"begin": 0}, "invalid data_offsets"),
        ("data_offsets", [0, None], "invalid data_offsets"),
    ],
)
def test_header_field_of_the_wrong_type(ws, field, value, phrase):
    path = ws.base / SHARD1
    _rewrite_header(path, lambda doc: _first_tensor(doc).__setitem__(field, value))
    run = ws.merge()
    ws.refused(run, str(path), phrase, code=2)


@pytest.mark.parametrize("value", [3, None, ["a.safetensors"], {"f": 1}])
def test_index_weight_map_value_not_a_file_name(ws, value):
    path = ws.base / INDEX
    _edit_json(path, lambda d: d["weight_map"].__setitem__("model.norm.weight", value))
    run = ws.merge()
    ws.refused(run, str(path), "weight_map['model.norm.weight'] must be a shard file name", code=2)


def test_index_metadata_not_an_object(ws):
    path = ws.base / INDEX
    _edit_json(path, lambda d: d.__setitem__("metadata", [1, 2]))
    ws.refused(ws.merge(), str(path), "'metadata' must be a JSON object", code=2)


@pytest.mark.parametrize(
    "config, phrase",
    [
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
        ({"r": 10**400}, "r must be a positive integer"),
        ({"alpha_pattern": {"q_proj": 10**400}}, "alpha_pattern['q_proj'] must be a finite"),
        ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"rank_pattern": [["q_proj", 2]]}, "rank_pattern must map module-name patterns"),
        ({"rank_pattern": {"(?i)q_proj": 2}}, "rank_pattern key '(?i)q_proj'"),
        ({"alpha_pattern": {"q_proj(": 2}}, "alpha_pattern key 'q_proj('"),
    ],
)
def test_adapter_config_value_refused_by_key(ws, config, phrase):
    adapter = ws.adapter_dir("bad", config=config)
    run = ws.merge(adapters=[adapter])
    ws.refused(run, str(adapter / "adapter_config.json"), phrase, code=2)
    assert "0000000000000000000000000000000000000000000000000" not in run.stderr  # shortened


def test_inline_flag_refusal_says_how_to_scope_it(ws):
    adapter = ws.adapter_dir("flag", config={"alpha_pattern": {"(?i)Q_PROJ": 8}})
    run = ws.merge(adapters=[adapter])
    ws.refused(run, "(?i:...)", code=2)


def test_scoped_inline_flag_works_as_in_peft(ws):
    adapter = ws.adapter_dir("scoped", config={"alpha_pattern": {"(?i:Q_PROJ)": 8}})
    run = ws.merge(adapters=[adapter])
    assert run.code == 0, run.output


PATTERN_KEYS = ["q_proj", "(?i:Q_PROJ)", "(?i)q_proj", "layers\\.0\\..*", "q_proj(", "a)|(b", "v_"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "b"]


@pytest.mark.parametrize("key", PATTERN_KEYS)
@pytest.mark.parametrize("module", MODULES)
def test_pattern_rule_is_peft_get_pattern_key(key, module):
    """Same match, or the same re.error, as PEFT 0.21's get_pattern_key for every key."""
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    try:
        expected = get_pattern_key([key], module) == key
    except re.error:
        with pytest.raises(re.error):
            pattern_value({key: 1}, module, 0)
        return
    assert pattern_value({key: 1}, module, 0) == (1 if expected else 0)


def _snapshot(root) -> dict[str, str]:
    """The sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _merge_then(ws, fn) -> None:
    assert ws.merge().code == 0
    fn(ws.out / ".shardmerge" / "journal.json")


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda d: d.__setitem__("shards", {k: 5 for k in d["shards"]}), "is not an object"),
        (lambda d: d.__setitem__("shards", [1]), "'shards' is not an object"),
        (lambda d: d.__setitem__("status", ["running"]), "status has the wrong type"),
        (lambda d: d["shards"][SHARD1].__setitem__("size", "12"), "no whole-number size"),
        (lambda d: d["shards"][SHARD1].__setitem__("max_delta", {"lora": "x"}), "max_delta"),
        (lambda d: d.__setitem__("deep", json.loads(JUST_TOO_DEEP)), "nests deeper"),
    ],
)
def test_damaged_journal_is_refused_then_set_aside_with_overwrite(ws, damage, phrase):
    _merge_then(ws, lambda j: _edit_json(j, damage))
    (ws.out / INDEX).unlink()  # an unfinished merge, as a crash leaves it
    journal = ws.out / ".shardmerge" / "journal.json"
    before = _snapshot(ws.out)
    run = ws.merge()
    assert run.code == 5 and "Traceback" not in run.output, run.output
    for expected in (str(journal), "resume journal is damaged", phrase, "--overwrite"):
        assert expected in run.stderr, run.stderr
    assert _snapshot(ws.out) == before, "a refused resume changed OUT"
    again = ws.merge("--overwrite")
    assert again.code == 0, again.output
    assert (ws.out / INDEX).is_file()


def _verify(ws) -> tuple[int, str]:
    argv = ["verify", str(ws.out), "--base", str(ws.base), "--adapter", str(ws.adapter)]
    result = CliRunner().invoke(main, argv)
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    "record, phrase",
    [
        ({"adapters": 5}, "'adapters' must be a list of objects"),
        ({"adapters": [{"weight": "1"}]}, "adapters[0].weight must be a number"),
        ({"adapters": [], "dtype": ["bf16"]}, "'dtype' must be text"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_verify_refuses_a_provenance_record_of_the_wrong_shape(ws, record, phrase):
    assert ws.merge().code == 0
    _edit_json(ws.out / INDEX, lambda d: d["metadata"].__setitem__("shardmerge", record))
    code, stderr = _verify(ws)
    assert code == 2, stderr
    assert str(ws.out / INDEX) in stderr and phrase in stderr, stderr


def test_verify_refuses_a_damaged_journal(ws):
    assert ws.merge().code == 0
    journal = ws.out / ".shardmerge" / "journal.json"
    journal.write_text('{"format": 1, "shards": 3}')
    code, stderr = _verify(ws)
    assert code == 5 and str(journal) in stderr, stderr


def test_job_file_deeply_nested_or_odd(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("base: " + "[" * 5000 + "]" * 5000 + "\n")
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2 and str(job) in result.stderr, result.output
    job.write_text("1: x\nfoo: y\nbase: b\n")  # keys of mixed types
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2 and "is not a job field" in result.stderr, result.output
    job.write_text("base: b\noutput: o\nadapters:\n  - path: a\n    weight: " + "9" * 400 + "\n")
    result = CliRunner().invoke(main, ["run", str(job)])
    assert result.exit_code == 2 and "must be a finite number" in result.stderr, result.output
