"""Training benchmark on the real CIFAR-10 subset: ``python benchmarks/training_bench.py --data-dir ../shared/data``.

Runs each configuration below (resumable: finished runs are reused), then writes
``benchmarks/training.json``, ``benchmarks/training.md`` and ``benchmarks/training.png``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from training.compare import bar_chart
from training.train import TrainConfig, train
from utils import atomic_write, atomic_write_json, cli

HERE = Path(__file__).resolve().parent

RUNS = [
    ("lite0-imagenet-frozen", dict(model="efficientnet_lite0", weights="imagenet", strategy="frozen",
                                   epochs=40, lr=1e-3, weight_decay=1e-3, scheduler="cosine")),
    ("lite0-imagenet-full128", dict(model="efficientnet_lite0", weights="imagenet", strategy="full",
                                    input_size=128, epochs=8, lr=5e-4, scheduler="cosine", augment="crop,flip")),
    ("lite0-random-full128", dict(model="efficientnet_lite0", weights="none", strategy="full",
                                  input_size=128, epochs=8, lr=5e-4, scheduler="cosine", augment="crop,flip")),
    ("scratch_cnn", dict(model="scratch_cnn", weights="none", strategy="full", epochs=30, lr=2e-3,
                         scheduler="cosine", augment="crop,flip")),
]


def row(name: str, m: dict) -> dict:
    return {
        "run": name, "model": m["model"], "weights": m["weights"], "strategy": m["strategy"],
        "input_size": m["input_size"], "epochs": m["epochs_run"], "train_seconds": round(m["train_seconds"], 1),
        "test_accuracy": round(m["test_accuracy"], 4), "macro_f1": round(m["test_macro_f1"], 4),
        "params_trainable": m["params_trainable"], "feature_cache": m["feature_cache"],
        "device": m["device"], "dataset": m["dataset"], "num_train": m["num_train"], "num_test": m["num_test"],
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "# Training benchmark",
        "",
        f"Dataset: `{rows[0]['dataset']}` — the real CIFAR-10 subset in `../shared/data` "
        f"({rows[0]['num_train']} training images after the validation split, {rows[0]['num_test']} test images; "
        "its test batch is drawn from the official training batches). Device: "
        f"{rows[0]['device']}. Produced by `python benchmarks/training_bench.py`.",
        "",
        "| run | model | weights | strategy | input px | epochs | train s | test acc | macro F1 | trainable params |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cache = " (cached features)" if r["feature_cache"] else ""
        lines.append(
            f"| {r['run']} | {r['model']} | {r['weights']} | {r['strategy']}{cache} | {r['input_size']} | "
            f"{r['epochs']} | {r['train_seconds']:.0f} | {r['test_accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['params_trainable']:,} |"
        )
    by = {r["run"]: r for r in rows}
    pre, rnd = by.get("lite0-imagenet-full128"), by.get("lite0-random-full128")
    if pre and rnd:
        gain = 100 * (pre["test_accuracy"] - rnd["test_accuracy"])
        lines += ["", f"Transfer gain (same architecture, strategy, resolution and epochs): ImageNet-pretrained "
                      f"EfficientNet-Lite0 {100 * pre['test_accuracy']:.1f}% vs random init "
                      f"{100 * rnd['test_accuracy']:.1f}% = **{gain:+.1f} points**."]
    lines += ["", "![test accuracy and training time](training.png)", ""]
    return "\n".join(lines)


@dataclass
class TrainingBenchConfig:
    data_dir: str = field(default=str(HERE.parent.parent / "shared" / "data"),
                          metadata={"help": "folder holding cifar-10-batches-py/"})
    runs_dir: str = field(default="runs/bench", metadata={"help": "where the runs go (finished ones are reused)"})
    only: list[str] = field(default_factory=list, metadata={"help": "run names to (re)run (default: all)"})


def run(cfg: TrainingBenchConfig) -> None:
    rows = []
    for name, kw in RUNS:
        if cfg.only and name not in cfg.only:
            continue
        print(f"=== {name}", flush=True)
        rows.append(row(name, train(TrainConfig(dataset="cifar10", data_dir=cfg.data_dir, runs_dir=cfg.runs_dir,
                                                name=name, resume=True, download=False, **kw))))
    atomic_write_json(rows, HERE / "training.json")
    atomic_write(HERE / "training.md", to_markdown(rows))
    bar_chart(rows, HERE / "training.png", label="run")
    print(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    return cli(TrainingBenchConfig, run, argv, "benchmarks/training_bench.py", __doc__, section="training_bench")


if __name__ == "__main__":
    sys.exit(main())
