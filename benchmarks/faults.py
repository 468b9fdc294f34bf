"""Fault runs of the service and the export: ``python -m benchmarks.faults`` → ``benchmarks/faults.{json,md}``.

Each scenario runs on loopback, bounded in time, with its own ``bentoml serve`` (the models of the local
BentoML store) or its own tiny export:
- ``worker_killed``: a worker gets SIGKILL under load (1 and 2 workers): failed requests, the time until
  the service answers again, and until a replacement worker runs;
- ``sigterm``: the serving process (or its process group) gets SIGTERM under load: every request sent
  before it must be answered;
- ``bad_artifact``: a tampered artifact, a missing one, and a missing model, each in a copy of the store:
  the service must never report ready, and must log one clear line saying why;
- ``export_interrupted``: an export whose write of an artifact fails half-way with ENOSPC (a full disk), or
  is killed half-way: no partial artifact, the manifest unchanged, and a re-run repairs the folder;
- ``slow_client``: clients that send their body slowly or never finish, beside normal load: they time
  out, the others are answered as fast as before;
- ``overload``: more load than ``max_latency_ms`` allows: shed requests are 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from benchmarks.fuzz import MULTIPART, base_images, encode, form, multipart, serving_processes
from benchmarks.soak import Load
from loadtest import LoadTestError
from loadtest.server import serve
from utils import ModelRef, atomic_write, atomic_write_json, cli, cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCENARIOS = ("worker_killed", "sigterm", "bad_artifact", "export_interrupted", "slow_client", "overload")


# --------------------------------------------------------------------------- load


def _request(images: int = 1) -> tuple:
    """A good request for :class:`benchmarks.soak.Load`: one image to /classify, or a batch to /classify_batch."""
    image = encode(base_images(1, 0, None)[0], "PNG", "RGB", {})
    if images == 1:
        return ("single", "/classify", *form(image), 200)
    body = multipart([("images", f"{i}.png", "image/png", image) for i in range(images)])
    return ("batch", "/classify_batch", {"content-type": MULTIPART}, body, 200)


def _load(url: str, clients: int, images: int = 1) -> Load:
    request = _request(images)
    return Load(url, clients, lambda rng: request, timeout_s=30)


def _workers() -> list[psutil.Process]:
    return [p for p in serving_processes() if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def _main_process() -> psutil.Process:
    return next(p for p in serving_processes() if "serve" in p.cmdline())


def _wait(predicate, timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` is true, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - t0
        time.sleep(step)
    return None


# --------------------------------------------------------------------------- scenarios


def worker_killed(model: ModelRef, options: dict, clients: int) -> list[dict]:
    """SIGKILL one worker under load: requests lost, how long until the service answers again (requests wait in
    the listening socket's backlog meanwhile) and until the replacement worker process has started."""
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as work, \
                serve([model], Path(work), {**options, "workers": workers}) as url, _load(url, clients) as load:
            time.sleep(3)
            victim = _workers()[0]
            t_kill = load.now()
            victim.send_signal(signal.SIGKILL)
            replaced = _wait(lambda v=victim.pid, n=workers: len({p.pid for p in _workers()} - {v}) == n, 120)
            _wait(lambda t=t_kill, rs=load.records: any(r.status == 200 and r.start > t for r in rs), 120)
            time.sleep(3)
        after = [(r.start - t_kill, r.end - t_kill, r.status) for r in load.records if r.end > t_kill]
        answered = [end for start, end, s in after if start > 0 and s == 200]
        rows.append({"workers": workers, "requests_after_kill": len(after),
                     "failed": sum(s != 200 for _, _, s in after),
                     "failures": dict(Counter(str(s) for _, _, s in after if s != 200)),
                     "answered_again_s": round(min(answered), 2) if answered else None,
                     "longest_wait_s": round(max(end - start for start, end, _ in after), 2),
                     "replacement_started_s": None if replaced is None else round(replaced, 2)})
    return rows


def sigterm(model: ModelRef, options: dict, clients: int) -> list[dict]:
    """SIGTERM under load (batches, so that requests are in flight), to the serving process as a container
    runtime sends it, and to its whole process group: every request sent before it must be answered."""
    rows = []
    for target in ("serving process", "process group"):
        with tempfile.TemporaryDirectory() as work, serve([model], Path(work), options) as url:
            main = _main_process()
            with _load(url, clients, images=8) as load:
                time.sleep(3)
                t_sig = load.now()
                if target == "process group":
                    os.killpg(main.pid, signal.SIGTERM)
                else:
                    main.send_signal(signal.SIGTERM)
                exited = _wait(lambda m=main: not m.is_running() or m.status() == psutil.STATUS_ZOMBIE, 60)
                time.sleep(0.5)
        before = [(r.start, r.end, r.status) for r in load.records if r.start < t_sig]
        in_flight = [r for r in before if r[1] > t_sig]
        rows.append({"signal_to": target, "requests_before_signal": len(before), "in_flight_at_signal": len(in_flight),
                     "in_flight_answered": sum(r[2] == 200 for r in in_flight),
                     "lost": sum(r[2] != 200 for r in before),
                     "longest_in_flight_wait_s": round(max((r[1] - t_sig for r in in_flight), default=0.0), 2),
                     "exited_after_s": None if exited is None else round(exited, 2),
                     "requests_after_signal": dict(Counter(str(r.status) for r in load.records if r.start >= t_sig))})
    return rows


@contextlib.contextmanager
def _store_copy(tag: str) -> Iterator[Path]:
    """A throw-away BentoML home holding a copy of model ``tag``; yields the copy's folder. The serving processes
    started meanwhile use it (``BENTOML_HOME``); the real store is never touched."""
    import bentoml

    source = Path(bentoml.models.get(tag).path)
    with tempfile.TemporaryDirectory() as home:
        copy = Path(home) / "models" / source.parent.name / source.name
        shutil.copytree(source, copy)
        (copy.parent / "latest").write_text(source.name)
        previous = os.environ.get("BENTOML_HOME")
        os.environ["BENTOML_HOME"] = home
        try:
            yield copy
        finally:
            if previous is None:
                os.environ.pop("BENTOML_HOME")
            else:
                os.environ["BENTOML_HOME"] = previous


def bad_artifact(model: ModelRef, options: dict, wait_s: float) -> list[dict]:
    """Serve a tampered artifact, a missing one and a missing model for ``wait_s``: never ready; what the log says."""
    def tamper(copy: Path) -> None:
        f = next(copy.glob("*.onnx"))
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(data)

    def remove(copy: Path) -> None:
        next(copy.glob("*.onnx")).unlink()

    rows = []
    for what, damage, served in (("tampered artifact", tamper, model),
                                 ("missing artifact", remove, model),
                                 ("missing model", None, ModelRef(model.name, "not-in-the-store:latest"))):
        with _store_copy(model.tag) as copy, tempfile.TemporaryDirectory() as work:
            if damage:
                damage(copy)
            t0, ready, outcome = time.monotonic(), False, "ready"
            try:
                with serve([served], Path(work), options, timeout=wait_s):
                    ready = True
            except LoadTestError as e:
                outcome = str(e).splitlines()[0]
            log = next(Path(work).glob("*.log")).read_text().splitlines()
        errors = [line for line in log if "ERROR" in line or "Error" in line]
        rows.append({"fault": what, "ready": ready, "outcome": outcome,
                     "seconds": round(time.monotonic() - t0, 1), "log_lines": len(log),
                     "error_lines": len(errors), "traceback": any("Traceback" in line for line in log),
                     "first_error_line": errors[0][:300] if errors else None})
    return rows


def faulty_export(kind: str, target: str, run_dir: str, out: str, data_dir: str) -> None:
    """Re-export ``run_dir`` into ``out`` (``--force``) with the write of artifact ``target`` failing half-way:
    ``enospc`` raises ENOSPC (a full disk) after half its bytes, ``kill`` SIGKILLs this process there."""
    import onnx

    from export.exporter import ExportConfig, run_export

    real_save = onnx.save

    def save(proto, path, *args, **kwargs) -> None:
        if not Path(path).name.startswith(target):
            return real_save(proto, path, *args, **kwargs)
        data = proto.SerializeToString()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    onnx.save = save
    run_export(ExportConfig(run_dir=run_dir, out=out, data_dir=data_dir, formats=["fp32", "int8"], calib_images=64,
                            threads=2, bentoml=False, force=True))


def export_interrupted() -> list[dict]:
    """A tiny model exported, then re-exported with a write failing half-way: the manifest and every artifact it
    names must be unchanged; then a plain re-run must leave a consistent folder again."""
    from export.exporter import ExportConfig, run_export
    from training.data import write_synthetic
    from training.train import TrainConfig, train
    from utils import sha256_file

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_synthetic(work / "data", "cifar10", train_per_class=50, test_per_class=10, seed=0)
        train(TrainConfig(model="scratch_cnn", weights="none", strategy="full", dataset="cifar10",
                          data_dir=str(work / "data"), download=False, epochs=1, batch_size=32, runs_dir=str(work),
                          name="tiny", threads=2))
        out = work / "artifacts"
        export = ExportConfig(run_dir=str(work / "tiny"), out=str(out), data_dir=str(work / "data"),
                              formats=["fp32", "int8"], calib_images=64, threads=2, bentoml=False)
        run_export(export)

        def snapshot() -> dict[str, str]:
            return {p.name: sha256_file(p) for p in sorted(out.iterdir())}

        for kind, target in (("enospc", "model.int8.onnx"), ("kill", "model.onnx")):
            before = snapshot()
            manifest = json.loads((out / "manifest.json").read_text())
            args = ", ".join(map(repr, (kind, target, str(work / "tiny"), str(out), str(work / "data"))))
            r = subprocess.run([sys.executable, "-c", f"from benchmarks.faults import faulty_export; "
                                f"faulty_export({args})"], cwd=ROOT, capture_output=True, text=True, timeout=600)
            after = snapshot()
            named = {e["file"]: e["sha256"] for e in manifest["artifacts"].values() if "sha256" in e}
            run_export(export)  # the repair: a plain re-run
            final = json.loads((out / "manifest.json").read_text())
            repaired = snapshot()
            rows.append({
                "fault": f"{'ENOSPC' if kind == 'enospc' else 'SIGKILL'} half-way through writing {target}",
                "exit": r.returncode, "last_error": (r.stderr.strip().splitlines() or [""])[-1][:300],
                "manifest_unchanged": after["manifest.json"] == before["manifest.json"],
                "artifacts_matching_manifest": sorted(n for n, sha in named.items() if after.get(n) == sha),
                "artifacts_changed": sorted(n for n, sha in named.items() if after.get(n) != sha),
                "files_left": sorted(set(after) - set(before)),
                "consistent_after_rerun": all(repaired.get(e["file"]) == e["sha256"]
                                              for e in final["artifacts"].values() if "sha256" in e),
                "files_left_after_rerun": sorted(set(repaired) - set(before)),
            })
    return rows


def _slow_request(port: int, body: bytes, headers: bytes, pace_s: float, chunk: int, stop_after: int | None) -> dict:
    """Send ``headers`` then ``body`` ``chunk`` bytes every ``pace_s`` (only ``stop_after`` bytes, then nothing
    more); the status line the server answers with, and when."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(headers)
        s.settimeout(pace_s)
        sent, answer = 0, b""
        limit = len(body) if stop_after is None else stop_after
        while not answer:
            if sent < limit:
                with contextlib.suppress(OSError):
                    s.sendall(body[sent:min(sent + chunk, limit)])
                sent = min(sent + chunk, limit)
            try:
                answer = s.recv(4096) or b"(closed)"
            except TimeoutError:
                if time.monotonic() - t0 > 120:
                    answer = b"(no answer in 120 s)"
            except OSError as e:
                answer = f"({type(e).__name__})".encode()
    return {"answer": answer.split(b"\r\n")[0].decode("latin-1"), "after_s": round(time.monotonic() - t0, 1),
            "bytes_sent": sent}


def slow_client(model: ModelRef, options: dict, clients: int, each: int = 10) -> dict:
    """``each`` clients of three kinds that send their body slowly, beside normal load: they time out (BentoML's
    request timeout, ``timeout_s``), and the others are answered as fast as without them."""
    head, body = form(encode(base_images(1, 0, None)[0], "PNG", "RGB", {}))
    kinds = {"slow, finishing within the timeout": (0.1, max(1, len(body) // 20), None),
             "too slow (1 byte/s)": (1.0, 1, None),
             "never finishes (half the body, then silence)": (1.0, len(body) // 2, len(body) // 2)}
    with tempfile.TemporaryDirectory() as work, serve([model], Path(work), options) as url:
        port = int(url.rsplit(":", 1)[1])
        request = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {head['content-type']}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode()
        with _load(url, clients) as alone:
            time.sleep(10)
        with ThreadPoolExecutor(each * len(kinds)) as pool, _load(url, clients) as beside:
            slow = {kind: list(pool.map(lambda _, a=args: _slow_request(port, body, request, *a), range(each)))
                    for kind, args in kinds.items()}

    def latency(load: Load) -> dict:
        ms = [1e3 * (r.end - r.start) for r in load.records if r.ok]
        return {"requests": len(load.records), "failed": sum(not r.ok for r in load.records),
                "p50_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}

    return {"timeout_s": options["timeout_s"], "others_alone": latency(alone),
            "others_beside_slow_clients": latency(beside),
            "slow_clients": {kind: {"clients": len(r), "answers": dict(Counter(x["answer"] for x in r)),
                                    "answered_after_s": max(x["after_s"] for x in r)} for kind, r in slow.items()}}


def overload(model: ModelRef, options: dict) -> dict:
    options = {**options, "max_latency_ms": 20, "max_batch_size": 1}
    with tempfile.TemporaryDirectory() as work, serve([model], Path(work), options) as url:
        image = encode(base_images(1, 0, None)[0], "PNG", "RGB", {})
        head, body = form(image)

        def one(_):
            r = httpx.post(f"{url}/classify", content=body, headers=head, timeout=30)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(one, range(400)))
    shed = [a for a in answers if a[0] == 503]
    return {"requests": len(answers), "statuses": dict(Counter(str(a[0]) for a in answers)),
            "shed_with_retry_after": sum(a[1] is not None for a in shed),
            "shed_json": sum(isinstance(a[2], dict) and a[2].get("status") == 503 for a in shed),
            "example": shed[0][2]["error"] if shed else None}


# --------------------------------------------------------------------------- CLI


@dataclass
class FaultsConfig:
    """Options of ``python -m benchmarks.faults`` (the CLI is generated from these fields)."""

    model: str = field(default="efficientnet_lite0=demo-efficientnet_lite0-int8:latest", metadata={
        "help": "the served model, name=tag[@backend] (a tag of the local BentoML store)"})
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS), metadata={"choices": list(SCENARIOS)})
    clients: int = field(default=4, metadata={"help": "concurrent clients of the load"})
    timeout_s: int = field(default=5, metadata={"help": "the service's request timeout (timeout_s)"})
    out: str = str(HERE / "faults")


def run(cfg: FaultsConfig) -> dict:
    model = ModelRef.parse(cfg.model)
    options = {"intra_op_threads": 1, "timeout_s": cfg.timeout_s}
    runs = {"worker_killed": lambda: worker_killed(model, options, cfg.clients),
            "sigterm": lambda: sigterm(model, options, cfg.clients),
            "bad_artifact": lambda: bad_artifact(model, options, 45),
            "export_interrupted": export_interrupted,
            "slow_client": lambda: slow_client(model, options, cfg.clients),
            "overload": lambda: overload(model, options)}
    out = Path(cfg.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    result = {"model": model.to_dict(), "cpu": cpu_name(), "service_options": options, "clients": cfg.clients,
              "scenarios": dict(previous.get("scenarios", {}))}  # a partial run keeps the other scenarios' results
    for name in cfg.scenarios:
        t0 = time.monotonic()
        print(f"{name} …", flush=True)
        result["scenarios"][name] = {"seconds": None, "result": runs[name]()}
        result["scenarios"][name]["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(result["scenarios"][name]), flush=True)
    atomic_write_json(result, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), render(result))
    return result


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join("–" if v is None else str(v) for v in row) + " |" for row in rows] + [""]


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _seconds(v: float | None) -> str | None:
    return None if v is None else f"{v:g} s"


SECTIONS = {
    "worker_killed": ("A worker killed (SIGKILL) under load", lambda r: _table(
        ["workers", "requests after the kill", "failed", "answered again after", "longest wait",
         "replacement started after"],
        [[x["workers"], x["requests_after_kill"], f"{x['failed']} ({', '.join(x['failures']) or '–'})",
          _seconds(x["answered_again_s"]), _seconds(x["longest_wait_s"]), _seconds(x["replacement_started_s"])]
         for x in r])),
    "sigterm": ("SIGTERM under load (batches of 8)", lambda r: _table(
        ["signal to", "requests before it", "in flight", "in flight answered", "lost", "exited after",
         "requests after it"],
        [[x["signal_to"], x["requests_before_signal"], x["in_flight_at_signal"], x["in_flight_answered"],
          f"**{x['lost']}**", _seconds(x["exited_after_s"]),
          ", ".join(f"{n} {k}" for k, n in x["requests_after_signal"].items())] for x in r])),
    "bad_artifact": ("A tampered or missing artifact at start", lambda r: _table(
        ["fault", "ever ready", "log lines", "error lines (one per start)", "tracebacks", "the log says"],
        [[x["fault"], "yes" if x["ready"] else "**no**", x["log_lines"], x["error_lines"], _yes(x["traceback"]),
          re.sub(r"^\S+ \[ERROR\] \[[^\]]*\] ", "", x["first_error_line"] or "")] for x in r])),
    "export_interrupted": ("An export interrupted half-way through writing an artifact", lambda r: _table(
        ["fault", "exit", "manifest unchanged", "artifacts as the manifest says", "artifacts changed", "files left",
         "after a re-run: consistent", "files left"],
        [[x["fault"], x["exit"], _yes(x["manifest_unchanged"]), ", ".join(x["artifacts_matching_manifest"]) or "none",
          ", ".join(x["artifacts_changed"]) or "none", ", ".join(x["files_left"]) or "none",
          _yes(x["consistent_after_rerun"]), ", ".join(x["files_left_after_rerun"]) or "none"] for x in r])),
    "slow_client": ("Clients that send their body slowly or never finish", lambda r: _table(
        ["client", "clients", "answers", "answered after"],
        [[k, v["clients"], ", ".join(f"{n}× {a}" for a, n in v["answers"].items()), _seconds(v["answered_after_s"])]
         for k, v in r["slow_clients"].items()]) + _table(
        ["normal load", "requests", "failed", "p50 ms", "max ms"],
        [[k.removeprefix("others_").replace("_", " "), v["requests"], v["failed"], v["p50_ms"], v["max_ms"]]
         for k, v in r.items() if k.startswith("others_")])),
    "overload": ("Overload (max_latency_ms 20, max_batch_size 1, 32 clients)", lambda r: _table(
        ["requests", "statuses", "503 with Retry-After", "503 as JSON", "a 503 says"],
        [[r["requests"], ", ".join(f"{n}× {k}" for k, n in r["statuses"].items()), r["shed_with_retry_after"],
          r["shed_json"], r["example"]]])),
}


def render(result: dict) -> str:
    lines = ["# Fault runs", "", "Produced by `python -m benchmarks.faults` on loopback: `bentoml serve` of "
             f"{result['model']['tag']} with {json.dumps(result['service_options'])}, {result['clients']} clients "
             f"of load; the export runs on a tiny scratch model. CPU: {result['cpu']}.", ""]
    for name, (title, table) in SECTIONS.items():
        if name in result["scenarios"]:
            run = result["scenarios"][name]
            lines += [f"## {title}", "", f"`{name}`, {run['seconds']:g} s.", "", *table(run["result"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli(FaultsConfig, run, argv, "python -m benchmarks.faults", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
