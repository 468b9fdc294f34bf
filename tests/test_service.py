"""The BentoML service over real HTTP: ``bentoml serve`` as a subprocess, requests with httpx and with
BentoML's own client."""

import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import yaml
from bentoml.exceptions import BentoMLException
from PIL import Image

from loadtest.server import serve
from service.preprocessing import decode_image, fit_image
from service.runtime import open_artifact
from utils import ModelRef

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def png(seed: int = 0, size=(48, 40), fmt="PNG") -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, fmt)
    return b.getvalue()


def image(data: bytes, name: str = "x.png", ctype: str = "image/png") -> dict:
    return {"image": (name, data, ctype)}


SERVICE_OPTIONS = {"max_batch_size": 16, "max_latency_ms": 1000, "max_upload_mb": 0.5, "max_megapixels": 1.0,
                   "max_batch_images": 4, "intra_op_threads": 1, "model_instances": 2}
MODELS = [ModelRef("tiny", "tiny-fp32:latest"), ModelRef("tiny-int8", "tiny-int8:latest")]


@pytest.fixture(scope="module")
def service_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("svc") / "config.yaml"
    path.write_text(yaml.safe_dump({"models": [m.to_dict() for m in MODELS], **SERVICE_OPTIONS}))
    return {**os.environ, "CIFAR_DEPLOY_CONFIG": str(path), "BENTOML_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def url(exported, tmp_path_factory):
    with serve(MODELS, tmp_path_factory.mktemp("serve"), SERVICE_OPTIONS, timeout=90) as url:
        yield url


@pytest.fixture(scope="module")
def server(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.mark.heavy
def test_health_endpoints(server):
    assert server.get("/livez").status_code == 200
    assert server.get("/readyz").status_code == 200


@pytest.mark.heavy
def test_png_and_jpeg_round_trip(server):
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        r = server.post("/classify", files=image(png(1, fmt=fmt), f"x.{fmt.lower()}", ctype), data={"top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["precision"] == "fp32" and body["backend"] == "onnxruntime"
        assert len(body["predictions"]) == 3 and body["timing_ms"]["total"] > 0


@pytest.mark.heavy
def test_served_prediction_equals_in_process_onnx_runtime(server, exported):
    out, _ = exported
    data = png(7, size=(90, 70), fmt="JPEG")
    r = server.post("/classify", files=image(data, "x.jpg", "application/octet-stream"), data={"top_k": 10})
    served = r.json()["predictions"]
    model, _ = open_artifact(out, "fp32")
    x = model.preprocessing.to_input(fit_image(decode_image(data), 32)[None])
    logits = model(x)[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    classes = model.preprocessing.classes
    assert served[0]["label"] == classes[int(p.argmax())]
    for pred in served:
        assert pred["score"] == pytest.approx(float(p[classes.index(pred["label"])]), abs=1e-6)


@pytest.mark.heavy
def test_models_endpoint(server, exported):
    _, manifest = exported
    listing = server.get("/models").json()
    models = {m["name"]: m for m in listing["models"]}
    assert set(models) == {"tiny", "tiny-int8"} and listing["default"] == "tiny"
    assert models["tiny"]["sha256"] == manifest["artifacts"]["fp32"]["sha256"]
    assert models["tiny-int8"]["precision"] == "int8" and models["tiny"]["input_size"] == 32
    assert len(models["tiny"]["classes"]) == 10 and models["tiny"]["accuracy"] is not None
    assert models["tiny"]["provider"] == "CPUExecutionProvider" and "cores" in models["tiny"]["device"]
    assert models["tiny"]["instances"] == 2


@pytest.mark.heavy
def test_batch_endpoint_answers_per_image(server):
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(3)]
    r = server.post("/classify_batch", files=files, data={"model": "tiny-int8", "top_k": 2})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p) == 2 for p in preds)
    single = server.post("/classify", files=image(png(1)), data={"model": "tiny-int8", "top_k": 2}).json()
    assert preds[1] == single["predictions"]


def _chunked(data: bytes, boundary: str = "b0undary"):
    """A multipart body with one image field, sent without Content-Length (chunked)."""
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return {"content": (body[i:i + 65536] for i in range(0, len(body), 65536)),
            "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


# Ours: {"error", "status", …}. Requests that do not match the API's schema (a missing or mistyped field) are
# refused by BentoML itself: 400 {"error", "detail"}. tests/test_fuzz.py tries many more.
BAD_INPUTS = {
    "not_image": (lambda: {"files": image(b"hello", "a.txt", "text/plain")}, 400),
    "truncated": (lambda: {"files": image(png(2)[:100])}, 400),
    "empty": (lambda: {"files": image(b"")}, 400),
    "bomb": (lambda: {"files": image(_encode(Image.new("L", (2000, 1000)), "PNG"))}, 413),  # 2 MP > 1 MP, few KB
    "too_big": (lambda: {"files": image(os.urandom(600_000))}, 413),
    "too_big_chunked": (lambda: _chunked(os.urandom(600_000)), 413),
    "tiff": (lambda: {"files": image(png(fmt="TIFF"), "x.tif", "image/tiff")}, 415),
    "unknown_model": (lambda: {"files": image(png()), "data": {"model": "resnet9000"}}, 404),
    "top_k_zero": (lambda: {"files": image(png()), "data": {"top_k": 0}}, 422),
    "top_k_too_large": (lambda: {"files": image(png()), "data": {"top_k": 11}}, 422),
    "too_many": (lambda: {"files": [("images", (f"{i}.png", png(i), "image/png")) for i in range(5)]}, 413),
    "top_k_not_int": (lambda: {"files": image(png()), "data": {"top_k": "many"}}, 400),
    "no_image_field": (lambda: {"files": {"model": (None, "tiny")}}, 400),
    "urlencoded": (lambda: {"data": {"model": "tiny"}}, 415),
    "raw_body": (lambda: {"content": png(), "headers": {"content-type": "image/png"}}, 415),
    "no_boundary": (lambda: {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),
    "stray_file": (lambda: {"files": {**image(png()), "extra": ("e.bin", b"\xff\xfe", "x/y")}}, 400),
}


def _encode(im: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


@pytest.mark.heavy
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_json_error_and_the_service_keeps_working(server, kind):
    request, expected = BAD_INPUTS[kind]
    r = server.post("/classify_batch" if kind == "too_many" else "/classify", **request())
    assert r.status_code == expected, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body, dict) and body["error"]
    if kind not in ("top_k_not_int", "no_image_field"):
        assert body["status"] == expected
    if kind == "unknown_model":
        assert body["models"] == ["tiny", "tiny-int8"]
    ok = server.post("/classify", files=image(png(3)))
    assert ok.status_code == 200 and ok.json()["predictions"]


@pytest.mark.heavy
def test_bentoml_client_answers_as_raw_http(server, url, tmp_path):
    """BentoML's own client (what `bentoml.depends` uses too) sees the APIs, and gets the same answers."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(20 + i))
    strip = lambda body: {k: v for k, v in body.items() if k != "timing_ms"}  # noqa: E731
    with bentoml.SyncHTTPClient(url) as client:
        assert {"classify", "classify_batch"} <= set(client.endpoints)
        got = client.classify(image=paths[0], top_k=3)
        raw = server.post("/classify", files=image(paths[0].read_bytes()), data={"top_k": 3}).json()
        assert strip(got) == strip(raw)
        got = client.classify_batch(images=paths, model="tiny-int8", top_k=2)
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
        raw = server.post("/classify_batch", files=files, data={"model": "tiny-int8", "top_k": 2}).json()
        assert strip(got) == strip(raw) and len(got["predictions"]) == 3
        with pytest.raises(BentoMLException) as e:
            client.classify(image=paths[0], model="resnet9000")
        assert e.value.error_code == 404 and json.loads(e.value.message)["models"] == ["tiny", "tiny-int8"]
    spec = server.get("/docs.json").json()
    assert {"/classify", "/classify_batch", "/models"} <= set(spec["paths"])
    form = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and set(form["properties"]) == {"image", "model", "top_k"}


def _histogram(text: str, name: str, model: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}_bucket\{{(.*?)\}} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("model") == model:
            out[labels["le"]] = out.get(labels["le"], 0.0) + float(m.group(2))
    return out


@pytest.mark.heavy
def test_concurrent_requests_are_batched(server):
    def one(i):
        return server.post("/classify", files=image(png(100 + i)), data={"model": "tiny"}).status_code

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


def test_gpu_backends_ask_bentoml_for_one_gpu_per_worker(tmp_path):
    """Each worker keeps one of the GPUs BentoML makes visible to all workers of the service."""
    code = ("import os, json, bentoml, service.service as s\n"
            "pinned = []\n"
            "for index in (1, 2, 3):\n"
            "    os.environ['CUDA_VISIBLE_DEVICES'] = '4,6'\n"
            "    bentoml.server_context.worker_index = index\n"
            "    s._pin_gpu()\n"
            "    pinned.append(os.environ['CUDA_VISIBLE_DEVICES'])\n"
            "print(json.dumps([s.CifarClassifier.config, pinned]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_DEPLOY_")}
    env.update(CIFAR_DEPLOY_MODELS="a=x:1,b=y:1@onnxruntime-cuda", CIFAR_DEPLOY_WORKERS="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    config, pinned = json.loads(r.stdout.splitlines()[-1])
    assert config["resources"] == {"gpu": 2} and config["workers"] == 2
    assert pinned == ["4", "6", "4"]


@pytest.mark.heavy
def test_bentoml_build_packs_every_configured_model(exported, service_env):
    r = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=ROOT, env=service_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "uv is not installed" not in r.stdout + r.stderr
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("cifar-deploy:")
    bento = bentoml.bentos.get(tag)
    packed = {str(m.tag).split(":")[0] for m in bento.info.all_models}
    assert packed == {"tiny-fp32", "tiny-int8"}
    description = (Path(bento.path) / "README.md").read_text()  # what the bento's OpenAPI page shows
    assert "/classify" in description and "\n" not in description.strip()  # one paragraph, not the README
