"""Fuzz the served upload path: ``python -m benchmarks.fuzz`` → ``benchmarks/fuzz.{json,md}``.

Seeded, reproducible variants of real JPEG, PNG, WebP, GIF and BMP files (CIFAR-10 test images, or
synthetic ones without the data): bit flips, truncation in each region of the file (header, tables,
data), patched absurd dimensions, empty and non-image files, wrong content types and file names, bad
form fields, batches with a bad image, and malformed multipart envelopes (no or wrong boundary, empty
parts, duplicate fields, huge part headers, stray binary fields, other media types, chunked bodies).
Each is sent to ``bentoml serve`` on loopback by a few concurrent clients. Every answer must be 200 or a
4xx JSON error (the exact status where it is certain), within ``timeout_s``; afterwards the same worker
processes still serve, and their RSS is compared. ``tests/test_fuzz.py`` runs a few hundred of the same
cases on every ``make test``.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from loadtest.payloads import cifar_test_images
from loadtest.server import serve
from utils import ModelRef, UserError, atomic_write, atomic_write_json, cli, cpu_name

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent.parent / "shared" / "data"
# Small limits, so that the limit cases stay small requests too.
SERVICE_OPTIONS = {"max_upload_mb": 1.0, "max_megapixels": 4.0, "max_batch_images": 4, "intra_op_threads": 1,
                   "timeout_s": 30}
BOUNDARY = "fuzzb0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass
class Case:
    """One request: ``allowed`` statuses (empty: 200 or any 4xx)."""

    kind: str
    detail: str
    path: str
    headers: dict
    body: bytes
    allowed: tuple[int, ...] = ()
    chunked: bool = False


# --------------------------------------------------------------------------- files


def base_images(n: int, seed: int, data_dir: Path | None) -> list[np.ndarray]:
    """``n`` uint8 RGB images: CIFAR-10 test images upscaled to 32–96 px, or seeded synthetic ones."""
    rng = np.random.default_rng(seed)
    folder = (data_dir or CIFAR) / "cifar-10-batches-py"
    if (folder / "test_batch").is_file():
        small = list(cifar_test_images(folder, n))
    else:
        small = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    sizes = rng.choice([32, 48, 64, 96], n)
    return [np.asarray(Image.fromarray(a).resize((int(s), int(s)), Image.Resampling.BICUBIC)) for a, s in
            zip(small, sizes, strict=True)]


# (format, mode, save options) per encoding
ENCODINGS = [("JPEG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}), ("JPEG", "L", {}),
             ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("WEBP", "RGB", {}),
             ("WEBP", "RGBA", {"lossless": True}), ("GIF", "P", {}), ("BMP", "RGB", {}), ("BMP", "P", {})]


def encode(a: np.ndarray, fmt: str, mode: str, options: dict) -> bytes:
    im = Image.fromarray(a)
    im = im.convert(mode) if mode != "P" else im.quantize(64)
    b = io.BytesIO()
    im.save(b, fmt, **options)
    return b.getvalue()


def regions(fmt: str, data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a file's header, tables (quantisation and Huffman tables, palettes, chunk headers)
    and data (entropy-coded or compressed pixels)."""
    n = len(data)
    if fmt == "JPEG":
        tables, sos = data.find(b"\xff\xdb"), data.find(b"\xff\xda")
        bounds = (tables, sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"))
    elif fmt == "PNG":
        bounds = (33, data.find(b"IDAT") - 4)
    elif fmt == "GIF":
        packed = data[10]
        palette = 3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0
        bounds = (13, data.find(b",", 13 + palette) + 10)
    elif fmt == "BMP":
        bounds = (14 + struct.unpack_from("<I", data, 14)[0], struct.unpack_from("<I", data, 10)[0])
    else:  # WebP: RIFF header, then the VP8/VP8L chunk header and frame header
        bounds = (12, 30)
    out = {"header": (0, bounds[0]), "tables": bounds, "data": (bounds[1], n)}
    return {k: (a, b) for k, (a, b) in out.items() if 0 <= a < b <= n}


def patch_dimensions(fmt: str, data: bytes, w: int, h: int) -> bytes | None:
    """``data`` with the width and height of its header replaced (None where the format has no such field here)."""
    b = bytearray(data)
    if fmt == "PNG":
        struct.pack_into(">II", b, 16, w & 0xFFFFFFFF, h & 0xFFFFFFFF)
        struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))  # a valid CRC: the header really says so
    elif fmt == "JPEG":
        sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        struct.pack_into(">HH", b, sof + 5, h & 0xFFFF, w & 0xFFFF)
    elif fmt == "GIF":
        struct.pack_into("<HH", b, 6, w & 0xFFFF, h & 0xFFFF)
    elif fmt == "BMP":
        struct.pack_into("<ii", b, 18, max(-2**31, min(w, 2**31 - 1)), max(-2**31, min(h, 2**31 - 1)))
    elif data[12:16] == b"VP8 ":
        struct.pack_into("<HH", b, 26, w & 0x3FFF, h & 0x3FFF)
    else:
        return None
    return bytes(b)


