"""The one preprocessing definition, read from artifact metadata (numpy and Pillow only: no torch).

Training writes it into ``model.json``; export copies it into the ONNX metadata and the manifest; the
service and export's evaluation both call :meth:`Preprocessing.to_input`, so a served prediction
equals the offline one. Images are resized to ``image_size`` (the dataset's native 32 px), scaled
to [0, 1] and normalised per channel; the model upsamples to ``input_size`` in-graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

METADATA_KEY = "cifar_deploy.preprocessing"


class PreprocessingError(ValueError):
    """Metadata that does not describe a usable preprocessing."""


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Other keys are ignored (older exports also wrote ``resize`` and ``layout``, never read)."""
        try:
            p = cls(image_size=int(d["image_size"]), input_size=int(d["input_size"]),
                    mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                    classes=tuple(str(c) for c in d["classes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PreprocessingError(f"invalid preprocessing metadata: {type(e).__name__}: {e}") from e
        if len(p.mean) != 3 or len(p.std) != 3 or min(p.std) <= 0 or not p.classes or p.image_size < 1:
            raise PreprocessingError(f"invalid preprocessing metadata: {d}")
        return p

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PreprocessingError(f"preprocessing metadata is not JSON: {e}") from e

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["classes"] = list(self.mean), list(self.std), list(self.classes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one model input (C, H, W)."""
        return (3, self.image_size, self.image_size)

    def to_input(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) at ``image_size`` → float32 NCHW model input."""
        x = np.asarray(images_uint8_nhwc)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {x.shape}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# --------------------------------------------------------------------------- decoding uploads

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_megapixels: float = 40.0):
    """Bytes → an RGB ``PIL.Image``: JPEG, PNG, WebP, BMP or the first frame of a GIF, any mode (RGBA
    and palette transparency composited on white, L, CMYK, 16-bit), EXIF orientation applied. The
    pixel count is checked from the header before anything is decoded (decompression bombs)."""
    return load_rgb(open_image(data, max_megapixels))


def open_image(data: bytes, max_megapixels: float = 40.0):
    """Parse and check an image's header (format, pixel count); nothing is decoded yet (cheap)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty upload: expected an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageError("not an image (expected JPEG, PNG, WebP, BMP or GIF)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}", status=413) from e
    except Exception as e:  # a format's reader refused the header: OSError, ValueError, EOFError …
        raise ImageError(f"corrupt image header: {type(e).__name__}: {e}") from e
    if im.format not in ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {im.format}; use one of {', '.join(ALLOWED_FORMATS)}",
                         status=415)
    if im.width < 1 or im.height < 1:
        raise ImageError(f"image of {im.width}x{im.height} pixels")
    megapixels = im.width * im.height / 1e6
    if megapixels > max_megapixels:
        raise ImageError(f"image too large: {im.width}x{im.height} = {megapixels:.1f} MP, over the "
                         f"{max_megapixels:g} MP limit", status=413)
    return im


def load_rgb(im):
    """Decode an image from :func:`open_image` into RGB, EXIF orientation applied."""
    from PIL import ImageOps

    try:
        im.seek(0)
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies the image even when upright
            im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt data
        raise ImageError(f"truncated or corrupt {im.format} image: {e}") from e


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a / (257.0 if a.max() > 255 else 1.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def fit_image(im, size: int) -> np.ndarray:
    """The service's one resize: centre-crop a ``PIL.Image`` to a square, then resize it to ``size`` px with
    Pillow's bicubic filter and ``reducing_gap=2.0`` (a box reduction by an integer factor first when the
    image is over twice the size: fast on photos). Returns uint8 HWC. Training's ``resample`` augmentation
    (``training.data.ServingPath``) calls this function, so a model trains on the pixels it will be served."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)
