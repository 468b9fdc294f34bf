import email.parser
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtest import LoadTestError
from loadtest.locust_runner import read_stats
from loadtest.payloads import PayloadError, load_payloads
from loadtest.run import LoadTestConfig, build_parser, main, run_loadtest
from loadtest.scenarios import gate, plan
from loadtest.validation import validate
from utils import ModelRef, parse_config

CLASSES = [f"c{i}" for i in range(10)]


def test_validate_accepts_a_distribution_and_rejects_the_rest():
    full = [{"label": c, "score": 0.1} for c in CLASSES]
    assert validate({"predictions": full}, set(CLASSES), 1, 10) is None
    assert validate({"predictions": full[:3]}, set(CLASSES), 1, 3) is None
    assert "probability" in validate({"predictions": [{"label": c, "score": 0.5} for c in CLASSES]},
                                     set(CLASSES), 1, 10)
    assert "unknown labels" in validate({"predictions": [{"label": "dog", "score": 0.9}]}, set(CLASSES), 1, 1)
    assert "outside" in validate({"predictions": [{"label": "c1", "score": 1.5}]}, set(CLASSES), 1, 1)
    assert "sorted" in validate({"predictions": [{"label": "c1", "score": 0.1}, {"label": "c2", "score": 0.2}]},
                                set(CLASSES), 1, 2)
    assert validate({}, set(CLASSES), 1, 1) == "no predictions"
    batch = [[{"label": "c1", "score": 0.9}]] * 3
    assert validate({"predictions": batch}, set(CLASSES), 3, 1) is None
    assert "lists" in validate({"predictions": batch}, set(CLASSES), 4, 1)


def test_payload_sources(tmp_path, synthetic_dir):
    assert len(load_payloads("synthetic", 5)) == 5
    pngs = load_payloads(f"cifar:{synthetic_dir}", 7)
    assert len(pngs) == 7 and pngs[0][:4] == b"\x89PNG"
    (tmp_path / "a.jpg").write_bytes(pngs[0])
    assert load_payloads(f"dir:{tmp_path}", 10) == [pngs[0]]
    with pytest.raises(PayloadError, match="no CIFAR"):
        load_payloads(f"cifar:{tmp_path}")
    with pytest.raises(PayloadError, match="unknown payload source"):
        load_payloads("ftp:x")


def test_models_parse_alike_from_cli_yaml_and_python(tmp_path, capsys):
    (tmp_path / "lt.yaml").write_text("loadtest:\n  models: [{name: a, tag: 't:1', backend: tensorrt}]\n"
                                      "  service: {max_latency_ms: 20}\n  users: [2]\n")
    parser = build_parser()
    from_yaml, _ = parse_config(LoadTestConfig, parser, ["--config", str(tmp_path / "lt.yaml"), "--users", "4"],
                                section="loadtest")
    from_cli, _ = parse_config(LoadTestConfig, build_parser(), ["--models", "a=t:1@tensorrt"], section="loadtest")
    expected = [ModelRef("a", "t:1", "tensorrt")]
    assert from_yaml.models == from_cli.models == LoadTestConfig(models=["a=t:1@tensorrt"]).models == expected
    assert from_yaml.service == {"max_latency_ms": 20} and from_yaml.users == [4]  # the command line wins
    with pytest.raises(SystemExit) as exit_:
        main(["--models", "just-a-name"])  # argparse's own usage error
    assert exit_.value.code == 2 and "needs a name and a tag" in capsys.readouterr().err
    assert main(["--scenarios", "single"]) == 2  # nothing to test
    with pytest.raises(LoadTestError, match="without models"):
        LoadTestConfig(service={"models": []})


def test_plan_and_gate():
    steps = plan(["single", "server", "rate", "offline"], [2, 4], 5, 3, rate=16, rate_users=8, offline_users=1,
                 offline_batch=4)
    assert [(s.scenario, s.users) for s in steps] == [("single-stream", 1), ("server", 2), ("server", 4),
                                                      ("constant-rate", 8), ("offline", 1)]
    assert steps[3].rate == 2.0 and steps[4].endpoint == "classify_batch" and steps[4].batch_images == 4
    assert "constant-rate" not in [s.scenario for s in plan(["rate"], [1], 5, 3, 0, 8, 1, 4)]
    rows = [{"model": "m", "scenario": "single-stream", "users": 1, "failure_ratio": 0.0, "p95_ms": 50.0},
            {"model": "m", "scenario": "server", "users": 32, "failure_ratio": 0.0, "p95_ms": 900.0}]
    assert gate(rows, 100, 0.01) == []  # the sweep may exceed the SLO: it is not gated
    assert gate(rows, 10, 0.01) and gate([{**rows[0], "failure_ratio": 0.02}], None, 0.01)


