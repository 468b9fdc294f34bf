"""The upload path never answers a bad upload with a 5xx: the guard in front of BentoML, and a short run of
the fuzzer (benchmarks/fuzz.py) through the served app."""

import asyncio
import logging

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.fuzz import BOUNDARY, MULTIPART, SERVICE_OPTIONS, cases, envelope_cases, multipart, run_fuzz
from loadtest.server import serve
from service.guard import Form, InternalErrors, UploadGuard
from utils import ModelRef


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"bytes": len(body), "form": sorted((await request.form()).keys())})


def boom(request: Request):
    raise RuntimeError("a secret detail")


def bentoml_500(request: Request) -> JSONResponse:
    """What BentoML answers after it has logged a traceback under its request id."""
    return JSONResponse({"error": "An unexpected error has occurred"}, 500, {"x-bentoml-request-id": "00ab"})


GUARDED = InternalErrors(UploadGuard(
    Starlette(routes=[Route("/classify", echo, methods=["POST"]), Route("/boom", boom, methods=["POST"]),
                      Route("/bentoml", bentoml_500, methods=["POST"])]),
    limit=10_000, forms={"/classify": Form("image", 1, ("model", "top_k"))}))


def post(path: str, content=b"", ctype: str | None = None) -> httpx.Response:
    """One request to the guarded app, in-process."""
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=GUARDED, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content, headers={"content-type": ctype} if ctype else {})

    return asyncio.run(go())


def test_guard_hands_a_sound_body_on_unchanged():
    body = multipart([("image", "x.png", "image/png", b"\x89PNG" * 10), ("top_k", None, None, b"3")])
    r = post("/classify", body, MULTIPART)
    assert r.status_code == 200 and r.json() == {"bytes": len(body), "form": ["image", "top_k"]}

    async def chunks():
        yield body[:7]
        yield body[7:]

    assert post("/classify", chunks(), MULTIPART).json() == r.json()


@pytest.mark.parametrize("ctype,body,status,match", [
    ("multipart/form-data", multipart([("image", "x", None, b"1")]), 400, "without a boundary"),
    (MULTIPART, multipart([("image", "x", None, b"1")], "other"), 400, "malformed multipart"),
    (MULTIPART, multipart([("image", "x", None, b"1")])[:-12], 400, "closing boundary"),
    (MULTIPART, f"--{BOUNDARY}\r\n\r\n\r\n--{BOUNDARY}--\r\n".encode(), 400, "field name"),
    (MULTIPART, multipart([("image", "x", None, b"1"), ("image", "y", None, b"2")]), 400, "given 2 times"),
    (MULTIPART, multipart([("image", "x", None, b"1"), ("extra", "e", None, b"\xff")]), 400, "unexpected field"),
    (MULTIPART, multipart([("image", None, None, b"http://127.0.0.1/x")]), 400, "must be a file part"),
    (MULTIPART, multipart([("image", "x", None, b"1"), ("model", "m", None, b"\xff")]), 400, "plain form field"),
    (MULTIPART, multipart([("image", "n" * 300, None, b"1")]), 400, "file name over"),
    (MULTIPART, multipart([("image", "x", None, b"1")]).replace(b"\r\n\r\n", b"\r\nX: " + b"p" * 5000 + b"\r\n\r\n"),
     400, "malformed multipart"),
    (MULTIPART, b"x" * 10_001, 413, "over the 10000-byte limit"),
    ("application/x-www-form-urlencoded", b"image=x", 415, "send multipart/form-data"),
])
def test_guard_refuses_what_bentoml_would_answer_with_a_500(ctype, body, status, match):
    r = post("/classify", body, ctype)
    assert r.status_code == status and match in r.json()["error"] and r.json()["status"] == status


def test_a_500_carries_a_request_id_and_no_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="bentoml.serve"):
        r = post("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == 500 and body["request_id"] == r.headers["x-request-id"]
    assert "secret" not in r.text and "Traceback" not in r.text
    assert any(body["request_id"] in m for m in caplog.messages)
    r = post("/bentoml")  # BentoML's own request id, the span= of its log lines, is kept
    assert r.status_code == 500 and r.json()["request_id"] == r.headers["x-request-id"] == "00ab"


@pytest.mark.heavy
def test_fuzzed_uploads_get_200_or_a_4xx_and_the_service_survives(exported, tmp_path):
    batch = cases(330, seed=1, max_batch_images=SERVICE_OPTIONS["max_batch_images"])
    assert {c.kind for c in batch} == {"bitflip", "truncate", "envelope", "dimensions", "content_type", "field",
                                       "not_image", "batch"}
    envelopes = len(envelope_cases(b"", np.random.default_rng(0), SERVICE_OPTIONS["max_batch_images"]))
    assert len({c.detail for c in batch if c.kind == "envelope"}) == envelopes  # every one of them
    with serve([ModelRef("tiny", "tiny-fp32:latest")], tmp_path, SERVICE_OPTIONS, timeout=90) as url:
        result = run_fuzz(url, batch, clients=4, timeout_s=10)
    assert result["problems"] == [], result["problems"][:5]
    assert result["alive"] and result["slowest_s"] < 10
    before, after = sum(result["rss_before_mb"].values()), sum(result["rss_after_mb"].values())
    assert after < before + 150, (before, after)
