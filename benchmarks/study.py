"""The seeds' study, config-driven: ``python -m benchmarks.study configs/cpu-small.yaml`` (``make study``).

For every experiment of the config: train (``training``), export every format (``export``), benchmark
the formats side by side (``export.benchmark``) and load-test the chosen formats over HTTP
(``loadtest``), each stage called with its own config object. Then write one report that puts the
seeds' published figures (``configs/published.yaml``) beside ours: ``<report>.md``, ``.json`` and
``.png``. Every stage skips work that is already done, so an interrupted study resumes where it
stopped. ``--validate`` only checks the config.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from export.benchmark import BenchmarkConfig
from export.exporter import ARTIFACTS
from export.onnx_export import ExportError
from loadtest.run import LoadTestConfig
from service.runtime import ArtifactError
from training.record import load_metrics
from training.train import TrainConfig
from utils import UserError, atomic_write, atomic_write_json, cli, from_mapping, pyplot, save_figure

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "configs" / "published.yaml"


@dataclass
class Experiment:
    name: str
    train: TrainConfig
    published: list[str] = field(default_factory=list)  # ids in configs/published.yaml
    speed_only: bool = False  # random weights on purpose: size and speed rows, no accuracy claim
    loadtest: bool = True
    nproc_per_node: int = 1  # more than 1: trained by that many torchrun processes (batch_size is per process)


@dataclass
class StudyConfig:
    name: str
    experiments: list[Experiment]
    description: str = ""
    data_dir: str | None = None
    runs_dir: str = "runs/study"
    artifacts_dir: str = "artifacts/study"
    work_dir: str = "studies/study"
    report: str = "benchmarks/study"
    export: dict = field(default_factory=lambda: {"formats": ["fp32", "fp16", "int8"]})
    benchmark: BenchmarkConfig = field(default_factory=lambda: BenchmarkConfig(batches=[1, 32], min_seconds=2))
    loadtest: LoadTestConfig = field(default_factory=lambda: LoadTestConfig(scenarios=["single", "offline"]))
    loadtest_formats: list[str] = field(default_factory=lambda: ["int8"])
    published: dict = field(default_factory=dict)


def _check_keys(where: str, raw: dict, allowed) -> None:
    unknown = set(raw) - set(allowed)
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def load_study(path: str | Path, published: str | Path = PUBLISHED, data_dir: str | None = None) -> StudyConfig:
    """Read and fully validate a study config (every experiment's training config included)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        pub = yaml.safe_load(Path(published).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path} or {published}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("experiments"), list) or not raw["experiments"]:
        raise UserError(f"{path}: needs a mapping with a non-empty `experiments` list")
    study_keys = {f.name for f in fields(StudyConfig)} | {"defaults"}
    _check_keys(str(path), raw, study_keys - {"published", "loadtest_formats"})
    defaults = raw.get("defaults") or {}
    train_keys = {f.name for f in fields(TrainConfig)} - {"name", "runs_dir", "resume", "data_dir"}
    _check_keys(f"{path}: defaults", defaults, train_keys)
    data = data_dir or os.environ.get("CIFAR_ROOT") or raw.get("data_dir")
    runs_dir = raw.get("runs_dir", StudyConfig.runs_dir)
    experiments = []
    for i, e in enumerate(raw["experiments"]):
        if not isinstance(e, dict) or not e.get("name"):
            raise UserError(f"{path}: experiment {i} needs a name")
        where = f"{path}: experiment {e['name']}"
        meta = {"name", "published", "speed_only", "loadtest", "nproc_per_node"}
        _check_keys(where, e, meta | train_keys)
        settings = {**defaults, **{k: v for k, v in e.items() if k not in meta}}
        cfg = TrainConfig(**settings, name=e["name"], runs_dir=runs_dir, resume=True, data_dir=data)
        try:
            cfg.validate()
        except UserError as err:
            raise UserError(f"{where}: {err}") from err
        refs = list(e.get("published") or [])
        missing = [r for r in refs if r not in pub]
        if missing:
            raise UserError(f"{where}: unknown published figures {missing}; see {published}")
        nproc = e.get("nproc_per_node", 1)
        if not isinstance(nproc, int) or nproc < 1:
            raise UserError(f"{where}: nproc_per_node must be a positive integer, got {nproc!r}")
        experiments.append(Experiment(e["name"], cfg, refs, bool(e.get("speed_only", False)),
                                      bool(e.get("loadtest", True)), nproc))
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: experiment names must be unique")
    nested = ("experiments", "defaults", "benchmark", "loadtest")
    study = StudyConfig(**{k: v for k, v in raw.items() if k not in nested}, experiments=experiments, published=pub)
    study.data_dir = data
    bad = set(study.export.get("formats", [])) - set(ARTIFACTS)
    if bad:
        raise UserError(f"{path}: export formats {sorted(bad)} unknown; valid: {', '.join(ARTIFACTS)}")
    _check_keys(f"{path}: export", study.export, {"formats"})
    study.benchmark = from_mapping(BenchmarkConfig, raw.get("benchmark") or {}, f"{path}: benchmark")
    lt = dict(raw.get("loadtest") or {})
    study.loadtest_formats = list(lt.pop("formats", study.loadtest_formats))
    study.loadtest = from_mapping(LoadTestConfig, lt, f"{path}: loadtest")
    if not set(study.loadtest_formats) <= set(study.export.get("formats", [])):
        raise UserError(f"{path}: loadtest formats must be among the exported formats")
    return study


# --------------------------------------------------------------------------- stages


def _say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def train_all(study: StudyConfig, only: set[str] | None) -> None:
    from training.distributed import launch
    from training.train import train

    for i, e in enumerate(study.experiments, 1):
        if only and e.name not in only:
            continue
        _say(f"[{i}/{len(study.experiments)}] train {e.name}")
        if e.nproc_per_node > 1:  # resume=True: a finished run is reused, an interrupted one continues
            launch(e.train, e.nproc_per_node)
        else:
            train(e.train)


def export_all(study: StudyConfig, only: set[str] | None) -> list[Path]:
    from export.exporter import ExportConfig, run_export

    dirs = []
    for i, e in enumerate(study.experiments, 1):
        out = Path(study.artifacts_dir) / e.name
        dirs.append(out)
        if only and e.name not in only:
            continue
        _say(f"[{i}/{len(study.experiments)}] export {e.name}")
        run_export(ExportConfig(run_dir=str(Path(study.runs_dir) / e.name), out=str(out),
                                data_dir=study.data_dir, formats=list(study.export.get("formats", ["fp32"])),
                                eval_limit=64 if e.speed_only else None))
    return dirs


def benchmark_all(study: StudyConfig, dirs: list[Path]) -> Path:
    from export.benchmark import run_benchmark

    _say("benchmark every format side by side")
    out = Path(study.work_dir) / "export"
    run_benchmark(replace(study.benchmark, artifacts=[str(d) for d in dirs], out=str(out)))
    return out.with_suffix(".json")


def loadtest_all(study: StudyConfig) -> Path | None:
    from loadtest.run import run_loadtest

    models = []
    for e in study.experiments:
        if not e.loadtest:
            continue
        manifest = json.loads((Path(study.artifacts_dir) / e.name / "manifest.json").read_text())
        for fmt in study.loadtest_formats:
            models.append(f"{e.name}-{fmt}={manifest['artifacts'][fmt]['bentoml_tag']}")
    if not models:
        return None
    _say(f"load test {len(models)} served models")
    reports = Path(study.work_dir) / "loadtest"
    payloads = f"cifar:{study.data_dir}" if study.data_dir else "synthetic"
    run_loadtest(replace(study.loadtest, models=models, reports_dir=str(reports), payload_source=payloads))
    return reports / "latest" / "results.json"


# --------------------------------------------------------------------------- report


def collect(study: StudyConfig, export_json: Path | None, loadtest_json: Path | None) -> list[dict]:
    """One record per experiment: training metrics, export rows, load-test rows, the seeds' figures."""
    exports = json.loads(export_json.read_text()) if export_json and export_json.is_file() else []
    lt = json.loads(loadtest_json.read_text())["rows"] if loadtest_json and loadtest_json.is_file() else []
    out = []
    for e in study.experiments:
        m = load_metrics(Path(study.runs_dir) / e.name) or {}
        formats = [r for r in exports if r.get("run") == e.name]
        out.append({
            "experiment": e.name, "speed_only": e.speed_only, "model": e.train.model, "weights": m.get("weights"),
            "dataset": m.get("dataset", e.train.dataset), "strategy": e.train.strategy,
            "input_size": m.get("input_size", e.train.input_size), "epochs": m.get("epochs_run"),
            "batch_size": m.get("global_batch_size", e.train.batch_size), "optimizer": e.train.optimizer,
            "train_seconds": m.get("train_seconds"), "test_accuracy": m.get("test_accuracy"),
            "macro_recall": m.get("test_macro_recall"), "macro_f1": m.get("test_macro_f1"),
            "params_total": m.get("params_total"), "device": m.get("device"),
            "formats": formats,
            "loadtest": [r for r in lt if r["model"].startswith(f"{e.name}-")],
            "published": [{"id": p, **study.published[p]} for p in e.published],
        })
    return out


def _f(v, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _best(rows: list[dict], key: str, **match) -> dict | None:
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def to_markdown(study: StudyConfig, records: list[dict]) -> str:
    lines = [f"# Study `{study.name}`", "", study.description, "",
             f"Produced by `python -m benchmarks.study configs/{study.name}.yaml`. Device: "
             f"{next((r['device'] for r in records if r['device']), '?')}. Rows marked *speed only* carry random "
             "weights on purpose (no ImageNet weights offline): their accuracy says nothing.", "",
             "## Accuracy and training time, ours beside the seeds'", "",
             "| experiment | model | weights | data | strategy | px | epochs | batch | optimizer | train s | "
             "test acc | macro F1 | seed figure | seed acc | seed train s | seed setting |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|"]
    for r in records:
        acc = "*speed only*" if r["speed_only"] else _f(r["test_accuracy"])
        f1 = "–" if r["speed_only"] else _f(r["macro_f1"])
        pubs = r["published"] or [{}]
        for j, p in enumerate(pubs):
            ours = [r["experiment"], r["model"], str(r["weights"]), str(r["dataset"]), r["strategy"],
                    str(r["input_size"]), str(r["epochs"]), str(r["batch_size"]), r["optimizer"],
                    _f(r["train_seconds"], ".0f"), acc, f1] if j == 0 else [""] * 12
            lines.append("| " + " | ".join([*ours, p.get("id", "–"), _f(p.get("test_accuracy")),
                                            _f(p.get("train_seconds"), ".0f"), p.get("setting", "")]) + " |")
    lines += ["", "## Formats (ONNX Runtime; batch 32 throughput, batch 1 latency)", "",
              "| experiment | format | size MB | accuracy | img/s (b32) | p50 ms (b1) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in records:
        for fmt in dict.fromkeys(x["format_label"] for x in r["formats"]):
            big = _best(r["formats"], "throughput_ips", format_label=fmt, batch=32) or {}
            one = _best(r["formats"], "throughput_ips", format_label=fmt, batch=1) or {}
            acc = "–" if r["speed_only"] else _f(big.get("accuracy") or one.get("accuracy"))
            lines.append(f"| {r['experiment']} | {fmt} | {_f(big.get('size_mb') or one.get('size_mb'), '.1f')} | "
                         f"{acc} | {_f(big.get('throughput_ips'), '.1f')} | {_f(one.get('p50_ms'), '.2f')} |")
    lines += ["", "## Served over HTTP (BentoML, Locust on the same machine)", "",
              "| experiment | served model | scenario | users | img/s | p50 ms | p95 ms | failures |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        for x in r["loadtest"]:
            lines.append(f"| {r['experiment']} | {x['model']} | {x['scenario']} | {x['users']} | "
                         f"{x['images_per_s']:.1f} | {_f(x['p50_ms'], '.0f')} | {_f(x['p95_ms'], '.0f')} | "
                         f"{x['failures']} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Left: our test accuracy beside the seeds' figures. Right: accuracy vs INT8 img/s (batch 32)."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    acc = [r for r in records if not r["speed_only"] and r["test_accuracy"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["experiment"] for r in acc]
    x = range(len(acc))
    ax1.bar([i - 0.2 for i in x], [r["test_accuracy"] for r in acc], width=0.4, label="ours")
    seed = [max((p.get("test_accuracy") or 0 for p in r["published"]), default=0) for r in acc]
    ax1.bar([i + 0.2 for i in x], seed, width=0.4, label="seed (best cited)", color="tab:gray")
    ax1.set_xticks(list(x), names, rotation=20, ha="right")
    ax1.set(ylim=(0, 1), ylabel="test accuracy", title="accuracy: ours vs the seeds'")
    ax1.legend()
    for r in acc:
        best = _best(r["formats"], "throughput_ips", batch=32, precision="int8") or \
            _best(r["formats"], "throughput_ips", batch=32)
        if best:
            ax2.scatter(best["throughput_ips"], r["test_accuracy"])
            ax2.annotate(r["experiment"], (best["throughput_ips"], r["test_accuracy"]), fontsize=8)
    ax2.set(xscale="log", xlabel="images/s, best format, batch 32", ylabel="test accuracy",
            title="accuracy vs throughput (this machine)")
    ax2.xaxis.set_minor_formatter(NullFormatter())
    save_figure(fig, path)


def write_report(study: StudyConfig, records: list[dict]) -> Path:
    out = Path(study.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"study": study.name, "description": study.description, "records": records},
                      out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), to_markdown(study, records))
    plot(records, out.with_suffix(".png"))
    return out.with_suffix(".md")


@dataclass
class StudyArgs:
    """Options of ``python -m benchmarks.study`` (the study itself is the YAML file ``study``)."""

    study: str = field(metadata={"help": "a study config, e.g. configs/cpu-small.yaml"})
    data_dir: str | None = field(default=None, metadata={"help": "CIFAR folder (default: $CIFAR_ROOT, else the "
                                                                 "config's)"})
    only: list[str] | None = field(default=None, metadata={"help": "run these experiments only (the report "
                                                                   "covers all)"})
    validate: bool = field(default=False, metadata={"help": "check the config and exit"})
    skip_loadtest: bool = False
    report_only: bool = field(default=False, metadata={"help": "rewrite the report from finished stages"})


def run_study(args: StudyArgs) -> int:
    study = load_study(args.study, data_dir=args.data_dir)
    if args.validate:
        print(f"{args.study}: valid ({len(study.experiments)} experiments)")
        return 0
    only = set(args.only) if args.only else None
    work = Path(study.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"study": study.name, "experiments": [{**asdict(e.train), "published": e.published}
                                                           for e in study.experiments]}, work / "config.json")
    export_json, lt_json = work / "export.json", work / "loadtest" / "latest" / "results.json"
    try:
        if not args.report_only:
            train_all(study, only)
            dirs = export_all(study, only)
            export_json = benchmark_all(study, [d for e, d in zip(study.experiments, dirs, strict=True)
                                                if not only or e.name in only])
            if not args.skip_loadtest:
                lt_json = loadtest_all(study) or lt_json
    except (ArtifactError, ExportError) as e:
        raise UserError(str(e)) from e
    print(f"report: {write_report(study, collect(study, export_json, lt_json))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(StudyArgs, run_study, argv, "python -m benchmarks.study", __doc__, positional=("study",))


if __name__ == "__main__":
    sys.exit(main())
