"""Service configuration: the models to serve, batching, limits and workers.

The defaults are the :class:`ServiceConfig` fields below. They are overridden, in order, by a YAML
file (``$CIFAR_DEPLOY_CONFIG``, else ``service/config.yaml``; of a file with one section per stage, its
``service:`` section) and by environment variables ``CIFAR_DEPLOY_<FIELD>``
(``CIFAR_DEPLOY_MODELS=name=tag[@backend],…`` replaces ``models`` only). Read when the service module is
imported, so ``bentoml build`` packs the models it names.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from service.openvino_backend import PRECISIONS as OPENVINO_PRECISIONS
from utils import ModelRef, UserError, yaml_defaults

BACKENDS = ("onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt")
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")
DEFAULT_FILE = Path(__file__).with_name("config.yaml")
ENV_PREFIX = "CIFAR_DEPLOY_"


class ConfigError(UserError):
    """An unusable service configuration; the message names the setting."""


@dataclass
class ServiceConfig:
    models: list[ModelRef] = field(default_factory=list, metadata={
        "help": "served models, {name, tag, backend} (tag: BentoML model tag; backend: " + " | ".join(BACKENDS)
                + "); the first is the default"})
    workers: int = field(default=1, metadata={
        "help": "worker processes, each with every model; with a GPU backend, one GPU each"})
    max_batch_size: int = field(default=32, metadata={"help": "most images per inference call"})
    max_latency_ms: int = field(default=1000, metadata={
        "help": "requests that waited longer in the batching queue are shed (503)"})
    intra_op_threads: int = field(default=0, metadata={
        "help": "threads per ONNX Runtime session or OpenVINO stream; 0: all cores"})
    model_instances: int = field(default=1, metadata={
        "help": "sessions (OpenVINO: streams) per model, each running one batch at a time (small CPU models: one "
                "per core with intra_op_threads 1 is fastest; benchmarks/service.md)"})
    ort_spinning: bool = field(default=False, metadata={
        "help": "ONNX Runtime threads busy-wait between calls (off leaves the cores to HTTP and decoding)"})
    openvino_precision: str = field(default="f32", metadata={
        "help": "float precision of openvino models: f32 (matches ONNX Runtime) or bf16 (faster on CPUs with AMX "
                "or AVX-512 BF16, less exact; an INT8 model's float layers too)"})
    max_upload_mb: float = field(default=10.0, metadata={"help": "largest request body (413 above)"})
    max_megapixels: float = field(default=40.0, metadata={"help": "largest image, checked from its header (413)"})
    max_batch_images: int = field(default=64, metadata={"help": "most images in one /classify_batch request (413)"})
    default_top_k: int = field(default=5, metadata={"help": "labels per image when a request gives no top_k"})
    timeout_s: int = field(default=30, metadata={"help": "BentoML's per-request timeout"})
    access_log: bool = field(default=False, metadata={"help": "one log line per request (costs CPU under load)"})

    @property
    def uses_gpu(self) -> bool:
        return any(m.backend in GPU_BACKENDS for m in self.models)


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(name: str, kind: type, value):
    """A YAML value or an environment string as ``kind`` (bool, int or float); a ConfigError names the setting."""
    try:
        if isinstance(value, str):
            value = _BOOLEANS[value.strip().lower()] if kind is bool else kind(value.strip())
        if isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool)):
            return kind(value)
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}")


def _models(items) -> list[ModelRef]:
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    if not isinstance(items, list) or not items:
        raise ConfigError("models: expected a non-empty list of {name, tag, backend} (name=tag[@backend],… in "
                          f"{ENV_PREFIX}MODELS)")
    out = []
    for i, item in enumerate(items):
        try:
            ref = ModelRef.parse(item)
        except UserError as e:
            raise ConfigError(f"models[{i}]: {e}") from None
        if ref.backend not in BACKENDS:
            raise ConfigError(f"models[{i}] ({ref.name}): unknown backend {ref.backend!r}; "
                              f"valid: {', '.join(BACKENDS)}")
        out.append(ref)
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"models: names must be unique, got {', '.join(names)}")
    return out


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    """Defaults ← the YAML file ← ``CIFAR_DEPLOY_<FIELD>`` variables of ``environ`` (default: os.environ)."""
    env = os.environ if environ is None else environ
    types = typing.get_type_hints(ServiceConfig)
    path = Path(env["CIFAR_DEPLOY_CONFIG"]) if env.get("CIFAR_DEPLOY_CONFIG") else DEFAULT_FILE
    if not path.is_file():
        raise ConfigError(f"CIFAR_DEPLOY_CONFIG points to {path}, which does not exist")
    try:
        values = dict(yaml_defaults(path, ServiceConfig, section="service"))  # unknown keys refused
    except UserError as e:
        raise ConfigError(str(e)) from None
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and key != "CIFAR_DEPLOY_CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            if name not in types:
                raise ConfigError(f"{key}: unknown setting; valid: CIFAR_DEPLOY_CONFIG and {ENV_PREFIX}<FIELD> for "
                                  f"the fields {', '.join(types)}")
            values[name] = value
    kwargs = {name: _coerce(name, types[name], value) for name, value in values.items() if name != "models"}
    kwargs["models"] = _models(values.get("models"))
    cfg = ServiceConfig(**kwargs)
    for name in ("workers", "max_batch_size", "max_latency_ms", "model_instances", "max_batch_images",
                 "default_top_k", "timeout_s", "max_upload_mb", "max_megapixels"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(cfg, name)}")
    if cfg.openvino_precision not in OPENVINO_PRECISIONS:
        raise ConfigError(f"openvino_precision: {cfg.openvino_precision!r}; valid: {', '.join(OPENVINO_PRECISIONS)}")
    if cfg.intra_op_threads < 0:
        raise ConfigError(f"intra_op_threads: must be 0 (all cores) or more, got {cfg.intra_op_threads}")
    return cfg
