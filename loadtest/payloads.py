"""Request payloads, prepared once: CIFAR test images encoded as PNG, a folder of photos, or synthetic.

The load test is a black-box HTTP client: it reads the CIFAR pickle layout itself and imports
nothing from training, export or the service.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class PayloadError(ValueError):
    """The payload source cannot be read; the message names it."""


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def cifar_test_images(folder: Path, limit: int) -> np.ndarray:
    """The first ``limit`` images of a CIFAR test batch (``test_batch`` or ``test``) under ``folder``, as
    uint8 (N, 32, 32, 3)."""
    folder = Path(folder)
    for sub in ("", "cifar-10-batches-py", "cifar-100-python"):
        for name in ("test_batch", "test"):
            path = folder / sub / name
            if path.is_file():
                try:
                    with open(path, "rb") as f:
                        d = pickle.load(f, encoding="latin1")
                    return np.asarray(d["data"], dtype=np.uint8)[:limit].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                except Exception as e:
                    raise PayloadError(f"cannot read CIFAR test images from {path}: {e}") from e
    raise PayloadError(f"no CIFAR test batch (test_batch or test) under {folder}")


def cifar_pngs(folder: Path, limit: int) -> list[bytes]:
    """The first ``limit`` images of a CIFAR test batch as PNG bytes."""
    return [_png(a) for a in cifar_test_images(folder, limit)]


def folder_images(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise PayloadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [p.read_bytes() for p in files]


def synthetic_pngs(limit: int, size: int = 32, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(limit)]


def load_payloads(source: str, limit: int = 256) -> list[bytes]:
    """``cifar:PATH``, ``dir:PATH`` (photos of any size) or ``synthetic[:SIZE]``."""
    kind, _, arg = source.partition(":")
    if kind == "cifar":
        return cifar_pngs(Path(arg), limit)
    if kind == "dir":
        return folder_images(Path(arg), limit)
    if kind == "synthetic":
        return synthetic_pngs(limit, int(arg) if arg else 32)
    raise PayloadError(f"unknown payload source {source!r}; use cifar:PATH, dir:PATH or synthetic[:SIZE]")
