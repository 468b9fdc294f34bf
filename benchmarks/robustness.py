"""Accuracy on real-world uploads: ``python -m benchmarks.robustness artifacts/RUN [...] --split test``
→ ``benchmarks/robustness.{json,md,png}``.

Each CIFAR image becomes the file a user would send (:data:`VARIANTS`: PNG and JPEG at 32 px, bicubic
upscales to 128–512 px as PNG and JPEG, grayscale, RGBA), encoded by Pillow with its defaults otherwise
(JPEG: 4:2:0 chroma subsampling, as phones and browsers write it). Every file then takes exactly the
service's path: ``open_image`` → ``load_rgb`` → ``fit_image(im, image_size)`` → ``Preprocessing.to_input``
→ the ONNX Runtime session of each format (``service.runtime.open_artifact``, sha256-checked).

``--split val`` measures the run's validation images, rebuilt as training made them (the run's
``metrics.json`` config: dataset, limits, ``val_fraction``, ``seed``); choose settings there, never on
``--split test``. Rows merge into ``<out>.json`` by (run, format, split). The issue-17 targets (JPEG q75
and 256 px JPEG within 1.5 points of PNG 32 px) are marked met / not met per (run, format).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import preprocessing as sp
from service.config import ServiceConfig
from service.preprocessing import Preprocessing
from service.runtime import ArtifactError, open_artifact, read_manifest
from utils import UserError, atomic_write, atomic_write_json, cli, cpu_name, device_name, pyplot, save_figure, versions

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
RGBA_ALPHA = 224  # mild transparency (88% opaque): the service composites it on white


@dataclass(frozen=True)
class Variant:
    """How a user's file is made from a 32 px image: bicubic resize to ``size`` px, ``mode``, ``fmt``."""

    label: str
    size: int = 32
    fmt: str = "PNG"
    quality: int | None = None  # JPEG quality (Pillow's scale)
    mode: str = "RGB"  # RGB, L (grayscale) or RGBA (alpha RGBA_ALPHA)


VARIANTS: dict[str, Variant] = {
    "png32": Variant("PNG 32 px"),
    "jpeg32_q95": Variant("JPEG q95 32 px", fmt="JPEG", quality=95),
    "jpeg32_q75": Variant("JPEG q75 32 px", fmt="JPEG", quality=75),
    "jpeg32_q50": Variant("JPEG q50 32 px", fmt="JPEG", quality=50),
    **{f"png{s}": Variant(f"PNG {s} px (bicubic up)", size=s) for s in (128, 256, 512)},
    **{f"jpeg{s}_q90": Variant(f"JPEG q90 {s} px (bicubic up)", size=s, fmt="JPEG", quality=90)
       for s in (128, 256, 512)},
    "gray_png32": Variant("grayscale PNG 32 px (mode L)", mode="L"),
    "rgba_png32": Variant(f"RGBA PNG 32 px (alpha {RGBA_ALPHA})", mode="RGBA"),
}
REFERENCE = "png32"
TARGETS = ("jpeg32_q75", "jpeg256_q90")  # issue 17: each within TARGET_POINTS of the reference
TARGET_POINTS = 1.5
FORMATS = ("fp32", "fp16", "int8", "int8_trt")


# --------------------------------------------------------------------------- files and the serving path

def make_variant(img: np.ndarray, variant: str | Variant) -> bytes:
    """A uint8 (32, 32, 3) image → the bytes of the file ``variant`` describes (Pillow defaults otherwise)."""
    from PIL import Image

    v = VARIANTS[variant] if isinstance(variant, str) else variant
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {a.dtype} {a.shape}")
    im = Image.fromarray(a, "RGB")
    if im.size != (v.size, v.size):
        im = im.resize((v.size, v.size), Image.Resampling.BICUBIC)
    if v.mode == "L":
        im = im.convert("L")
    elif v.mode == "RGBA":
        im.putalpha(RGBA_ALPHA)
    buf = io.BytesIO()
    im.save(buf, v.fmt, **({"quality": v.quality} if v.quality is not None else {}))
    return buf.getvalue()


