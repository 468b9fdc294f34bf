"""Write ``benchmarks/README.md`` from the committed results: ``python -m benchmarks.summary``.

The tables are rendered from ``benchmarks/{training,ship,robustness,export,service,loadtest,study-cpu-small}.json``;
the interpretation is hand-written in ``benchmarks/notes.md`` (one ``## <section>`` per section below)
and placed after that section's tables. ``tests/test_docs.py`` checks that the committed README is
exactly what this writes, so rerun it after a benchmark or an edit of the notes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from loadtest.scenarios import best_within_slo
from utils import atomic_write

HERE = Path(__file__).resolve().parent
OUT = HERE / "README.md"
NOTES = HERE / "notes.md"


def _f(value, spec: str) -> str:
    """``value`` formatted with ``spec``; a dash when it was not measured."""
    return "–" if value is None else format(value, spec)


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table; ``align`` has one letter per column: l (left) or r (right)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- sections


def training(rows: list[dict]) -> list[str]:
    first = rows[0]
    out = [f"Dataset `{first['dataset']}`: {first['num_train']} training and {first['num_test']} test images; "
           f"device: {first['device']}.", ""]
    out += _table(
        ["run", "model", "weights", "strategy", "px", "epochs", "train s", "test acc", "macro F1", "trainable params"],
        "llllrrrrrr",
        [[r["run"], r["model"], r["weights"], r["strategy"] + (" (cached features)" if r["feature_cache"] else ""),
          str(r["input_size"]), str(r["epochs"]), f"{r['train_seconds']:.0f}", f"{r['test_accuracy']:.4f}",
          f"{r['macro_f1']:.4f}", f"{r['params_trainable']:,}"] for r in rows])
    for pre in rows:  # ImageNet vs random init, everything else equal
        for rnd in rows:
            same = all(pre[k] == rnd[k] for k in ("model", "strategy", "input_size", "epochs"))
            if same and pre["weights"].startswith("imagenet") and rnd["weights"].startswith("none"):
                gain = 100 * (pre["test_accuracy"] - rnd["test_accuracy"])
                out += ["", f"Transfer gain ({pre['model']}, {pre['strategy']}, {pre['input_size']} px, "
                            f"{pre['epochs']} epochs): ImageNet {100 * pre['test_accuracy']:.1f}% vs random init "
                            f"{100 * rnd['test_accuracy']:.1f}% = **{gain:+.1f} points**."]
    return out


def _ratio(num: dict | None, den: dict | None) -> str:
    return f"{num['throughput_ips'] / den['throughput_ips']:.2f}×" if num and den else "–"


def export(rows: list[dict]) -> list[str]:
    runs = list(dict.fromkeys(r["run"] for r in rows))  # export.json merges by run
    small, large = min(r["batch"] for r in rows), max(r["batch"] for r in rows)
    out = [f"Device: {rows[0]['device']}. Throughput at batch {large}, latency at batch {small}.", ""]
    table, ratios = [], []
    for run in runs:
        mine = [r for r in rows if r["run"] == run]
        at = {(r["format"], r["batch"]): r for r in mine}
        first = mine[0]
        model = first["model"]
        for i, fmt in enumerate(dict.fromkeys(r["format"] for r in mine)):
            big, one = at.get((fmt, large)), at.get((fmt, small))
            row = big or one
            table.append([f"{model} ({first['input_size']} px)" if i == 0 else "",
                          first["weights"] if i == 0 else "", row["format_label"], f"{row['size_mb']}",
                          _f(row["accuracy"], ".4f"),
                          "–" if row["accuracy_delta"] is None else f"{100 * row['accuracy_delta']:+.2f} pts",
                          _f(big and big["throughput_ips"], ".1f"), _f(one and one["p50_ms"], ".2f")])
        fp32 = at.get(("fp32", large))
        ov_int8 = max((r for r in mine if r["batch"] == large and r["format"].startswith("openvino_int8")),
                      key=lambda r: r["throughput_ips"], default=None)
        ratios.append([model, _ratio(at.get(("int8", large)), fp32), _ratio(at.get(("int8_trt", large)), fp32),
                       _ratio(at.get(("openvino_fp32", large)), fp32),
                       _ratio(ov_int8, fp32) + (f" ({ov_int8['format_label'][9:]})" if ov_int8 else ""),
                       _ratio(fp32, at.get(("pytorch", large)))])
    out += _table(["model", "weights", "format", "size MB", "accuracy", "Δ vs PyTorch", f"img/s (b{large})",
                   f"p50 ms (b{small})"], "lllrrrrr", table)
    out += ["", f"Throughput ratios at batch {large} on the CPU, against ONNX Runtime FP32 (OpenVINO runs the "
            "same ONNX files; its best INT8 flavour is named):", ""]
    out += _table(["model", "ORT INT8 (CPU Q/DQ)", "ORT INT8 (TensorRT Q/DQ)", "OpenVINO FP32", "best OpenVINO INT8",
                   "ORT FP32 ÷ PyTorch eager"], "lrrrrr", ratios)
    return out


def service(rows: list[dict]) -> list[str]:
    topology = any("topology" in r for r in rows)  # rows measured before the split topology was removed
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # one line per (model, sessions, topology): single-image and batched clients side by side
        key = (r["model"], r["precision"], r["input_size"], r["instances"], r["threads"], r.get("topology"))
        groups.setdefault(key, []).append(r)
    table = []
    for (model, precision, px, instances, threads, topo), rs in groups.items():
        rs.sort(key=lambda r: r["images_per_request"])

        def both(key: str, rs=rs) -> str:
            return " / ".join(str(r[key]) for r in rs)

        first = rs[0]
        table.append([f"{model} {precision} ({px} px)", f"{instances} × {threads or 'all'}"]
                     + ([topo or "inline"] if topology else [])
                     + [" / ".join(f"{r['clients']} × {r['images_per_request']}" for r in rs), both("served_ips"),
                        str(first["inprocess_ips"]), both("ratio"),
                        " / ".join(", ".join(str(x) for x in r["ratios"]) for r in rs),
                        str(first["p50_ms"]), str(first["inprocess_p50_ms"]), str(first["overhead_p50_ms"]),
                        str(sum(r["failures"] for r in rs))])
    header = ["model", "sessions"] + (["topology"] if topology else []) + [
        "clients × images/request", "served img/s", "in-process img/s", "ratio", "runs", "p50 ms",
        "in-process p50 ms", "overhead ms", "failures"]
    out = [f"Batch setting {rows[0]['batch_setting']}; medians of {rows[0]['repeats']} served runs per row "
           "(each run's ratio in *runs*).", ""]
    return out + _table(header, "ll" + ("l" if topology else "") + "lrrrrrrrr", table)


def _how(r: dict) -> str:
    if r["scenario"] == "offline":
        return f"`/classify_batch`, {r['users']} users × {round(r['images_per_s'] / r['rps'])} images"
    users = f"{r['users']} user" + ("s" if r["users"] > 1 else "")
    return f"single images, {users}" + {"single-stream": " (single-stream)", "constant-rate": " (constant rate)"}.get(
        r["scenario"], "")


def loadtest(rows: list[dict], slo_ms: float = 100.0) -> list[str]:
    """Per served model: its most images/s within the SLO with single images, and with batches."""
    ranked = best_within_slo(rows, slo_ms, by_request_kind=True)
    models = len({(r["model"], r["backend"]) for r in rows})
    out = [f"{models} (model, precision) entries on {rows[0]['device']}: {sum(r['requests'] for r in rows):,} "
           f"requests, {sum(r['failures'] for r in rows)} failed. Most images/s with p95 ≤ {slo_ms:.0f} ms and "
           "≤ 1% failures, per model and kind of request:", ""]
    return out + _table(["rank", "model", "backend", "how", "img/s", "p95 ms", "server batch"], "rlllrrr",
                        [[str(i), r["model"], r["backend"], _how(r), f"{r['images_per_s']:.1f}",
                          f"{r['p95_ms']:.1f}", f"{r['server_mean_batch']:.1f}"] for i, r in enumerate(ranked, 1)])


def study(data: dict) -> list[str]:
    recs = data["records"]
    acc = []
    for r in recs:
        seeds = "; ".join(f"{p['id']}: {_f(p.get('test_accuracy'), '.4f')}"
                          + (f", {p['train_seconds']:.0f} s" if p.get("train_seconds") else "") for p in r["published"])
        acc.append([r["experiment"], r["model"], r["strategy"], str(r["input_size"]), str(r["epochs"]),
                    f"{r['train_seconds']:.0f}", "*speed only*" if r["speed_only"] else f"{r['test_accuracy']:.4f}",
                    seeds or "–"])
    speed = []
    for r in recs:
        fmt = {(f["format"], f["batch"]): f for f in r["formats"]}
        served = {x["scenario"]: x for x in r["loadtest"]}
        int8, fp32 = fmt.get(("int8", 32)), fmt.get(("fp32", 32))
        single, offline = served.get("single-stream"), served.get("offline")
        speed.append([r["experiment"], _f(fp32 and fp32["throughput_ips"], ".1f"),
                      _f(int8 and int8["throughput_ips"], ".1f"),
                      "–" if r["speed_only"] or not int8 else f"{int8['accuracy']:.4f}",
                      _f(single and single["p50_ms"], ".0f"), _f(offline and offline["images_per_s"], ".1f")])
    out = [f"{data['description']}. Rows marked *speed only* carry random weights on purpose.", ""]
    out += _table(["experiment", "model", "strategy", "px", "epochs", "train s", "test acc",
                   "seeds' figures (test acc, train s)"], "lllrrrrl", acc)
    out += ["", "ONNX Runtime on CPU at batch 32, and served over HTTP (INT8):", ""]
    out += _table(["experiment", "FP32 img/s", "INT8 img/s", "INT8 test acc", "served single-stream p50 ms",
                   "served offline img/s"], "lrrrrr", speed)
    return out


def ship(rows: list[dict]) -> list[str]:
    from benchmarks.ship import augment_label  # the one label of a run's training images (imports torch)

    first = rows[0]
    out = [f"{first['num_train']} training, {first['num_val']} validation, {first['num_test']} test images; "
           f"{first['cpu']}. The epoch that ships has the best validation loss.", ""]
    return out + _table(
        ["run", "training images", "px", "epochs", "selected", "val acc", "test acc (run)", "FP32 ONNX test acc",
         "INT8 test acc (Δ)", "train s"],
        "llrrrrrrrr",
        [[r["run"], augment_label(r),
          str(r["input_size"]), str(r["epochs"]), str(r["best_epoch"]),
          f"{100 * r['val_accuracy']:.2f}", f"{100 * r['test_accuracy']:.2f}",
          _f(r["onnx_fp32_accuracy"] and 100 * r["onnx_fp32_accuracy"], ".2f"),
          "–" if r["int8_accuracy"] is None else f"{100 * r['int8_accuracy']:.2f} ({100 * r['int8_delta']:+.2f})",
          f"{r['train_seconds']:.0f}"] for r in rows])


def robustness(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["split"] == "test"]
    by = {(r["run"], r["format"], r["variant"]): r for r in rows}
    variants = ("png32", "jpeg32_q75", "jpeg256_q90", "jpeg32_q50", "png256", "gray_png32")
    body = []
    for run, fmt in dict.fromkeys((r["run"], r["format"]) for r in rows):
        cells = [by.get((run, fmt, v)) for v in variants]
        body.append([run, fmt.upper()] + ["–" if c is None else f"{100 * c['accuracy']:.2f}" if v == "png32"
                                          else f"{100 * c['delta_vs_png32']:+.2f}"
                                          for v, c in zip(variants, cells, strict=True)])
    return [f"Test split ({rows[0]['n']} images) through the service's preprocessing: accuracy on PNG 32 px, "
            "then Δ points for other uploads (target: JPEG q75 and 256 px JPEG within 1.5 points).", ""] + _table(
        ["run", "format", "PNG 32 px", "JPEG q75", "JPEG 256 px", "JPEG q50", "PNG 256 px", "grayscale"],
        "llrrrrrr", body)


# --------------------------------------------------------------------------- document

# (notes key, title, source JSON, renderer, the command that regenerates the source, figure)
SECTIONS: list[tuple[str, str, str | None, Callable | None, str | None, str | None]] = [
    ("training", "Training: the real CIFAR-10 subset", "training.json", training,
     "python benchmarks/training_bench.py --data-dir ../shared/data", "training.png"),
    ("ship", "The shipped Lite0", "ship.json", ship, "python -m benchmarks.ship", "ship.png"),
    ("robustness", "Real-world uploads: JPEG and any size", "robustness.json", robustness,
     "python -m benchmarks.ship (or python -m benchmarks.robustness ARTIFACTS … --split test)", "robustness.png"),
    ("export", "Export: formats side by side", "export.json", export,
     "python benchmarks/export_bench.py --data-dir ../shared/data", "export.png"),
    ("service", "Service: served vs in-process", "service.json", service,
     "python benchmarks/service_bench.py --models efficientnet_lite0=artifacts/lite0-imagenet-full128:int8 "
     "resnet50=artifacts/resnet50-random:int8 --configs 1x0 2x1 --repeats 2 --seconds 15", None),
    ("loadtest", "Load tests over HTTP", "loadtest.json", loadtest,
     "python -m loadtest.run --models NAME=TAG … --payload-source cifar:../shared/data "
     "--scenarios single server offline --users 1 4 16 --offline-batch 16 --slo-ms 100 --bench-out benchmarks/loadtest",
     "loadtest.png"),
    ("study", "The seeds' study, reduced for this CPU", "study-cpu-small.json", study,
     "make study STUDY=configs/cpu-small.yaml", "study-cpu-small.png"),
    ("claims", "The seeds' claims next to what we measured", None, None, None, None),
]


def parse_notes(text: str) -> dict[str, str]:
    """``## key`` sections of the notes file (text before the first heading is for its editors)."""
    notes: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = notes.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    known = {"intro"} | {s[0] for s in SECTIONS}
    unknown = sorted(set(notes) - known)
    if unknown:
        raise ValueError(f"{NOTES.name}: unknown sections {unknown}; valid: {sorted(known)}")
    return {k: "\n".join(v).strip() for k, v in notes.items()}


def render(folder: Path = HERE) -> str:
    """benchmarks/README.md's text from the JSON results and the notes in ``folder``."""
    notes = parse_notes((folder / NOTES.name).read_text())
    lines = ["# Benchmark results", "",
             "<!-- Generated by `python -m benchmarks.summary` from benchmarks/*.json and benchmarks/notes.md: "
             "edit those, not this file. -->", ""]
    if notes.get("intro"):
        lines += [notes["intro"], ""]
    for key, title, source, renderer, command, figure in SECTIONS:
        lines += [f"## {title}", ""]
        if source:
            stem = Path(source).stem
            lines += [f"Regenerate: `{command}`. Source: [{source}]({source}); full table: [{stem}.md]({stem}.md).", ""]
        if renderer:
            lines += renderer(json.loads((folder / source).read_text())) + [""]
        if notes.get(key):
            lines += [notes[key], ""]
        if figure:
            lines += [f"![{key}]({figure})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    atomic_write(OUT, render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
