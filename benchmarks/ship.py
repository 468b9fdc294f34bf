"""The Lite0 that ships, and what the serving-path augmentation does to it: ``python -m benchmarks.ship``.

1. Trains ``configs/lite0-ship.yaml``'s stages in order: ``base`` (when the recipe has one), then ``train``, the
   model that ships. Beside them, one comparison run (``--comparison``): the shipped stage without its teacher
   (what the distillation buys), or, when it has none, with the serving-path augmentation toggled (``resample,jpeg``
   dropped when it has them, added at ``--serving-aug-p`` when it does not). Then a learning curve
   (``--fractions``): the shipped stage on a fraction of its training images, for as many steps (more epochs), so
   that the gaps between clean and compressed uploads can be read against the number of training images.
   Finished runs are reused (``resume``).
2. Exports each with the recipe's export section (FP32, FP16, INT8 with its accuracy-bounded search; FP32 alone
   for the learning curve's runs).
3. Measures them, and the frozen ``make demo`` model when it is exported, through the service's own
   preprocessing on real-world files (``benchmarks.robustness``), on the validation split (where choices are
   made) and the test split (which only reports).

→ ``benchmarks/ship.{json,md,png}`` and ``benchmarks/robustness.{json,md,png}``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks import robustness
from export.exporter import ExportConfig, run_export
from training.data import JPEG_QUALITY
from training.train import TrainConfig, train
from utils import (
    UserError,
    atomic_write,
    atomic_write_json,
    cli,
    cpu_name,
    from_mapping,
    pyplot,
    save_figure,
    yaml_defaults,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVING_AUGMENT = ("resample", "jpeg")
STAGES = ("base", "train")  # a recipe's training stages, in order; ``train`` is the one that ships


@dataclass
class ShipBenchConfig:
    recipe: str = field(default=str(ROOT / "configs" / "lite0-ship.yaml"), metadata={"help": "the shipped recipe"})
    data_dir: str = str(ROOT.parent / "shared" / "data")
    comparison: bool = field(default=True, metadata={
        "help": "also train the shipped stage without its teacher (or with the serving-path augmentation toggled)"})
    serving_aug_p: float = field(default=0.2, metadata={
        "help": "the comparison's --serving-aug-p when it adds resample,jpeg"})
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5], metadata={
        "help": "learning curve: also train the shipped stage on these fractions of its training images (the "
                "validation split stays whole), for as many optimizer steps (0: none)"})
    extra_artifacts: list[str] = field(default_factory=lambda: ["artifacts/demo-efficientnet_lite0"], metadata={
        "help": "other export folders to measure in the robustness benchmark when they exist (the frozen demo)"})
    robustness_out: str = str(HERE / "robustness")
    out: str = str(HERE / "ship")


def comparison_config(cfg: TrainConfig, serving_p: float) -> TrainConfig:
    """The shipped stage changed in one thing, in its own run folder: without its teacher (``<run>-noteacher``,
    hard labels alone) when it has one; otherwise with the serving-path augmentation toggled: without it
    (``<run>-noserving``) when the recipe has it, with it at ``serving_p`` (``<run>-serving``) when it does not."""
    if cfg.teacher:
        return replace(cfg, teacher=None, name=f"{cfg.run_name}-noteacher")
    augment = cfg.resolved_augment()
    if set(SERVING_AUGMENT) & set(augment):
        kept = [a for a in augment if a not in SERVING_AUGMENT]
        return replace(cfg, augment=",".join(kept) or "none", name=f"{cfg.run_name}-noserving")
    return replace(cfg, augment=",".join((*augment, *SERVING_AUGMENT)), serving_aug_p=serving_p,
                   name=f"{cfg.run_name}-serving")


def fraction_config(cfg: TrainConfig, fraction: float) -> TrainConfig:
    """The shipped stage on ``fraction`` of its training images, for the same number of optimizer steps (epochs
    scaled by 1 / fraction), in its own run folder (``<run>-frac25`` for 0.25)."""
    return replace(cfg, train_fraction=fraction, epochs=max(1, round(cfg.epochs / fraction)),
                   name=f"{cfg.run_name}-frac{round(100 * fraction)}")


def stages(recipe: str, data_dir: str) -> list[TrainConfig]:
    """The recipe's training stages in order (``train`` alone when it has no ``base`` section)."""
    import yaml

    sections = yaml.safe_load(Path(recipe).read_text()) or {}
    return [from_mapping(TrainConfig, {**yaml_defaults(recipe, TrainConfig, s), "data_dir": data_dir,
                                       "download": False}, recipe)
            for s in STAGES if s == "train" or isinstance(sections.get(s), dict)]


