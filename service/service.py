"""The BentoML service: ``bentoml serve service.service:CifarClassifier`` (or a built bento).

``classify`` (one image) and ``classify_batch`` (several) are BentoML APIs, so BentoML's HTTP clients,
its OpenAPI page and ``bentoml.depends`` work with them; ``GET /models`` lists the served models.
One process checks and decodes uploads, batches concurrent requests in-process
(:mod:`service.batching`) and runs the models: on CPU this beat a separate runner service, whose
internal HTTP hop cost more than its batching saved (benchmarks/service.md).

Uploads are typed ``Path`` (BentoML stores each file part and hands over its path) and decoded by
:mod:`service.preprocessing`, not by BentoML's PIL input type, so that every bad upload keeps its own
answer: a 4xx JSON error ``{"error", "status", …}`` (400 bad image, 404 unknown model, 413 too large or
too many, 415 unsupported format, 422 bad top_k); overload is 503 with ``Retry-After``. A multipart body
BentoML could not parse, or another media type, is refused before BentoML reads it (:mod:`service.guard`);
a missing or mistyped field is refused by BentoML itself: 400 ``{"error", "detail"}``. Anything else is a
bug: 500 with a request id (body and ``X-Request-ID``), its traceback in the log.

GPU backends: the service asks BentoML for one GPU per worker (``resources={"gpu": workers}``).
BentoML 1.4 assigns those GPUs to the service as a whole: every worker starts with the same
``CUDA_VISIBLE_DEVICES`` (BentoML's allocation, or the caller's own when it was already set). Each
worker therefore narrows it to one GPU by its worker index before anything initialises CUDA:
worker i (from 1) runs every model on visible GPU (i - 1) mod n.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.models import BentoModel
from bentoml.validators import ContentType
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse

from service.backends import LoadedModel, load_model
from service.batching import MicroBatcher, Overloaded
from service.config import load_config
from service.guard import Form, InternalErrors, UploadGuard
from service.preprocessing import ImageError, PreprocessingError, fit_image, load_rgb, open_image
from service.runtime import ArtifactError

CONFIG = load_config()
logger = logging.getLogger("bentoml.serve")
DESCRIPTION = ("CIFAR image classifiers exported by cifar-deploy (ONNX Runtime, OpenVINO or TensorRT). POST an "
               "image file to /classify, or several to /classify_batch, with an optional model name (GET /models "
               "lists them) and top_k; the answer holds the top-k labels with their probabilities.")
# The answer's media type, declared: else BentoML derives it from the JSON schema on every response (~0.1 ms).
JSONObject = Annotated[dict, ContentType("application/json")]
INLINE_DECODE_PIXELS = 256 * 256  # a lone image this small decodes on the event loop: cheaper than a thread hop

INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="cifar_inference_seconds", documentation="Model inference time per batch (preprocessing to tensor + model)",
    labelnames=["model", "backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="cifar_batch_size", documentation="Images per inference call after adaptive batching",
    labelnames=["model", "backend"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class RequestError(Exception):
    """A request the service does not answer with predictions: a client mistake (4xx) or overload (503)."""

    def __init__(self, status: int, message: str, **extra) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": message, "status": status, **extra}

    def reply(self, ctx: bentoml.Context) -> dict:
        ctx.response.status_code = self.status
        if self.status == 503:
            ctx.response.headers["Retry-After"] = "1"
        return self.body


def _run(m: LoadedModel, images: np.ndarray) -> np.ndarray:
    """uint8 images (N, S, S, 3) → logits (N, classes), timed into the service's histograms."""
    t0 = time.perf_counter()
    logits = m.predict(m.preprocessing.to_input(images))
    INFERENCE_SECONDS.labels(model=m.ref.name, backend=m.ref.backend).observe(time.perf_counter() - t0)
    BATCH_SIZE.labels(model=m.ref.name, backend=m.ref.backend).observe(len(images))
    return np.asarray(logits, dtype=np.float32)


def _fit(data: bytes, size: int, where: str, im=None) -> np.ndarray:
    """One upload → uint8 (size, size, 3); ``im``: its header when already opened."""
    try:
        return fit_image(load_rgb(open_image(data, CONFIG.max_megapixels) if im is None else im), size)
    except ImageError as e:
        raise RequestError(e.status, f"{where}: {e}") from e


async def _images(paths: list[Path], size: int) -> np.ndarray:
    """Uploaded files → uint8 (N, size, size, 3), checked and decoded by service.preprocessing."""
    if len(paths) > 1:
        return await asyncio.to_thread(
            lambda: np.stack([_fit(p.read_bytes(), size, f"image {i}") for i, p in enumerate(paths)]))
    data = paths[0].read_bytes()
    try:
        im = open_image(data, CONFIG.max_megapixels)  # the header only: cheap
    except ImageError as e:
        raise RequestError(e.status, f"image: {e}") from e
    if im.width * im.height <= INLINE_DECODE_PIXELS:
        return _fit(data, size, "image", im)[None]
    return (await asyncio.to_thread(_fit, data, size, "image", im))[None]


def _pin_gpu() -> None:
    """Keep one of the GPUs BentoML made visible to every worker of the service: worker i takes the
    (i - 1) mod n-th. Must run before CUDA is initialised in this process."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) > 1:
        index = (bentoml.server_context.worker_index or 1) - 1
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)]


app = FastAPI(title="cifar-deploy", docs_url=None, redoc_url=None, openapi_url=None)  # BentoML serves the docs
UI_PAGE = Path(__file__).with_name("static") / "ui.html"


@app.get("/", include_in_schema=False)
def ui() -> HTMLResponse:
    """The page for people (service/static/ui.html); it takes / from BentoML's Swagger UI, now at /docs."""
    return HTMLResponse(UI_PAGE.read_text())


