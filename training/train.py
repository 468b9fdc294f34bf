"""Fine-tune a registry backbone on CIFAR: ``python -m training.train --model resnet50 --strategy frozen``.

Each run writes ``runs/<name>/``: ``last.pt`` and ``best.pt`` (atomic), ``metrics.json``,
``model.json`` (what export and the service read) and PNG plots. ``--resume`` continues after an
interruption, losing at most the epoch in progress.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training import report
from training.data import CifarData, ImageArrayDataset, load_dataset, normalize, parse_augment, stratified_split
from training.errors import UserError
from training.metrics import classification_report
from training.models import (
    HEADS,
    WEIGHTS_CHOICES,
    Classifier,
    ModelConfig,
    count_flops,
    count_params,
    get_model,
    get_spec,
    list_models,
)
from training.strategies import apply_strategy, parse_strategy, train_mode

MODEL_JSON_FORMAT = "cifar-deploy/model@1"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("plateau", "cosine", "none")


@dataclass
class TrainConfig:
    model: str = "efficientnet_lite0"
    dataset: str = "cifar10"
    data_dir: str | None = None
    strategy: str = "frozen"
    head: str = "linear"
    weights: str = "imagenet"
    weights_file: str | None = None
    input_size: int | None = None
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "plateau"
    plateau_patience: int = 2
    early_stopping: int = 0
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    augment: str | None = None
    cache_features: str = "auto"
    phase1_epochs: int | None = None
    phase2_lr_scale: float = 0.1
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    download: bool = True
    synthetic_fallback: bool = False

    def validate(self) -> None:
        get_spec(self.model)
        parse_strategy(self.strategy)
        if self.head not in HEADS:
            raise UserError(f"unknown head {self.head!r}; valid: {', '.join(HEADS)}")
        if self.weights not in WEIGHTS_CHOICES:
            raise UserError(f"unknown weights {self.weights!r}; valid: {', '.join(WEIGHTS_CHOICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.cache_features not in ("auto", "on", "off"):
            raise UserError("--cache-features must be auto, on or off")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs, --batch-size and --lr must be positive")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.dataset}-{self.strategy}"

    def resolved_augment(self) -> tuple[str, ...]:
        """Default: no augmentation for ``frozen`` (so features can be cached), crop+flip otherwise."""
        if self.augment is None:
            return () if self.strategy == "frozen" else ("crop", "flip")
        return parse_augment(self.augment)

    def use_cache(self) -> bool:
        frozen = self.strategy == "frozen"
        augment = bool(self.resolved_augment())
        if self.cache_features == "on":
            if not frozen or augment:
                raise UserError("--cache-features on needs --strategy frozen and --augment none "
                                "(cached features cannot see training-time augmentation)")
            return True
        return self.cache_features == "auto" and frozen and not augment


# --------------------------------------------------------------------------- helpers

def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A run checkpoint, with a clear error when it is missing or unreadable."""
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def batches_of(n: int, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Index batches for one epoch (shuffled when a generator is given); a trailing batch of one
    image is dropped so BatchNorm heads never see a single sample."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if generator is not None and len(out) > 1 and len(out[-1]) == 1:
        out.pop()
    return out


@torch.no_grad()
def predict_logits(model: Classifier, x_uint8: np.ndarray, mean, std, device: torch.device,
                   batch_size: int = 128, amp: bool = False, desc: str | None = None,
                   features_only: bool = False) -> torch.Tensor:
    """Logits (or backbone features) of uint8 NHWC images, in eval mode."""
    model.eval()
    outs = []
    x_all = torch.from_numpy(x_uint8)
    steps = range(0, len(x_uint8), batch_size)
    for i in tqdm(steps, desc=desc, leave=False, disable=True if desc is None else None):
        x = normalize(x_all[i:i + batch_size], mean, std).to(device)
        with _autocast(device, amp):
            y = model.features(x) if features_only else model(x)
        outs.append(y.float().cpu())
    dim = model.feat_dim if features_only else model.head(torch.zeros(2, model.feat_dim, device=device)).shape[1]
    return torch.cat(outs) if outs else torch.zeros(0, dim)


# --------------------------------------------------------------------------- the run

class Trainer:
    """One training run; ``run()`` returns the metrics dict also written to ``metrics.json``."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.strategy = parse_strategy(cfg.strategy)
        self.run_dir = Path(cfg.runs_dir) / cfg.run_name
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

    # -- setup
    def _load_data(self) -> CifarData:
        try:
            data = load_dataset(self.cfg.dataset, self.cfg.data_dir, download=self.cfg.download)
        except UserError as e:
            if not self.cfg.synthetic_fallback or self.cfg.dataset.startswith("synthetic-"):
                raise
            print(f"WARNING: {e}\nWARNING: --synthetic-fallback: using synthetic-{self.cfg.dataset} instead.",
                  file=sys.stderr)
            data = load_dataset(f"synthetic-{self.cfg.dataset}", self.cfg.data_dir)
        if self.cfg.limit_train:
            data.train_x, data.train_y = data.train_x[: self.cfg.limit_train], data.train_y[: self.cfg.limit_train]
        if self.cfg.limit_test:
            data.test_x, data.test_y = data.test_x[: self.cfg.limit_test], data.test_y[: self.cfg.limit_test]
        if data.synthetic:
            print(f"WARNING: {data.name} is SYNTHETIC data (coloured shapes), not CIFAR; "
                  "its accuracy says nothing about real images.", file=sys.stderr)
        return data

    def _optimizer(self, phase: str) -> tuple[torch.optim.Optimizer, object]:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = cfg.lr * (cfg.phase2_lr_scale if self.strategy.kind == "two-phase" and phase == "full" else 1.0)
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        if cfg.scheduler == "plateau":  # halve on a validation-loss plateau (seed 000)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=cfg.plateau_patience)
        elif cfg.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self._phase_len(phase)))
        else:
            sched = None
        return opt, sched

    def _phase_len(self, phase: str) -> int:
        if self.strategy.kind != "two-phase":
            return self.cfg.epochs
        return self.phase1 if phase == "frozen" else self.cfg.epochs - self.phase1

    # -- epochs
    def _train_epoch(self, epoch: int, gen: torch.Generator) -> tuple[float, float]:
        cfg, model = self.cfg, self.model
        train_mode(model)
        total, correct, loss_sum = 0, 0, 0.0
        if self.cached:
            feats, labels = self.features["train"], torch.from_numpy(self.train_y)
            batches = batches_of(len(labels), cfg.batch_size, gen)
            it = ((feats[b], labels[b]) for b in batches)
        else:
            batches = batches_of(len(self.train_ds), cfg.batch_size, gen)
            it = DataLoader(self.train_ds, batch_sampler=batches, num_workers=0)
        bar = tqdm(it, total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs} train", leave=False, disable=None)
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            if self.device.type == "cuda" and not self.cached:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device, cfg.amp):
                logits = model.head(x) if self.cached else model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        return loss_sum / max(total, 1), correct / max(total, 1)

    def _logits(self, split: str) -> torch.Tensor:
        if self.cached:
            self.model.eval()
            with torch.no_grad():
                return self.model.head(self.features[split].to(self.device)).float().cpu()
        x = {"val": self.val_x, "test": self.data.test_x}[split]
        return predict_logits(self.model, x, self.mean, self.std, self.device, amp=self.cfg.amp,
                              desc=f"{split} eval")

    def _evaluate(self, split: str, y: np.ndarray) -> tuple[float, float, np.ndarray]:
        if len(y) == 0:
            return float("nan"), float("nan"), np.zeros(0, dtype=np.int64)
        logits = self._logits(split)
        yt = torch.from_numpy(y)
        loss = F.cross_entropy(logits, yt).item()
        pred = logits.argmax(1)
        return loss, (pred == yt).float().mean().item(), pred.numpy()

    def _compute_features(self) -> dict[str, torch.Tensor]:
        """Backbone features of every split, computed once (the backbone is frozen) and kept in the run."""
        path = self.run_dir / "features.pt"
        key = {"weights": self.weights_source, "n": [len(self.train_y), len(self.val_y), len(self.data.test_y)],
               "input_size": self.model.input_size}
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == json.dumps(key):
                    self.feature_seconds = float(saved.get("seconds", 0.0))
                    return saved["features"]
            except Exception:
                pass  # recompute below
        feats, t0 = {}, time.perf_counter()
        for split, x in (("train", self.train_x), ("val", self.val_x), ("test", self.data.test_x)):
            feats[split] = predict_logits(self.model, x, self.mean, self.std, self.device, amp=self.cfg.amp,
                                          desc=f"features {split}", features_only=True)
        self.feature_seconds = time.perf_counter() - t0
        atomic_save({"key": json.dumps(key), "features": feats, "seconds": self.feature_seconds}, path)
        return feats

    # -- main
    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last_path, best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        metrics_path = self.run_dir / "metrics.json"
        ckpt = None
        if cfg.resume and last_path.exists():
            ckpt = load_checkpoint(last_path)
            saved = ckpt.get("config", {})
            for k in ("model", "dataset", "strategy", "head", "weights", "input_size", "seed", "val_fraction"):
                if k in saved and saved[k] != getattr(cfg, k):
                    raise UserError(f"--resume: run {self.run_dir} was started with {k}={saved[k]!r}, "
                                    f"not {getattr(cfg, k)!r}; use another --name")
            if ckpt.get("finished") and metrics_path.exists():
                print(f"{self.run_dir}: already complete (use another --name to train again)")
                return json.loads(metrics_path.read_text())
        elif last_path.exists() and not cfg.resume:
            raise UserError(f"{self.run_dir} already holds a run; pass --resume to continue it or --name for a new one")

        torch.manual_seed(cfg.seed)
        self.data = data = self._load_data()
        spec = get_spec(cfg.model)
        self.mean, self.std = spec.mean, spec.std
        self.model, self.weights_source = get_model(cfg.model, data.num_classes, cfg.head, cfg.weights,
                                                    cfg.weights_file, cfg.input_size)
        if cfg.weights == "none":
            print(f"NOTE: {cfg.model} starts from random init (--weights none), on purpose.", file=sys.stderr)
        print(f"{cfg.model}: weights = {self.weights_source}")
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        tr, va = stratified_split(data.train_y, cfg.val_fraction, cfg.seed)
        self.train_x, self.train_y = data.train_x[tr], data.train_y[tr]
        self.val_x, self.val_y = data.train_x[va], data.train_y[va]
        augment = cfg.resolved_augment()
        self.train_ds = ImageArrayDataset(self.train_x, self.train_y, self.mean, self.std, augment)
        self.cached = cfg.use_cache()
        self.phase1 = cfg.phase1_epochs if cfg.phase1_epochs is not None else max(1, cfg.epochs // 2)

        history: list[dict] = []
        start_epoch, best_val, bad_epochs, phase = 0, math.inf, 0, None
        gen = torch.Generator().manual_seed(cfg.seed)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            history, start_epoch = ckpt["history"], ckpt["epoch"]
            best_val, bad_epochs = ckpt["best_val_loss"], ckpt["bad_epochs"]
            gen.set_state(ckpt["generator"])
            print(f"resuming {self.run_dir} after epoch {start_epoch}")
        self.feature_seconds = 0.0
        if self.cached:
            print("frozen backbone: computing its features once and training the head on them (feature cache)")
            self.features = self._compute_features()

        # elapsed_s counts the one-off feature extraction too: it is part of the training cost
        t_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else self.feature_seconds)
        stopped_early = False
        for epoch in range(start_epoch, cfg.epochs):
            current = self.strategy.phase(epoch, self.phase1)
            if current != phase:
                apply_strategy(self.model, current, self.strategy.n)
                self.opt, self.sched = self._optimizer(current)
                if ckpt is not None and ckpt.get("phase") == current and epoch == start_epoch:
                    self.opt.load_state_dict(ckpt["optimizer"])
                    if self.sched is not None and ckpt.get("scheduler"):
                        self.sched.load_state_dict(ckpt["scheduler"])
                phase = current
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch, gen)
            val_loss, val_acc, _ = self._evaluate("val", self.val_y)
            monitor = val_loss if not math.isnan(val_loss) else train_loss
            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.sched.step(monitor)
            elif self.sched is not None:
                self.sched.step()
            row = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": self.opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0, "elapsed_s": time.perf_counter() - t_start}
            history.append(row)
            print(f"epoch {epoch + 1}/{cfg.epochs} [{phase}] train loss {train_loss:.4f} acc {train_acc:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f} | lr {row['lr']:.2e} | {row['seconds']:.1f}s")
            if monitor < best_val:
                best_val, bad_epochs = monitor, 0
                atomic_save({"model": self.model.state_dict(), "epoch": epoch + 1, "val_loss": monitor}, best_path)
            else:
                bad_epochs += 1
            stopped_early = bool(cfg.early_stopping and bad_epochs >= cfg.early_stopping)
            atomic_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "scheduler": self.sched.state_dict() if self.sched is not None else None,
                         "epoch": epoch + 1, "phase": phase, "history": history, "best_val_loss": best_val,
                         "bad_epochs": bad_epochs, "generator": gen.get_state(), "config": asdict(cfg),
                         "finished": False}, last_path)
            if stopped_early:
                print(f"early stopping: validation loss has not improved for {bad_epochs} epochs")
                break
        train_seconds = history[-1]["elapsed_s"] if history else 0.0
        return self._finish(history, train_seconds, stopped_early, last_path, best_path, finished=True)

    def _finish(self, history, train_seconds, stopped_early, last_path, best_path, finished) -> dict:
        cfg, data, model = self.cfg, self.data, self.model
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        t0 = time.perf_counter()
        _, _, pred = self._evaluate("test", data.test_y)
        test_seconds = time.perf_counter() - t0
        rep = classification_report(data.test_y, pred, data.classes)
        apply_strategy(model, self.strategy.phase(cfg.epochs - 1, self.phase1), self.strategy.n)
        total, trainable = count_params(model)
        title = f"{cfg.model} {cfg.strategy} on {data.name}"
        mcfg = ModelConfig(cfg.model, cfg.head, data.num_classes, model.input_size, model.image_size)
        metrics = {
            "run": cfg.run_name,
            "config": asdict(cfg),
            "model": cfg.model,
            "weights": self.weights_source,
            "dataset": data.name,
            "synthetic": data.synthetic,
            "data_source": data.source,
            "num_train": len(self.train_y), "num_val": len(self.val_y), "num_test": len(data.test_y),
            "strategy": cfg.strategy,
            "head": cfg.head,
            "input_size": model.input_size,
            "augment": list(cfg.resolved_augment()),
            "feature_cache": self.cached,
            "feature_seconds": self.feature_seconds,
            "device": device_name(self.device),
            "params_total": total,
            "params_trainable": trainable,
            "flops": count_flops(model.cpu(), model.image_size),
            "history": history,
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "best_epoch": best["epoch"],
            "train_seconds": train_seconds,
            "test_seconds": test_seconds,
            "test_accuracy": rep["accuracy"],
            "test_macro_precision": rep["macro_precision"],
            "test_macro_recall": rep["macro_recall"],
            "test_macro_f1": rep["macro_f1"],
            "per_class_accuracy": rep["per_class_accuracy"],
            "confusion_matrix": rep["confusion_matrix"],
            "torch": torch.__version__,
        }
        model.to(self.device)
        atomic_write_json(metrics, self.run_dir / "metrics.json")
        atomic_write_json(model_json(mcfg, data, self.mean, self.std, self.weights_source, cfg, rep["accuracy"]),
                          self.run_dir / "model.json")
        report.plot_curves(history, self.run_dir / "curves.png", title)
        report.plot_confusion(np.array(rep["confusion_matrix"]), data.classes, self.run_dir / "confusion.png",
                              f"{title}: test accuracy {rep['accuracy']:.3f}")
        report.plot_samples(data.test_x[:24], data.test_y[:24], pred[:24], data.classes,
                            self.run_dir / "samples.png", title)
        ckpt = load_checkpoint(last_path)
        ckpt["finished"] = finished
        atomic_save(ckpt, last_path)
        print(f"test accuracy {rep['accuracy']:.4f}, macro F1 {rep['macro_f1']:.4f}, "
              f"trained in {train_seconds:.1f}s → {self.run_dir}")
        return metrics


def model_json(mcfg: ModelConfig, data: CifarData, mean, std, weights: str, cfg: TrainConfig,
               test_accuracy: float) -> dict:
    """The artifact description export and the service read; ``preprocessing`` is the one definition."""
    return {
        "format": MODEL_JSON_FORMAT,
        **asdict(mcfg),
        "classes": data.classes,
        "preprocessing": {
            "image_size": mcfg.image_size,
            "input_size": mcfg.input_size,
            "mean": list(mean),
            "std": list(std),
            "classes": data.classes,
            "resize": "bilinear",
            "layout": "NCHW",
        },
        "weights": weights,
        "strategy": cfg.strategy,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "checkpoint": "best.pt",
        "test_accuracy": test_accuracy,
        "run": cfg.run_name,
    }


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--list-models", action="store_true", help="list the registry and exit")
    p.add_argument("--model", default=d.model, help="backbone (see --list-models)")
    p.add_argument("--dataset", default=d.dataset,
                   help="cifar10, cifar100, cifar100-coarse, or synthetic-cifar10/100 (offline stand-in)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ (default: $CIFAR_ROOT or ./data)")
    p.add_argument("--strategy", default=d.strategy, help="frozen, full, last-N (e.g. last-90) or two-phase")
    p.add_argument("--head", default=d.head, choices=HEADS)
    p.add_argument("--weights", default=d.weights, help="imagenet or none (random init, on purpose)")
    p.add_argument("--weights-file", default=None, help="local ImageNet state dict for the backbone")
    p.add_argument("--input-size", type=int, default=None, help="network resolution (default: the backbone's)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", default=d.optimizer, help="sgd, adam or adamw")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--scheduler", default=d.scheduler, help="plateau (halve on plateau), cosine or none")
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience)
    p.add_argument("--early-stopping", type=int, default=d.early_stopping, metavar="PATIENCE",
                   help="stop after this many epochs without a better validation loss (0: off)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--augment", default=None,
                   help="comma list of crop, flip, rotate, zoom, or none "
                        "(default: none for frozen, crop,flip otherwise)")
    p.add_argument("--cache-features", default=d.cache_features, help="auto, on or off (frozen backbones only)")
    p.add_argument("--phase1-epochs", type=int, default=None, help="two-phase: frozen epochs (default: half)")
    p.add_argument("--phase2-lr-scale", type=float, default=d.phase2_lr_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on CUDA")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--name", default=None, help="run folder name (default: model-dataset-strategy)")
    p.add_argument("--runs-dir", default=d.runs_dir)
    p.add_argument("--resume", action="store_true", help="continue the run in runs/<name>/ (no-op when finished)")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--synthetic-fallback", action="store_true",
                   help="when the dataset can be neither found nor downloaded, train on the synthetic stand-in "
                        "(loudly labelled) instead of failing")
    return p


def print_models() -> None:
    print(f"{'model':20} {'input':>5} {'params':>10} {'GFLOPs':>7}  pretrained weights")
    for name in list_models():
        spec = get_spec(name)
        model, _ = get_model(name, 10, weights="none")
        total, _ = count_params(model)
        flops = count_flops(model)
        offline = " (offline)" if spec.offline else ""
        print(f"{name:20} {spec.input_size:>5} {total / 1e6:>9.2f}M {flops / 1e9:>7.2f}  {spec.pretrained}{offline}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_models:
            print_models()
            return 0
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in known})
        Trainer(cfg).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last finished epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
