"""The export pipeline: a run folder → ONNX FP32/FP16/INT8 (+ TensorRT engines) + ``manifest.json``.

Every artifact is evaluated on real test images through the serving preprocessing; FP32 must match
PyTorch (max |Δlogit| ≤ 1e-4 × max(1, the largest |logit|), top-1 agreement ≥ 99.9%) or the export
fails. Artifacts whose inputs have not changed are skipped on a re-run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from export import int8_search, quantize
from export.onnx_export import DEFAULT_OPSET, ExportError, artifact_metadata, export_onnx, load_run, opset_of
from export.trt_check import tensorrt_problems
from service import tensorrt_engine as trt_engine
from service.preprocessing import Preprocessing
from service.runtime import load_ort_model
from training.data import CifarData, load_dataset, stratified_split
from training.record import load_metrics
from utils import UserError, atomic_path, atomic_write_json, sha256_file, versions

MAX_LOGIT_DIFF = 1e-4  # FP32 parity: of the largest |logit| (float32 kernels differ in rounding, not in scale)
MIN_AGREEMENT = 0.999

# format key → (file name, precision, kind)
ARTIFACTS = {
    "fp32": ("model.onnx", "fp32", "onnx"),
    "fp16": ("model.fp16.onnx", "fp16", "onnx"),
    "int8": ("model.int8.onnx", "int8", "onnx"),
    "int8_trt": ("model.int8.trt.onnx", "int8", "onnx"),
    "trt_fp16": ("model.fp16.plan", "fp16", "tensorrt"),
    "trt_int8": ("model.int8.plan", "int8", "tensorrt"),
}


def _opt(help: str, **extra) -> dict:
    return {"help": help, **extra}


@dataclass
class ExportConfig:
    """Options of ``python -m export`` (the CLI is generated from these fields)."""

    run_dir: str = field(metadata=_opt("a finished run folder (model.json + best.pt)"))
    out: str | None = field(default=None, metadata=_opt("output folder (default: artifacts/<run name>)"))
    data_dir: str | None = field(default=None, metadata=_opt("dataset folder (default: the one the run trained on)"))
    formats: list[str] = field(default_factory=lambda: list(ARTIFACTS), metadata=_opt("", choices=list(ARTIFACTS)))
    opset: int = DEFAULT_OPSET
    calib_images: int = field(default=512, metadata=_opt("class-balanced training images for INT8 calibration"))
    calib_method: str = field(default="minmax", metadata=_opt("", choices=list(quantize.CALIBRATION_METHODS)))
    keep_float: list[str] = field(default_factory=lambda: ["auto"], metadata=_opt(
        "which INT8 nodes stay float. 'auto': the search (--max-accuracy-drop) for pretrained runs with a "
        "validation split of 100+ images, else 'preset'; 'search': the search for any run; 'preset': the "
        "backbone's known-sensitive nodes (EfficientNet stem, early blocks, SE, classifier); 'none': "
        "quantize everything; other values: regexes of node names or torch module scopes", metavar="PATTERN"))
    max_accuracy_drop: float | None = field(default=0.5, metadata=_opt(
        "INT8 search: largest validation accuracy drop vs FP32, in points"))
    min_agreement: float = field(default=0.97, metadata=_opt(
        "INT8 search: smallest validation top-1 agreement with FP32 (a small drop with many flipped images "
        "is luck)"))
    search_calibration: bool = field(default=True, metadata=_opt(
        "INT8 search: also try minmax on all and a quarter of --calib-images, percentile and entropy on a "
        "quarter, and per-tensor weights"))
    eval_limit: int | None = field(default=None, metadata=_opt("evaluate on the first N test images only"))
    min_batch: int = field(default=1, metadata=_opt("TensorRT optimization profile: smallest batch"))
    opt_batch: int = field(default=32, metadata=_opt("TensorRT optimization profile: batch tuned for"))
    max_batch: int = field(default=128, metadata=_opt("TensorRT optimization profile: largest batch"))
    workspace_mb: int = field(default=1024, metadata=_opt("TensorRT builder workspace"))
    bentoml: bool = field(default=True, metadata=_opt("save each ONNX artifact to the BentoML model store"))
    force: bool = field(default=False, metadata=_opt("re-export even artifacts that are up to date"))
    threads: int | None = None

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else Path("artifacts") / Path(self.run_dir).resolve().name


def tool_versions() -> dict[str, str]:
    return versions("torch", "onnx", "onnxruntime", "bentoml", "tensorrt")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def batched(fn, x: np.ndarray, batch: int = 64, desc: str | None = None) -> np.ndarray:
    outs = [fn(x[i:i + batch]) for i in tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=None)]
    return np.concatenate(outs)


def _eval_data(cfg: ExportConfig, mj: dict, metrics: dict) -> CifarData:
    data_dir = cfg.data_dir or metrics.get("config", {}).get("data_dir")
    data = load_dataset(mj.get("dataset", "cifar10"), data_dir, download=False)
    if cfg.eval_limit:
        data.test_x, data.test_y = data.test_x[: cfg.eval_limit], data.test_y[: cfg.eval_limit]
    return data


def _scores(logits: np.ndarray, labels: np.ndarray, ref_pred: np.ndarray, ref_acc: float) -> dict:
    pred = logits.argmax(1)
    acc = float((pred == labels).mean())
    return {"accuracy": acc, "accuracy_delta": acc - ref_acc, "top1_agreement": float((pred == ref_pred).mean())}


def run_export(cfg: ExportConfig) -> dict:
    """Export every requested format; returns the manifest (also written to ``manifest.json``)."""
    bad = [f for f in cfg.formats if f not in ARTIFACTS]
    if bad:
        raise UserError(f"unknown format {bad[0]!r}; valid: {', '.join(ARTIFACTS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    model, mj, pre, ckpt_path = load_run(run_dir)
    metrics = load_metrics(run_dir) or {}
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # left by an export that was killed mid-write
        stale.unlink()
    manifest_path = out / "manifest.json"
    old, old_pytorch_acc, old_search = {}, None, {}
    if manifest_path.is_file() and not cfg.force:
        try:
            previous = json.loads(manifest_path.read_text())
            old, old_pytorch_acc = previous.get("artifacts", {}), previous.get("pytorch", {}).get("accuracy")
            old_search = previous.get("int8_search") or {}
        except json.JSONDecodeError:
            print(f"WARNING: {manifest_path} is corrupt; re-exporting everything", file=sys.stderr)
    ckpt_sha = sha256_file(ckpt_path)
    data = _eval_data(cfg, mj, metrics)
    x_test = pre.to_input(data.test_x)
    y_test = data.test_y

    ref: dict = {}

    def reference() -> tuple[np.ndarray, np.ndarray, float]:
        """PyTorch logits, predictions and accuracy on the test images: computed only when needed."""
        if not ref:
            print(f"PyTorch reference on {len(y_test)} test images ({data.name})")
            with torch.no_grad():
                ref["logits"] = batched(lambda b: model(torch.from_numpy(b)).numpy(), x_test, desc="pytorch")
            ref["pred"] = ref["logits"].argmax(1)
            ref["acc"] = float((ref["pred"] == y_test).mean())
        return ref["logits"], ref["pred"], ref["acc"]

    manifest = {
        "run": mj.get("run", run_dir.name), "source_run": str(run_dir.resolve()),
        "checkpoint_sha256": ckpt_sha, "backbone": mj["backbone"], "head": mj["head"],
        "weights": mj.get("weights"), "dataset": data.name, "synthetic": data.synthetic,
        "preprocessing": pre.to_dict(), "eval_images": int(len(y_test)),
        "pytorch": {"accuracy": old_pytorch_acc}, "tools": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "artifacts": {},
    }
    arts = manifest["artifacts"]

    def up_to_date(fmt: str, key: str) -> bool:
        e = old.get(fmt)
        path = out / ARTIFACTS[fmt][0]
        if e and e.get("key") == key and path.is_file() and e.get("sha256") == sha256_file(path):
            print(f"{ARTIFACTS[fmt][0]}: up to date")
            arts[fmt] = e
            return True
        return False

    def record(fmt: str, key: str, scores: dict | None, **extra) -> None:
        name, precision, kind = ARTIFACTS[fmt]
        path = out / name
        entry = {"file": name, "format": kind, "precision": precision, "key": key,
                 "sha256": sha256_file(path), "size_bytes": path.stat().st_size, **(scores or {}), **extra}
        if kind == "onnx":
            entry["opset"] = opset_of(path)
        arts[fmt] = entry
        if scores:
            print(f"{name}: accuracy {scores['accuracy']:.4f} (Δ {100 * scores['accuracy_delta']:+.2f} pts), "
                  f"top-1 agreement {scores['top1_agreement']:.4f}")

    def evaluate(fmt: str, path: Path | None = None):
        _, ref_pred, ref_acc = reference()
        manifest["pytorch"]["accuracy"] = ref_acc
        m = load_ort_model(path or out / ARTIFACTS[fmt][0], threads=cfg.threads)
        logits = batched(m, x_test, desc=fmt)
        return logits, _scores(logits, y_test, ref_pred, ref_acc)

    # FP32 is the base of everything else: always (re)check it. It replaces the previous model.onnx only
    # once it has passed the parity check, so a failed export leaves the old file and manifest as they were.
    key32 = _key(ckpt_sha, cfg.opset, "fp32")
    if not up_to_date("fp32", key32):
        print("exporting model.onnx (FP32, dynamic batch)")
        with atomic_path(out / "model.onnx") as candidate:
            export_onnx(model, candidate, artifact_metadata(pre, mj, "fp32", run_dir), opset=cfg.opset)
            logits, scores = evaluate("fp32", candidate)
            max_diff = float(np.abs(logits - reference()[0]).max())
            limit = MAX_LOGIT_DIFF * max(1.0, float(np.abs(reference()[0]).max()))
            if max_diff > limit or scores["top1_agreement"] < MIN_AGREEMENT:
                raise ExportError(f"FP32 ONNX parity failed: max |Δlogit| {max_diff:.2e} (limit {limit:.1e}), "
                                  f"top-1 agreement {scores['top1_agreement']:.4f} (limit {MIN_AGREEMENT})")
        record("fp32", key32, scores, max_abs_logit_diff=max_diff)
    meta = artifact_metadata(pre, mj, "fp32", run_dir)

    if "fp16" in cfg.formats:
        key = _key(ckpt_sha, cfg.opset, "fp16")
        if not up_to_date("fp16", key):
            print("exporting model.fp16.onnx (FP16 compute, FP32 inputs and outputs)")
            export_onnx(model, out / "model.fp16.onnx", {**meta, "cifar_deploy.precision": "fp16"}, fp16=True,
                        opset=cfg.opset)
            record("fp16", key, evaluate("fp16")[1])

    int8 = [(f, flavour) for f, flavour in (("int8", "cpu"), ("int8_trt", "trt")) if f in cfg.formats]
    if int8:
        _int8(cfg, out, mj, metrics, data, pre, manifest, old_search, up_to_date, record, evaluate, int8)

    _tensorrt(cfg, out, arts, up_to_date, record, lambda runner: _scores(
        batched(runner, x_test, batch=min(64, cfg.max_batch), desc="tensorrt"), y_test, *reference()[1:]))
    atomic_write_json(manifest, manifest_path)
    if cfg.bentoml:
        save_to_bentoml(out, manifest)
        atomic_write_json(manifest, manifest_path)
    print(f"artifacts and manifest in {out}")
    return manifest


def _keep_patterns(keep_float: list[str], backbone: str) -> list[str]:
    """``preset`` expands to the backbone's known-sensitive nodes; other entries are regexes."""
    out: list[str] = []
    for p in keep_float:
        if p == "preset":
            out += quantize.KEEP_FLOAT_PRESETS.get(backbone, [])
        elif p not in ("none", "auto", "search"):
            out.append(p)
    return out


