"""CIFAR-10/100 in the standard python-pickle layout, a synthetic stand-in, splits, augmentation and
the loaders training reads them through.

The loader reads the layout itself (no checksum of the full release), so subsets and local copies
work. When a folder is missing it can download the release through torchvision; offline it fails
with a message naming the folder, the files expected and ``--data-dir``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import UserError, atomic_path

DATASETS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
    },
}
LABEL_MODES = ("fine", "coarse")


@dataclass
class CifarData:
    """Images as uint8 NHWC arrays with integer labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    synthetic: bool
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_data_dir() -> Path:
    return Path(os.environ.get("CIFAR_ROOT", "./data"))


def resolve_folder(data_dir: str | Path, dataset: str) -> Path:
    """Accept either the parent folder or the dataset folder itself."""
    spec = _spec(dataset)
    data_dir = Path(data_dir)
    if data_dir.name == spec["folder"]:
        return data_dir
    return data_dir / spec["folder"]


def _spec(dataset: str) -> dict:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except FileNotFoundError as e:
        raise UserError(f"missing data file {path}") from e
    except Exception as e:  # truncated or not a pickle
        raise UserError(f"corrupt data file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"corrupt data file {path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batches(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise UserError(f"corrupt data file {path}: expected keys 'data' and {label_key!r}")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise UserError(
                f"corrupt data file {path}: expected data of shape (N, 3072) and N labels, "
                f"got {data.shape} and {len(labels)} labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _download(dataset: str, parent: Path) -> None:
    import socket

    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        cls(root=str(parent), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def load_cifar(
    data_dir: str | Path | None = None,
    dataset: str = "cifar10",
    label_mode: str = "fine",
    download: bool = True,
) -> CifarData:
    """Read CIFAR from ``data_dir`` (the parent or the dataset folder); download when absent."""
    spec = _spec(dataset)
    if label_mode not in LABEL_MODES:
        raise UserError(f"unknown label mode {label_mode!r}; valid: {', '.join(LABEL_MODES)}")
    folder = resolve_folder(data_dir if data_dir is not None else default_data_dir(), dataset)
    expected = [*spec["train"], *spec["test"], spec["meta"]]
    missing = [n for n in expected if not (folder / n).exists()]
    if missing and download:
        try:
            _download(dataset, folder.parent)
        except Exception as e:  # offline, DNS failure, checksum mismatch …
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = ""
        missing = [n for n in expected if not (folder / n).exists()]
    else:
        reason = "download disabled"
    if missing:
        raise UserError(
            f"{dataset} not found in {folder} (missing: {', '.join(missing)}; expected files: "
            f"{', '.join(expected)}). The download failed too ({reason}). Point --data-dir (or CIFAR_ROOT) "
            f"at a folder holding {spec['folder']}/ in the standard python-pickle layout, "
            "or use --dataset synthetic-" + dataset + " for an offline synthetic stand-in."
        )
    meta = _unpickle(folder / spec["meta"])
    if dataset == "cifar10":
        label_key, names_key = "labels", "label_names"
    else:
        label_key, names_key = f"{label_mode}_labels", f"{label_mode}_label_names"
    if names_key not in meta:
        raise UserError(f"corrupt metadata file {folder / spec['meta']}: missing {names_key!r}")
    classes = [str(c) for c in meta[names_key]]
    train_x, train_y = _read_batches(folder, spec["train"], label_key)
    test_x, test_y = _read_batches(folder, spec["test"], label_key)
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{folder}: {split} labels outside 0..{len(classes) - 1}")
    name = dataset if label_mode == "fine" else f"{dataset}-coarse"
    return CifarData(
        name=("synthetic-" + name) if meta.get("synthetic") else name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        synthetic=bool(meta.get("synthetic", False)),
        source=str(folder.resolve()),
    )


# --------------------------------------------------------------------------- synthetic data

SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "corners", "dots")
COLOURS = (
    (230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 210, 40), (200, 60, 220),
    (40, 210, 220), (250, 140, 30), (140, 90, 40), (245, 245, 245), (120, 120, 120),
)


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(7, 12)
    cy, cx = rng.uniform(12, 20, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (abs(dx) <= r * 0.8) & (abs(dy) <= r * 0.8)
    if kind == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.55)
    if kind == "cross":
        return ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (r * 0.6) ** 2)
    if kind == "hbar":
        return (abs(dy) <= r * 0.3) & (abs(dx) <= r * 1.2)
    if kind == "vbar":
        return (abs(dx) <= r * 0.3) & (abs(dy) <= r * 1.2)
    if kind == "diamond":
        return abs(dx) + abs(dy) <= r
    if kind == "corners":
        return ((abs(dx) >= r * 0.5) & (abs(dy) >= r * 0.5)) & (abs(dx) <= r) & (abs(dy) <= r)
    return ((np.round(xx) % 6 == 0) & (np.round(yy) % 6 == 0)) & (dx**2 + dy**2 <= (r * 1.3) ** 2)


def synthetic_images(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Deterministic 32x32 images: class k is a (shape, colour) pair on a noisy background."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        shape = SHAPES[k % len(SHAPES)]
        colour = np.array(COLOURS[(k // len(SHAPES) + k) % len(COLOURS)], dtype=np.float32)
        bg = rng.uniform(20, 90, size=3).astype(np.float32)
        img = np.broadcast_to(bg, (32, 32, 3)).copy() + rng.normal(0, 12, size=(32, 32, 3))
        mask = _shape_mask(shape, 32, rng)
        img[mask] = colour * rng.uniform(0.85, 1.0) + rng.normal(0, 8, size=(int(mask.sum()), 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_synthetic(
    data_dir: str | Path,
    dataset: str = "cifar10",
    train_per_class: int = 40,
    test_per_class: int = 10,
    seed: int = 0,
) -> Path:
    """Write a synthetic set in the standard layout (marked ``synthetic`` in its metadata)."""
    spec = _spec(dataset)
    num_classes = 10 if dataset == "cifar10" else 100
    folder = resolve_folder(data_dir, dataset)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"synthetic_{SHAPES[k % 10]}_{k}" for k in range(num_classes)]
    rng = np.random.default_rng(seed)

    def batch(n_per_class: int, label: str, seed_: int) -> dict:
        y = np.repeat(np.arange(num_classes), n_per_class)
        rng.shuffle(y)
        x = synthetic_images(y, num_classes, seed_)
        d = {"data": x.transpose(0, 3, 1, 2).reshape(len(y), -1), "batch_label": label,
             "filenames": [f"synthetic_{i}.png" for i in range(len(y))]}
        if dataset == "cifar10":
            d["labels"] = y.tolist()
        else:
            d["fine_labels"] = y.tolist()
            d["coarse_labels"] = (y // 5).tolist()
        return d

    n_train = len(spec["train"])
    per_batch = max(1, train_per_class // n_train)
    for i, name in enumerate(spec["train"]):
        _atomic_pickle(folder / name, batch(per_batch, f"synthetic training batch {i + 1}", seed + 1 + i))
    _atomic_pickle(folder / spec["test"][0], batch(test_per_class, "synthetic testing batch", seed + 100))
    if dataset == "cifar10":
        meta = {"label_names": names, "num_cases_per_batch": per_batch * num_classes, "num_vis": 3072}
    else:
        meta = {"fine_label_names": names, "coarse_label_names": [f"synthetic_group_{g}" for g in range(20)]}
    meta["synthetic"] = True
    _atomic_pickle(folder / spec["meta"], meta)
    return folder


def _atomic_pickle(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> CifarData:
    """``cifar10``, ``cifar100``, ``cifar100-coarse`` or ``synthetic-<one of those>``."""
    if name.startswith("synthetic-"):
        base = name.removeprefix("synthetic-")
        root = Path(data_dir if data_dir is not None else default_data_dir()) / "synthetic"
        ds, mode = _split_name(base)
        if not (resolve_folder(root, ds) / DATASETS[ds]["meta"]).exists():
            write_synthetic(root, ds)
        data = load_cifar(root, ds, mode, download=False)
        if not data.synthetic:
            raise UserError(f"{resolve_folder(root, ds)} holds real data, not a synthetic set")
        return data
    ds, mode = _split_name(name)
    return load_cifar(data_dir, ds, mode, download=download)


def _split_name(name: str) -> tuple[str, str]:
    if name.endswith("-coarse"):
        return _check_name(name.removesuffix("-coarse")), "coarse"
    return _check_name(name), "fine"


def _check_name(ds: str) -> str:
    if ds not in DATASETS:
        valid = [*DATASETS, "cifar100-coarse", *(f"synthetic-{d}" for d in DATASETS)]
        raise UserError(f"unknown dataset {ds!r}; valid: {', '.join(valid)}")
    return ds


# --------------------------------------------------------------------------- splits and tensors

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices into (train, val)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


AUGMENTATIONS = ("crop", "flip", "rotate", "zoom", "color", "resample", "jpeg")
JPEG_QUALITY = (50, 95)  # ``jpeg``: the default quality range of the re-encoding (phones and browsers: 70–95)
RESAMPLE_SIZES = (48, 512)  # ``resample``: the range of the upload sizes it imitates (log-uniform)


def check_jpeg_quality(quality) -> None:
    """Refuse a ``--jpeg-quality`` that is not LOW HIGH within Pillow's 1–100."""
    if len(quality) != 2 or not 1 <= quality[0] <= quality[1] <= 100:
        raise UserError(f"--jpeg-quality takes LOW HIGH with 1 <= LOW <= HIGH <= 100, got {list(quality)}")


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop,flip"`` → ("crop", "flip"); ``"none"`` → ()."""
    if spec in ("", "none"):
        return ()
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in parts if p not in AUGMENTATIONS]
    if bad:
        raise UserError(f"unknown augmentation {bad[0]!r}; valid: {', '.join(AUGMENTATIONS)} or none")
    return parts


def normalize(x_uint8_nhwc: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW, scaled to [0, 1] then normalised per channel."""
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class ImageArrayDataset(Dataset):
    """uint8 NHWC images → normalised float CHW tensors, with optional augmentation.

    With ``paired`` an item is ``((served, clean), label)``: the same augmented picture after and before the
    serving-path augmentation (``resample``, ``jpeg``), for a teacher that sees the clean one."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean, std, augment: tuple[str, ...] = (),
                 serving_p: float = 0.5, paired: bool = False, jpeg_quality: tuple[int, int] = JPEG_QUALITY):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.paired = augment, paired
        self.transform, self.serving = _build_augment(augment, serving_p, jpeg_quality)

    def __len__(self) -> int:
        return len(self.y)

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        return normalize(img.permute(1, 2, 0).unsqueeze(0), self.mean, self.std)[0]

    def __getitem__(self, i: int):
        img = self.x[i].permute(2, 0, 1)  # CHW uint8
        if self.transform is not None:
            img = self.transform(img)
        served = self.serving(img) if self.serving is not None else img
        if self.paired:
            return (self._normalize(served), self._normalize(img)), self.y[i]
        return self._normalize(served), self.y[i]


def _build_augment(augment: tuple[str, ...], serving_p: float = 0.5, jpeg_quality: tuple[int, int] = JPEG_QUALITY):
    """(the picture's own augmentation, or None; then the serving-path one, or None)."""
    serving = None
    if "resample" in augment or "jpeg" in augment:  # last: what happens to the picture on its way to the service
        serving = ServingPath("resample" in augment, "jpeg" in augment, serving_p, jpeg_quality)
    from torchvision.transforms import v2

    ops = []
    if "rotate" in augment or "zoom" in augment:
        ops.append(v2.RandomAffine(degrees=15 if "rotate" in augment else 0,
                                   scale=(0.9, 1.1) if "zoom" in augment else None))
    if "crop" in augment:
        ops.append(v2.RandomCrop(32, padding=4, padding_mode="reflect"))
    if "flip" in augment:
        ops.append(v2.RandomHorizontalFlip())
    if "color" in augment:
        ops += [v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), v2.RandomGrayscale(p=0.05)]
    return (v2.Compose(ops) if ops else None), serving


class ServingPath:
    """Imitates an upload's trip to the service on a CHW uint8 image: each with probability ``p``,

    - ``resample``: the picture exists at another size (``RESAMPLE_SIZES``, log-uniform; a random Pillow
      filter), is maybe JPEG-compressed there, and comes back through the service's own
      :func:`service.preprocessing.fit_image`;
    - ``jpeg``: the 32 px picture is JPEG-compressed at a quality drawn uniformly from ``quality`` (Pillow's
      default 4:2:0 chroma subsampling, as phones and browsers write).

    Random draws come from torch's generator, so a seeded run is reproducible."""

    FILTERS = ("NEAREST", "BILINEAR", "BICUBIC", "LANCZOS")

    def __init__(self, resample: bool, jpeg: bool, p: float = 0.5, quality: tuple[int, int] = JPEG_QUALITY):
        check_jpeg_quality(quality)
        self.resample, self.jpeg, self.p, self.quality = resample, jpeg, p, tuple(quality)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        from service.preprocessing import fit_image

        size = img.shape[-1]
        im = Image.fromarray(img.permute(1, 2, 0).numpy())
        if self.resample and _draw() < self.p:
            lo, hi = np.log(RESAMPLE_SIZES[0]), np.log(RESAMPLE_SIZES[1])
            side = int(round(np.exp(lo + (hi - lo) * _draw())))
            im = im.resize((side, side), getattr(Image.Resampling, self.FILTERS[int(_draw() * 4)]))
            if _draw() < 0.5:
                im = _jpeg(im, self.quality)
            im = Image.fromarray(fit_image(im, size))
        if self.jpeg and _draw() < self.p:
            im = _jpeg(im, self.quality)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _draw() -> float:
    return float(torch.rand(()))


def _jpeg(im, quality: tuple[int, int]):
    import io

    from PIL import Image

    buf = io.BytesIO()
    lo, hi = quality
    im.save(buf, "JPEG", quality=lo + int(_draw() * (hi - lo + 1)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# --------------------------------------------------------------------------- loaders

class EpochBatches(Sampler[list[int]]):
    """One rank's index batches, in a new order each epoch: call ``set_epoch`` first. The order is drawn from
    ``seed`` and the epoch alone, so every rank draws the same one and a resumed run sees the same orders.

    As in ``DistributedSampler``, the order is cut into global batches of ``batch_size`` × ``world_size`` and
    rank r takes every ``world_size``-th index of each, so N ranks at batch B train on exactly the batches
    of one process at batch N·B. A trailing global batch is cut to a multiple of ``world_size`` and dropped
    when a rank would get a single image, unless it is the only batch (BatchNorm heads need two)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        k = -(-self.n // size)
        per_rank = (self.n - (k - 1) * size) // self.world_size if k else 0  # in the last batch
        return k - int(k > 0 and (per_rank == 0 or (k > 1 and per_rank < 2)))

    def __iter__(self):
        size = self.batch_size * self.world_size
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for i in range(0, len(self) * size, size):
            batch = order[i:i + size]
            yield batch[: len(batch) - len(batch) % self.world_size][self.rank::self.world_size]


def eval_loader(dataset: Dataset, batch_size: int = 128) -> DataLoader:
    """Batches in order, for evaluation. Its own generator seeds the iterator, so evaluating leaves the
    global random stream (dropout, augmentation) as training left it."""
    return DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
