"""Locust scenarios for the cifar-deploy service: ``locust -f loadtest/locustfile.py --host URL``.

Custom options: ``--model`` (default: the service's default), ``--endpoint classify|classify_batch``,
``--payload-source cifar:PATH|dir:PATH|synthetic``, ``--batch-images`` (images per /classify_batch
request), ``--top-k``, ``--rate`` (requests/s per user, Locust's ``constant_throughput``; 0 = back to back).
Requests are multipart forms: file field ``image`` (``images`` for a batch) and form fields ``model`` and
``top_k``, encoded once per process. Every response is validated (status, JSON, labels among the model's
classes, scores a probability distribution) and counted as a failure otherwise. One stats row per model.
"""

from __future__ import annotations

import itertools
import json
import types

from locust import FastHttpUser, constant_throughput, events, task
from locust.exception import StopUser
from urllib3 import encode_multipart_formdata

from loadtest.payloads import load_payloads
from loadtest.validation import validate

STATE: dict = {}  # per process: the payloads and the request bodies built from them


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--model", default="", help="model name (default: the service's default)")
    parser.add_argument("--endpoint", default="classify", choices=["classify", "classify_batch"])
    parser.add_argument("--payload-source", default="synthetic", help="cifar:PATH, dir:PATH or synthetic[:SIZE]")
    parser.add_argument("--batch-images", type=int, default=32, help="images per /classify_batch request")
    parser.add_argument("--top-k", type=int, default=0, help="0: all classes (validates the full distribution)")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per user; 0: back to back")


@events.test_start.add_listener
def _prepare(environment, **_kw) -> None:
    STATE["payloads"] = load_payloads(environment.parsed_options.payload_source, limit=256)


def encode_bodies(payloads: list[bytes], endpoint: str, per_request: int, model: str, top_k: int,
                  count: int) -> list[tuple[bytes, str]]:
    """``count`` (body, content type) multipart forms of ``per_request`` images each, cycling through
    ``payloads``, with the form fields ``model`` and ``top_k``: encoded once, then sent as raw bytes."""
    field = "image" if endpoint == "classify" else "images"
    cycle = itertools.cycle(payloads)
    return [encode_multipart_formdata([*((field, (f"{i}.png", next(cycle), "image/png")) for i in range(per_request)),
                                       ("model", model), ("top_k", str(top_k))])
            for _ in range(count)]


class ClassifyUser(FastHttpUser):
    """Sends images to /classify (or batches to /classify_batch) and checks every answer."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        with self.client.get("/models", name="/models", catch_response=True) as r:
            info = r.json() if r.status_code == 200 else {}
            name = opts.model or info.get("default")
            models = {m["name"]: m for m in info.get("models", [])}
            if name not in models:
                r.failure(f"/models answered {r.status_code}; model {name!r} not among {sorted(models)}")
                raise StopUser()
        if opts.rate > 0:
            self.wait_time = types.MethodType(constant_throughput(opts.rate), self)
        self.model = name
        self.classes = set(models[name]["classes"])
        self.top_k = opts.top_k or len(models[name]["classes"])
        self.per_request = 1 if opts.endpoint == "classify" else opts.batch_images
        key = (opts.endpoint, name, self.top_k)
        if key not in STATE:  # shared by this process's users
            payloads = STATE["payloads"]
            count = len(payloads) if self.per_request == 1 else 8
            STATE[key] = encode_bodies(payloads, opts.endpoint, self.per_request, name, self.top_k, count)
        self.bodies = itertools.cycle(STATE[key])

    @task
    def classify(self) -> None:
        endpoint = self.environment.parsed_options.endpoint
        body, ctype = next(self.bodies)
        with self.client.post(f"/{endpoint}", data=body, headers={"Content-Type": ctype},
                              name=f"/{endpoint} [{self.model}]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                answer = r.json()
            except (json.JSONDecodeError, ValueError):
                r.failure("response is not JSON")
                return
            problem = validate(answer, self.classes, self.per_request, self.top_k)
            if problem:
                r.failure(problem)
