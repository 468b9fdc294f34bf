"""Training benchmark on the real CIFAR-10 subset: ``python benchmarks/training_bench.py --data-dir ../shared/data``.

Runs each configuration below (resumable: finished runs are reused), then writes
``benchmarks/training.json``, ``benchmarks/training.md`` and ``benchmarks/training.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from training.compare import bar_chart
from training.errors import UserError
from training.train import TrainConfig, Trainer, atomic_write_json

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--only", nargs="*", help="run names to (re)run; default all")
    args = p.parse_args(argv)
    rows = []
    try:
        for name, kw in RUNS:
            if args.only and name not in args.only:
                continue
            cfg = replace(TrainConfig(), dataset="cifar10", data_dir=args.data_dir, runs_dir=args.runs_dir,
                          name=name, resume=True, download=False, **kw)
            print(f"=== {name}", flush=True)
            rows.append(row(name, Trainer(cfg).run()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(rows, HERE / "training.json")
    (HERE / "training.md").write_text(to_markdown(rows))
    bar_chart(rows, HERE / "training.png", label="run")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
