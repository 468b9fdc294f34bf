"""Shared fixtures: a tiny synthetic CIFAR in the standard layout, and the real shared subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.data import write_synthetic

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