def run_split(data: CifarData, metrics: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """The run's own (train, val) indices into ``data.train_x``: its ``--limit-train``, ``--val-fraction``
    and ``--seed`` from ``metrics.json`` (training's defaults when it has none)."""
    c = metrics.get("config", {})
    split = {"val_fraction": c.get("val_fraction", 0.1), "seed": c.get("seed", 0), "limit_train": c.get("limit_train")}
    tr, va = stratified_split(data.train_y[: split["limit_train"] or len(data.train_y)], split["val_fraction"],
                              split["seed"])
    return tr, va, split


def _search_skipped(cfg: ExportConfig, mj: dict, n_val: int) -> str | None:
    """Why the INT8 search does not run (None: it runs)."""
    if cfg.keep_float not in (["auto"], ["search"]):
        return "--keep-float names the float nodes"
    if cfg.max_accuracy_drop is None:
        return "no --max-accuracy-drop"
    if n_val == 0:
        return "the run has no validation split"
    if cfg.keep_float == ["auto"]:
        if str(mj.get("weights", "")).startswith("none"):
            return "random-init weights (a speed-only run: its accuracy means nothing); --keep-float search forces it"
        if n_val < int8_search.MIN_VAL_IMAGES:
            return (f"{n_val} validation images are too few to measure a {cfg.max_accuracy_drop:g}-point drop; "
                    "--keep-float search forces it")
    return None


def _int8(cfg: ExportConfig, out: Path, mj: dict, metrics: dict, data: CifarData, pre: Preprocessing,
          manifest: dict, old_search: dict, up_to_date, record, evaluate, formats: list[tuple[str, str]]) -> None:
    """The INT8 artifacts: float nodes from the search (on the run's validation split), the preset or
    ``--keep-float``; calibration on the run's training split, computed once for both flavours."""
    tr, va, split = run_split(data, metrics)
    skipped = _search_skipped(cfg, mj, len(va))
    if skipped and cfg.keep_float == ["search"]:
        raise UserError(f"--keep-float search: {skipped}")
    fp32_sha = manifest["artifacts"]["fp32"]["sha256"]
    quarter = max(1, cfg.calib_images // 4)
    calibrations = list(dict.fromkeys([(cfg.calib_method, cfg.calib_images)] + (
        [("minmax", cfg.calib_images), ("minmax", quarter), ("percentile", quarter), ("entropy", quarter)]
        if cfg.search_calibration else [])))
    if skipped:
        patterns = _keep_patterns(["preset"] if cfg.keep_float == ["auto"] else cfg.keep_float, mj["backbone"])
        source = f"preset ({skipped})" if cfg.keep_float == ["auto"] else "--keep-float"
        recipe = _key(fp32_sha, cfg.calib_images, cfg.calib_method, patterns, split, "train-split")
        manifest["int8_search"] = {"skipped": skipped}
    else:
        recipe = _key(fp32_sha, cfg.max_accuracy_drop, cfg.min_agreement, calibrations, split, len(va),
                      int8_search.VERSION)
        reuse = old_search.get("key") == recipe
        manifest["int8_search"] = old_search if reuse else {"key": recipe}
    calib_x: np.ndarray | None = None
    caches: dict[tuple[str, int], Path] = {}
    with tempfile.TemporaryDirectory() as work:
        for fmt, flavour in formats:
            key = _key(recipe, flavour, quantize.TRT_OPTIONS if flavour == "trt" else {})
            if (skipped or "float_nodes" in manifest["int8_search"]) and up_to_date(fmt, key):
                continue
            if calib_x is None:
                idx = tr[quantize.select_calibration_indices(data.train_y[tr], cfg.calib_images, seed=0)]
                calib_x = pre.to_input(data.train_x[idx])
            s = manifest["int8_search"]
            if not skipped and "float_nodes" not in s:
                print(f"INT8 search: bound {cfg.max_accuracy_drop:g} pts, agreement ≥ {cfg.min_agreement:g} on the "
                      f"run's {len(va)} validation images")
                s.update(int8_search.search(out / "model.onnx", calib_x, pre.to_input(data.train_x[va]),
                                            data.train_y[va], cfg.max_accuracy_drop, cfg.min_agreement, calibrations,
                                            Path(work), cfg.threads))
                c = s["calibration"]
                caches[c["method"], c["images"]] = Path(s.pop("cache"))
                s["split"] = split
            if skipped:
                method, images, per_channel = cfg.calib_method, len(calib_x), True
                keep = quantize.resolve_keep_float(out / "model.onnx", patterns)
                extra = {"keep_float_patterns": patterns, "keep_float_source": source}
            else:
                c = s["calibration"]
                method, images, per_channel = c["method"], c["images"], c["per_channel"] or flavour == "trt"
                keep = s["float_nodes"]
                extra = {"keep_float_patterns": [re.escape(n) for n in keep], "keep_float_source": "search",
                         "float_blocks": s["float_blocks"]}
            if (method, images) not in caches:
                caches.update({(method, n): p for n, p in quantize.calibrate(
                    out / "model.onnx", calib_x, method, [images], Path(work)).items()})
            print(f"quantizing {ARTIFACTS[fmt][0]} ({flavour} flavour, {method} calibration on {images} training "
                  f"images, {len(keep)} nodes kept in float)")
            path = out / ARTIFACTS[fmt][0]
            quantize.quantize_int8(out / "model.onnx", path, calib_x, flavour, method, keep, "input",
                                   caches[method, images], per_channel)
            problems = tensorrt_problems(onnx.load(str(path))) if flavour == "trt" else []
            if problems:
                path.unlink()
                raise ExportError(f"{path.name} would not build with TensorRT ({len(problems)} problems): "
                                  + "; ".join(problems[:3]))
            record(fmt, key, evaluate(fmt)[1],
                   calibration={"method": method, "images": images, "flavour": flavour, "per_channel": per_channel,
                                "split": "training split (validation images excluded)", **extra,
                                "keep_float_nodes": len(keep)},
                   qdq=quantize.qdq_summary(path))


def _tensorrt(cfg: ExportConfig, out: Path, arts: dict, up_to_date, record, score) -> None:
    """TensorRT engines from the FP16 and INT8 (TensorRT flavour) ONNX files, like every other artifact: an
    up-to-date key (source, profile, workspace, TensorRT version and GPU), evaluated with ``score``. A
    missing TensorRT or GPU, or a failed build, is a skipped manifest entry with its reason."""
    wanted = [f for f in ("trt_fp16", "trt_int8") if f in cfg.formats]
    if not wanted:
        return
    reason = trt_engine.unavailable_reason()
    try:
        target = None if reason else trt_engine.host_target()
    except RuntimeError as e:  # a CUDA error while reading the GPU's properties
        reason = str(e)

    def skip(fmt: str, why: str) -> None:
        print(f"{ARTIFACTS[fmt][0]}: skipped: {why}")
        arts[fmt] = {"file": ARTIFACTS[fmt][0], "format": "tensorrt", "skipped": why}

    if reason:
        for fmt in wanted:
            skip(fmt, reason)
        return
    profile = trt_engine.Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    for fmt in wanted:
        src = {"trt_fp16": "fp16", "trt_int8": "int8_trt"}[fmt]
        if "sha256" not in arts.get(src, {}):
            skip(fmt, f"it is built from the {src} ONNX file: add {src} to --formats")
            continue
        plan = out / ARTIFACTS[fmt][0]
        key = _key(arts[src]["sha256"], asdict(profile), cfg.workspace_mb, target)
        if up_to_date(fmt, key):
            continue
        print(f"building {plan.name} from {arts[src]['file']} (TensorRT {target['tensorrt_version']}, "
              f"{target['gpu']}, compute capability {target['compute_capability']})")
        try:
            trt_engine.build_engine(out / arts[src]["file"], plan, profile, cfg.workspace_mb, out / "timing.cache")
            runner = trt_engine.TrtRunner(plan, target)
            try:
                scores = score(runner)
            finally:
                runner.close()
        except Exception as e:  # TensorRT's errors have no common base; the other artifacts still ship
            plan.unlink(missing_ok=True)
            skip(fmt, f"TensorRT build or check failed: {type(e).__name__}: {e}")
            continue
        record(fmt, key, scores, source=arts[src]["file"], **target, **asdict(profile))


def save_to_bentoml(out: Path, manifest: dict) -> None:
    """Each ONNX artifact → a BentoML model (``<run>-<format>``), manifest entry as metadata."""
    import bentoml

    for fmt, e in manifest["artifacts"].items():
        if "sha256" not in e:
            continue
        tag = bentoml_name(manifest["run"], fmt)
        try:
            existing = bentoml.models.get(tag)
            if existing.info.metadata.get("sha256") == e["sha256"]:
                e["bentoml_tag"] = str(existing.tag)
                continue
        except bentoml.exceptions.NotFound:
            pass
        with bentoml.models.create(tag, labels={"backbone": manifest["backbone"], "format": fmt,
                                                "precision": e["precision"]},
                                   metadata={**{k: v for k, v in e.items() if isinstance(v, str | int | float)},
                                             "preprocessing": json.dumps(manifest["preprocessing"]),
                                             "run": manifest["run"], "dataset": manifest["dataset"]}) as bm:
            (Path(bm.path) / e["file"]).write_bytes((out / e["file"]).read_bytes())
            (Path(bm.path) / "manifest.json").write_text(json.dumps(manifest, indent=2))
        e["bentoml_tag"] = str(bm.tag)
        print(f"saved {e['file']} to the BentoML model store as {bm.tag}")


def bentoml_name(run: str, fmt: str) -> str:
    """A valid BentoML model name for a run's artifact (lowercase letters, digits, ``-_.``)."""
    import re

    return re.sub(r"[^a-z0-9_.-]+", "-", f"{run}-{fmt}".lower()).strip("-_.")