# --------------------------------------------------------------------------- requests


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = BOUNDARY,
              newline: bytes = b"\r\n") -> bytes:
    """A multipart body from (field name, file name or None, content type or None, data) parts."""
    out = b""
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}".encode() + newline + f"Content-Disposition: {disposition}".encode() + newline
        if ctype is not None:
            out += f"Content-Type: {ctype}".encode() + newline
        out += newline + data + newline
    return out + f"--{boundary}--".encode() + newline


def form(data: bytes, filename: str = "x.png", ctype: str | None = "image/png", **fields: str) -> tuple[dict, bytes]:
    """Headers and body of a /classify request with one image and plain ``fields``."""
    parts = [("image", filename, ctype, data)] + [(k, None, None, v.encode()) for k, v in fields.items()]
    return {"content-type": MULTIPART}, multipart(parts)


def envelope_cases(good: bytes, rng: np.random.Generator, max_batch_images: int) -> list[Case]:
    """Malformed or unexpected request envelopes, each with the status it must get."""
    def part(name: str = "image", filename: str | None = "x.png", data: bytes = good, ctype: str | None = None):
        return (name, filename, ctype, data)

    def case(detail: str, body: bytes, allowed: tuple[int, ...], ctype: str | None = MULTIPART,
             path: str = "/classify", **kw) -> Case:
        return Case("envelope", detail, path, {} if ctype is None else {"content-type": ctype}, body, allowed, **kw)

    junk = rng.bytes(int(rng.integers(1, 2000)))
    pad = "x" * int(rng.integers(5000, 20000))
    return [
        case("no boundary", multipart([part()]), (400,), ctype="multipart/form-data"),
        case("empty boundary", multipart([part()]), (400,), ctype="multipart/form-data; boundary="),
        case("other boundary", multipart([part()], "other"), (400,)),
        case("boundary over 256 bytes", multipart([part()], "b" * 300), (400,),
             ctype="multipart/form-data; boundary=" + "b" * 300),
        case("empty body", b"", (400,)),
        case("only the closing boundary", f"--{BOUNDARY}--\r\n".encode(), (400,)),
        case("empty part", f"--{BOUNDARY}\r\n\r\n\r\n--{BOUNDARY}--\r\n".encode(), (400,)),
        case("part without a name", multipart([part()]).replace(b'name="image"; ', b""), (400,)),
        case("part without Content-Disposition",
             multipart([part()]).replace(b'Content-Disposition: form-data; name="image"; filename="x.png"',
                                         b"X-Other: 1"), (400,)),
        case("header line without a colon", multipart([part()]).replace(b"Content-Disposition:", b"Content-Disp"),
             (400,)),
        case("no closing boundary", multipart([part()])[:-len(f"--{BOUNDARY}--\r\n")], (400,)),
        case("body cut inside the image part", multipart([part()])[:len(good) // 2], (400,)),
        case("LF line ends", multipart([part()], newline=b"\n"), (400,)),
        case("junk before the first boundary", junk + b"\r\n" + multipart([part()]), (200, 400)),
        case("duplicate image field", multipart([part(), part()]), (400,)),
        case("duplicate top_k field", multipart([part(), part("top_k", None, b"3"), part("top_k", None, b"2")]),
             (400,)),
        case("duplicate model field", multipart([part(), part("model", None, b"a"), part("model", None, b"b")]),
             (400,)),
        case(f"part header of {len(pad)} bytes",
             multipart([part()]).replace(b"\r\n\r\n", f"\r\nX-Pad: {pad}\r\n\r\n".encode(), 1), (400,)),
        case("20 part headers", multipart([part()]).replace(
            b"\r\n\r\n", b"".join(f"\r\nX-H{i}: v".encode() for i in range(20)) + b"\r\n\r\n", 1), (400,)),
        case("file name of 300 bytes", multipart([part(filename="n" * 296 + ".png")]), (400,)),
        case("file name of 150 bytes", multipart([part(filename="n" * 146 + ".png")]), (200,)),
        case("file name with a path", multipart([part(filename="../../etc/passwd.png")]), (200,)),
        case("file name with a NUL byte", multipart([part(filename="x\x00.png")]), (400,)),
        case("stray binary file field", multipart([part(), part("extra", "junk.bin", junk)]), (400,)),
        case("stray text field", multipart([part(), part("extra", None, b"1")]), (400,)),
        case("model sent as a binary file", multipart([part(), part("model", "m.bin", junk)]), (400,)),
        case("top_k sent as a binary file", multipart([part(), part("top_k", "k.bin", b"\xff\xfe3")]), (400,)),
        case("image sent as a text field (a URL)", multipart([part(filename=None, data=b"http://127.0.0.1:9/x.png")]),
             (400,)),
        case("no image field", multipart([part("model", None, b"x")]), (400,)),
        case("non-ASCII field name", multipart([part("imagé")]), (400,)),
        case("urlencoded form", b"image=abc&top_k=3", (415,), ctype="application/x-www-form-urlencoded"),
        case("raw image body", good, (415,), ctype="image/png"),
        case("octet-stream body", good, (415,), ctype="application/octet-stream"),
        case("text body", b"hello", (415,), ctype="text/plain"),
        case("BentoML pickle body", b"\x80\x05N.", (415,), ctype="application/vnd.bentoml+pickle"),
        case("JSON body, image as a string", b'{"image": "x.png"}', (400,), ctype="application/json"),
        case("JSON body, binary junk", junk, (400,), ctype="application/json"),
        case("no Content-Type, binary junk", junk, (400,), ctype=None),
        case("chunked malformed body", multipart([part()])[:-20], (400,), chunked=True),
        case("chunked good body", multipart([part()]), (200,), chunked=True),
        case("batch without images", multipart([part("model", None, b"tiny")]), (400,), path="/classify_batch"),
        case(f"batch of {max_batch_images + 1} images", multipart([part("images")] * (max_batch_images + 1)), (413,),
             path="/classify_batch"),
        case("batch with the single field name", multipart([part("image")]), (400,), path="/classify_batch"),
        case("batch with one empty image", multipart([part("images"), part("images", data=b"")]), (400,),
             path="/classify_batch"),
    ]


FIELD_VALUES = {"top_k": ["0", "-1", "abc", "1e3", "99999999999999999999", "", " 3", "null", "[1]", "3.5"],
                "model": ["../x", "a/b", "..", "%2e%2e%2f", "x" * 5000, "é", "", "null", '{"a": 1}', "tiny\x00"]}


def cases(n: int, seed: int, data_dir: Path | None = None, max_batch_images: int = 4) -> list[Case]:
    """``n`` reproducible cases: every kind in turn, each drawn from its own seeded generator."""
    images = base_images(8, seed, data_dir)
    files = [(fmt, encode(a, fmt, mode, opts)) for a in images for fmt, mode, opts in ENCODINGS]
    kinds = ["bitflip", "truncate", "envelope", "bitflip", "truncate", "dimensions", "envelope", "content_type",
             "field", "not_image", "batch"]
    out: list[Case] = []
    envelope: list[Case] = []
    seen: Counter = Counter()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % len(kinds)]
        seen[kind] += 1
        fmt, data = files[int(rng.integers(len(files)))]
        if kind == "bitflip":
            b = bytearray(data)
            region, (lo, hi) = list(regions(fmt, data).items())[int(rng.integers(len(regions(fmt, data))))]
            flips = int(rng.integers(1, 17))
            for pos in rng.integers(lo, hi, flips):
                b[pos] ^= 1 << int(rng.integers(8))
            out.append(Case(kind, f"{fmt} {flips} bits in {region}", "/classify", *form(bytes(b))))
        elif kind == "truncate":
            region, (lo, hi) = list(regions(fmt, data).items())[int(rng.integers(len(regions(fmt, data))))]
            cut = int(rng.integers(lo, hi))
            out.append(Case(kind, f"{fmt} cut at {cut}/{len(data)} ({region})", "/classify", *form(data[:cut]),
                            (400,) if cut == 0 else ()))
        elif kind == "dimensions":
            w, h = (int(v) for v in rng.choice([0, 1, 7, 16383, 65535, 2**31 - 1, 2**32 - 1, -1, 5000], 2))
            patched = patch_dimensions(fmt, data, w, h)
            if patched is None:
                fmt, patched = "PNG", patch_dimensions("PNG", files[3][1], w, h)
            out.append(Case(kind, f"{fmt} patched to {w}x{h}", "/classify", *form(patched)))
        elif kind == "envelope":
            if not envelope:
                envelope = envelope_cases(data, rng, max_batch_images)
            out.append(envelope[(seen[kind] - 1) % len(envelope)])
        elif kind == "content_type":
            ctype = str(rng.choice(["text/plain", "application/json", "image/gif", "application/octet-stream",
                                    "x/y; charset=zzz"]))
            filename = str(rng.choice(["a.txt", "noext", "x.gif", ".png", "é.jpg"]))
            out.append(Case(kind, f"{fmt} as {ctype} named {filename}", "/classify", *form(data, filename, ctype),
                            (200,)))
        elif kind == "field":
            name = str(rng.choice(list(FIELD_VALUES)))
            value = str(rng.choice(FIELD_VALUES[name]))
            out.append(Case(kind, f"{name}={value[:40]!r}", "/classify", *form(data, **{name: value})))
        elif kind == "not_image":
            body = [b"", rng.bytes(int(rng.integers(1, 5000))), b"<html>not an image</html>", data[:4],
                    encode(images[0], "TIFF", "RGB", {})][seen[kind] % 5]
            allowed = (415,) if body[:2] in (b"II", b"MM") else (400,) if len(body) < 5 else (400, 415)
            out.append(Case(kind, f"{len(body)} bytes", "/classify", *form(body), allowed))
        else:  # a batch with one corrupt or empty image among good ones
            good = [files[int(j)][1] for j in rng.integers(len(files), size=2)]
            bad = data[:int(rng.integers(0, len(data) // 2))]
            body = multipart([("images", f"{j}.img", "image/png", d) for j, d in enumerate([*good, bad])])
            out.append(Case(kind, f"2 good + {fmt} cut at {len(bad)}", "/classify_batch",
                            {"content-type": MULTIPART}, body, (400,)))
    return out


def send(client: httpx.Client, case: Case) -> tuple[int | str, float, str]:
    """(status or exception name, seconds, problem or '') of one case."""
    t0 = time.perf_counter()
    body = (case.body[i:i + 4096] for i in range(0, len(case.body), 4096)) if case.chunked else case.body
    try:
        r = client.post(case.path, content=body, headers=case.headers)
    except httpx.HTTPError as e:
        return type(e).__name__, time.perf_counter() - t0, f"no answer: {type(e).__name__}"
    dt, status = time.perf_counter() - t0, r.status_code
    try:
        answer = r.json()
    except json.JSONDecodeError:
        answer = None
    if "Traceback" in r.text:
        problem = "a traceback in the body"
    elif not (status == 200 or 400 <= status < 500):
        problem = f"status {status}: {r.text[:200]}"
    elif not isinstance(answer, dict):
        problem = f"{status} whose body is not a JSON object"
    elif status == 200:
        problem = "" if "predictions" in answer else "200 without predictions"
    else:
        problem = "" if answer.get("error") else "4xx without an error message"
    if not problem and case.allowed and status not in case.allowed:
        problem = f"status {status}, expected {' or '.join(map(str, case.allowed))}: {r.text[:200]}"
    return status, dt, problem


def serving_processes() -> list[psutil.Process]:
    """The ``bentoml serve`` processes this process started (the serving process and its workers)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "bentoml" in " ".join(p.cmdline()):
                out.append(p)
    return out


def rss_mb(procs: list[psutil.Process]) -> dict[int, float]:
    """Resident memory (MB) of each of ``procs`` still running, by pid."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = round(p.memory_info().rss / 2**20, 1)
    return out


def run_fuzz(url: str, batch: list[Case], clients: int = 4, timeout_s: float = 10.0) -> dict:
    """Send every case; returns counts per kind and status, the problems, the slowest answer, and the
    serving processes' RSS before and after (the same processes must still be there, and still serve)."""
    procs = serving_processes()
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        good = form(encode(base_images(1, 0, None)[0], "PNG", "RGB", {}))
        for _ in range(5):  # warm-up
            client.post("/classify", headers=good[0], content=good[1])
        before = rss_mb(procs)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda c: send(client, c), batch))
        seconds = time.perf_counter() - t0
        alive = client.get("/readyz").status_code == 200 and \
            client.post("/classify", headers=good[0], content=good[1]).status_code == 200
    after = rss_mb(procs)
    by_kind: dict[str, Counter] = {}
    for case, (status, _, _) in zip(batch, results, strict=True):
        by_kind.setdefault(case.kind, Counter())[str(status)] += 1
    problems = [{"kind": c.kind, "detail": c.detail, "status": s, "problem": p}
                for c, (s, _, p) in zip(batch, results, strict=True) if p]
    slowest = max(range(len(batch)), key=lambda i: results[i][1])
    return {"cases": len(batch), "seconds": round(seconds, 1), "statuses": dict(Counter(str(r[0]) for r in results)),
            "by_kind": {k: dict(v) for k, v in by_kind.items()}, "problems": problems,
            "slowest_s": round(results[slowest][1], 3),
            "slowest_case": f"{batch[slowest].kind}: {batch[slowest].detail}",
            "timeout_s": timeout_s, "alive": alive and set(after) == set(before),
            "rss_before_mb": before, "rss_after_mb": after}


# --------------------------------------------------------------------------- CLI


@dataclass
class FuzzConfig:
    """Options of ``python -m benchmarks.fuzz`` (the CLI is generated from these fields)."""

    cases: int = field(default=5000, metadata={"help": "requests to send"})
    seed: int = 0
    clients: int = field(default=4, metadata={"help": "concurrent clients"})
    timeout_s: float = field(default=10.0, metadata={"help": "longest wait for an answer; longer is a failure"})
    models: list[ModelRef] = field(default_factory=lambda: [ModelRef("efficientnet_lite0",
                                                                      "demo-efficientnet_lite0-int8:latest")],
                                   metadata={"help": "served models, name=tag[@backend]", "metavar": "MODEL"})
    bento: str = field(default="service.service:CifarClassifier", metadata={"help": "what `bentoml serve` serves"})
    data_dir: str = field(default=str(CIFAR), metadata={"help": "CIFAR-10 folder (synthetic images without it)"})
    out: str = str(HERE / "fuzz")


def run(cfg: FuzzConfig) -> dict:
    batch = cases(cfg.cases, cfg.seed, Path(cfg.data_dir), SERVICE_OPTIONS["max_batch_images"])
    with tempfile.TemporaryDirectory() as work, serve(cfg.models, Path(work), SERVICE_OPTIONS, bento=cfg.bento) as url:
        result = run_fuzz(url, batch, cfg.clients, cfg.timeout_s)
    result = {"config": {**vars(cfg), "models": [m.to_dict() for m in cfg.models]}, "service_options": SERVICE_OPTIONS,
              "cpu": cpu_name(), **result}
    write(result, Path(cfg.out))
    if result["problems"] or not result["alive"]:
        raise UserError(f"{len(result['problems'])} problems (alive: {result['alive']}); see {cfg.out}.md")
    return result


def write(result: dict, out: Path) -> None:
    atomic_write_json(result, out.with_suffix(".json"))
    kinds = sorted({s for v in result["by_kind"].values() for s in v}, key=lambda s: (not s.isdigit(), s))
    before, after = sum(result["rss_before_mb"].values()), sum(result["rss_after_mb"].values())
    lines = ["# Upload fuzzing", "", f"Produced by `python -m benchmarks.fuzz` (seed {result['config']['seed']}): "
             f"{result['cases']} requests to `{result['config']['bento']}` on loopback, {result['config']['clients']} "
             f"clients at once, in {result['seconds']} s. Every answer must be 200 or a 4xx JSON error (the exact "
             f"status where it is certain) within {result['timeout_s']:g} s. CPU: {result['cpu']}.", "",
             "| kind | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for kind, counts in result["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(s, 0)) for s in kinds) + " |")
    lines += ["", f"Problems: **{len(result['problems'])}**. Slowest answer: {result['slowest_s']} s "
              f"({result['slowest_case']}). The same serving processes answered afterwards: "
              f"**{'yes' if result['alive'] else 'no'}**; their RSS went from {before:.0f} MB to {after:.0f} MB "
              f"({len(result['rss_after_mb'])} processes)."]
    lines += [f"- {p['kind']} ({p['detail']}): {p['problem']}" for p in result["problems"][:50]]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    return cli(FuzzConfig, run, argv, "python -m benchmarks.fuzz", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
