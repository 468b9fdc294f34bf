"""Shared fixtures: a tiny synthetic CIFAR in the standard layout, and the real shared subset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Keep the BentoML model store of test runs out of the user's ~/bentoml (read when bentoml is imported).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="cifar-deploy-bentoml-")

import pytest  # noqa: E402
import torch  # noqa: E402

from training.data import write_synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Parent folder of a synthetic cifar-10-batches-py (5 batches of 10 per class, 10 per class test)."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, "cifar10", train_per_class=50, test_per_class=10, seed=0)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py" / "batches.meta").exists():
        pytest.skip(f"real CIFAR-10 subset not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_dir) -> Path:
    """A finished 1-epoch scratch_cnn run on the synthetic set (seconds to train and export)."""
    from training.train import TrainConfig, train

    runs = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(model="scratch_cnn", weights="none", strategy="full", dataset="cifar10",
                      data_dir=str(synthetic_dir), download=False, epochs=2, batch_size=32, lr=3e-3,
                      runs_dir=str(runs), name="tiny", threads=2)
    train(cfg)
    return runs / "tiny"


@pytest.fixture(scope="session")
def exported(tiny_run, synthetic_dir, tmp_path_factory):
    """The tiny run exported to every CPU format and saved to the (test) BentoML store as tiny-<format>."""
    from export.exporter import ExportConfig, run_export

    out = tmp_path_factory.mktemp("artifacts")
    manifest = run_export(ExportConfig(run_dir=str(tiny_run), out=str(out), data_dir=str(synthetic_dir),
                                       calib_images=64, threads=2))
    return out, manifest
