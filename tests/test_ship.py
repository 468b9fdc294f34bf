from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.ship import comparison_config, curve, fraction_config, row, stages, to_markdown
from export.exporter import ExportConfig
from loadtest.run import LoadTestConfig
from service.config import load_config
from training.train import TrainConfig
from utils import from_mapping, yaml_defaults

ROOT = Path(__file__).resolve().parent.parent


def test_comparison_changes_one_thing():
    recipe = TrainConfig(augment="crop,flip,color,resample,jpeg", name="ship", ema_decay=0.995)
    without = comparison_config(recipe, 0.2)
    assert without.resolved_augment() == ("crop", "flip", "color")
    assert without.run_name == "ship-noserving" and without.ema_decay == recipe.ema_decay
    assert comparison_config(TrainConfig(augment="jpeg", name="x"), 0.2).resolved_augment() == ()
    added = comparison_config(without, 0.2)
    assert added.resolved_augment() == recipe.resolved_augment() and added.serving_aug_p == 0.2
    assert added.run_name == "ship-noserving-serving" and added.lr == recipe.lr
    taught = replace(recipe, teacher="runs/base", init_from="runs/base")  # a stage with a teacher: it alone goes
    assert comparison_config(taught, 0.2) == replace(taught, teacher=None, name="ship-noteacher")


def test_row_reports_the_epoch_selected_on_validation_loss():
    history = [{"epoch": 1, "val_loss": 0.5, "val_acc": 0.80}, {"epoch": 2, "val_loss": 0.4, "val_acc": 0.85},
               {"epoch": 3, "val_loss": 0.45, "val_acc": 0.86}]  # the best accuracy is not the best loss
    metrics = {"run": "r", "model": "m", "weights": "w", "strategy": "full", "input_size": 224, "augment": [],
               "history": history, "best_epoch": 2, "test_accuracy": 0.9, "test_macro_f1": 0.9,
               "train_seconds": 10.0, "num_train": 1, "num_val": 1, "num_test": 1, "device": "cpu",
               "config": {"batch_size": 64, "lr": 1e-3, "label_smoothing": 0.1}}
    manifest = {"artifacts": {"int8": {"accuracy": 0.89, "accuracy_delta": -0.01}}}
    r = row(metrics, manifest)
    assert (r["best_epoch"], r["val_accuracy"], r["val_loss"]) == (2, 0.85, 0.4)
    assert r["epochs"] == 3 and r["int8_delta"] == -0.01


def test_learning_curve_runs_keep_the_steps_and_report_their_gaps():
    shipped = TrainConfig(name="ship", epochs=8, teacher="runs/base", init_from="runs/base")
    quarter = fraction_config(shipped, 0.25)
    assert (quarter.run_name, quarter.epochs, quarter.train_fraction) == ("ship-frac25", 32, 0.25)
    assert replace(quarter, name="ship", epochs=8, train_fraction=1.0) == shipped  # nothing else changes
    rows = [{"run": n, "num_train": k, "epochs": e, "augment": ["jpeg"], "serving_aug_p": 0.8, "teacher": None,
             "init_from": None, "jpeg_quality": [50, 95], "train_fraction": f, "input_size": 160, "best_epoch": 1,
             "val_accuracy": 0.9, "test_accuracy": 0.9, "onnx_fp32_accuracy": 0.9, "int8_accuracy": None,
             "train_seconds": 1.0, "device": "cpu", "num_val": 10, "num_test": 10}
            for n, k, e, f in (("ship", 400, 8, 1.0), ("ship-frac25", 100, 32, 0.25), ("other", 400, 8, 1.0))]
    rob = [{"run": n, "format": "fp32", "split": sp, "variant": v, "accuracy": 0.9 + d, "delta_vs_png32": d}
           for n, gap in (("ship", -0.05), ("ship-frac25", -0.08), ("other", -0.5))
           for sp in ("val", "test") for v, d in (("png32", 0.0), ("jpeg32_q75", gap), ("jpeg256_q90", gap / 2))]
    points = curve(rows, rob, "ship")
    assert [(p["split"], p["num_train"]) for p in points] == [("val", 100), ("val", 400), ("test", 100),
                                                              ("test", 400)]
    assert points[0]["jpeg32_q75"] == -0.08 and points[1]["jpeg256_q90"] == -0.025
    md = to_markdown(rows, rob, "ship")
    assert "| val | 100 | 32 | 90.00 | -8.00 | -4.00 |" in md and "25% of the images" in md
    assert curve(rows[2:], rob, "ship") == []  # no curve without the shipped stage and a fraction of it


@pytest.mark.parametrize("name", ["demo", "demo-small", "lite0-ship"])
def test_every_stage_section_of_a_make_config_is_valid(name):
    """`make demo DEMO=…` / `make ship` read one section per stage: each must load as its stage does."""
    path = ROOT / "configs" / f"{name}.yaml"
    for cls, section in ((TrainConfig, "train"), (ExportConfig, "export"), (LoadTestConfig, "loadtest")):
        from_mapping(cls, yaml_defaults(path, cls, section), str(path))  # unknown keys and bad values refused
    recipe = stages(str(path), "data")
    assert recipe[-1] == from_mapping(TrainConfig, {**yaml_defaults(path, TrainConfig, "train"), "data_dir": "data",
                                                    "download": False})
    for earlier in recipe[:-1]:  # a stage that ships from a base: the base is trained first, by `make ship` too
        assert {recipe[-1].teacher, recipe[-1].init_from} & {str(Path(earlier.runs_dir) / earlier.run_name)}
        assert "--section base" in (ROOT / "Makefile").read_text()
    export = yaml_defaults(path, ExportConfig, "export")
    assert export["run_dir"] == str(Path(recipe[-1].runs_dir) / recipe[-1].run_name)  # what ships is exported
    service = load_config({"CIFAR_DEPLOY_CONFIG": str(path)})
    assert service.models and all(m.tag for m in service.models)