def served_image(data: bytes, size: int, max_megapixels: float | None = None) -> np.ndarray:
    """An uploaded file → uint8 (size, size, 3), as the service decodes it (service.service._fit)."""
    mp = ServiceConfig().max_megapixels if max_megapixels is None else max_megapixels
    return sp.fit_image(sp.decode_image(data, mp), size)


def served_images(images: np.ndarray, variant: str | Variant, size: int) -> np.ndarray:
    """Every image made into ``variant``'s file and decoded by the service: uint8 (N, size, size, 3)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        out[i] = served_image(make_variant(a, variant), size)
    return out


def predict_labels(predict_fn: Callable[[np.ndarray], np.ndarray], pre: Preprocessing, images: np.ndarray,
                   batch_size: int = 128) -> np.ndarray:
    """Top-1 class of uint8 (N, S, S, 3) images: ``pre.to_input`` then ``predict_fn`` (float32 NCHW → logits)."""
    out = [np.asarray(predict_fn(pre.to_input(images[i:i + batch_size]))).argmax(1)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def variant_predictions(predict_fn: Callable[[np.ndarray], np.ndarray], pre: Preprocessing, images: np.ndarray,
                        variants: Iterable[str] = tuple(VARIANTS), batch_size: int = 128,
                        cache: dict | None = None) -> dict[str, np.ndarray]:
    """Top-1 predictions per variant. ``cache``: a dict that keeps the decoded images between calls on the
    same ``images`` (e.g. one per model), keyed by (variant, image_size)."""
    cache = {} if cache is None else cache
    preds = {}
    for name in variants:
        key = (name, pre.image_size)
        if key not in cache:
            cache[key] = served_images(images, name, pre.image_size)
        preds[name] = predict_labels(predict_fn, pre, cache[key], batch_size)
    return preds


def variant_accuracy(predict_fn: Callable[[np.ndarray], np.ndarray], pre: Preprocessing, images: np.ndarray,
                     labels: np.ndarray, variants: Iterable[str] = tuple(VARIANTS), batch_size: int = 128,
                     cache: dict | None = None) -> dict[str, float]:
    """Accuracy per variant of uint8 (N, 32, 32, 3) ``images`` through the serving path; ``predict_fn`` maps
    float32 NCHW model input to logits (an ONNX Runtime model, or a torch model wrapped in numpy)."""
    labels = np.asarray(labels)
    preds = variant_predictions(predict_fn, pre, images, variants, batch_size, cache)
    return {name: float((p == labels).mean()) for name, p in preds.items()}


# --------------------------------------------------------------------------- data: the run's own splits

def run_config(manifest: dict) -> tuple[dict, Path]:
    """The training config (``metrics.json``) of an export's source run, and that run's folder."""
    from training.record import load_metrics

    tried = []
    for d in (manifest.get("source_run"), Path("runs") / str(manifest.get("run", ""))):
        metrics = load_metrics(d) if d else None
        if metrics is not None:
            return metrics, Path(d)
        tried.append(str(d))
    raise UserError(f"run {manifest.get('run')!r}: no metrics.json in {' or '.join(tried)}; the validation split "
                    "is rebuilt from the run's training config (val_fraction, seed)")


def split_data(manifest: dict, split: str, data_dir: str | Path, limit: int | None = None) -> dict:
    """The images of ``split`` as the run's training saw them: ``val`` is
    ``stratified_split(train_y, val_fraction, seed)`` of the (limited) training set, ``test`` its test set.
    Returns {images, labels, source, dataset, total} (``total``: the split's size before ``limit``)."""
    from export.exporter import run_split
    from training.train import TrainConfig, load_data

    if split not in ("val", "test"):
        raise UserError(f"unknown split {split!r}; valid: val, test")
    metrics, run_dir = run_config(manifest)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    raw = {k: v for k, v in metrics.get("config", {}).items() if k in names}
    cfg = TrainConfig(**{**raw, "data_dir": str(data_dir), "download": False})
    data = load_data(cfg)
    if data.name != manifest.get("dataset", data.name):
        raise UserError(f"{data_dir} holds {data.name}, but {manifest.get('run')} was trained on "
                        f"{manifest['dataset']}; give its data with --data-dir")
    if split == "val":
        _, va, _ = run_split(data, metrics)
        if "num_val" in metrics and len(va) != metrics["num_val"]:
            raise UserError(f"{data_dir} gives {len(va)} validation images, but {run_dir} trained with "
                            f"{metrics['num_val']}: not the data this run was trained on")
        x, y = data.train_x[va], data.train_y[va]
    else:
        x, y = data.test_x, data.test_y
    total = len(y)
    if limit:
        x, y = x[:limit], y[:limit]
    return {"images": np.ascontiguousarray(x), "labels": np.asarray(y), "source": data.source,
            "dataset": data.name, "total": total}


# --------------------------------------------------------------------------- the benchmark

@dataclass
class RobustnessConfig:
    """Options of ``python -m benchmarks.robustness`` (the CLI is generated from these fields)."""

    artifacts: list[str] = field(default_factory=list, metadata={"help": "export folders (with manifest.json)"})
    formats: list[str] = field(default_factory=lambda: ["fp32", "int8"], metadata={"choices": list(FORMATS)})
    split: str = field(default="val", metadata={
        "choices": ["val", "test"], "help": "val: the run's validation images (choose settings here); test: report"})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"choices": list(VARIANTS)})
    data_dir: str = field(default=str(DEFAULT_DATA), metadata={"help": "CIFAR folder the runs were trained on"})
    limit: int | None = field(default=None, metadata={"help": "only the first N images of the split"})
    batch_size: int = field(default=128, metadata={"help": "images per model call"})
    threads: int = field(default=0, metadata={"help": "ONNX Runtime threads; 0: all cores"})
    providers: list[str] | None = field(default=None, metadata={"help": "ONNX Runtime providers (default: cpu)"})
    out: str = field(default=str(HERE / "robustness"), metadata={"help": "output path without extension"})
    keep_others: bool = field(default=True, metadata={
        "help": "keep the rows of <out>.json that this call does not measure (other runs, formats, splits)"})