def row(metrics: dict, manifest: dict) -> dict:
    cfg, arts = metrics["config"], manifest["artifacts"]
    best = next(h for h in metrics["history"] if h["epoch"] == metrics["best_epoch"])
    int8 = arts.get("int8", {})
    return {
        "run": metrics["run"], "model": metrics["model"], "weights": metrics["weights"],
        "strategy": metrics["strategy"], "input_size": metrics["input_size"], "augment": metrics["augment"],
        "epochs": len(metrics["history"]), "best_epoch": metrics["best_epoch"], "val_accuracy": best["val_acc"],
        "val_loss": best["val_loss"], "test_accuracy": metrics["test_accuracy"], "macro_f1": metrics["test_macro_f1"],
        "train_seconds": metrics["train_seconds"], "ema_decay": cfg.get("ema_decay"), "cpu_amp": cfg.get("cpu_amp"),
        "serving_aug_p": cfg.get("serving_aug_p", 0.5) if set(SERVING_AUGMENT) & set(metrics["augment"]) else None,
        "jpeg_quality": cfg.get("jpeg_quality", list(JPEG_QUALITY)) if set(SERVING_AUGMENT) & set(metrics["augment"])
        else None,
        "init_from": cfg.get("init_from"), "teacher": cfg.get("teacher"),
        "train_fraction": cfg.get("train_fraction", 1.0),
        "distill_weight": cfg.get("distill_weight") if cfg.get("teacher") else None,
        "batch_size": cfg["batch_size"], "lr": cfg["lr"], "label_smoothing": cfg["label_smoothing"],
        "num_train": metrics["num_train"], "num_val": metrics["num_val"], "num_test": metrics["num_test"],
        "device": metrics["device"], "cpu": cpu_name(), "history": metrics["history"],
        "onnx_fp32_accuracy": arts.get("fp32", {}).get("accuracy"),
        "int8_accuracy": int8.get("accuracy"), "int8_delta": int8.get("accuracy_delta"),
        "int8_search": int8.get("search"),
    }


def augment_label(r: dict) -> str:
    """The run's augmentation, with the probability of the serving-path ones, and its teacher."""
    p, teacher, start, q = r.get("serving_aug_p"), r.get("teacher"), r.get("init_from"), r.get("jpeg_quality")
    fraction = r.get("train_fraction", 1.0)
    return (",".join(r["augment"]) + ("" if p is None else f" (p {p:g}" + (f", JPEG q {q[0]}–{q[1]})" if q else ")"))
            + ("" if fraction == 1.0 else f"; {100 * fraction:g}% of the images")
            + ("" if not start else f"; from {Path(start).name}")
            + ("" if not teacher else f"; teacher {Path(teacher).name} (weight {r['distill_weight']:g})"))


