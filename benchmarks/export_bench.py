"""Export benchmark driver: ``python benchmarks/export_bench.py --data-dir ../shared/data``.

1. Exports the fine-tuned EfficientNet-Lite0 run of ``benchmarks/training_bench.py``.
2. For ResNet-50, EfficientNet-B0 and AlexNet, whose ImageNet weights cannot be downloaded here,
   trains a 1-epoch random-init run (speed rows only: their accuracy columns say so) and exports it.
3. Runs ``python -m export.benchmark`` on all of them side by side → ``benchmarks/export.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from export import benchmark
from export.exporter import ExportConfig, run_export
from training.train import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
SPEED_MODELS = ("resnet50", "efficientnet_b0", "alexnet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--lite0-run", default="runs/bench/lite0-imagenet-full128")
    p.add_argument("--runs-dir", default="runs/speed")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--skip-benchmark", action="store_true")
    args = p.parse_args(argv)
    dirs = [Path(args.artifacts) / Path(args.lite0_run).name]
    run_export(ExportConfig(run_dir=args.lite0_run, out_dir=str(dirs[0]), data_dir=args.data_dir))
    for model in SPEED_MODELS:
        cfg = replace(TrainConfig(), model=model, weights="none", strategy="full", dataset="cifar10",
                      data_dir=args.data_dir, download=False, epochs=1, batch_size=32, limit_train=64,
                      limit_test=32, runs_dir=args.runs_dir, name=f"{model}-random", resume=True)
        Trainer(cfg).run()
        out = Path(args.artifacts) / f"{model}-random"
        run_export(ExportConfig(run_dir=str(Path(args.runs_dir) / f"{model}-random"), out_dir=str(out),
                                data_dir=args.data_dir, eval_limit=128))
        dirs.append(out)
    if args.skip_benchmark:
        return 0
    return benchmark.main([*map(str, dirs), "--batches", *map(str, args.batches), "--out", str(HERE / "export")])


if __name__ == "__main__":
    sys.exit(main())
