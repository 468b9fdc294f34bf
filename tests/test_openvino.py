"""The openvino backend: parity with ONNX Runtime on the same files, what the service reports, the export
benchmark's OpenVINO rows, and the clear errors and skips where OpenVINO is missing."""

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import bentoml
import httpx
import numpy as np
import pytest
import yaml

from export import benchmark
from loadtest.server import serve
from service import openvino_backend
from service.backends import load_model
from service.config import ConfigError, load_config
from service.runtime import ArtifactError, open_artifact
from utils import ModelRef

ROOT = Path(__file__).resolve().parent.parent
needs_openvino = pytest.mark.skipif(openvino_backend.unavailable_reason() is not None,
                                    reason=openvino_backend.unavailable_reason() or "")


def _test_images(exported, n: int = 64) -> np.ndarray:
    out, manifest = exported
    return benchmark.eval_inputs(manifest, n)[0]


@needs_openvino
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_backend_matches_onnx_runtime_on_the_same_file(exported, fmt):
    out, manifest = exported
    x = _test_images(exported)
    ort_model, _ = open_artifact(out, fmt, threads=2)
    ref = ort_model(x)
    m = load_model(ModelRef("t", f"tiny-{fmt}:latest", "openvino"), bentoml.models.get(f"tiny-{fmt}:latest"),
                   intra_op_threads=1)
    got = m.predict(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    if fmt == "fp32":  # the same float graph: equal up to summation order
        assert np.abs(got - ref).max() < 1e-4 and agreement == 1.0
    else:  # OpenVINO's INT8 kernels round differently from ONNX Runtime's: close, not equal
        assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max() and agreement >= 0.9
    assert m.provider == "OpenVINO CPU" and m.precision == fmt
    assert m.runtime["inference_precision"] == "f32" and m.runtime["threads_per_stream"] == 1


@needs_openvino
def test_instances_are_streams_that_answer_concurrent_calls_alike(exported):
    x = _test_images(exported, 32)
    m = load_model(ModelRef("t", "tiny-fp32:latest", "openvino"), bentoml.models.get("tiny-fp32:latest"),
                   intra_op_threads=1, instances=2)
    assert m.instances == 2 and m.runtime["streams"] == 2
    one = m.predict(x)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(m.predict, [x] * 8))
    assert all(np.array_equal(o, one) for o in outs)
    info = m.describe()  # what GET /models lists
    assert info["backend"] == "openvino" and info["provider"] == "OpenVINO CPU" and info["instances"] == 2
    assert "cores" in info["device"] and info["runtime"]["openvino"]


@needs_openvino
def test_bf16_is_reported_as_such(exported):
    if not openvino_backend.bf16_capable():
        pytest.skip("this CPU has no native bfloat16: OpenVINO runs f32 whatever the hint")
    m = load_model(ModelRef("t", "tiny-int8:latest", "openvino"), bentoml.models.get("tiny-int8:latest"),
                   intra_op_threads=1, openvino_precision="bf16")
    assert m.precision == "int8+bf16" and m.runtime["inference_precision"] == "bf16"


class _Stored(SimpleNamespace):
    """A stand-in for a BentoML model: its metadata and a folder holding the file."""

    def path_of(self, name: str) -> str:
        return str(Path(self.path) / name)


def _stored_copy(exported, tmp_path: Path, fmt: str = "fp32") -> _Stored:
    stored = bentoml.models.get(f"tiny-{fmt}:latest")
    shutil.copy(stored.path_of(stored.info.metadata["file"]), tmp_path / stored.info.metadata["file"])
    return _Stored(tag=stored.tag, path=str(tmp_path), info=SimpleNamespace(metadata=dict(stored.info.metadata)))


