"""Compare runs as the seeds do: ``python -m training.compare runs/* [--out comparison]``.

Writes ``<out>.md`` (training time; last-epoch train/val accuracy and loss; test accuracy, macro
recall and F1) and ``<out>.png`` (test accuracy and training time per run).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from training.record import load_metrics
from utils import UserError, atomic_write, cli, pyplot, save_figure


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        path = Path(p)
        m = load_metrics(path)
        if m is None:
            print(f"skipping {p}: no metrics.json (unfinished run?)", file=sys.stderr)
            continue
        m.setdefault("run", path.name)
        runs.append(m)
    if not runs:
        raise UserError("no finished runs (folders with metrics.json) among the paths given")
    return runs


def comparison_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for m in runs:
        last = m["history"][-1] if m.get("history") else {}
        rows.append({
            "run": m["run"], "model": m["model"], "weights": m["weights"], "strategy": m["strategy"],
            "input_size": m["input_size"], "dataset": m["dataset"], "train_seconds": m["train_seconds"],
            "train_accuracy": last.get("train_acc"), "train_loss": last.get("train_loss"),
            "val_accuracy": last.get("val_acc"), "val_loss": last.get("val_loss"),
            "test_accuracy": m["test_accuracy"], "macro_recall": m["test_macro_recall"],
            "macro_f1": m["test_macro_f1"], "params_total": m["params_total"],
        })
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict]) -> str:
    synthetic = any(r["dataset"].startswith("synthetic") for r in rows)
    out = ["# Run comparison", ""]
    if synthetic:
        out += ["**Some runs used SYNTHETIC data: their accuracy says nothing about CIFAR.**", ""]
    out += ["| run | model | weights | strategy | px | dataset | train time s | train acc | train loss | "
            "val acc | val loss | test acc | macro recall | macro F1 |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append("| " + " | ".join([
            r["run"], r["model"], r["weights"], r["strategy"], str(r["input_size"]), r["dataset"],
            f"{r['train_seconds']:.1f}", *(_fmt(r[k]) for k in ("train_accuracy", "train_loss", "val_accuracy",
                                                                  "val_loss", "test_accuracy", "macro_recall",
                                                                  "macro_f1"))]) + " |")
    return "\n".join(out) + "\n"


def bar_chart(rows: list[dict], path: Path, label: str = "run") -> None:
    """Test accuracy and training time side by side, one bar per run."""
    names = [str(r[label]) for r in rows]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(max(8, 1.6 * len(rows) * 2), 4))
    ax1.bar(names, [r["test_accuracy"] for r in rows], color="tab:blue")
    ax1.set(ylabel="test accuracy", ylim=(0, 1), title="test accuracy")
    ax2.bar(names, [r["train_seconds"] for r in rows], color="tab:orange")
    ax2.set(ylabel="seconds", title="training time")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        for lbl in ax.get_xticklabels():
            lbl.set_ha("right")
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, Path(path))


@dataclass
class CompareConfig:
    runs: list[str] = field(metadata={"help": "run folders (or metrics.json files)"})
    out: str = field(default="comparison", metadata={"help": "output path without extension"})


def compare(cfg: CompareConfig) -> None:
    rows = comparison_rows(load_runs(cfg.runs))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".md"), to_markdown(rows))
    bar_chart(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    return cli(CompareConfig, compare, argv, "python -m training.compare", __doc__, positional=("runs",),
               section="compare")


if __name__ == "__main__":
    sys.exit(main())
