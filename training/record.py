"""The run record in ``runs/<name>/``: checkpoints (``last.pt`` to resume, ``best.pt`` to export),
``metrics.json``, ``model.json`` (what export and the service read) and the PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from training import report
from training.data import CifarData
from training.metrics import classification_report
from training.models import Classifier, ModelConfig, count_flops, count_params, get_spec, rebuild
from utils import UserError, atomic_save_torch, atomic_write_json, device_name

if TYPE_CHECKING:
    from training.train import TrainConfig

# settings a resumed run must share with the run it continues
RESUME_KEYS = ("model", "dataset", "strategy", "head", "weights", "input_size", "seed", "val_fraction", "augment",
               "serving_aug_p", "jpeg_quality", "train_fraction", "feature_copies", "init_from", "teacher",
               "distill_weight", "distill_temperature")


def load_checkpoint(path: Path) -> dict:
    """A run checkpoint, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"corrupt checkpoint {path} ({type(e).__name__}: {e}); expected a file written "
                        "by training.train. Delete it, or retrain without --resume") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"corrupt checkpoint {path}: expected a dict with a 'model' state dict")
    return ckpt


def resume_checkpoint(run_dir: Path, config: dict, resume: bool) -> dict | None:
    """The ``last.pt`` to continue from, or None for a new run. Refuses to overwrite a run without
    ``resume``, and to continue one that was started with other settings."""
    last = run_dir / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or --name for a new one")
    ckpt = load_checkpoint(last)
    saved = ckpt.get("config", {})
    for k in RESUME_KEYS:
        if k in saved and saved[k] != config[k]:
            raise UserError(f"--resume: run {run_dir} was started with {k}={saved[k]!r}, not {config[k]!r}; "
                            "use another --name")
    return ckpt


def load_metrics(run_dir: str | Path) -> dict | None:
    """A run's ``metrics.json`` (``run_dir`` is its folder, or the file itself), or None when it has none; a
    corrupt one is a :class:`UserError`."""
    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {path} ({e}): rerun the training that wrote it") from e
    if not isinstance(metrics, dict):
        raise UserError(f"corrupt {path}: not a JSON object; rerun the training that wrote it")
    return metrics


def load_trained(run_dir: str | Path) -> tuple[Classifier, dict, Path]:
    """A finished run's model as it ships (``model.json`` + its checkpoint), in eval mode; also returns the
    ``model.json`` and the checkpoint's path."""
    run_dir = Path(run_dir)
    mj_path = run_dir / "model.json"
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not mj_path.is_file():
        raise UserError(f"{run_dir} has no model.json: is it a finished run of training.train?")
    try:
        mj = json.loads(mj_path.read_text())
        cfg = ModelConfig(mj["backbone"], mj["head"], int(mj["num_classes"]), int(mj["input_size"]),
                          int(mj.get("image_size", 32)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt {mj_path}: {type(e).__name__}: {e}") from e
    ckpt_path = run_dir / mj.get("checkpoint", "best.pt")
    ckpt = load_checkpoint(ckpt_path)
    model = rebuild(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt_path} does not match model.json ({cfg}): {e}") from e
    return model.eval(), mj, ckpt_path


def model_json(cfg: TrainConfig, mcfg: ModelConfig, data: CifarData, weights: str, test_accuracy: float) -> dict:
    """The artifact description export and the service read; ``preprocessing`` is the one definition."""
    spec = get_spec(cfg.model)
    return {
        **asdict(mcfg),
        "classes": data.classes,
        "preprocessing": {
            "image_size": mcfg.image_size,
            "input_size": mcfg.input_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "classes": data.classes,
        },
        "weights": weights,
        "strategy": cfg.strategy,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "checkpoint": "best.pt",
        "test_accuracy": test_accuracy,
        "run": cfg.run_name,
    }


def write_record(run_dir: Path, cfg: TrainConfig, model: Classifier, data: CifarData, pred: np.ndarray, *,
                 weights: str, num_train: int, num_val: int, feature_cache: bool, feature_seconds: float,
                 device: torch.device, world_size: int, history: list[dict], stopped_early: bool, best_epoch: int,
                 test_seconds: float) -> dict:
    """Write ``metrics.json``, ``model.json`` and the plots of a finished run (``pred``: its test
    predictions), then mark ``last.pt`` finished. Returns the metrics; leaves ``model`` on the CPU."""
    rep = classification_report(data.test_y, pred, data.classes)
    total, trainable = count_params(model)
    metrics = {
        "run": cfg.run_name,
        "config": asdict(cfg),
        "model": cfg.model,
        "weights": weights,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "data_source": data.source,
        "num_train": num_train, "num_val": num_val, "num_test": len(data.test_y),
        "strategy": cfg.strategy,
        "head": cfg.head,
        "input_size": model.input_size,
        "augment": list(cfg.resolved_augment()),
        "feature_cache": feature_cache,
        "feature_seconds": feature_seconds,
        "device": device_name(str(device)),
        "world_size": world_size,  # processes (torchrun), each on its own device
        "batch_size_per_process": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world_size,
        "params_total": total,
        "params_trainable": trainable,
        "flops": count_flops(model.cpu(), model.image_size),
        "history": history,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "best_epoch": best_epoch,
        "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
        "test_seconds": test_seconds,
        "test_accuracy": rep["accuracy"],
        "test_macro_precision": rep["macro_precision"],
        "test_macro_recall": rep["macro_recall"],
        "test_macro_f1": rep["macro_f1"],
        "per_class_accuracy": rep["per_class_accuracy"],
        "confusion_matrix": rep["confusion_matrix"],
        "torch": torch.__version__,
    }
    mcfg = ModelConfig(cfg.model, cfg.head, data.num_classes, model.input_size, model.image_size)
    atomic_write_json(metrics, run_dir / "metrics.json")
    atomic_write_json(model_json(cfg, mcfg, data, weights, rep["accuracy"]), run_dir / "model.json")
    title = f"{cfg.model} {cfg.strategy} on {data.name}"
    report.plot_curves(history, run_dir / "curves.png", title)
    report.plot_confusion(np.array(rep["confusion_matrix"]), data.classes, run_dir / "confusion.png",
                          f"{title}: test accuracy {rep['accuracy']:.3f}")
    report.plot_samples(data.test_x[:24], data.test_y[:24], pred[:24], data.classes, run_dir / "samples.png", title)
    last = load_checkpoint(run_dir / "last.pt")
    last["finished"] = True
    atomic_save_torch(last, run_dir / "last.pt")
    print(f"test accuracy {rep['accuracy']:.4f}, macro F1 {rep['macro_f1']:.4f}, "
          f"trained in {metrics['train_seconds']:.1f}s → {run_dir}")
    return metrics
