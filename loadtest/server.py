"""Service lifecycle for the load test: ``bentoml serve`` on a free loopback port, ready on ``/readyz``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from loadtest import LoadTestError
from utils import ModelRef

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url/readyz`` until it answers 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise LoadTestError(f"the service exited with code {proc.returncode} before it was ready:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise LoadTestError(f"{url} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def serve(models: list[ModelRef], workdir: Path, service_options: dict, timeout: float = 180,
          bento: str = "service.service:CifarClassifier") -> Iterator[str]:
    """Serve ``models`` (from the source service or a built bento tag) with ``service_options`` (service
    config keys) on a loopback port; yield its URL; stop the whole process group afterwards."""
    cfg = {**service_options, "models": [m.to_dict() for m in models]}
    stem = f"service-{models[0].name}-{models[0].backend}"
    cfg_path = workdir / f"{stem}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = workdir / f"{stem}.log"
    env = {**os.environ, "CIFAR_DEPLOY_CONFIG": str(cfg_path), "BENTOML_DO_NOT_TRACK": "true"}
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, proc, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
