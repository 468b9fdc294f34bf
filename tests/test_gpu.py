"""The GPU path without a GPU: the TensorRT-flavour INT8 graph, the structural check that stands in for
TensorRT's parser, one ONNX Runtime per environment, the GPU bento, and the TensorRT engine logic (keys,
skips, version checks, profile bounds, copies on the engine's stream) over a fake ``tensorrt`` module and
fake CUDA runtime bindings. The tests marked by ``needs_tensorrt``/``needs_ort_cuda`` run on a GPU host only."""

import ctypes
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from packaging.requirements import Requirement

from benchmarks import gpu_check
from export import quantize
from export.benchmark import sample_inputs
from export.exporter import ExportConfig, run_export
from export.onnx_export import ExportError
from export.trt_check import tensorrt_problems
from service import tensorrt_engine as trt_engine
from service.runtime import ArtifactError

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
TRT_REASON = trt_engine.unavailable_reason()
needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT on a GPU: {TRT_REASON}")
needs_ort_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                    reason="ONNX Runtime's CUDA provider is not installed or has no GPU here")


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_one_onnx_runtime_per_environment():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & RUNTIMES
    assert _names(extras["cpu"]) & RUNTIMES == {"onnxruntime"}
    assert _names(extras["gpu"]) & RUNTIMES == {"onnxruntime-gpu"}
    assert all(len(_names(reqs) & RUNTIMES) <= 1 for reqs in extras.values())
    for bentofile, runtime in (("bentofile.yaml", "onnxruntime"), ("bentofile.gpu.yaml", "onnxruntime-gpu")):
        packages = yaml.safe_load((ROOT / bentofile).read_text())["python"]["packages"]
        assert _names(packages) & RUNTIMES == {runtime}, bentofile
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()} & RUNTIMES
    assert len(installed) == 1, f"this environment holds {sorted(installed)}: the `onnxruntime` module is whichever " \
                                "was installed last"


# --------------------------------------------------------------------------- the TensorRT-flavour INT8 graph

def qdq_conv(bias_int32=False, zero_point=0, qtype=np.int8, weight_axis=0, per_channel_activation=False):
    """x → Q → DQ → Conv(DQ(int8 weight), bias) → y as TensorRT takes it, or with one thing wrong."""
    channels = 3 if per_channel_activation else 1
    w_scales = 4 if weight_axis == 0 else 3
    inits = [numpy_helper.from_array(np.full(channels, 0.1, np.float32).reshape(-1 if channels > 1 else ()), "xs"),
             numpy_helper.from_array(np.full(channels, zero_point, qtype).reshape(-1 if channels > 1 else ()), "xz"),
             numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "wq"),
             numpy_helper.from_array(np.full(w_scales, 0.05, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(w_scales, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"], axis=1),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=weight_axis)]
    if bias_int32:
        inits += [numpy_helper.from_array(np.zeros(4, np.int32), "bq"),
                  numpy_helper.from_array(np.full(4, 0.005, np.float32), "bs")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], axis=0))
    else:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    nodes.append(helper.make_node("Conv", ["xf", "w", "b"], ["y"]))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"bias_int32": True}, "INT32 quantized data"),
    ({"zero_point": 3}, "non-zero zero point"),
    ({"qtype": np.uint8}, "UINT8 quantized data"),
    ({"weight_axis": 1}, "unsupported axis 1"),
    ({"per_channel_activation": True}, "per-channel scales on an activation"),
])
def test_structural_check_refuses_what_tensorrt_rejects(change, problem):
    model = qdq_conv(**change)
    onnx.checker.check_model(model, full_check=True)  # each graph is valid ONNX: only TensorRT would refuse it
    problems = tensorrt_problems(model)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) >= 1 and any(problem in p for p in problems), problems


def test_exported_trt_flavour_passes_and_cpu_flavour_does_not(exported):
    out, manifest = exported
    trt = onnx.load(str(out / "model.int8.trt.onnx"))
    assert tensorrt_problems(trt) == []
    floats = {i.name for i in trt.graph.initializer if i.data_type == TensorProto.FLOAT}
    producer = {o: n for n in trt.graph.node for o in n.output}
    layers = [n for n in trt.graph.node if n.op_type in ("Conv", "Gemm")]
    assert layers and all(n.input[2] in floats for n in layers)  # biases stay float
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in layers)  # layer inputs are quantized
    assert not any(n.op_type == "QuantizeLinear" and producer.get(n.input[0]) in layers for n in trt.graph.node)
    cpu = tensorrt_problems(onnx.load(str(out / "model.int8.onnx")))  # ORT's CPU layout: TensorRT refuses it
    assert any("UINT8" in p for p in cpu) and any("zero point" in p for p in cpu)