def command_line(cfg: RobustnessConfig) -> str:
    """The command that regenerates ``cfg``'s rows (defaults left out)."""
    parts = ["python -m benchmarks.robustness", *cfg.artifacts, "--split", cfg.split, "--formats", *cfg.formats]
    if cfg.variants != list(VARIANTS):
        parts += ["--variants", *cfg.variants]
    if cfg.limit:
        parts += ["--limit", str(cfg.limit)]
    if Path(cfg.data_dir).resolve() != DEFAULT_DATA.resolve():
        parts += ["--data-dir", cfg.data_dir]
    if cfg.providers:
        parts += ["--providers", *cfg.providers]
    if Path(cfg.out).resolve() != (HERE / "robustness").resolve():
        parts += ["--out", cfg.out]
    return " ".join(parts)


def measure(cfg: RobustnessConfig) -> list[dict]:
    """Rows of every (artifact, format, variant) of ``cfg``."""
    if not cfg.artifacts:
        raise UserError("nothing to measure: give one or more export folders")
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variants {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    variants = [REFERENCE] + [v for v in dict.fromkeys(cfg.variants) if v != REFERENCE]
    caches: dict[str, dict] = {}  # decoded variants per data set: shared by every model measured on it
    rows, command, pillow = [], command_line(cfg), versions("pillow").get("pillow")
    for a in cfg.artifacts:
        try:
            manifest = read_manifest(Path(a) / "manifest.json")
        except ArtifactError as e:
            raise UserError(str(e)) from e
        d = split_data(manifest, cfg.split, cfg.data_dir, cfg.limit)
        cache = caches.setdefault(hashlib.sha256(d["images"].tobytes()).hexdigest(), {})
        for fmt in cfg.formats:
            if "sha256" not in manifest.get("artifacts", {}).get(fmt, {}):
                print(f"skipping {manifest['run']} {fmt}: no such artifact in {a}", file=sys.stderr)
                continue
            try:
                model, entry = open_artifact(a, fmt, cfg.providers or ["cpu"], threads=cfg.threads or None,
                                             spinning=False)
            except ArtifactError as e:
                raise UserError(str(e)) from e
            t0 = time.perf_counter()
            preds = variant_predictions(model, model.preprocessing, d["images"], variants, cfg.batch_size, cache)
            ref = preds[REFERENCE]
            ref_acc = float((ref == d["labels"]).mean())
            if cfg.split == "test" and len(ref) == manifest.get("eval_images") and entry.get("accuracy") is not None:
                same = abs(ref_acc - entry["accuracy"]) < 1e-9  # PNG is lossless: export's own evaluation
                print(f"  PNG 32 px {100 * ref_acc:.2f}% vs the export's {100 * entry['accuracy']:.2f}% on the same "
                      f"images: {'equal' if same else 'DIFFERENT (the serving path differs from export evaluation)'}")
            for name, p in preds.items():
                acc = float((p == d["labels"]).mean())
                rows.append({
                    "run": manifest["run"], "model": manifest.get("backbone"), "format": fmt,
                    "precision": entry.get("precision"), "split": cfg.split, "variant": name,
                    "variant_label": VARIANTS[name].label, "accuracy": acc, "n": int(len(p)),
                    "delta_vs_png32": acc - ref_acc, "changed_vs_png32": float((p != ref).mean()),
                    "split_size": d["total"], "dataset": d["dataset"], "data_source": d["source"],
                    "provider": model.provider,
                    "device": cpu_name() if model.provider == "CPUExecutionProvider" else device_name("cuda"),
                    "pillow": pillow, "command": command,
                })
                print(f"{manifest['run']:28} {fmt:5} {cfg.split:4} {name:12} {100 * acc:6.2f}% "
                      f"({100 * (acc - ref_acc):+.2f} vs PNG 32 px, n={len(p)})", flush=True)
            print(f"  {manifest['run']} {fmt}: {len(variants)} variants × {len(ref)} images in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not rows:
        raise UserError(f"none of the formats {', '.join(cfg.formats)} exists in {', '.join(cfg.artifacts)}")
    return rows


def target_status(rows: list[dict]) -> list[dict]:
    """Per (run, format, split) and target variant: its delta vs PNG 32 px in points and whether it is within
    :data:`TARGET_POINTS` (a gain counts as met)."""
    out = []
    for r in rows:
        if r["variant"] in TARGETS and r.get("delta_vs_png32") is not None:
            points = 100 * r["delta_vs_png32"]
            out.append({"run": r["run"], "format": r["format"], "split": r["split"], "variant": r["variant"],
                        "delta_points": points, "met": round(points, 9) >= -TARGET_POINTS})
    return out


def _series(rows: list[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["run"], r["format"]) for r in rows))


def to_markdown(rows: list[dict]) -> str:
    splits = [s for s in ("test", "val") if any(r["split"] == s for r in rows)]
    cpus = sorted({r["device"] for r in rows})
    pillow = ", ".join(sorted({r["pillow"] for r in rows if r.get("pillow")})) or "?"
    out = ["# Robustness: accuracy on real-world uploads", "",
           "Produced by `python -m benchmarks.robustness` (commands below). Each image becomes the file a user "
           "would send, then takes the service's own path: `open_image` → `load_rgb` → `fit_image` (centre crop, "
           "bicubic resize to the model's 32 px) → `Preprocessing.to_input` → the ONNX Runtime model. Files are "
           f"written by Pillow {pillow} with its defaults: upscales are bicubic; JPEG uses 4:2:0 "
           "chroma subsampling (what phones and browsers write); the upscaled JPEGs are quality 90; grayscale is "
           f"a mode-L PNG; RGBA is a PNG with alpha {RGBA_ALPHA} everywhere (mild transparency; the service "
           "composites it on white). Cells: accuracy % (Δ points vs PNG 32 px of the same model and format). "
           f"Device: {', '.join(cpus)}.", ""]
    for split in splits:
        rs = [r for r in rows if r["split"] == split]
        series = _series(rs)
        by = {(r["run"], r["format"], r["variant"]): r for r in rs}
        ns = dict.fromkeys(f"{r['n']} of {r['split_size']}" + (f" ({r['run']})" if len(series) > 1 else "")
                           for r in rs if r["variant"] == REFERENCE)
        what = "the runs' validation images (rebuilt from each run's val_fraction and seed)" if split == "val" \
            else "the test images"
        out += [f"## Split: {split}", "",
                f"Data: {what}, from {', '.join(sorted({r['data_source'] for r in rs}))}; images: "
                f"{'; '.join(ns)}.", "", "Regenerate:", "", "```bash",
                *dict.fromkeys(r["command"] for r in rs), "```", "",
                "| variant | " + " | ".join(f"{run} {fmt.upper()}" for run, fmt in series) + " |",
                "|---|" + "---:|" * len(series)]
        for v in dict.fromkeys(r["variant"] for r in rs):
            cells = []
            for run, fmt in series:
                r = by.get((run, fmt, v))
                cells.append("–" if r is None else f"{100 * r['accuracy']:.2f}" if v == REFERENCE
                             else f"{100 * r['accuracy']:.2f} ({100 * r['delta_vs_png32']:+.2f})")
            out.append(f"| {VARIANTS[v].label if v in VARIANTS else v} | " + " | ".join(cells) + " |")
        out += ["", f"Targets (issue 17): JPEG q75 and 256 px JPEG each within {TARGET_POINTS} points of PNG 32 px.",
                ""]
        status = target_status(rs)
        for run, fmt in series:
            marks = [f"{VARIANTS[t['variant']].label} {t['delta_points']:+.2f} pts: "
                     f"**{'met' if t['met'] else 'not met'}**" for t in status if (t["run"], t["format"]) == (run, fmt)]
            if marks:
                out.append(f"- {run} {fmt.upper()}: " + "; ".join(marks))
        out.append("")
    out += ["![accuracy per variant](robustness.png)", ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: accuracy per variant, one bar per (run, format); one panel per split."""
    plt = pyplot()
    splits = [s for s in ("test", "val") if any(r["split"] == s for r in rows)]
    fig, axes = plt.subplots(len(splits), 1, figsize=(11, 4.5 * len(splits)), squeeze=False, layout="constrained")
    for ax, split in zip(axes[:, 0], splits, strict=True):
        rs = [r for r in rows if r["split"] == split]
        series, variants = _series(rs), list(dict.fromkeys(r["variant"] for r in rs))
        by = {(r["run"], r["format"], r["variant"]): 100 * r["accuracy"] for r in rs}
        width = 0.8 / len(series)
        for i, (run, fmt) in enumerate(series):
            have = [(j, v) for j, v in enumerate(variants) if (run, fmt, v) in by]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j, _ in have], [by[(run, fmt, v)] for _, v in have],
                   width, label=f"{run} {fmt.upper()}")
        accs = list(by.values())
        ax.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 3))
        ax.set_xticks(range(len(variants)),
                      [v + (" *" if v in TARGETS else "") for v in variants], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="accuracy (%)", title=f"{split} split, n = {rs[0]['n']} (* issue-17 targets)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def run(cfg: RobustnessConfig) -> list[dict]:
    """Measure, merge into ``<out>.json`` (rows of the same run, format and split are replaced; with
    ``keep_others`` off, every earlier row goes) and rewrite
    ``<out>.md`` and ``<out>.png``. Returns all rows."""
    rows = measure(cfg)
    out = Path(cfg.out)
    old = json.loads(out.with_suffix(".json").read_text()) if cfg.keep_others and out.with_suffix(".json").exists() \
        else []
    measured = {(r["run"], r["format"], r["split"]) for r in rows}
    rows = [r for r in old if (r.get("run"), r.get("format"), r.get("split")) not in measured] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rows, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), to_markdown(rows))
    plot(rows, out.with_suffix(".png"))
    for t in target_status([r for r in rows if (r["run"], r["format"], r["split"]) in measured]):
        print(f"target {t['run']} {t['format']} {t['split']} {t['variant']}: {t['delta_points']:+.2f} pts "
              f"({'met' if t['met'] else 'NOT met'})")
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    return cli(RobustnessConfig, run, argv, "python -m benchmarks.robustness", __doc__, positional=("artifacts",))


if __name__ == "__main__":
    sys.exit(main())
