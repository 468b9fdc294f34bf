"""The BentoML service: ``bentoml serve service.service:CifarClassifier``.

``CifarClassifier`` is the HTTP entry (``/classify``, ``/classify_batch``, ``/models``): it checks and
decodes uploads (outside the batched path). Where inference runs depends on ``topology``:
- ``split`` (as in BentoML's own examples): ``CifarRunner`` owns the models (``BentoModel`` references,
  so ``bentoml build`` packs them) and one sync, batchable API per model, where BentoML batches
  adaptively; the entry ``bentoml.depends`` on it. Runners scale separately (one per GPU).
- ``inline``: the entry owns the models and batches in-process (``service.batching``), which saves
  the internal HTTP hop: the faster choice for CPU models that take a few milliseconds.
Bad input is answered with a 4xx JSON error, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.models import BentoModel
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from service.backends import LoadedModel, load_model
from service.batching import MicroBatcher
from service.config import ModelSpec, load_config
from service.preprocessing import ImageError, fit_image, load_rgb, open_image

CONFIG = load_config()
RUNNER_ATTEMPTS = 3
INLINE_DECODE_PIXELS = 256 * 256  # a lone image this small decodes on the event loop: cheaper than a thread hop

INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="cifar_inference_seconds", documentation="Model inference time per batch (preprocessing to tensor + model)",
    labelnames=["model", "backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RUNNER_RETRIES = bentoml.metrics.Counter(
    name="cifar_runner_retries", documentation="Entry→runner calls retried after a dropped connection",
    labelnames=["model"],
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="cifar_batch_size", documentation="Images per inference call after adaptive batching",
    labelnames=["model", "backend"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


def _dropped_connection(e: BaseException) -> bool:
    """aiohttp's two ways of saying the runner closed a pooled connection (while sending, while reading)."""
    return isinstance(e, aiohttp.ClientConnectionError) or (isinstance(e, RuntimeError)
                                                            and str(e) == "Connection closed.")


def _model_attr(spec: ModelSpec) -> str:
    return f"model_{spec.key}"


def _run(m: LoadedModel, images: np.ndarray) -> np.ndarray:
    """uint8 images (N, S, S, 3) → logits (N, classes), timed into the service's histograms."""
    t0 = time.perf_counter()
    logits = m.predict(m.preprocessing.to_input(images))
    INFERENCE_SECONDS.labels(model=m.spec.name, backend=m.spec.backend).observe(time.perf_counter() - t0)
    BATCH_SIZE.labels(model=m.spec.name, backend=m.spec.backend).observe(len(images))
    return np.asarray(logits, dtype=np.float32)


def _load_all(service) -> dict[str, LoadedModel]:
    """Load and warm up every configured model from the service's BentoModel references."""
    return {spec.name: load_model(spec, getattr(service, _model_attr(spec)), CONFIG.intra_op_threads,
                                  warmup_batch=min(8, CONFIG.max_batch_size), ort_spinning=CONFIG.ort_spinning,
                                  instances=CONFIG.model_instances)
            for spec in CONFIG.models}