def residual_net(path: Path) -> None:
    """input → Conv → Relu → Conv → Add(skip: the Relu) → Relu → pool → Gemm: one residual block."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                              [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("b2", 8),
                               init("w3", 10, 8), init("b3", 10)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_trt_flavour_quantizes_layer_inputs_and_the_residual_skip_only(tmp_path):
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.trt.onnx"
    residual_net(fp32)
    x = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    quantize.quantize_int8(fp32, int8, x, flavour="trt")
    model = onnx.load(str(int8))
    assert tensorrt_problems(model) == []
    producer = {o: n for n in model.graph.node for o in n.output}
    (add,) = [n for n in model.graph.node if n.op_type == "Add"]
    assert add.input[0] == "c2"  # the conv's output in float: TensorRT fuses the add into that conv
    assert producer[add.input[1]].op_type == "DequantizeLinear"  # the skip input quantized
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("c1", "c2", "logits") for n in model.graph.node)
    reference = ort.InferenceSession(str(fp32)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(int8)).run(None, {"input": x})[0]
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()


def test_export_refuses_an_int8_trt_graph_tensorrt_would_reject(exported, tiny_run, synthetic_dir, tmp_path,
                                                                monkeypatch):
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    real = quantize.quantize_int8  # the CPU layout written as the TensorRT one

    monkeypatch.setattr(quantize, "quantize_int8", lambda fp32, path, x, _, *rest: real(fp32, path, x, "cpu", *rest))
    with pytest.raises(ExportError, match="model.int8.trt.onnx would not build with TensorRT .*INT32 quantized data"):
        run_export(ExportConfig(run_dir=str(tiny_run), out=str(out), data_dir=str(synthetic_dir), calib_images=32,
                                formats=["fp32", "int8_trt"], threads=2, bentoml=False))
    assert not (out / "model.int8.trt.onnx").exists()


# --------------------------------------------------------------------------- TensorRT over fakes

class FakeCudart:
    """cuda-python's runtime bindings over host memory, recording the stream of every copy."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.copy_streams: list[int] = []

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=b"Fake GPU\x00\x00", major=8, minor=9)

    def cudaStreamCreate(self):
        return 0, 77

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaMalloc(self, size):
        ptr = 4096 * (len(self.memory) + 1)
        self.memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.copy_streams.append(int(stream))
        if kind == 1:
            self.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:count]), count)
        return (0,)


def engine_function(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: the first ten values of each image, doubled."""
    return x.reshape(len(x), -1)[:, :10] * 2


class FakeContext:
    def __init__(self, cudart: FakeCudart):
        self.cudart, self.addresses, self.shape, self.refuse, self.streams = cudart, {}, None, False, []

    def set_input_shape(self, name, shape):
        assert name == "images"
        self.shape = tuple(shape)
        return not self.refuse

    def get_tensor_shape(self, name):
        return (self.shape[0], 10) if name == "scores" else self.shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.streams.append(stream)
        memory = self.cudart.memory
        n = int(np.prod(self.shape))
        x = np.frombuffer(bytes(memory[self.addresses["images"]][:4 * n]), np.float32).reshape(self.shape)
        y = engine_function(x).astype(np.float32).tobytes()
        memory[self.addresses["scores"]][:len(y)] = y
        return True


def fake_tensorrt(cudart: FakeCudart, max_batch: int = 128) -> ModuleType:
    """The part of TensorRT's Python API the runner uses; I/O names that are not the ONNX ones."""
    trt = ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = np.dtype
    engine = SimpleNamespace(
        num_io_tensors=2, get_tensor_name=["images", "scores"].__getitem__,
        get_tensor_mode=lambda name: "in" if name == "images" else "out",
        get_tensor_dtype=lambda name: np.float32,
        get_tensor_profile_shape=lambda name, profile: [(1, 3, 32, 32), (32, 3, 32, 32), (max_batch, 3, 32, 32)])
    trt.contexts = []

    def create_execution_context():
        trt.contexts.append(FakeContext(cudart))
        return trt.contexts[-1]

    engine.create_execution_context = create_execution_context
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_engine, "_cudart", lambda: cudart)
    return trt, cudart


