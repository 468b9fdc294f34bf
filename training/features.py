"""The feature cache: a frozen backbone's features of every split, computed once and kept in the run.

With a frozen backbone and no augmentation, each image's features never change, so the head trains on
them directly: the training loop gets ``model.head`` and these datasets instead of the classifier and
the images. With augmentation and ``copies`` (``--feature-copies``), the training split adds that many
augmented copies of each image to its clean features, drawn once. ``features.pt`` is reused while its
key (weights, split sizes, input size, augmentation, copies) matches. Under
torchrun the ranks compute a shard each and share the whole; rank 0 reads and writes the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from training import distributed
from training.data import ImageArrayDataset
from training.engine import predict_logits
from training.models import Classifier
from utils import atomic_save_torch


def _load(path: Path, key: str) -> tuple[dict[str, torch.Tensor] | None, float]:
    """Saved features and the seconds they took, or ``(None, 0)`` when absent, stale or unreadable."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return saved["features"], float(saved.get("seconds", 0.0))
    except Exception:  # absent, corrupt or from another version: recompute
        pass
    return None, 0.0


def feature_datasets(model: Classifier, images: dict[str, ImageArrayDataset], path: Path, weights: str,
                     device: torch.device, amp: bool = False,
                     copies: int = 0) -> tuple[dict[str, TensorDataset], float]:
    """``(features, label)`` datasets of each split of ``images`` (train, val, test), and the seconds the
    features took to compute (the first time; read back from ``path`` afterwards). The training split is
    its clean images' features, then ``copies`` passes of its own augmentation."""
    train = images["train"]
    key = json.dumps({"weights": weights, "n": [len(ds) for ds in images.values()], "input_size": model.input_size,
                      **({"augment": list(train.augment), "serving_p": train.serving and train.serving.p,
                          "jpeg_quality": train.serving and list(train.serving.quality),
                          "copies": copies} if copies else {})})
    feats, seconds = distributed.from_main(_load, path, key)
    if feats is None:
        t0 = time.perf_counter()
        clean = {**images, "train": ImageArrayDataset(train.x.numpy(), train.y.numpy(), train.mean, train.std)}
        feats = {split: predict_logits(model, ds, device, amp, desc=f"features {split}", features=True)[0]
                 for split, ds in clean.items()}
        feats["train"] = torch.cat([feats["train"], *(
            predict_logits(model, train, device, amp, desc=f"features train copy {k + 1}/{copies}", features=True)[0]
            for k in range(copies))])
        seconds = time.perf_counter() - t0
        if distributed.rank() == 0:
            atomic_save_torch({"key": key, "features": feats, "seconds": seconds}, path)
    labels = {split: ds.y.repeat(1 + copies) if split == "train" else ds.y for split, ds in images.items()}
    return {split: TensorDataset(feats[split], labels[split]) for split in images}, seconds
