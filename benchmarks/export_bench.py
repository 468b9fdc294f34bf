"""Export benchmark driver: ``python benchmarks/export_bench.py --data-dir ../shared/data``.

1. Exports the shipped recipe's EfficientNet-Lite0 base stage (``configs/lite0-ship.yaml``: ``make ship`` or
   ``python -m benchmarks.ship`` trains it; ``--lite0-run`` picks another run). The shipped stage is the same
   network, so the speed rows hold for it; its own accuracy per format is in ``benchmarks/ship.md``.
2. For ResNet-50, EfficientNet-B0 and AlexNet, whose ImageNet weights cannot be downloaded here,
   trains a 1-epoch random-init run (speed rows only: their accuracy columns say so) and exports it.
3. Benchmarks all of them side by side (``export.benchmark``) → ``benchmarks/export.{json,md,png}``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from export.benchmark import BenchmarkConfig, run_benchmark
from export.exporter import ExportConfig, run_export
from training.train import TrainConfig, train
from utils import cli

HERE = Path(__file__).resolve().parent
SPEED_MODELS = ("resnet50", "efficientnet_b0", "alexnet")


@dataclass
class ExportBenchConfig:
    data_dir: str = str(HERE.parent.parent / "shared" / "data")
    lite0_run: str = "runs/ship-efficientnet_lite0"
    runs_dir: str = "runs/speed"
    artifacts: str = "artifacts"
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    skip_benchmark: bool = False


def run(cfg: ExportBenchConfig) -> None:
    dirs = [Path(cfg.artifacts) / Path(cfg.lite0_run).name]
    run_export(ExportConfig(run_dir=cfg.lite0_run, out=str(dirs[0]), data_dir=cfg.data_dir))
    for model in SPEED_MODELS:
        train(TrainConfig(model=model, weights="none", strategy="full", dataset="cifar10", data_dir=cfg.data_dir,
                          download=False, epochs=1, batch_size=32, limit_train=64, limit_test=32,
                          runs_dir=cfg.runs_dir, name=f"{model}-random", resume=True))
        out = Path(cfg.artifacts) / f"{model}-random"
        run_export(ExportConfig(run_dir=str(Path(cfg.runs_dir) / f"{model}-random"), out=str(out),
                                data_dir=cfg.data_dir, eval_limit=128))
        dirs.append(out)
    if not cfg.skip_benchmark:
        run_benchmark(BenchmarkConfig(artifacts=[str(d) for d in dirs], batches=cfg.batches, out=str(HERE / "export")))


def main(argv: list[str] | None = None) -> int:
    return cli(ExportBenchConfig, run, argv, "benchmarks/export_bench.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
