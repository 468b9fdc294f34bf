"""Soak the service: ``python -m benchmarks.soak`` (``make soak``) → ``benchmarks/soak.{json,md,png}``.

For ``minutes`` on loopback, against the built bento (or the source service): ``clients`` threads send
single images, batches and about 5% bad uploads (each with the 4xx it must get), while the RSS of every
serving process is sampled. An unexpected status (anything but 200 for a good request, or the expected
4xx for a bad one) is a failure. Before the clock starts, rounds of concurrent batches run the largest
inference calls, which size ONNX Runtime's memory arena; RSS growth is measured from the end of the
warm-up (``warmup_s`` into the run) to the end.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np

from benchmarks.fuzz import MULTIPART, encode, envelope_cases, form, multipart, rss_mb, serving_processes
from loadtest.payloads import load_payloads
from loadtest.server import serve
from utils import ModelRef, UserError, atomic_write, atomic_write_json, cli, cpu_name, pyplot, save_figure

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent.parent / "shared" / "data"


@dataclass
class SoakConfig:
    """Options of ``python -m benchmarks.soak`` (the CLI is generated from these fields)."""

    minutes: float = field(default=10.0, metadata={"help": "how long to run"})
    warmup_s: float = field(default=60.0, metadata={"help": "RSS growth is counted from the end of the warm-up"})
    clients: int = field(default=4, metadata={"help": "concurrent clients, each sending one request at a time"})
    batch_share: float = field(default=0.15, metadata={"help": "share of requests that are batches"})
    bad_share: float = field(default=0.05, metadata={"help": "share of requests that are bad uploads"})
    batch_images: int = field(default=8, metadata={"help": "images per batch request"})
    sample_s: float = field(default=5.0, metadata={"help": "seconds between RSS samples"})
    models: list[ModelRef] = field(default_factory=lambda: [ModelRef("efficientnet_lite0",
                                                                      "demo-efficientnet_lite0-int8:latest")],
                                   metadata={"help": "served models, name=tag[@backend]", "metavar": "MODEL"})
    bento: str = field(default="cifar-deploy:latest", metadata={
        "help": "what `bentoml serve` serves: a built bento (make demo builds it) or service.service:CifarClassifier"})
    payload_source: str = field(default=f"cifar:{CIFAR}" if CIFAR.is_dir() else "synthetic",
                                metadata={"help": "images: cifar:PATH, dir:PATH or synthetic"})
    seed: int = 0
    out: str = str(HERE / "soak")


def requests(cfg: SoakConfig, max_batch_images: int) -> tuple[list, list]:
    """(good, bad) requests as (label, path, headers, body, expected status)."""
    images = load_payloads(cfg.payload_source, 256)
    rng = np.random.default_rng(cfg.seed)
    good = [("single", "/classify", *form(p), 200) for p in images]
    for i in range(0, len(images) - cfg.batch_images, cfg.batch_images):
        body = multipart([("images", f"{j}.png", "image/png", p) for j, p in enumerate(images[i:i + cfg.batch_images])])
        good.append(("batch", "/classify_batch", {"content-type": MULTIPART}, body, 200))
    png = images[0]
    bad = [("bad", "/classify", *form(png[:len(png) // 2]), 400), ("bad", "/classify", *form(b"not an image"), 400),
           ("bad", "/classify", *form(encode(np.zeros((8, 8, 3), np.uint8), "TIFF", "RGB", {})), 415),
           ("bad", "/classify", *form(png, model="no-such-model"), 404),
           ("bad", "/classify", *form(png, top_k="0"), 422)]
    bad += [("bad", c.path, c.headers, c.body, c.allowed[0]) for c in envelope_cases(png, rng, max_batch_images)
            if len(c.allowed) == 1 and c.allowed[0] != 200 and not c.chunked]
    return good, bad


class Record(NamedTuple):
    start: float  # seconds from the load's start
    end: float
    label: str
    status: int | str  # or the name of the exception
    ok: bool  # the status the request must get


class Load:
    """``clients`` threads, each sending requests ``pick(rng)`` = (label, path, headers, body, expected status)
    one after another, until the ``with`` block ends."""

    def __init__(self, url: str, clients: int, pick, seed: int = 0, timeout_s: float = 60.0) -> None:
        self.url, self.pick, self.seed, self.timeout_s = url, pick, seed, timeout_s
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _loop(self, index: int) -> None:
        rng = np.random.default_rng([self.seed, index])
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                label, path, headers, body, expected = self.pick(rng)
                start = self.now()
                try:
                    status: int | str = client.post(path, content=body, headers=headers).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    time.sleep(0.05)  # a refused connection fails at once: do not spin
                self.records.append(Record(start, self.now(), label, status, status == expected))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)


def mix(cfg: SoakConfig, good: list, bad: list):
    """``pick`` for :class:`Load`: a bad upload with probability ``bad_share``, a batch with ``batch_share``, else
    a single image."""
    singles, batches = [g for g in good if g[0] == "single"], [g for g in good if g[0] == "batch"]

    def pick(rng: np.random.Generator) -> tuple:
        u = rng.random()
        pool = bad if u < cfg.bad_share else batches if u < cfg.bad_share + cfg.batch_share else singles
        return pool[int(rng.integers(len(pool)))]

    return pick


def run(cfg: SoakConfig) -> dict:
    options = {"max_batch_images": max(cfg.batch_images, 8), "intra_op_threads": 1}
    good, bad = requests(cfg, options["max_batch_images"])
    samples: list[tuple[float, dict[int, float]]] = []
    with tempfile.TemporaryDirectory() as work, serve(cfg.models, Path(work), options, bento=cfg.bento) as url:
        procs = serving_processes()
        batches = [g for g in good if g[0] == "batch"]
        with ThreadPoolExecutor(cfg.clients) as pool:  # the largest inference batches first: they size the arenas
            for _ in range(20):
                list(pool.map(lambda g: httpx.post(url + g[1], headers=g[2], content=g[3], timeout=60),
                              batches[:cfg.clients]))
        with Load(url, cfg.clients, mix(cfg, good, bad), cfg.seed) as load:
            end = load.t0 + 60 * cfg.minutes
            while time.monotonic() < end:
                samples.append((round(load.now(), 1), rss_mb(procs)))
                time.sleep(min(cfg.sample_s, max(0.0, end - time.monotonic())))
        samples.append((round(load.now(), 1), rss_mb(procs)))
        alive = {p.pid for p in serving_processes()} == {p.pid for p in procs}
    result = summarize(cfg, load.records, samples, alive, len(procs))
    out = Path(cfg.out)
    atomic_write_json(result, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), render(result))
    plot(result, out.with_suffix(".png"))
    if result["failures"] or result["rss_growth"] > 0.10:
        raise UserError(f"{result['failures']} unexpected statuses, RSS growth {100 * result['rss_growth']:.1f}% "
                        f"after warm-up; see {out}.md")
    return result


def summarize(cfg: SoakConfig, records: list, samples: list, alive: bool, processes: int) -> dict:
    totals = [(t, sum(rss.values())) for t, rss in samples]
    warm = [mb for t, mb in totals if t >= cfg.warmup_s] or [totals[-1][1]]
    failures = [r for r in records if not r.ok]
    latency = {label: [1e3 * (r.end - r.start) for r in records if r.label == label and r.ok]
               for label in ("single", "batch", "bad")}
    return {
        "duration_s": round(samples[-1][0], 1), "requests": len(records), "failures": len(failures),
        "rss_start_mb": round(warm[0], 1), "rss_end_mb": round(totals[-1][1], 1),
        "rss_max_mb": round(max(warm), 1), "rss_growth": round(warm[-1] / warm[0] - 1, 4),
        "rss_before_warmup_mb": round(totals[0][1], 1), "warmup_s": cfg.warmup_s,
        "by_kind": {label: len(v) for label, v in latency.items()},
        "p50_ms": {k: round(statistics.median(v), 1) for k, v in latency.items() if v},
        "p99_ms": {k: round(float(np.percentile(v, 99)), 1) for k, v in latency.items() if v},
        "failure_examples": dict(Counter(f"{r.label}: {r.status}" for r in failures).most_common(10)),
        "same_processes_at_the_end": alive, "processes": processes,
        "config": {**vars(cfg), "models": [m.to_dict() for m in cfg.models]}, "cpu": cpu_name(),
        "samples": [{"t": t, "rss_mb": {str(pid): mb for pid, mb in rss.items()}} for t, rss in samples],
        "requests_per_10s": list(np.bincount([int(r.start // 10) for r in records]).tolist()),
    }


def render(r: dict) -> str:
    growth = 100 * r["rss_growth"]
    return "\n".join([
        "# Soak", "",
        f"Produced by `make soak` (`python -m benchmarks.soak`): {r['duration_s'] / 60:.1f} minutes against "
        f"`{r['config']['bento']}` ({', '.join(m['tag'] for m in r['config']['models'])}) on loopback, "
        f"{r['config']['clients']} clients sending single images, batches of {r['config']['batch_images']} "
        f"({100 * r['config']['batch_share']:.0f}%) and bad uploads ({100 * r['config']['bad_share']:.0f}%, each "
        f"with the 4xx it must get), after 20 rounds of concurrent batches (the largest inference calls, which "
        f"size ONNX Runtime's memory arena). CPU: {r['cpu']}.", "",
        "| requests | single | batch | bad | unexpected statuses | p50 ms single / batch / bad | "
        "p99 ms single / batch / bad |", "|---:|---:|---:|---:|---:|---|---|",
        f"| {r['requests']} | {r['by_kind']['single']} | {r['by_kind']['batch']} | {r['by_kind']['bad']} | "
        f"**{r['failures']}** | {' / '.join(str(r['p50_ms'].get(k, '–')) for k in ('single', 'batch', 'bad'))} | "
        f"{' / '.join(str(r['p99_ms'].get(k, '–')) for k in ('single', 'batch', 'bad'))} |", "",
        f"RSS of the {r['processes']} serving processes together: {r['rss_before_warmup_mb']:.0f} MB at the start, "
        f"{r['rss_start_mb']:.0f} MB after the {r['warmup_s']:.0f} s warm-up, {r['rss_end_mb']:.0f} MB at the end "
        f"(**{growth:+.1f}%** after warm-up; at most {r['rss_max_mb']:.0f} MB). The same processes served "
        f"to the end: **{'yes' if r['same_processes_at_the_end'] else 'no'}**.", "",
        "![RSS and requests over time](soak.png)", ""])


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    t = [s["t"] / 60 for s in r["samples"]]
    for pid in r["samples"][0]["rss_mb"]:
        ax.plot(t, [s["rss_mb"].get(pid) for s in r["samples"]], label=f"process {pid}")
    ax.plot(t, [sum(s["rss_mb"].values()) for s in r["samples"]], label="all", color="black")
    ax.axvline(r["warmup_s"] / 60, color="grey", linestyle=":")
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize=8)
    rate = r["requests_per_10s"]
    bx.plot([(i + 0.5) / 6 for i in range(len(rate))], [n / 10 for n in rate])
    bx.set_ylabel("requests/s")
    bx.set_xlabel("minutes")
    fig.suptitle(f"Soak: {r['requests']} requests, {r['failures']} unexpected statuses")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    return cli(SoakConfig, run, argv, "python -m benchmarks.soak", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
