"""Service configuration: which models, which backend each, batching, limits, workers and threads.

Read at import time (``bentoml build`` packs the models it names) from, in order:
``$CIFAR_DEPLOY_CONFIG`` (a YAML file), ``$CIFAR_DEPLOY_MODELS`` (``name=tag[@backend],…``), or
``service/config.yaml``. Environment variables ``CIFAR_DEPLOY_<FIELD>`` override single fields.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")
TOPOLOGIES = ("split", "inline")
DEFAULT_FILE = Path(__file__).with_name("config.yaml")


class ConfigError(ValueError):
    """An unusable service configuration; the message says which entry."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the name clients use (?model=…)
    tag: str  # BentoML model tag, e.g. demo-efficientnet_lite0-int8:latest
    backend: str = "onnxruntime"

    @property
    def key(self) -> str:
        """A Python identifier derived from the name (for API and attribute names)."""
        return re.sub(r"\W", "_", self.name)


@dataclass
class ServiceConfig:
    models: list[ModelSpec] = field(default_factory=list)
    # split: HTTP entry + runner service (BentoML adaptive batching; runners scale per GPU);
    # inline: one process decodes and runs the models (in-process batching; no internal HTTP hop)
    topology: str = "inline"
    max_batch_size: int = 32
    max_latency_ms: int = 1000
    runner_workers: int = 1
    runner_threads: int = 4
    api_workers: int = 1
    api_threads: int = 8
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (all cores)
    model_instances: int = 1  # sessions per model run in parallel, each with intra_op_threads threads
    ort_spinning: bool = False  # ONNX Runtime threads busy-wait between calls (off: cores go to HTTP/decoding)
    max_upload_mb: float = 10.0
    max_megapixels: float = 40.0
    max_batch_images: int = 64
    default_top_k: int = 5
    timeout_s: int = 30
    access_log: bool = False  # one log line per request in each service: costs CPU under load


def _parse_models(items) -> list[ModelSpec]:
    out = []
    for item in items or []:
        if isinstance(item, str):
            name, _, rest = item.partition("=")
            tag, _, backend = rest.partition("@")
            item = {"name": name.strip(), "tag": tag.strip(), "backend": backend.strip() or "onnxruntime"}
        if not isinstance(item, dict) or not item.get("name") or not item.get("tag"):
            raise ConfigError(f"model entry {item!r} needs a name and a tag")
        spec = ModelSpec(str(item["name"]), str(item["tag"]), str(item.get("backend", "onnxruntime")))
        if spec.backend not in BACKENDS:
            raise ConfigError(f"model {spec.name}: unknown backend {spec.backend!r}; valid: {', '.join(BACKENDS)}")
        out.append(spec)
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique: {names}")
    return out


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    env = os.environ if environ is None else environ
    raw: dict = {}
    path = env.get("CIFAR_DEPLOY_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"CIFAR_DEPLOY_CONFIG points to {p}, which does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
    elif env.get("CIFAR_DEPLOY_MODELS"):
        raw = {"models": [m for m in env["CIFAR_DEPLOY_MODELS"].split(",") if m.strip()]}
    elif DEFAULT_FILE.is_file():
        raw = yaml.safe_load(DEFAULT_FILE.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError("the service configuration must be a mapping")
    known = {f.name: f for f in fields(ServiceConfig)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    cfg = ServiceConfig(models=_parse_models(raw.get("models")))
    for name in known:
        if name == "models":
            continue
        value = env.get(f"CIFAR_DEPLOY_{name.upper()}", raw.get(name))
        if value is not None:
            try:
                kind = type(getattr(cfg, name))
                if kind is bool and isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                setattr(cfg, name, kind(value))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{name}: {value!r} is not a valid {type(getattr(cfg, name)).__name__}") from e
    if cfg.topology not in TOPOLOGIES:
        raise ConfigError(f"topology: {cfg.topology!r} is not one of {', '.join(TOPOLOGIES)}")
    if min(cfg.max_batch_size, cfg.max_batch_images, cfg.default_top_k, cfg.model_instances) < 1:
        raise ConfigError("max_batch_size, max_batch_images, default_top_k and model_instances must be positive")
    return cfg