def _infer_api(spec: ModelSpec):
    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, S, S, 3) → logits (N, classes)."""
        return _run(self.models[spec.name], images)

    infer.__name__ = infer.__qualname__ = f"infer_{spec.key}"
    return bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size,
                       max_latency_ms=CONFIG.max_latency_ms)(infer)


class _RunnerBase:
    def __init__(self) -> None:
        self.models = _load_all(self)  # every model loaded and warmed up before answering

    def __is_ready__(self) -> bool:
        return len(self.models) == len(CONFIG.models)

    @bentoml.api
    def describe(self) -> list[dict]:
        """Every loaded model: backend, provider, precision, sizes, classes, accuracy, sha256."""
        return [m.describe() for m in self.models.values()]


_attrs: dict = {"__module__": __name__}
for _spec in CONFIG.models:
    _attrs[_model_attr(_spec)] = BentoModel(_spec.tag)
    _attrs[f"infer_{_spec.key}"] = _infer_api(_spec)
CifarRunner = bentoml.service(
    name="cifar_runner", workers=CONFIG.runner_workers, threads=CONFIG.runner_threads,
    traffic={"timeout": CONFIG.timeout_s}, logging={"access": {"enabled": CONFIG.access_log}},
)(type("CifarRunner", (_RunnerBase,), _attrs))

app = FastAPI(title="cifar-deploy", description="CIFAR classifiers exported by cifar-deploy")


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


class RequestError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"payload of {int(declared)} bytes is over the {limit}-byte limit")


async def _read_body(request: Request, limit: int) -> bytes:
    _check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"payload is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in a multipart form, or the raw body as one file."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        _check_declared_length(request, limit)
        try:
            form = await request.form(max_files=max_files + 1, max_part_size=limit)
        except Exception as e:  # malformed multipart, too many parts
            raise RequestError(400, f"malformed multipart body: {e}") from e
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise RequestError(400, "multipart body has no file part (send the image as a file field)")
        if sum(len(b) for _, b in files) > limit:
            raise RequestError(413, f"payload is over the {limit}-byte limit")
        return files
    return [("body", await _read_body(request, limit))]


class CifarClassifier:
    def __init__(self) -> None:
        self._catalog: dict[str, dict] | None = None
        self._specs = {m.name: m for m in CONFIG.models}
        self._names = list(self._specs)
        self._batchers: dict[str, MicroBatcher] = {}
        if CONFIG.topology == "inline":
            models = _load_all(self)
            self._catalog = {name: m.describe() for name, m in models.items()}
            self._batchers = {name: MicroBatcher(lambda x, m=m: _run(m, x), CONFIG.max_batch_size,
                                                 CONFIG.max_latency_ms, name=m.spec.key,
                                                 workers=CONFIG.model_instances)
                              for name, m in models.items()}

    def catalog(self) -> dict[str, dict]:
        if self._catalog is None:
            self._catalog = {m["name"]: m for m in self.runner.describe()}
        return self._catalog

    async def __is_ready__(self) -> bool:
        """Ready once every model is loaded and warmed up (by the runner, in the split topology)."""
        try:
            await anyio.to_thread.run_sync(self.catalog)
        except Exception:
            return False
        return True

    def _model(self, name: str | None) -> tuple[ModelSpec, dict]:
        if not self._names:
            raise RequestError(503, "no models configured (see service/config.yaml)")
        name = name or self._names[0]
        if name not in self._specs:
            raise RequestError(404, f"unknown model {name!r}", models=self._names)
        return self._specs[name], self.catalog()[name]

    async def _infer(self, spec: ModelSpec, images: np.ndarray) -> np.ndarray:
        """Logits for at most max_batch_size images, from the in-process batcher or the runner."""
        if spec.name in self._batchers:
            return await self._batchers[spec.name](images)
        infer = getattr(self.runner.to_async, f"infer_{spec.key}")
        # Pooled entry→runner connections are sometimes dropped by the runner (bentoml/BentoML#3669,
        # #4971); inference is idempotent, so connection-level failures are retried.
        for attempt in range(RUNNER_ATTEMPTS):
            try:
                return await infer(images)
            except Exception as e:
                if not _dropped_connection(e) or attempt == RUNNER_ATTEMPTS - 1:
                    raise
                RUNNER_RETRIES.labels(model=spec.name).inc()

    async def _classify(self, files: list[tuple[str, bytes]], model: str | None, top_k: int | None) -> dict:
        spec, m = self._model(model)
        k = top_k or CONFIG.default_top_k
        if k > len(m["classes"]):
            raise RequestError(422, f"top_k={k} is more than the {len(m['classes'])} classes of {m['name']}")
        t0 = time.perf_counter()

        @contextlib.contextmanager
        def reported(i: int, fname: str):
            try:
                yield
            except ImageError as e:
                where = f"image {i} ({fname})" if len(files) > 1 else "image"
                raise RequestError(e.status, f"{where}: {e}") from e

        def fit(i: int, fname: str, data: bytes, im=None) -> np.ndarray:
            """One upload → uint8 (S, S, 3); ``im``: its header, when already opened."""
            with reported(i, fname):
                return fit_image(load_rgb(open_image(data, CONFIG.max_megapixels) if im is None else im),
                                 m["image_size"])

        if len(files) == 1:  # a lone small image decodes on the event loop: cheaper than a thread hop
            fname, data = files[0]
            with reported(0, fname):
                im = open_image(data, CONFIG.max_megapixels)
            if im.width * im.height <= INLINE_DECODE_PIXELS:
                images = fit(0, fname, data, im)[None]
            else:
                images = (await anyio.to_thread.run_sync(fit, 0, fname, data, im))[None]
        else:
            images = await anyio.to_thread.run_sync(
                lambda: np.stack([fit(i, fname, data) for i, (fname, data) in enumerate(files)]))
        t1 = time.perf_counter()
        step = CONFIG.max_batch_size
        parts = await asyncio.gather(*(self._infer(spec, images[i:i + step]) for i in range(0, len(images), step)))
        logits = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        t2 = time.perf_counter()
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(probs, top, axis=1).tolist()
        classes = m["classes"]
        results = [[{"label": classes[j], "score": v} for j, v in zip(row, vals, strict=True)]
                   for row, vals in zip(top.tolist(), scores, strict=True)]
        return {"model": m["name"], "backend": m["backend"], "provider": m["provider"],
                "precision": m["precision"], "results": results,
                "timing_ms": {"decode": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                              "total": 1e3 * (time.perf_counter() - t0)}}

    async def handle(self, request: Request, model: str | None, top_k: int | None, batch: bool) -> JSONResponse:
        limit = int(CONFIG.max_upload_mb * 2**20)
        try:
            files = await _uploads(request, limit, CONFIG.max_batch_images)
            most = CONFIG.max_batch_images if batch else 1
            if len(files) > most:
                raise RequestError(413, f"{len(files)} images in one request; the limit is {most}"
                                   + ("" if batch else " (use /classify_batch for several)"))
            out = await self._classify(files, model, top_k)
        except RequestError as e:
            return error(e.status, e.message, **e.extra)
        except Exception as e:  # the runner is down or shedding load: not the client's fault
            response = error(503, f"inference unavailable: {type(e).__name__}: {e}")
            response.headers["Retry-After"] = "1"
            return response
        results = out.pop("results")
        out["predictions"] = results if batch else results[0]
        return JSONResponse(out)  # plain JSON types already: skips FastAPI's per-element encoder

    def listing(self) -> dict:
        return {"models": list(self.catalog().values()), "default": self._names[0] if self._names else None}


# Routes are module functions that look the service instance up, not BentoML class views: a class
# view resolves ``self`` through a sync FastAPI dependency, a thread-pool hop on every request.
def _classifier() -> CifarClassifier:
    return bentoml.get_current_service()


@app.post("/classify")
async def classify(request: Request, model: str | None = Query(None), top_k: int | None = Query(None, ge=1, le=1000)):
    """One image (multipart file field or raw body) → top-k labels and scores."""
    return await _classifier().handle(request, model, top_k, batch=False)


@app.post("/classify_batch")
async def classify_batch(request: Request, model: str | None = Query(None),
                         top_k: int | None = Query(None, ge=1, le=1000)):
    """Several images (multipart file fields) → one prediction list per image, in order."""
    return await _classifier().handle(request, model, top_k, batch=True)


@app.get("/models")
def models():
    """Every served model with its backend, precision, input size, classes, accuracy and sha256."""
    try:
        return _classifier().listing()
    except Exception as e:
        return error(503, f"models not loaded yet: {type(e).__name__}: {e}")


if CONFIG.topology == "inline":
    for _spec in CONFIG.models:
        setattr(CifarClassifier, _model_attr(_spec), BentoModel(_spec.tag))
else:
    CifarClassifier.runner = bentoml.depends(CifarRunner)
CifarClassifier = bentoml.service(
    name="cifar_classifier", workers=CONFIG.api_workers, threads=CONFIG.api_threads,
    traffic={"timeout": CONFIG.timeout_s}, logging={"access": {"enabled": CONFIG.access_log}},
)(bentoml.asgi_app(app, path="/")(CifarClassifier))