BUILT = {"tensorrt_version": "11.4.0.106", "compute_capability": "8.9"}


def test_runner_reads_the_engine_and_copies_on_its_stream(fake_gpu, tmp_path):
    trt, cudart = fake_gpu
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    assert trt_engine.unavailable_reason() is None
    assert trt_engine.host_target() == {**BUILT, "gpu": "Fake GPU"}
    runner = trt_engine.TrtRunner(plan, BUILT)
    assert (runner.input, runner.output, runner.max_batch) == ("images", "scores", 128)
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(runner(x), engine_function(x))
    assert set(cudart.copy_streams) == {77} and trt.contexts[0].streams == [77]
    with pytest.raises(ValueError, match=r"batch of 129 is outside this engine's optimization profile \[1, 128\]"):
        runner(np.zeros((129, 3, 32, 32), np.float32))
    trt.contexts[0].refuse = True
    with pytest.raises(ValueError, match="TensorRT refused input shape"):
        runner(x)
    runner.close()
    assert cudart.memory == {}


@pytest.mark.parametrize("key, value", [("tensorrt_version", "10.13.0.35"), ("compute_capability", "9.0")])
def test_engine_of_another_tensorrt_or_gpu_is_refused(fake_gpu, tmp_path, key, value):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ArtifactError, match=f"{key} {value} .here .*rebuild it"):
        trt_engine.TrtRunner(plan, {**BUILT, key: value})


def _export_engines(out: Path, tiny_run, synthetic_dir) -> dict:
    return run_export(ExportConfig(run_dir=str(tiny_run), out=str(out), data_dir=str(synthetic_dir), calib_images=64,
                                   formats=["fp32", "fp16", "int8_trt", "trt_fp16", "trt_int8"], threads=2,
                                   bentoml=False))


def test_engines_have_up_to_date_keys_and_record_their_target(fake_gpu, exported, tiny_run, synthetic_dir, tmp_path,
                                                              monkeypatch, capsys):
    trt, _ = fake_gpu
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    builds = []

    def build(onnx_path, plan_path, profile, workspace_mb, timing_cache):
        builds.append(plan_path.name)
        plan_path.write_bytes(b"engine of " + onnx_path.name.encode())

    monkeypatch.setattr(trt_engine, "build_engine", build)
    manifest = _export_engines(out, tiny_run, synthetic_dir)
    assert sorted(builds) == ["model.fp16.plan", "model.int8.plan"]
    for fmt, source in (("trt_fp16", "model.fp16.onnx"), ("trt_int8", "model.int8.trt.onnx")):
        e = manifest["artifacts"][fmt]
        assert e["source"] == source and e["max_batch"] == 128 and e["gpu"] == "Fake GPU"
        assert {k: e[k] for k in BUILT} == BUILT and e["key"] and e["sha256"]
    builds.clear()
    capsys.readouterr()
    again = _export_engines(out, tiny_run, synthetic_dir)
    assert builds == [] and "model.int8.plan: up to date" in capsys.readouterr().out
    assert again["artifacts"]["trt_int8"]["sha256"] == manifest["artifacts"]["trt_int8"]["sha256"]
    trt.__version__ = "11.5.0.1"  # a TensorRT upgrade: the engines are rebuilt
    _export_engines(out, tiny_run, synthetic_dir)
    assert sorted(builds) == ["model.fp16.plan", "model.int8.plan"]


def test_failed_engine_build_is_a_skipped_entry_with_its_reason(fake_gpu, exported, tiny_run, synthetic_dir, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)

    def build(onnx_path, plan_path, profile, workspace_mb, timing_cache):
        if "int8" in onnx_path.name:
            raise RuntimeError("TensorRT could not parse model.int8.trt.onnx: unsupported node")
        plan_path.write_bytes(b"engine")

    monkeypatch.setattr(trt_engine, "build_engine", build)
    manifest = _export_engines(out, tiny_run, synthetic_dir)
    assert "unsupported node" in manifest["artifacts"]["trt_int8"]["skipped"]
    assert not (out / "model.int8.plan").exists() and "sha256" in manifest["artifacts"]["trt_fp16"]
    assert "unsupported node" in (out / "manifest.json").read_text()


