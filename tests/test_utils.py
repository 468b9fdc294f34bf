"""The shared helpers: atomic writes, the generated CLI with YAML defaults, model references, exit codes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pytest
import yaml

from utils import (
    ModelRef,
    UserError,
    atomic_path,
    atomic_write,
    atomic_write_json,
    config_parser,
    from_mapping,
    parse_config,
    run_cli,
    sha256_file,
)


@dataclass
class Options:
    run_dir: str = field(metadata={"help": "a run"})
    formats: list[str] = field(default_factory=lambda: ["fp32", "int8"], metadata={"choices": ["fp32", "int8"]})
    batches: list[int] = field(default_factory=lambda: [1])
    limit: int | None = None
    amp: bool = True
    lr: float = 1e-3


def parse(argv, **kw):
    return parse_config(Options, config_parser(Options, "prog", "doc", positional=("run_dir",)), argv, **kw)[0]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_json({"v": 1}, path)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and sha256_file(path) == hashlib.sha256(b"new").hexdigest()


def test_the_cli_is_generated_from_the_dataclass():
    assert parse(["runs/a"]) == Options("runs/a")
    cfg = parse(["runs/a", "--formats", "int8", "--batches", "1", "32", "--limit", "5", "--no-amp", "--lr", "0.1"])
    assert cfg == Options("runs/a", ["int8"], [1, 32], 5, False, 0.1)
    with pytest.raises(SystemExit):
        parse(["runs/a", "--formats", "fp64"])
    with pytest.raises(SystemExit):
        parse([])  # the required field is missing


def test_yaml_sets_defaults_and_the_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"export": {"run_dir": "runs/y", "limit": 3, "amp": False}, "train": {"x": 1}}))
    assert parse(["--config", str(path)], section="export") == Options("runs/y", limit=3, amp=False)
    assert parse(["--config", str(path), "runs/z", "--limit", "4"], section="export").limit == 4
    assert parse(["--config", str(path), "runs/z"], section="loadtest") == Options("runs/z")  # no such section
    path.write_text(yaml.safe_dump({"run_dir": "r", "limt": 3}))
    with pytest.raises(UserError, match="unknown options limt"):
        parse(["--config", str(path)])
    with pytest.raises(UserError, match="not found"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_nested_configs_refuse_unknown_keys():
    assert from_mapping(Options, {"run_dir": "r", "lr": 0.5}).lr == 0.5
    with pytest.raises(UserError, match="benchmark: unknown keys batch"):
        from_mapping(Options, {"run_dir": "r", "batch": 2}, "benchmark")


def test_model_references_have_one_shape_per_medium():
    assert ModelRef.parse("lite0=demo-int8:latest") == ModelRef("lite0", "demo-int8:latest", "onnxruntime")
    assert ModelRef.parse("g=t:1@onnxruntime-cuda").backend == "onnxruntime-cuda"
    assert ModelRef.parse({"name": "g", "tag": "t:1", "backend": "tensorrt"}) == ModelRef("g", "t:1", "tensorrt")
    for bad in ("lite0", "=tag", {"name": "a"}, {"name": "a", "tag": "t", "gpu": 1}, "../x=t", "a=t/x:1", "a=t:../1",
                ".hidden=t", "a=" + "t" * 64):
        with pytest.raises(UserError):
            ModelRef.parse(bad)


def test_cli_exit_codes(capsys):
    def fails():
        raise UserError("no such run")

    assert run_cli(fails) == 2 and capsys.readouterr().err == "error: no such run\n"
    assert run_cli(lambda: 1) == 1
    assert run_cli(lambda: ["rows"]) == 0
