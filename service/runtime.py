"""ONNX Runtime sessions that say which provider really runs them (ORT falls back to CPU silently)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.preprocessing import METADATA_KEY, Preprocessing
from utils import sha256_file

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ArtifactError(RuntimeError):
    """A missing, corrupt or tampered artifact; the message names the file."""


def verify_sha256(path: str | Path, expected: str) -> None:
    """Refuse a file whose sha256 differs from the one its manifest recorded."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{path}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…; "
                            "the file was modified or corrupted — re-export it")


@dataclass
class OrtModel:
    """An ONNX Runtime session plus the preprocessing stored in the model's metadata."""

    session: object
    provider: str  # the provider that actually runs the graph
    preprocessing: Preprocessing
    input_name: str
    path: Path

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def resolve_providers(names: list[str] | None) -> list[str]:
    if not names:
        return ["CPUExecutionProvider"]
    out = [PROVIDER_ALIASES.get(n.lower(), n) for n in names]
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def load_ort_model(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                   expected_sha256: str | None = None, require: bool = False, spinning: bool = True) -> OrtModel:
    """Open an ONNX model with ONNX Runtime. ``require``: fail when the first provider asked for is not
    the one in use (instead of only reporting it). ``spinning``: ONNX Runtime's default busy-waiting
    intra-op threads (fastest alone; turn off when other work shares the cores)."""
    import onnxruntime as ort

    path = Path(path)
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    elif not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    wanted = resolve_providers(providers)
    available = ort.get_available_providers()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:  # idle worker threads sleep instead of busy-waiting: leaves the cores to HTTP and decoding
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=[p for p in wanted if p in available] or ["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(f"cannot load {path} with ONNX Runtime: {type(e).__name__}: {e}") from e
    used = sess.get_providers()[0]
    if require and used != wanted[0]:
        raise ArtifactError(f"{path}: asked for {wanted[0]} but ONNX Runtime runs it on {used} "
                            f"(available here: {', '.join(available)})")
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ArtifactError(f"{path} carries no preprocessing metadata ({METADATA_KEY}); export it with "
                            "python -m export")
    return OrtModel(sess, used, Preprocessing.from_json(meta[METADATA_KEY]), sess.get_inputs()[0].name, path)


def read_manifest(manifest_path: str | Path) -> dict:
    """Read a manifest with a clear error when it is missing or corrupt."""
    p = Path(manifest_path)
    if not p.is_file():
        raise ArtifactError(f"manifest not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"corrupt manifest {p}: {e}") from e


def open_artifact(artifact_dir: str | Path, fmt: str = "fp32", providers: list[str] | None = None,
                  threads: int | None = None, require: bool = False, spinning: bool = True) -> tuple[OrtModel, dict]:
    """Load one ONNX artifact of an export folder after checking its sha256 against ``manifest.json``.
    Returns the model and its manifest entry."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir / "manifest.json")
    entry = manifest.get("artifacts", {}).get(fmt)
    if not entry or "sha256" not in entry:
        have = [k for k, v in manifest.get("artifacts", {}).items() if "sha256" in v]
        raise ArtifactError(f"{artifact_dir} has no {fmt!r} artifact; available: {', '.join(have) or 'none'}")
    if entry.get("format") != "onnx":
        raise ArtifactError(f"{fmt!r} in {artifact_dir} is a {entry.get('format')} artifact, not ONNX")
    model = load_ort_model(artifact_dir / entry["file"], providers, threads, expected_sha256=entry["sha256"],
                           require=require, spinning=spinning)
    return model, entry