# --------------------------------------------------------------------------- make gpu-check, the GPU bento

@pytest.mark.skipif(gpu_check.no_gpu_reason() is None, reason="a GPU is here: gpu-check runs for real")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == 1 and "no GPU here" in r.stdout and "nothing was checked" in r.stdout


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="ONNX Runtime CUDA is here")
def test_gpu_check_reports_a_missing_cuda_provider_instead_of_pretending(exported):
    out, manifest = exported
    rows = gpu_check.ort_parity(out, manifest, sample_inputs(manifest, 8))
    assert {r["format"] for r in rows} == {"fp32", "fp16", "int8", "int8_trt"}
    assert all(not r["ok"] and "CUDAExecutionProvider" in r["error"] for r in rows)


def test_gpu_check_exports_nothing_but_the_engines(exported, tmp_path, capsys):
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    before = json.loads((out / "manifest.json").read_text())["artifacts"]
    after = gpu_check.build_engines(out, json.loads((out / "manifest.json").read_text()))["artifacts"]
    printed = capsys.readouterr().out
    assert "quantizing" not in printed and "exporting" not in printed  # the recorded calibration is reused
    assert all(after[f]["sha256"] == before[f]["sha256"] for f in ("fp32", "fp16", "int8", "int8_trt"))
    if TRT_REASON is not None:
        assert after["trt_fp16"]["skipped"] == after["trt_int8"]["skipped"] == TRT_REASON


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA driver is here")
def test_make_gpu_check_without_a_driver_exits_0_in_one_line():
    r = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "nothing was checked" in r.stdout


@pytest.mark.heavy
def test_gpu_bento_builds_with_the_gpu_runtime_and_asks_for_gpus(exported):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_DEPLOY_")}
    env.update(CIFAR_DEPLOY_MODELS="tiny=tiny-fp16:latest@onnxruntime-cuda", BENTOML_DO_NOT_TRACK="true")
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    r = subprocess.run([bentoml_cli, "build", "-f", "bentofile.gpu.yaml", "--output", "tag"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import bentoml

    bento = bentoml.bentos.get(r.stdout.strip().splitlines()[-1].removeprefix("__tag__:"))
    assert str(bento.tag).startswith("cifar-deploy-gpu:")
    assert {str(m.tag).split(":")[0] for m in bento.info.all_models} == {"tiny-fp16"}
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = _names([line for line in requirements if line.strip() and not line.startswith(("#", "-"))])
    assert {"onnxruntime-gpu", "tensorrt", "cuda-bindings"} <= names and "onnxruntime" not in names
    assert "torch" not in names
    (service,) = bento.info.services
    assert service.config["resources"] == {"gpu": 1}


# --------------------------------------------------------------------------- on a GPU host only

@needs_ort_cuda
def test_ort_cuda_matches_cpu_on_every_onnx_format(exported):
    out, manifest = exported
    rows = gpu_check.ort_parity(out, manifest, gpu_check.images(manifest, 64))
    assert {r["format"] for r in rows} == {"fp32", "fp16", "int8", "int8_trt"}
    assert all(r["ok"] for r in rows), rows


@needs_tensorrt
def test_tensorrt_engines_build_run_and_check_their_bounds(exported, tiny_run, synthetic_dir, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(exported[0], out)
    manifest = _export_engines(out, tiny_run, synthetic_dir)
    for fmt in ("trt_fp16", "trt_int8"):
        e = manifest["artifacts"][fmt]
        assert "sha256" in e, e.get("skipped")
        assert e["top1_agreement"] >= (0.98 if fmt == "trt_fp16" else 0.9)
    runner = trt_engine.TrtRunner(out / "model.int8.plan", manifest["artifacts"]["trt_int8"])
    try:
        assert runner(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 10)
        with pytest.raises(ValueError, match="optimization profile"):
            runner(np.zeros((runner.max_batch + 1, 3, 32, 32), np.float32))
    finally:
        runner.close()