def test_throughput_counts_answered_requests_only(tmp_path):
    header = "Type,Name,Request Count,Failure Count,Requests/s,Average Response Time,50%,90%,95%,99%\n"
    (tmp_path / "r_stats.csv").write_text(header + "POST,/classify_batch [m],10,4,2.0,120,100,150,170,200\n"
                                          "POST,Aggregated,10,4,2.0,120,100,150,170,200\n")
    (tmp_path / "r_failures.csv").write_text("Method,Name,Error,Occurrences\nPOST,/classify_batch,HTTP 503,4\n")
    s = read_stats(tmp_path / "r", "classify_batch", 32)
    assert s["failures"] == 4 and s["failure_ratio"] == pytest.approx(0.4)
    assert s["images_per_s"] == pytest.approx(2.0 * 0.6 * 32)  # 6 of 10 answered, 32 images each
    assert s["failure_reasons"] == ["4× HTTP 503"] and s["p95_ms"] == 170
    with pytest.raises(LoadTestError, match="no /classify requests"):
        read_stats(tmp_path / "r", "classify", 1)
    with pytest.raises(LoadTestError, match="no statistics"):
        read_stats(tmp_path / "missing", "classify", 1)


SHORT = ["--warmup-seconds", "2", "--single-seconds", "3", "--step-seconds", "3"]


@pytest.fixture(scope="module")
def short_run(exported, synthetic_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lt")
    cfg = LoadTestConfig(models=["tiny=tiny-int8:latest"], scenarios=["single", "server", "offline"], users=[2],
                         offline_batch=4, payload_source=f"cifar:{synthetic_dir}", slo_ms=5000, warmup_seconds=2,
                         single_seconds=3, step_seconds=3, reports_dir=str(tmp / "reports"),
                         bench_out=str(tmp / "bench" / "loadtest"))
    return run_loadtest(cfg), tmp


@pytest.mark.heavy
def test_short_run_writes_a_report_without_failures(short_run):
    (rows, problems, outdir), tmp = short_run
    assert problems == []
    latest = tmp / "reports" / "latest"
    assert latest.resolve() == outdir.resolve()
    for f in ("report.md", "results.json", "throughput.png", "latency.png", "models.png"):
        assert (latest / f).is_file(), f
    results = json.loads((latest / "results.json").read_text())
    assert results["rows"] == rows
    assert [r["scenario"] for r in rows] == ["single-stream", "server", "offline"]
    assert all(r["rps"] > 0 and r["failures"] == 0 and r["requests"] > 0 for r in rows)
    assert rows[-1]["images_per_s"] == pytest.approx(4 * rows[-1]["rps"])
    assert rows[0]["server_calls"] > 0 and rows[0]["precision"] == "int8"
    assert results["meta"]["versions"]["locust"]
    bench = json.loads((tmp / "bench" / "loadtest.json").read_text())
    assert {"model", "backend", "precision", "scenario", "users", "rps", "p50_ms", "p95_ms", "p99_ms", "failures",
            "device"} <= set(bench[0])
    assert "Most images/s" in (tmp / "bench" / "loadtest.md").read_text()
    assert (tmp / "bench" / "loadtest.png").is_file()


@pytest.mark.heavy
def test_impossible_slo_fails_the_gate(exported, tmp_path):
    code = main(["--models", "tiny=tiny-fp32:latest", "--scenarios", "single", "--slo-ms", "0.001",
                 "--reports-dir", str(tmp_path / "reports"), *SHORT])
    assert code == 1
    report = (tmp_path / "reports" / "latest" / "report.md").read_text()
    assert "Gate failed" in report and "SLO" in report


class _FakeService(BaseHTTPRequestHandler):
    """The HTTP contract's checks, then malformed answers from /classify and well-formed ones from
    /classify_batch; a request off the contract gets a 400 that names the problem."""

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/readyz":
            self._send(200, {})
        elif self.path == "/models":
            self._send(200, {"default": "m", "models": [{"name": "m", "classes": CLASSES, "backend": "fake",
                                                          "provider": "none", "precision": "fp32", "input_size": 32}]})
        else:
            self._send(404, {})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        parts = [(p.get_param("name", header="content-disposition"), p) for p in msg.iter_parts()] \
            if msg.is_multipart() else []
        files = {name: [p for n, p in parts if n == name and p.get_filename()] for name in ("image", "images")}
        form = {n: p.get_payload(decode=True).decode() for n, p in parts if not p.get_filename()}
        batch = self.path == "/classify_batch"
        if self.path not in ("/classify", "/classify_batch"):
            return self._send(404, {})
        if len(files["images" if batch else "image"]) < 1 or files["image" if batch else "images"] or \
                (not batch and len(files["image"]) != 1) or form.get("model") != "m" or form.get("top_k") != "10":
            return self._send(400, {"error": f"off the contract: files {files}, form {form}"})
        if batch:
            self._send(200, {"predictions": [[{"label": c, "score": 0.1} for c in CLASSES]] * len(files["images"])})
        else:
            self._send(200, {"predictions": [{"label": "not-a-class", "score": 3.0}] * 10})

    def log_message(self, *a):
        pass


@pytest.mark.heavy
def test_malformed_answers_count_as_failures(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = main(["--url", f"http://127.0.0.1:{srv.server_port}", "--model", "m", "--scenarios", "single",
                     "offline", "--offline-batch", "3", "--offline-users", "1", "--reports-dir",
                     str(tmp_path / "reports"), *SHORT])
    finally:
        srv.shutdown()
    assert code == 1
    single, offline = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())["rows"]
    assert single["requests"] > 0 and single["failures"] == single["requests"] and single["images_per_s"] == 0
    assert any("outside" in r or "unknown labels" in r for r in single["failure_reasons"])
    assert offline["requests"] > 0 and offline["failures"] == 0, offline["failure_reasons"]
    assert offline["images_per_s"] == pytest.approx(3 * offline["rps"])
