"""Locust scenarios for the cifar-deploy service: ``locust -f loadtest/locustfile.py --host URL``.

Custom options: ``--model`` (default: the service's default), ``--endpoint classify|classify_batch``,
``--payload-source cifar:PATH|dir:PATH|synthetic``, ``--batch-images`` (images per /classify_batch
request), ``--top-k``, ``--rate`` (requests/s per user for constant arrival rate; 0 = back to back).
Every response is validated (status, JSON, labels among the model's classes, scores a probability
distribution) and counted as a failure otherwise. One stats row per model via ``name=``.
"""

from __future__ import annotations

import itertools
import json

from locust import FastHttpUser, events, task
from locust.exception import StopUser

from loadtest.payloads import load_payloads
from loadtest.validation import validate

STATE: dict = {}


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
    """Payloads and the model's classes, once per process (not per user)."""
    opts = environment.parsed_options
    STATE["payloads"] = load_payloads(opts.payload_source, limit=256)


def batch_bodies(payloads: list[bytes], n: int, count: int = 8) -> list[tuple[bytes, str]]:
    """``count`` multipart bodies of ``n`` images each, encoded once (FastHttpUser sends raw bytes)."""
    from urllib3 import encode_multipart_formdata

    cycle = itertools.cycle(payloads)
    out = []
    for _ in range(count):
        fields = [("images", (f"{i}.png", next(cycle), "image/png")) for i in range(n)]
        out.append(encode_multipart_formdata(fields))
    return out


class ClassifyUser(FastHttpUser):
    """Sends images to /classify (or batches to /classify_batch) and checks every answer."""

    def wait_time(self):
        rate = self.environment.parsed_options.rate
        return 0.0 if rate <= 0 else self._pace(rate)

    def _pace(self, rate: float) -> float:
        # constant arrival rate per user: sleep what is left of the 1/rate interval
        import time

        now = time.monotonic()
        nxt = getattr(self, "_next", now) + 1.0 / rate
        self._next = max(nxt, now)
        return max(0.0, self._next - now)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        with self.client.get("/models", name="/models", catch_response=True) as r:
            info = r.json() if r.status_code == 200 else {}
            name = opts.model or info.get("default")
            models = {m["name"]: m for m in info.get("models", [])}
            if name not in models:
                r.failure(f"/models answered {r.status_code}; model {name!r} not among {sorted(models)}")
                raise StopUser()
        self.model = name
        self.classes = set(models[name]["classes"])
        self.top_k = opts.top_k or len(models[name]["classes"])
        self.payloads = itertools.cycle(STATE["payloads"])
        if opts.endpoint == "classify_batch":
            self.batches = itertools.cycle(batch_bodies(STATE["payloads"], opts.batch_images))

    @task
    def classify(self) -> None:
        opts = self.environment.parsed_options
        params = f"?model={self.model}&top_k={self.top_k}"
        if opts.endpoint == "classify":
            n = 1
            kwargs = {"data": next(self.payloads), "headers": {"Content-Type": "image/png"}}
        else:
            n = opts.batch_images
            body, ctype = next(self.batches)
            kwargs = {"data": body, "headers": {"Content-Type": ctype}}
        with self.client.post(f"/{opts.endpoint}{params}", name=f"/{opts.endpoint} [{self.model}]",
                              catch_response=True, **kwargs) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                body = r.json()
            except (json.JSONDecodeError, ValueError):
                r.failure("response is not JSON")
                return
            problem = validate(body, self.classes, n, self.top_k)
            if problem:
                r.failure(problem)
