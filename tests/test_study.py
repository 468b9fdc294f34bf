"""The config-driven study (``benchmarks/study.py``) and the reduced ``make demo`` that CI runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.study import load_study, main
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["cpu-small", "seeds"])
def test_committed_study_configs_validate(name):
    study = load_study(ROOT / "configs" / f"{name}.yaml")
    assert study.name == name and study.experiments
    models = {e.train.model for e in study.experiments}
    assert {"resnet50", "efficientnet_b0", "alexnet", "googlenet"} <= models  # the seeds' backbones
    refs = {r for e in study.experiments for r in e.published}
    assert refs and refs <= set(study.published)
    if name == "seeds":  # the GPU config covers both datasets, both resolutions and all three strategies
        assert {e.train.dataset for e in study.experiments} == {"cifar10", "cifar100"}
        assert {32, 224} <= {e.train.input_size for e in study.experiments}
        assert {"frozen", "full", "last-90"} <= {e.train.strategy for e in study.experiments}


def write(tmp_path, cfg: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


GOOD = {"name": "t", "experiments": [{"name": "a", "model": "scratch_cnn", "weights": "none", "strategy": "full"}]}


@pytest.mark.parametrize("change, message", [
    ({"experiments": [{"name": "a", "model": "vgg99"}]}, "unknown model"),
    ({"experiments": [{"name": "a", "model": "scratch_cnn", "strategy": "half"}]}, "unknown strategy"),
    ({"experiments": [{"name": "a", "model": "scratch_cnn", "epoch": 3}]}, "unknown keys epoch"),
    ({"experiments": [{"name": "a", "model": "scratch_cnn", "published": ["999-x"]}]}, "unknown published"),
    ({"experiments": [GOOD["experiments"][0], GOOD["experiments"][0]]}, "unique"),
    ({"exports": {}}, "unknown keys exports"),
    ({"export": {"formats": ["fp32", "int4"]}}, "int4"),
    ({"export": {"formats": ["fp32"]}, "loadtest": {"formats": ["int8"]}}, "among the exported"),
    ({"experiments": []}, "non-empty"),
])
def test_bad_study_configs_are_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        load_study(write(tmp_path, {**GOOD, **change}))


def test_a_tiny_study_runs_end_to_end_and_reports(tmp_path, synthetic_dir):
    cfg = {"name": "tiny", "description": "test", "data_dir": str(synthetic_dir),
           "runs_dir": str(tmp_path / "runs"), "artifacts_dir": str(tmp_path / "artifacts"),
           "work_dir": str(tmp_path / "work"), "report": str(tmp_path / "report"),
           "defaults": {"download": False, "epochs": 1, "batch_size": 32, "threads": 2},
           "export": {"formats": ["fp32", "int8"]}, "benchmark": {"batches": [1, 4], "min_seconds": 0.2},
           "experiments": [{"name": "cnn", "model": "scratch_cnn", "weights": "none", "strategy": "full",
                            "published": ["004-scratch-cnn"]}]}
    assert main([str(write(tmp_path, cfg)), "--skip-loadtest"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    (rec,) = report["records"]
    assert rec["experiment"] == "cnn" and 0 <= rec["test_accuracy"] <= 1 and rec["train_seconds"] > 0
    assert {r["format"] for r in rec["formats"]} >= {"fp32", "int8"}
    assert rec["published"][0]["test_accuracy"] == 0.807
    md = (tmp_path / "report.md").read_text()
    assert "| cnn | scratch_cnn |" in md and "004-scratch-cnn" in md
    assert (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.heavy
def test_make_demo_small_runs_the_whole_chain(tmp_path, synthetic_dir):
    """`make demo` on configs/demo-small.yaml: train, export, bentoml build, serve the bento, load-test, report."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo-small.yaml").read_text())
    cfg["train"]["runs_dir"] = str(tmp_path / "runs")
    cfg["export"].update(run_dir=str(tmp_path / "runs" / "demo-small"), out=str(tmp_path / "artifacts"))
    cfg["loadtest"]["reports_dir"] = str(tmp_path / "reports")
    demo = write(tmp_path, cfg)
    env = {**os.environ, "CIFAR_ROOT": str(synthetic_dir), "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run(["make", "demo", f"DEMO={demo}", f"BIN={Path(sys.executable).parent}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "try:       curl" in r.stdout
    assert (tmp_path / "artifacts" / "model.int8.onnx").is_file()
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    rows = results["rows"]
    assert {row["scenario"] for row in rows} >= {"single-stream", "offline"}
    assert all(row["failures"] == 0 and row["requests"] > 0 for row in rows)
    assert (tmp_path / "reports" / "latest" / "report.md").read_text().startswith("#")