def test_a_tampered_file_is_refused_before_openvino_compiles_it(exported, tmp_path):
    stored = _stored_copy(exported, tmp_path)
    with open(stored.path_of(stored.info.metadata["file"]), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_model(ModelRef("t", "tiny-fp32:latest", "openvino"), stored)


def test_missing_openvino_is_a_clear_artifact_error(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    reason = openvino_backend.unavailable_reason()
    assert reason and "pip install -e '.[openvino]'" in reason
    with pytest.raises(ArtifactError, match=r"model t: backend openvino unavailable: openvino is not installed"):
        load_model(ModelRef("t", "tiny-fp32:latest", "openvino"), _stored_copy(exported, tmp_path))


def test_openvino_refuses_a_tensorrt_engine(exported, tmp_path, monkeypatch):
    stored = _stored_copy(exported, tmp_path)
    stored.info.metadata["format"] = "tensorrt"
    monkeypatch.setattr(openvino_backend, "unavailable_reason", lambda: None)
    with pytest.raises(ArtifactError, match="serves the ONNX files"):
        load_model(ModelRef("t", "tiny-fp32:latest", "openvino"), stored)


def test_config_accepts_the_backend_and_checks_its_precision():
    cfg = load_config({"CIFAR_DEPLOY_MODELS": "a=x:1@openvino", "CIFAR_DEPLOY_OPENVINO_PRECISION": "bf16"})
    assert cfg.models[0].backend == "openvino" and cfg.openvino_precision == "bf16" and not cfg.uses_gpu
    with pytest.raises(ConfigError, match="openvino_precision: 'fp16'; valid: f32, bf16"):
        load_config({"CIFAR_DEPLOY_MODELS": "a=x:1@openvino", "CIFAR_DEPLOY_OPENVINO_PRECISION": "fp16"})


def test_parity_measures_agreement_difference_and_accuracy():
    ref = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    got = ref + np.array([[0, 0], [0, 0], [-1.5, 0]], dtype=np.float32)  # the last prediction flips
    p = benchmark.parity(got, ref, np.array([0, 1, 0]))
    assert p == {"images": 3, "top1_agreement": pytest.approx(2 / 3), "max_abs_logit_diff": 1.5,
                 "accuracy": pytest.approx(2 / 3)}


OV_FORMATS = ["fp32", "int8", "openvino_fp32", "openvino_int8", "openvino_bf16", "openvino_int8_bf16",
              "openvino_int8_trt"]


def _bench(exported, dest: Path, formats=OV_FORMATS) -> int:
    out, _ = exported
    return benchmark.main([str(out), "--batches", "1", "4", "--warmup", "1", "--iters", "2", "--min-seconds", "0",
                           "--threads", "2", "--formats", *formats, "--out", str(dest)])


def manifest_mb(manifest: dict, fmt: str) -> float:
    return round(manifest["artifacts"][fmt]["size_bytes"] / 2**20, 2)


@needs_openvino
def test_benchmark_puts_openvino_rows_beside_onnx_runtime(exported, tmp_path):
    out, manifest = exported
    dest = tmp_path / "bench"
    assert _bench(exported, dest) == 0
    rows = json.loads(dest.with_suffix(".json").read_text())
    bf16 = openvino_backend.bf16_capable()
    expected = {"fp32", "int8", "openvino_fp32", "openvino_int8", "openvino_int8_trt"} | (
        {"openvino_bf16", "openvino_int8_bf16"} if bf16 else set())
    assert {r["format"] for r in rows} == expected
    assert set(benchmark.openvino_formats()) == {f for f in benchmark.OPENVINO_FORMATS if bf16 or "bf16" not in f}
    at = {(r["format"], r["batch"]): r for r in rows}
    for b in (1, 4):  # every row's ratio is its throughput over ONNX Runtime FP32's at the same batch
        base = at["fp32", b]["throughput_ips"]
        for fmt in expected:
            assert at[fmt, b]["vs_ort_fp32"] == pytest.approx(at[fmt, b]["throughput_ips"] / base, rel=1e-2)
    for fmt in expected - {"fp32", "int8"}:
        r = at[fmt, 4]
        src = r["source_format"]
        assert r["backend"] == "openvino" and r["provider"] == "OpenVINO CPU"
        assert src == benchmark.OPENVINO_FORMATS[fmt][0] and r["size_mb"] == manifest_mb(manifest, src)
        p = r["parity"]
        assert p["images"] == manifest["eval_images"] and p["inputs"] == "test"
        assert p["reference_accuracy"] == pytest.approx(manifest["artifacts"][src]["accuracy"])  # same images
        assert r["accuracy"] == p["accuracy"] and 0 <= p["top1_agreement"] <= 1
        if fmt == "openvino_fp32":
            assert p["max_abs_logit_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    md = dest.with_suffix(".md").read_text()
    assert "| × ORT FP32 |" in md and "| OpenVINO INT8 (CPU Q/DQ) | 4 |" in md
    assert "Fastest CPU INT8 path at batch 4" in md
    assert "OpenVINO FP32 vs ONNX Runtime CPU, model.onnx on " in md


def test_benchmark_says_openvino_rows_are_skipped_without_it(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(openvino_backend, "unavailable_reason", lambda: "openvino is not installed (test)")
    dest = tmp_path / "bench"
    assert _bench(exported, dest, ["fp32", "openvino_fp32", "openvino_int8"]) == 0
    assert "skipped: openvino_fp32, openvino_int8: openvino is not installed (test)" in capsys.readouterr().err
    assert {r["format"] for r in json.loads(dest.with_suffix(".json").read_text())} == {"fp32"}


def test_the_openvino_bento_is_the_default_one_plus_openvino():
    default = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    ov = yaml.safe_load((ROOT / "bentofile.openvino.yaml").read_text())
    assert ov["service"] == default["service"] and ov["include"] == default["include"]
    extra = [p for p in ov["python"]["packages"] if p not in default["python"]["packages"]]
    assert [p.split(">")[0] for p in extra] == ["openvino"]
    assert not any(p.startswith(("openvino", "torch")) for p in default["python"]["packages"])


@needs_openvino
@pytest.mark.heavy
def test_served_openvino_model_is_listed_and_answers_like_onnx_runtime(exported, tmp_path):
    from tests.test_service import image, png

    models = [ModelRef("ov", "tiny-fp32:latest", "openvino"), ModelRef("ort", "tiny-fp32:latest")]
    options = {"max_batch_size": 8, "intra_op_threads": 1, "model_instances": 2}
    with serve(models, tmp_path, options, timeout=90) as url, httpx.Client(base_url=url, timeout=30) as client:
        listing = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listing["ov"]["backend"] == "openvino" and listing["ov"]["provider"] == "OpenVINO CPU"
        assert listing["ov"]["runtime"]["streams"] == 2 and listing["ov"]["precision"] == "fp32"
        assert listing["ort"]["backend"] == "onnxruntime"
        data = png(3)
        answers = [client.post("/classify", files=image(data), data={"model": name, "top_k": 10}).json()
                   for name in ("ov", "ort")]
    assert answers[0]["backend"] == "openvino"
    ov, ort = ({p["label"]: p["score"] for p in a["predictions"]} for a in answers)
    assert ov.keys() == ort.keys() and all(abs(ov[k] - ort[k]) < 1e-5 for k in ov)
