"""Load-test reports: ``reports/<timestamp>/`` (report.md, results.json, plots) and ``benchmarks/loadtest.*``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loadtest.scenarios import best_within_slo
from utils import atomic_path, atomic_write, atomic_write_json, pyplot, save_figure, versions

BENCH_KEYS = ("model", "backend", "precision", "scenario", "users", "rps", "images_per_s", "p50_ms", "p95_ms",
              "p99_ms", "failures", "requests", "server_mean_batch", "server_infer_ms_mean", "device")


def _label(r: dict) -> str:
    return f"{r['model']} {r['backend']} {r['precision']}"


def plots(rows: list[dict]) -> dict:
    """Figures ``throughput`` and ``latency`` (vs concurrency) and ``models`` (side by side)."""
    plt = pyplot()
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["scenario"] in ("single-stream", "server"):
            series.setdefault(_label(r), []).append(r)
    figs = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["users"])
        ax.plot([r["users"] for r in rs], [r["images_per_s"] for r in rs], "o-", label=name)
    ax.set(xscale="log", xlabel="concurrent users", ylabel="images/s", title="throughput vs concurrency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figs["throughput"] = fig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["users"])
        colour = f"C{i}"
        for p, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ax.plot([r["users"] for r in rs], [r[p] for r in rs], style, color=colour,
                    label=f"{name} {p[:3]}")
    ax.set(xscale="log", yscale="log", xlabel="concurrent users", ylabel="latency (ms)",
           title="latency percentiles vs concurrency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figs["latency"] = fig

    single = [r for r in rows if r["scenario"] == "single-stream"]
    peak: dict[str, float] = {}
    for r in rows:
        peak[_label(r)] = max(peak.get(_label(r), 0.0), r["images_per_s"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar([_label(r) for r in single], [r["p50_ms"] for r in single], color="tab:orange")
    ax1.set(ylabel="ms", title="single-stream p50 latency")
    ax2.bar(list(peak), list(peak.values()), color="tab:blue")
    ax2.set(ylabel="images/s", title="peak throughput (any scenario)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        for lbl in ax.get_xticklabels():
            lbl.set_ha("right")
        ax.grid(axis="y", alpha=0.3)
    figs["models"] = fig
    return figs


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> list[str]:
    out = ["| model | backend | precision | scenario | users | img/s | p50 ms | p95 ms | p99 ms | failures | "
           "server batch | server infer ms |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['scenario']} | {r['users']} | "
                   f"{r['images_per_s']:.1f} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
                   f"{r['failures']}/{r['requests']} | {_fmt(r['server_mean_batch'])} | "
                   f"{_fmt(r['server_infer_ms_mean'])} |")
    return out


def best_lines(best: list[dict], slo_ms: float) -> list[str]:
    if not best:
        return [f"No model/format kept p95 within {slo_ms:g} ms at ≤ 1% failures."]
    out = [f"Most images/s with p95 ≤ {slo_ms:g} ms and ≤ 1% failures:", "",
           "| rank | model | backend | precision | scenario | users | img/s | p95 ms |",
           "|---:|---|---|---|---|---:|---:|---:|"]
    for i, r in enumerate(best, 1):
        out.append(f"| {i} | {r['model']} | {r['backend']} | {r['precision']} | {r['scenario']} | {r['users']} | "
                   f"{r['images_per_s']:.1f} | {_fmt(r['p95_ms'])} |")
    return out


def to_markdown(rows: list[dict], meta: dict, best: list[dict]) -> str:
    out = ["# Load-test report", "", f"Created {meta['created']} on {meta['device']}; payloads "
           f"`{meta['payload_source']}`; versions {json.dumps(meta['versions'])}.", "",
           "Latency is Locust's client-side time (rounded); *server batch* and *server infer ms* come from the "
           "service's own `/metrics` histograms over the same step (exact).", "", *table(rows), "",
           *best_lines(best, meta["slo_ms"] or 100.0), ""]
    if meta["gate_problems"]:
        out += ["**Gate failed:**", "", *[f"- {p}" for p in meta["gate_problems"]], ""]
    else:
        out += [f"Gate passed (failure ratio ≤ {meta['max_failure_ratio']:.0%}"
                + (f", p95 ≤ {meta['slo_ms']:g} ms in single-stream/constant-rate" if meta["slo_ms"] else "")
                + ").", ""]
    out += ["![throughput](throughput.png)", "", "![latency](latency.png)", "", "![models](models.png)", ""]
    return "\n".join(out)


def write_report(rows: list[dict], outdir: Path, problems: list[str], slo_ms: float | None,
                 max_failure_ratio: float, payload_source: str) -> None:
    """``outdir``/results.json, report.md and the plots; then ``latest`` beside it points to ``outdir``."""
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "slo_ms": slo_ms,
            "max_failure_ratio": max_failure_ratio, "payload_source": payload_source,
            "device": rows[0]["device"] if rows else "unknown",
            "versions": versions("locust", "bentoml", "onnxruntime"), "gate_problems": problems}
    atomic_write_json({"meta": meta, "rows": rows}, outdir / "results.json")
    for name, fig in plots(rows).items():
        save_figure(fig, outdir / f"{name}.png")
    atomic_write(outdir / "report.md", to_markdown(rows, meta, best_within_slo(rows, slo_ms or 100.0)))
    with atomic_path(outdir.parent / "latest") as tmp:
        tmp.unlink(missing_ok=True)  # left by an interrupted run
        tmp.symlink_to(outdir.name)


def write_bench(rows: list[dict], out: Path, slo_ms: float) -> None:
    """``out``.json (rows merged by model/backend/precision), ``out``.md and ``out``.png (+ -latency, -models)."""
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() else []
    new = [{k: r.get(k) for k in BENCH_KEYS} for r in rows]
    keys = {(r["model"], r["backend"], r["precision"]) for r in new}
    merged = [r for r in old if (r["model"], r["backend"], r["precision"]) not in keys] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(merged, path)
    md = ["# Load-test benchmark", "", "Produced by `python -m loadtest.run … --bench-out benchmarks/loadtest`: the "
          "service, Locust and the models share this machine's cores, so these figures include that contention.",
          "", *table(merged), "", *best_lines(best_within_slo(merged, slo_ms), slo_ms), "",
          "![throughput](loadtest.png)", ""]
    atomic_write(out.with_suffix(".md"), "\n".join(md))
    for name, fig in plots(merged).items():
        save_figure(fig, out.with_suffix(".png") if name == "throughput" else out.with_name(f"{out.stem}-{name}.png"))