def to_markdown(rows: list[dict], robustness_rows: list[dict], shipped: str | None = None) -> str:
    """``shipped``: the run that ships (the recipe's ``train`` stage), marked ★."""
    first = rows[0]
    out = ["# The shipped Lite0 (`configs/lite0-ship.yaml`, `make ship`)", "",
           f"Produced by `python -m benchmarks.ship` on {first['device']}. Data: the real CIFAR-10 "
           f"subset, {first['num_train']} training, {first['num_val']} validation and {first['num_test']} test "
           "images (the dev test batch: other real CIFAR-10 images may score lower). The epoch that ships is the "
           "one with the best validation loss; the test set only reports. The ONNX columns are the exported ONNX "
           "Runtime FP32 and INT8 models on the test images, Δ against the float32 PyTorch model. The run's own "
           "validation and test figures are those `metrics.json` records: runs trained before evaluation moved "
           "to float32 scored them under bf16 autocast (`cpu_amp`), so compare runs on the float32 figures: the "
           "ONNX columns and the table through the service below. ★: the run that ships.", "",
           "| run | training images | px | epochs | selected epoch | val acc | test acc (run) | FP32 ONNX test acc | "
           "INT8 test acc (Δ pts) | train s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        int8 = "–" if r["int8_accuracy"] is None else \
            f"{100 * r['int8_accuracy']:.2f} ({100 * r['int8_delta']:+.2f})"
        fp32 = "–" if r["onnx_fp32_accuracy"] is None else f"{100 * r['onnx_fp32_accuracy']:.2f}"
        star = " ★" if r["run"] == shipped else ""
        out.append(f"| {r['run']}{star} | {augment_label(r)} | {r['input_size']} | {r['epochs']} | {r['best_epoch']} | "
                   f"{100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | {fp32} | {int8} | "
                   f"{r['train_seconds']:.0f} |")
    by = {(r["run"], r["format"], r["split"], r["variant"]): r for r in robustness_rows}
    names = [r["run"] for r in rows]
    lines = []
    for split in ("val", "test"):
        for v in ("png32", *robustness.TARGETS, "gray_png32"):
            cells = [by.get((n, "fp32", split, v)) for n in names]
            if all(c is not None for c in cells):
                lines.append(f"| {split} | {robustness.VARIANTS[v].label} | " +
                             " | ".join(f"{100 * c['accuracy']:.2f}" for c in cells) + " |")
    if lines:
        out += ["", "Through the service's preprocessing (FP32; all variants and INT8: robustness.md):",
                "", "| split | upload | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names), *lines]
    points = curve(rows, robustness_rows, shipped)
    if points:
        out += ["", "## Learning curve: the gaps against the number of training images", "",
                "The shipped stage trained on a fraction of its training images (each class alike; the validation "
                "split stays whole), for the same number of optimizer steps, beside the stage itself: FP32 through "
                "the service, Δ in points against its PNG 32 px accuracy (issue 17's target: within "
                f"{robustness.TARGET_POINTS:g}). If a gap narrows as images are added, more training data is a way "
                "to close it.", "",
                "| split | training images | epochs | PNG 32 px | " + " | ".join(
                    f"{robustness.VARIANTS[v].label} Δ" for v in robustness.TARGETS) + " |",
                "|---|---:|---:|---:|" + "---:|" * len(robustness.TARGETS)]
        out += [f"| {p['split']} | {p['num_train']} | {p['epochs']} | {100 * p['png32']:.2f} | " + " | ".join(
            "–" if p.get(v) is None else f"{100 * p[v]:+.2f}" for v in robustness.TARGETS) + " |" for p in points]
    out += ["", "![validation accuracy per epoch; the learning curve's gaps](ship.png)", ""]
    return "\n".join(out)


def curve(rows: list[dict], robustness_rows: list[dict], shipped: str | None) -> list[dict]:
    """The learning curve: the shipped stage and its ``--fractions`` runs, per split and by training images, with
    their FP32 accuracy on PNG 32 px uploads and their deltas to it on the target uploads."""
    by = {(r["run"], r["split"], r["variant"]): r for r in robustness_rows if r["format"] == "fp32"}
    points = []
    for r in rows:
        if shipped is None or not (r["run"] == shipped or r["run"].startswith(f"{shipped}-frac")):
            continue
        for split in ("val", "test"):
            ref = by.get((r["run"], split, robustness.REFERENCE))
            if ref is not None:
                points.append({"run": r["run"], "split": split, "num_train": r["num_train"], "epochs": r["epochs"],
                               "png32": ref["accuracy"], **{v: by[(r["run"], split, v)]["delta_vs_png32"]
                                                            for v in robustness.TARGETS if (r["run"], split, v) in by}})
    if not any(p["run"] != shipped for p in points):
        return []  # the shipped stage alone is no curve
    return sorted(points, key=lambda p: (p["split"] != "val", p["num_train"]))


def plot(rows: list[dict], path: Path, points: list[dict] | None = None) -> None:
    """Validation accuracy per epoch; beside it, when there is one, the learning curve's gaps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if points else 1, figsize=(12 if points else 7, 4), layout="constrained",
                             squeeze=False)
    ax = axes[0][0]
    for r in rows:
        epochs = [h["epoch"] for h in r["history"]]
        line, = ax.plot(epochs, [100 * h["val_acc"] for h in r["history"]], marker="o", label=r["run"])
        ax.plot([r["best_epoch"]], [100 * r["val_accuracy"]], marker="*", markersize=14, color=line.get_color())
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy (★ the epoch that ships)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if points:
        ax = axes[0][1]
        for split in ("val", "test"):
            for k, v in enumerate(robustness.TARGETS):
                pts = [p for p in points if p["split"] == split and p.get(v) is not None]
                ax.plot([p["num_train"] for p in pts], [100 * p[v] for p in pts], marker="o", color=f"C{k}",
                        linestyle="-" if split == "test" else "--", label=f"{robustness.VARIANTS[v].label} ({split})")
        ax.axhline(-robustness.TARGET_POINTS, color="grey", linestyle=":", label="target")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="training images (log scale)", ylabel="Δ vs PNG 32 px (points)",
               title="Learning curve: gaps of the shipped stage (FP32)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def run(cfg: ShipBenchConfig) -> list[dict]:
    if any(not 0 <= f < 1 for f in cfg.fractions):
        raise UserError(f"--fractions must each be in (0, 1) (0: none), got {cfg.fractions}")
    recipe = stages(cfg.recipe, cfg.data_dir)
    export = yaml_defaults(cfg.recipe, ExportConfig, "export")
    runs = recipe + ([comparison_config(recipe[-1], cfg.serving_aug_p)] if cfg.comparison else []) \
        + [fraction_config(recipe[-1], f) for f in sorted(set(cfg.fractions), reverse=True) if f]
    rows, artifacts = [], []
    for t in runs:
        metrics = train(t)
        out = Path(export["out"]).parent / t.run_name
        curve_only = {} if t.train_fraction == 1.0 else {"formats": ["fp32"]}  # the curve reads FP32 alone
        manifest = run_export(from_mapping(ExportConfig, {
            **export, **curve_only, "run_dir": str(Path(t.runs_dir) / t.run_name), "out": str(out),
            "data_dir": cfg.data_dir}, cfg.recipe))
        rows.append(row(metrics, manifest))
        artifacts.append(str(out))
    artifacts += [a for a in cfg.extra_artifacts if (Path(a) / "manifest.json").is_file()]
    rob = []
    for split in ("val", "test"):  # the first split starts the file afresh: no rows of runs no longer measured
        rob = robustness.run(robustness.RobustnessConfig(artifacts=artifacts, split=split, data_dir=cfg.data_dir,
                                                         out=cfg.robustness_out, keep_others=split == "test"))
    out = Path(cfg.out)
    atomic_write_json(rows, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), to_markdown(rows, rob, recipe[-1].run_name))
    plot(rows, out.with_suffix(".png"), curve(rows, rob, recipe[-1].run_name))
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    return cli(ShipBenchConfig, run, argv, "python -m benchmarks.ship", __doc__)


if __name__ == "__main__":
    sys.exit(main())