@app.get("/docs", include_in_schema=False)
def swagger_ui() -> HTMLResponse:
    """Swagger UI over BentoML's /docs.json, from the assets BentoML serves (offline, no tag manager)."""
    return get_swagger_ui_html(openapi_url="docs.json", title="cifar-deploy API",
                               swagger_js_url="static_content/swagger-ui-bundle.js",
                               swagger_css_url="static_content/swagger-ui.css",
                               swagger_favicon_url="static_content/favicon-light-32x32.png")


@bentoml.service(
    name="cifar_classifier", description=DESCRIPTION, workers=CONFIG.workers,
    resources={"gpu": CONFIG.workers} if CONFIG.uses_gpu else None,
    traffic={"timeout": CONFIG.timeout_s}, logging={"access": {"enabled": CONFIG.access_log}},
)
@bentoml.asgi_app(app, path="/")
class CifarClassifier:
    """Classifies images with the models of service/config.yaml."""

    # `bentoml build` packs, and the service resolves, every class attribute that is a model reference
    # (BentoML finds them with dir()): one attribute per configured model, model_0, model_1, …
    locals().update({f"model_{i}": BentoModel(ref.tag) for i, ref in enumerate(CONFIG.models)})

    def __init__(self) -> None:
        if CONFIG.uses_gpu:
            _pin_gpu()
        try:
            self.models = {ref.name: load_model(ref, getattr(self, f"model_{i}"), CONFIG.intra_op_threads,
                                                warmup_batch=min(8, CONFIG.max_batch_size),
                                                ort_spinning=CONFIG.ort_spinning, instances=CONFIG.model_instances,
                                                openvino_precision=CONFIG.openvino_precision)
                           for i, ref in enumerate(CONFIG.models)}  # every model loaded and warmed up before serving
        except (ArtifactError, PreprocessingError) as e:  # a missing, tampered or unusable artifact: never ready
            logger.error("cannot serve: %s", e)
            os._exit(3)  # raising would log two tracebacks (BentoML's and the ASGI lifespan's) around this line
        self.batchers = {name: MicroBatcher(functools.partial(_run, m), CONFIG.max_batch_size, CONFIG.max_latency_ms,
                                            name=name, workers=CONFIG.model_instances)
                         for name, m in self.models.items()}
        self.catalog = {"models": [m.describe() for m in self.models.values()], "default": CONFIG.models[0].name}

    @bentoml.api
    async def classify(self, image: Path, model: str | None = None, top_k: int | None = None, *,
                       ctx: bentoml.Context) -> JSONObject:
        """One image file (JPEG, PNG, WebP, BMP or GIF) → the top_k labels of `model` with their probabilities."""
        try:
            out = await self._classify([image], model, top_k)
        except RequestError as e:
            return e.reply(ctx)
        out["predictions"] = out["predictions"][0]
        return out

    @bentoml.api
    async def classify_batch(self, images: list[Path], model: str | None = None, top_k: int | None = None, *,
                             ctx: bentoml.Context) -> JSONObject:
        """Several image files → one list of top_k labels and probabilities per image, in order."""
        try:
            if not 1 <= len(images) <= CONFIG.max_batch_images:
                raise RequestError(413 if images else 400, f"{len(images)} images in one request; expected 1 to "
                                   f"{CONFIG.max_batch_images}")
            return await self._classify(images, model, top_k)
        except RequestError as e:
            return e.reply(ctx)

    @bentoml.on_shutdown
    def close(self) -> None:
        """After the last request: stop the batchers' inference threads."""
        for batcher in self.batchers.values():
            batcher.close()

    @app.get("/models")
    def list_models(self) -> dict:
        """Every served model: backend, provider, precision, sizes, classes, accuracy and sha256; and the default."""
        return self.catalog

    async def _classify(self, paths: list[Path], name: str | None, top_k: int | None) -> dict:
        name = name or CONFIG.models[0].name
        if name not in self.models:
            raise RequestError(404, f"unknown model {name[:100]!r}", models=list(self.models))
        m = self.models[name]
        classes = m.preprocessing.classes
        k = min(CONFIG.default_top_k, len(classes)) if top_k is None else top_k
        if not 1 <= k <= len(classes):
            raise RequestError(422, f"top_k={k}: expected 1 to {len(classes)} (the classes of {name})")
        t0 = time.perf_counter()
        images = await _images(paths, m.preprocessing.image_size)
        t1 = time.perf_counter()
        step = CONFIG.max_batch_size
        try:
            parts = await asyncio.gather(*(self.batchers[name](images[i:i + step])
                                           for i in range(0, len(images), step)))
        except Overloaded as e:
            raise RequestError(503, str(e)) from e
        logits = np.concatenate(parts)
        t2 = time.perf_counter()
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(probs, top, axis=1).tolist()
        predictions = [[{"label": classes[j], "score": v} for j, v in zip(row, vals, strict=True)]
                       for row, vals in zip(top.tolist(), scores, strict=True)]
        return {"model": name, "backend": m.ref.backend, "provider": m.provider, "precision": m.precision,
                "predictions": predictions,
                "timing_ms": {"decode": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                              "total": 1e3 * (time.perf_counter() - t0)}}


CifarClassifier.add_asgi_middleware(InternalErrors)
CifarClassifier.add_asgi_middleware(UploadGuard, limit=int(CONFIG.max_upload_mb * 2**20), forms={
    "/classify": Form("image", 1, ("model", "top_k")),
    "/classify_batch": Form("images", CONFIG.max_batch_images, ("model", "top_k"))})
