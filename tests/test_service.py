"""The BentoML service over real HTTP: ``bentoml serve`` as a subprocess, requests with httpx."""

import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from loadtest.run import Target, serve
from service.preprocessing import decode_image, fit_image
from service.runtime import open_artifact

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def png(seed: int = 0, size=(48, 40), fmt="PNG") -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, fmt)
    return b.getvalue()


SERVICE_OPTIONS = {"max_batch_size": 16, "max_latency_ms": 1000, "max_upload_mb": 0.5, "max_megapixels": 1.0,
                   "max_batch_images": 4, "intra_op_threads": 1, "runner_threads": 8,
                   "model_instances": 2}
TARGETS = [Target("tiny", "tiny-fp32:latest"), Target("tiny-int8", "tiny-int8:latest")]


@pytest.fixture(scope="module")
def service_env(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("svc") / "config.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": t.name, "tag": t.tag} for t in TARGETS],
                                    **SERVICE_OPTIONS}))
    return {**os.environ, "CIFAR_DEPLOY_CONFIG": str(path), "BENTOML_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module", params=["inline", "split"])
def server(exported, tmp_path_factory, request):
    """The service in each topology: one process (inline) and entry + runner services (split)."""
    options = {**SERVICE_OPTIONS, "topology": request.param}
    with serve(TARGETS, tmp_path_factory.mktemp("serve"), options, timeout=90) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_health_endpoints(server):
    assert server.get("/livez").status_code == 200
    assert server.get("/readyz").status_code == 200


def test_png_and_jpeg_round_trip_multipart_and_raw(server):
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = png(1, fmt=fmt)
        r = server.post("/classify", files={"image": (f"x.{fmt.lower()}", data, ctype)}, params={"top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["precision"] == "fp32" and body["backend"] == "onnxruntime"
        assert len(body["predictions"]) == 3 and body["timing_ms"]["total"] > 0
        raw = server.post("/classify", content=data, headers={"content-type": ctype}, params={"top_k": 3})
        assert raw.status_code == 200 and raw.json()["predictions"] == body["predictions"]


def test_served_prediction_equals_in_process_onnx_runtime(server, exported):
    out, _ = exported
    data = png(7, size=(90, 70), fmt="JPEG")
    served = server.post("/classify", content=data, params={"top_k": 10}).json()["predictions"]
    model, _ = open_artifact(out, "fp32")
    x = model.preprocessing.to_input(fit_image(decode_image(data), 32)[None])
    logits = model(x)[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    classes = model.preprocessing.classes
    assert served[0]["label"] == classes[int(p.argmax())]
    for pred in served:
        assert pred["score"] == pytest.approx(float(p[classes.index(pred["label"])]), abs=1e-6)


def test_models_endpoint(server, exported):
    _, manifest = exported
    models = {m["name"]: m for m in server.get("/models").json()["models"]}
    assert set(models) == {"tiny", "tiny-int8"}
    assert models["tiny"]["sha256"] == manifest["artifacts"]["fp32"]["sha256"]
    assert models["tiny-int8"]["precision"] == "int8" and models["tiny"]["input_size"] == 32
    assert len(models["tiny"]["classes"]) == 10 and models["tiny"]["accuracy"] is not None
    assert models["tiny"]["provider"] == "CPUExecutionProvider" and "cores" in models["tiny"]["device"]
    assert models["tiny"]["instances"] == 2


def test_batch_endpoint_answers_per_image(server):
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(3)]
    r = server.post("/classify_batch", files=files, params={"model": "tiny-int8", "top_k": 2})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p) == 2 for p in preds)
    single = server.post("/classify", content=png(1), params={"model": "tiny-int8", "top_k": 2}).json()
    assert preds[1] == single["predictions"]


@pytest.mark.parametrize("kind", ["not_image", "truncated", "empty", "bomb", "too_big", "unknown_model",
                                  "top_k_zero", "top_k_too_large", "too_many", "two_in_classify", "tiff"])
def test_bad_input_is_a_4xx_json_error_and_the_service_keeps_working(server, kind):
    post, expected = server.post, None
    if kind == "not_image":
        r, expected = post("/classify", files={"image": ("a.txt", b"hello", "text/plain")}), 400
    elif kind == "truncated":
        r, expected = post("/classify", content=png(2)[:100]), 400
    elif kind == "empty":
        r, expected = post("/classify", content=b""), 400
    elif kind == "bomb":
        b = io.BytesIO()
        Image.new("L", (2000, 1000)).save(b, "PNG")  # 2 MP, over the 1 MP limit, a few KB
        r, expected = post("/classify", content=b.getvalue()), 413
    elif kind == "too_big":
        r, expected = post("/classify", content=os.urandom(600_000)), 413
    elif kind == "unknown_model":
        r, expected = post("/classify", content=png(), params={"model": "resnet9000"}), 404
        assert r.json()["models"] == ["tiny", "tiny-int8"]
    elif kind == "top_k_zero":
        r, expected = post("/classify", content=png(), params={"top_k": 0}), 422
    elif kind == "top_k_too_large":
        r, expected = post("/classify", content=png(), params={"top_k": 11}), 422
    elif kind == "too_many":
        files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(5)]
        r, expected = post("/classify_batch", files=files), 413
    elif kind == "two_in_classify":
        files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        r, expected = post("/classify", files=files), 413
    else:
        r, expected = post("/classify", content=png(fmt="TIFF")), 415
    assert r.status_code == expected, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()
    ok = post("/classify", content=png(3))
    assert ok.status_code == 200 and ok.json()["predictions"]


def _histogram(text: str, name: str, model: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}_bucket\{{(.*?)\}} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("model") == model:
            out[labels["le"]] = out.get(labels["le"], 0.0) + float(m.group(2))
    return out


def test_concurrent_requests_are_batched(server):
    def one(i):
        return server.post("/classify", content=png(100 + i), params={"model": "tiny"}).status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    text = server.get("/metrics").text
    buckets = _histogram(text, "cifar_batch_size", "tiny")
    assert buckets["+Inf"] >= 1
    assert buckets["1.0"] < buckets["+Inf"], "no inference call ever saw more than one image"
    assert "cifar_inference_seconds_bucket" in text


def test_service_module_does_not_import_torch(service_env):
    code = "import sys, service.service; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=service_env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_bentoml_build(service_env, tmp_path):
    r = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=ROOT, env=service_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("cifar-deploy:")
    listed = subprocess.run([BENTOML, "list", "-o", "json"], env=service_env, capture_output=True, text=True)
    assert tag.split(":")[1] in listed.stdout
