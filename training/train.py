"""Fine-tune a registry backbone on CIFAR: ``python -m training.train --model resnet50 --strategy frozen``.

Each run writes ``runs/<name>/``: ``last.pt`` and ``best.pt`` (atomic), ``metrics.json``,
``model.json`` (what export and the service read) and PNG plots. ``--resume`` continues after an
interruption, losing at most the epoch in progress.

``torchrun --nproc-per-node N -m training.train …`` trains with DistributedDataParallel on N processes
(and ``--nnodes`` for several hosts); ``--batch-size`` is then per process.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing import errors
from torch.utils.data import DataLoader

from training import distributed, engine, record
from training.data import (
    JPEG_QUALITY,
    CifarData,
    EpochBatches,
    ImageArrayDataset,
    check_jpeg_quality,
    load_dataset,
    parse_augment,
    stratified_split,
)
from training.features import feature_datasets
from training.models import HEADS, WEIGHTS_CHOICES, count_flops, count_params, get_model, get_spec, list_models
from training.strategies import Strategy, apply_strategy, parse_strategy
from utils import UserError, atomic_save_torch, config_parser, parse_config, run_cli

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("plateau", "cosine", "none")
CACHE_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Every option of a training run; ``python -m training.train --help`` is generated from it."""

    model: str = field(default="efficientnet_lite0", metadata={"help": "backbone (see --list-models)"})
    dataset: str = field(default="cifar10", metadata={
        "help": "cifar10, cifar100, cifar100-coarse, or synthetic-cifar10/100 (offline stand-in)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder holding cifar-10-batches-py/ (default: $CIFAR_ROOT or ./data)"})
    strategy: str = field(default="frozen", metadata={"help": "frozen, full, last-N (e.g. last-90) or two-phase"})
    head: str = field(default="linear", metadata={"help": "classification head", "choices": HEADS})
    weights: str = field(default="imagenet", metadata={
        "help": "ImageNet-pretrained backbone, or none (random init, on purpose)", "choices": WEIGHTS_CHOICES})
    weights_file: str | None = field(default=None, metadata={"help": "local ImageNet state dict for the backbone"})
    input_size: int | None = field(default=None, metadata={"help": "network resolution (default: the backbone's)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={
        "help": "images per training batch and process (torchrun: the global batch is this × the world size)"})
    optimizer: str = field(default="adamw", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    scheduler: str = field(default="plateau", metadata={
        "help": "plateau (halve on a validation-loss plateau), cosine or none", "choices": SCHEDULERS})
    plateau_patience: int = field(default=2, metadata={
        "help": "plateau: epochs without a better validation loss before the learning rate halves"})
    early_stopping: int = field(default=0, metadata={
        "help": "stop after this many epochs without a better validation loss (0: off)", "metavar": "PATIENCE"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the training loss"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "fraction of each class's training images held out for validation"})
    augment: str | None = field(default=None, metadata={
        "help": "comma list of crop, flip, rotate, zoom, color, resample, jpeg (the last two imitate an upload's "
                "trip to the service: docs/training.md), or none (default: none for frozen, crop,flip otherwise)"})
    serving_aug_p: float = field(default=0.5, metadata={
        "help": "resample, jpeg: the probability of each (0.5: three images in four take at least one)"})
    jpeg_quality: list[int] = field(default_factory=lambda: list(JPEG_QUALITY), metadata={
        "help": "jpeg (and resample's JPEG step): the range LOW HIGH its quality is drawn from, uniformly",
        "metavar": "Q"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from a finished run's shipped weights (its folder): a second stage that fine-tunes it further"})
    teacher: str | None = field(default=None, metadata={
        "help": "a finished run (its folder) whose predictions on each clean training image are the soft targets of "
                "the student's augmented one (with resample,jpeg: robustness to uploads without forgetting clean "
                "images; docs/training.md)"})
    distill_weight: float = field(default=0.5, metadata={
        "help": "teacher: the weight of the distillation loss (the cross-entropy takes the rest)"})
    distill_temperature: float = field(default=2.0, metadata={"help": "teacher: the softmax temperature"})
    cache_features: str = field(default="auto", metadata={
        "help": "frozen backbone without augmentation (or with --feature-copies): train the head on features "
                "computed once", "choices": CACHE_CHOICES})
    feature_copies: int = field(default=0, metadata={
        "help": "frozen backbone with augmentation: cache this many augmented copies of each training image beside "
                "its clean one, drawn once, instead of running the backbone every epoch (0: no cache)"})
    phase1_epochs: int | None = field(default=None, metadata={"help": "two-phase: frozen epochs (default: half)"})
    phase2_lr_scale: float = field(default=0.1, metadata={"help": "two-phase: learning-rate factor of the full phase"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, validation split and batch order"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: torch's)"})
    device: str = field(default="auto", metadata={
        "help": "auto, cpu, cuda, cuda:1 … (torchrun: each process takes the GPU of its LOCAL_RANK)"})
    dist_timeout: float = field(default=600, metadata={
        "help": "torchrun: seconds a process waits for the others before the job fails (a hung process)"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    cpu_amp: bool = field(default=False, metadata={
        "help": "bf16 autocast on the CPU too: about 1.7x faster on CPUs with AMX or AVX512-BF16, slower on others; "
                "training steps only, validation and test stay float32 as the exported model is"})
    ema_decay: float = field(default=0.0, metadata={
        "help": "keep an exponential moving average of the weights (e.g. 0.998) and validate, select and ship it; "
                "0: off"})
    limit_train: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    limit_test: int | None = field(default=None, metadata={"help": "use only the first N test images"})
    train_fraction: float = field(default=1.0, metadata={
        "help": "train on this fraction of each class's training images, drawn after the validation split, which "
                "stays whole: a learning curve's points are compared on the same validation images"})
    name: str | None = field(default=None, metadata={"help": "run folder name (default: model-dataset-strategy)"})
    runs_dir: str = field(default="runs", metadata={"help": "folder of the run folders"})
    resume: bool = field(default=False, metadata={"help": "continue the run in runs/<name>/ (no-op when finished)"})
    download: bool = field(default=True, metadata={"help": "download the dataset when it is missing"})
    synthetic_fallback: bool = field(default=False, metadata={
        "help": "when the dataset can be neither found nor downloaded, train on the synthetic stand-in "
                "(loudly labelled) instead of failing"})

    def validate(self) -> None:
        get_spec(self.model)
        parse_strategy(self.strategy)
        for name, valid in (("head", HEADS), ("weights", WEIGHTS_CHOICES), ("optimizer", OPTIMIZERS),
                            ("scheduler", SCHEDULERS), ("cache_features", CACHE_CHOICES)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs, --batch-size and --lr must be positive")
        if not 0.0 <= self.serving_aug_p <= 1.0:
            raise UserError(f"--serving-aug-p must be in [0, 1], got {self.serving_aug_p}")
        check_jpeg_quality(self.jpeg_quality)
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.feature_copies < 0 or (self.feature_copies and not self.resolved_augment()):
            raise UserError("--feature-copies needs --augment (copies of what?) and must be 0 or more")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature <= 0:
            raise UserError("--distill-weight must be in [0, 1] and --distill-temperature positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")

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
        augment = bool(self.resolved_augment()) and not self.feature_copies
        if self.cache_features == "on":
            if not frozen or augment or self.teacher:
                raise UserError("--cache-features on needs --strategy frozen, no --teacher and --augment none "
                                "or --feature-copies (cached features cannot see augmentation drawn each epoch)")
            return True
        return self.cache_features == "auto" and frozen and not augment and not self.teacher


def load_data(cfg: TrainConfig) -> CifarData:
    """The dataset (or, with ``synthetic_fallback``, its loudly labelled synthetic stand-in), limited."""
    try:
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    except UserError as e:
        if not cfg.synthetic_fallback or cfg.dataset.startswith("synthetic-"):
            raise
        print(f"WARNING: {e}\nWARNING: --synthetic-fallback: using synthetic-{cfg.dataset} instead.", file=sys.stderr)
        data = load_dataset(f"synthetic-{cfg.dataset}", cfg.data_dir)
    if cfg.limit_train:
        data.train_x, data.train_y = data.train_x[: cfg.limit_train], data.train_y[: cfg.limit_train]
    if cfg.limit_test:
        data.test_x, data.test_y = data.test_x[: cfg.limit_test], data.test_y[: cfg.limit_test]
    if data.synthetic:
        print(f"WARNING: {data.name} is SYNTHETIC data (coloured shapes), not CIFAR; "
              "its accuracy says nothing about real images.", file=sys.stderr)
    return data


def trained_run(cfg: TrainConfig, run_dir: str, role: str) -> nn.Module:
    """A finished run's model, for ``--init-from`` or ``--teacher``. It must have trained on this run's training
    images only (same dataset, validation split and limit), so that this run's validation stays unseen, and
    take the same input (image size, normalisation)."""
    model, mj, _ = record.load_trained(run_dir)
    metrics = record.load_metrics(run_dir)
    if metrics is None:
        raise UserError(f"--{role} {run_dir}: no metrics.json (not a finished run)")
    theirs = metrics.get("config")
    if not isinstance(theirs, dict):
        raise UserError(f"--{role} {run_dir}: corrupt {Path(run_dir) / 'metrics.json'}: it records no config")
    for key in ("dataset", "val_fraction", "seed", "limit_train"):
        if theirs.get(key) != getattr(cfg, key):
            raise UserError(f"--{role} {run_dir} trained with {key}={theirs.get(key)!r}, this run has "
                            f"{getattr(cfg, key)!r}: its training images would include this run's validation ones")
    spec, pre = get_spec(cfg.model), mj["preprocessing"]
    if (list(pre["mean"]), list(pre["std"])) != (list(spec.mean), list(spec.std)):
        raise UserError(f"--{role} {run_dir}: its input normalisation differs from {cfg.model}'s")
    return model


def make_optimizer(cfg: TrainConfig, net: nn.Module, lr: float, epochs: int) -> tuple[torch.optim.Optimizer, object]:
    """The optimizer of ``net``'s trainable parameters and its scheduler (None for ``none``)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "plateau":  # halve on a validation-loss plateau (seed 000)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    return opt, None


def phase_schedule(cfg: TrainConfig, strategy: Strategy, phase: str, phase1: int) -> tuple[float, int]:
    """Learning rate and length in epochs of a phase (two-phase: the full phase runs at a lower rate)."""
    if strategy.kind != "two-phase":
        return cfg.lr, cfg.epochs
    if phase == "frozen":
        return cfg.lr, phase1
    return cfg.lr * cfg.phase2_lr_scale, cfg.epochs - phase1


def _saved_run(run_dir: Path, cfg: TrainConfig) -> tuple[dict | None, dict | None]:
    """The checkpoint to continue from (None for a new run) and, when the run has finished, its metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = record.resume_checkpoint(run_dir, asdict(cfg), cfg.resume)
    if ckpt is not None and ckpt.get("finished") and (metrics := record.load_metrics(run_dir)) is not None:
        return None, metrics
    return ckpt, None


def shipped_weights(model: nn.Module, net: nn.Module, ema: engine.EMA | None) -> dict:
    """The whole model's state dict as it ships: with ``ema``, the averaged weights of ``net`` (the model, or
    its head when the head trains on cached features)."""
    if ema is None:
        return model.state_dict()
    if net is model:
        return ema.module.state_dict()
    return {**model.state_dict(), **{f"head.{k}": v for k, v in ema.module.state_dict().items()}}


def train(cfg: TrainConfig) -> dict:
    """One training run; returns the metrics also written to ``metrics.json``. A finished run with
    ``resume`` returns its saved metrics. Under torchrun the processes train one model together (rank 0
    writes the run folder) and each returns the metrics."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with distributed.process_group(engine.pick_device(cfg.device), cfg.dist_timeout) as device:
        return _train(cfg, device)


def _train(cfg: TrainConfig, device: torch.device) -> dict:
    strategy = parse_strategy(cfg.strategy)
    amp = cfg.amp and (device.type == "cuda" or cfg.cpu_amp)
    eval_amp = cfg.amp and device.type == "cuda"  # on the CPU, scores come from float32, as the export's do
    rank, world = distributed.rank(), distributed.world_size()
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    ckpt, finished = distributed.from_main(_saved_run, run_dir, cfg)  # the run folder is rank 0's
    if finished is not None:
        print(f"{run_dir}: already complete (use another --name to train again)")
        return finished

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    with distributed.local_main_first():  # one download per node
        data = load_data(cfg)
        model, weights = get_model(cfg.model, data.num_classes, cfg.head, cfg.weights, cfg.weights_file,
                                   cfg.input_size)
    if world > 1:
        torch.manual_seed(cfg.seed + rank)  # each rank its own augmentation and dropout
        print(f"torchrun: {world} processes ({torch.distributed.get_backend()}), {cfg.batch_size} images each "
              f"per step, global batch {cfg.batch_size * world}")
    if cfg.weights == "none":
        print(f"NOTE: {cfg.model} starts from random init (--weights none), on purpose.", file=sys.stderr)
    print(f"{cfg.model}: weights = {weights}")
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    spec = get_spec(cfg.model)
    tr, va = stratified_split(data.train_y, cfg.val_fraction, cfg.seed)
    if cfg.train_fraction < 1.0:
        tr = tr[stratified_split(data.train_y[tr], 1.0 - cfg.train_fraction, cfg.seed)[0]]
        print(f"--train-fraction {cfg.train_fraction}: {len(tr)} training images")
    sets = {"train": ImageArrayDataset(data.train_x[tr], data.train_y[tr], spec.mean, spec.std,
                                       cfg.resolved_augment(), cfg.serving_aug_p, paired=bool(cfg.teacher),
                                       jpeg_quality=tuple(cfg.jpeg_quality)),
            "val": ImageArrayDataset(data.train_x[va], data.train_y[va], spec.mean, spec.std),
            "test": ImageArrayDataset(data.test_x, data.test_y, spec.mean, spec.std)}
    phase1 = cfg.phase1_epochs if cfg.phase1_epochs is not None else max(1, cfg.epochs // 2)

    history: list[dict] = []
    start_epoch, best_val, bad_epochs = 0, math.inf, 0
    if cfg.init_from and ckpt is None:
        try:
            model.load_state_dict(trained_run(cfg, cfg.init_from, "init-from").state_dict())
        except RuntimeError as e:
            raise UserError(f"--init-from {cfg.init_from}: not a {cfg.model} of this shape ({e})") from e
        print(f"starting from the weights of {cfg.init_from}")
    teacher = None
    if cfg.teacher:
        teacher = trained_run(cfg, cfg.teacher, "teacher").to(device).requires_grad_(False)
        print(f"teacher: {cfg.teacher} (on the clean images; distillation weight {cfg.distill_weight}, "
              f"T {cfg.distill_temperature})")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        best_val, bad_epochs = ckpt["best_val_loss"], ckpt["bad_epochs"]
        print(f"resuming {run_dir} after epoch {start_epoch}")
    net, cached, feature_seconds = model, cfg.use_cache(), 0.0
    if cached:  # the head trains on the frozen backbone's features, computed once
        print("frozen backbone: computing its features once and training the head on them (feature cache)")
        sets, feature_seconds = feature_datasets(model, sets, run_dir / "features.pt", weights, device, eval_amp,
                                                 cfg.feature_copies)
        net = model.head
    ema = engine.EMA(net, cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
    sampler = EpochBatches(len(sets["train"]), cfg.batch_size, cfg.seed, rank, world)
    train_loader = DataLoader(sets["train"], batch_sampler=sampler)

    # elapsed_s counts the one-off feature extraction too: it is part of the training cost
    t_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else feature_seconds)
    phase, opt, sched, stopped_early = None, None, None, False
    for epoch in range(start_epoch, cfg.epochs):
        current = strategy.phase(epoch, phase1)
        if current != phase:
            apply_strategy(model, current, strategy.n)
            trained = distributed.wrap(net, device)  # DDP registers the parameters that train now
            opt, sched = make_optimizer(cfg, net, *phase_schedule(cfg, strategy, current, phase1))
            if ckpt is not None and ckpt.get("phase") == current and epoch == start_epoch:
                opt.load_state_dict(ckpt["optimizer"])
                if sched is not None and ckpt.get("scheduler"):
                    sched.load_state_dict(ckpt["scheduler"])
            phase = current
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_loss, train_acc = engine.train_one_epoch(trained, opt, train_loader, device, amp=amp, ema=ema,
                                                       label_smoothing=cfg.label_smoothing, teacher=teacher,
                                                       distill_weight=cfg.distill_weight,
                                                       distill_temperature=cfg.distill_temperature,
                                                       desc=f"epoch {epoch + 1}/{cfg.epochs} train")
        val_net = net if ema is None else ema.module  # what is validated is what ships
        val_loss, val_acc, _ = engine.evaluate(val_net, sets["val"], device, eval_amp, desc="val eval")
        monitor = val_loss if not math.isnan(val_loss) else train_loss
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(monitor)
        elif sched is not None:
            sched.step()
        row = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0, "elapsed_s": time.perf_counter() - t_start}
        history.append(row)
        print(f"epoch {epoch + 1}/{cfg.epochs} [{phase}] train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"val loss {val_loss:.4f} acc {val_acc:.4f} | lr {row['lr']:.2e} | {row['seconds']:.1f}s")
        if monitor < best_val:
            best_val, bad_epochs = monitor, 0
            distributed.from_main(atomic_save_torch, {"model": shipped_weights(model, net, ema), "epoch": epoch + 1,
                                                      "val_loss": monitor}, best_path)
        else:
            bad_epochs += 1
        stopped_early = bool(cfg.early_stopping and bad_epochs >= cfg.early_stopping)
        distributed.from_main(atomic_save_torch, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None, "epoch": epoch + 1, "phase": phase,
            "history": history, "best_val_loss": best_val, "bad_epochs": bad_epochs, "config": asdict(cfg),
            "ema": ema.state_dict() if ema is not None else None, "finished": False}, last_path)
        if stopped_early:
            print(f"early stopping: validation loss has not improved for {bad_epochs} epochs")
            break

    best = distributed.from_main(record.load_checkpoint, best_path)
    model.load_state_dict(best["model"])
    t0 = time.perf_counter()
    _, _, pred = engine.evaluate(net, sets["test"], device, eval_amp, desc="test eval")
    test_seconds = time.perf_counter() - t0
    apply_strategy(model, strategy.phase(cfg.epochs - 1, phase1), strategy.n)  # trainable counts as trained
    return distributed.from_main(
        record.write_record, run_dir, cfg, model, data, pred, weights=weights, num_train=len(tr), num_val=len(va),
        feature_cache=cached, feature_seconds=feature_seconds, device=device, world_size=world, history=history,
        stopped_early=stopped_early, best_epoch=best["epoch"], test_seconds=test_seconds)


# --------------------------------------------------------------------------- CLI

def print_models() -> None:
    print(f"{'model':20} {'input':>5} {'params':>10} {'GFLOPs':>7}  pretrained weights")
    for name in list_models():
        spec = get_spec(name)
        model, _ = get_model(name, 10, weights="none")
        total, _ = count_params(model)
        offline = " (offline)" if spec.offline else ""
        print(f"{name:20} {spec.input_size:>5} {total / 1e6:>9.2f}M {count_flops(model) / 1e9:>7.2f}  "
              f"{spec.pretrained}{offline}")


def _train_cli(cfg: TrainConfig) -> int:
    try:
        train(cfg)
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last finished epoch", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(TrainConfig, "python -m training.train", __doc__)
    parser.add_argument("--list-models", action="store_true", help="list the registry and exit")
    parser.add_argument("--section", default="train", help="the --config section to read (default: train; "
                        "configs/lite0-ship.yaml has a 'base' stage before it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(TrainConfig, build_parser(), argv, section="train")
    return run_cli(print_models) if args.list_models else run_cli(_train_cli, cfg)


if __name__ == "__main__":
    sys.exit(errors.record(main)())  # under torchrun, an exception's traceback goes into its failure report
