import json
import os

import numpy as np
import onnx
import pytest
import torch

from export import exporter
from export.__main__ import main as export_main
from export.exporter import ExportConfig, run_export
from export.onnx_export import ExportError, load_run
from export.quantize import qdq_summary, resolve_keep_float, select_calibration_indices
from service import tensorrt_engine as trt_engine
from service.preprocessing import METADATA_KEY, Preprocessing
from service.runtime import ArtifactError, load_ort_model, open_artifact
from training.data import load_cifar
from utils import sha256_file


def test_fp32_has_dynamic_batch_and_matches_pytorch(exported, tiny_run, synthetic_dir):
    out, manifest = exported
    model, mj, pre, _ = load_run(tiny_run)
    ort_model = load_ort_model(out / "model.onnx")
    assert ort_model.provider == "CPUExecutionProvider"
    data = load_cifar(synthetic_dir, download=False)
    for n in (1, 5):
        x = pre.to_input(data.test_x[:n])
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = ort_model(x)
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() <= 1e-4
    assert manifest["artifacts"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert manifest["artifacts"]["fp32"]["top1_agreement"] >= 0.999
    assert manifest["artifacts"]["fp32"]["opset"] >= 17


def test_onnx_carries_the_preprocessing_of_model_json(exported, tiny_run):
    out, _ = exported
    mj = json.loads((tiny_run / "model.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert Preprocessing.from_json(meta[METADATA_KEY]) == Preprocessing.from_dict(mj["preprocessing"])


def test_serving_preprocessing_equals_training_normalisation(synthetic_dir, tiny_run):
    from training.data import normalize

    _, mj, pre, _ = load_run(tiny_run)
    x = load_cifar(synthetic_dir, download=False).test_x[:8]
    np.testing.assert_array_equal(pre.to_input(x), normalize(torch.from_numpy(x), pre.mean, pre.std).numpy())


def test_fp16_runs_with_fp32_io(exported):
    out, manifest = exported
    proto = onnx.load(str(out / "model.fp16.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    m = load_ort_model(out / "model.fp16.onnx")
    assert m(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 10)
    assert manifest["artifacts"]["fp16"]["top1_agreement"] > 0.9


def test_int8_flavours_are_qdq_and_run(exported):
    out, manifest = exported
    cpu, trt = qdq_summary(out / "model.int8.onnx"), qdq_summary(out / "model.int8.trt.onnx")
    assert cpu["quantize_nodes"] > 0 and cpu["dequantize_nodes"] > 0
    assert trt["quantize_nodes"] > 0 and trt["zero_points_all_zero"]
    assert "uint8" in cpu["zero_point_dtypes"] and not cpu["zero_points_all_zero"]
    assert "int8" in trt["zero_point_dtypes"] and "uint8" not in trt["zero_point_dtypes"]
    for f in ("model.int8.onnx", "model.int8.trt.onnx"):
        assert load_ort_model(out / f)(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert manifest["artifacts"]["int8"]["calibration"]["images"] == 64


def test_keep_float_resolves_module_scopes(exported):
    out, _ = exported
    names = resolve_keep_float(out / "model.onnx", [r"head(\..*)?"])
    ops = {n.name: n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert names and {ops[n] for n in names} == {"Gemm"}
    assert resolve_keep_float(out / "model.onnx", []) == []


def test_manifest_verifies_and_tampering_is_refused(exported, tmp_path):
    out, manifest = exported
    model, entry = open_artifact(out, "int8")
    assert entry["sha256"] == manifest["artifacts"]["int8"]["sha256"]
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match="sha256"):
        open_artifact(copy, "fp32")
    with pytest.raises(ArtifactError, match="available"):
        open_artifact(copy, "fp64")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        open_artifact(copy, "fp32")


def test_rerun_skips_up_to_date_artifacts(exported, tiny_run, synthetic_dir, capsys):
    out, manifest = exported
    before = {f: (out / f).stat().st_mtime_ns for f in ("model.onnx", "model.int8.onnx")}
    again = run_export(ExportConfig(run_dir=str(tiny_run), out=str(out), data_dir=str(synthetic_dir),
                                    calib_images=64, threads=2))
    printed = capsys.readouterr().out
    assert "up to date" in printed and "PyTorch reference" not in printed
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before
    assert again["pytorch"]["accuracy"] == manifest["pytorch"]["accuracy"]
    assert again["artifacts"]["int8"]["sha256"] == manifest["artifacts"]["int8"]["sha256"]


def test_tensorrt_is_skipped_with_one_clear_line(exported):
    _, manifest = exported
    reason = trt_engine.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here (tests/test_gpu.py builds the engines)")
    assert manifest["artifacts"]["trt_fp16"]["skipped"] == manifest["artifacts"]["trt_int8"]["skipped"] == reason
    assert "\n" not in reason and ("tensorrt" in reason or "GPU" in reason)


def test_tensorrt_profile_shapes():
    p = trt_engine.Profile(1, 16, 64)
    assert p.shapes((3, 32, 32)) == ((1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))
    with pytest.raises(ValueError):
        trt_engine.Profile(8, 4, 64)


def test_calibration_selection_is_balanced_and_warns(capsys):
    y = np.repeat(np.arange(10), 20)
    idx = select_calibration_indices(y, 50)
    assert len(idx) == 50 and len(set(idx)) == 50
    assert np.bincount(y[idx]).tolist() == [5] * 10
    np.testing.assert_array_equal(idx, select_calibration_indices(y, 50))
    assert len(select_calibration_indices(y, 500)) == 200
    assert "only 200" in capsys.readouterr().err


def test_bentoml_store_holds_each_artifact(exported):
    import bentoml

    out, manifest = exported
    for fmt in ("fp32", "int8"):
        bm = bentoml.models.get(manifest["artifacts"][fmt]["bentoml_tag"])
        assert bm.info.metadata["sha256"] == manifest["artifacts"][fmt]["sha256"]
        assert sha256_file(bm.path_of(manifest["artifacts"][fmt]["file"])) == manifest["artifacts"][fmt]["sha256"]


def test_parity_failure_fails_loudly_and_keeps_the_previous_export(tiny_run, synthetic_dir, tmp_path, monkeypatch):
    cfg = ExportConfig(run_dir=str(tiny_run), out=str(tmp_path), data_dir=str(synthetic_dir), formats=["fp32"],
                       bentoml=False)
    first = run_export(cfg)
    (tmp_path / "model.int8.onnx.tmp").write_bytes(b"left by a killed export")
    monkeypatch.setattr(exporter, "MAX_LOGIT_DIFF", -1.0)
    with pytest.raises(ExportError, match="parity"):
        run_export(ExportConfig(**{**cfg.__dict__, "force": True}))
    assert sha256_file(tmp_path / "model.onnx") == first["artifacts"]["fp32"]["sha256"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == first
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_errors(tmp_path, tiny_run, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text((tiny_run / "model.json").read_text())
    (bad / "best.pt").write_bytes(b"junk")
    assert export_main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "corrupt checkpoint" in capsys.readouterr().err
    torn = tmp_path / "torn"
    torn.mkdir()
    for f in ("model.json", "best.pt"):
        (torn / f).write_bytes((tiny_run / f).read_bytes())
    (torn / "metrics.json").write_text('{"config": ')
    assert export_main([str(torn), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "metrics.json" in err and "Traceback" not in err


def test_benchmark_writes_rows_table_and_plot(exported, tmp_path):
    from export import benchmark

    out, manifest = exported
    dest = tmp_path / "bench"
    assert benchmark.main([str(out), "--batches", "1", "4", "--warmup", "1", "--iters", "2", "--min-seconds", "0",
                           "--threads", "2", "--out", str(dest)]) == 0
    rows = json.loads(dest.with_suffix(".json").read_text())
    keys = {"model", "format", "precision", "batch", "size_mb", "accuracy", "accuracy_delta", "p50_ms", "p95_ms",
            "p99_ms", "throughput_ips", "provider", "device"}
    assert rows and all(keys <= set(r) for r in rows)
    engines = {f for f in ("trt_fp16", "trt_int8") if "sha256" in manifest["artifacts"][f]}  # where TensorRT runs
    assert {r["format"] for r in rows} == ({"pytorch", "fp32", "fp16", "int8", "int8_trt"} | engines
                                          | set(benchmark.openvino_formats()))
    assert {r["batch"] for r in rows} == {1, 4}
    assert all(r["throughput_ips"] > 0 and r["p99_ms"] >= r["p95_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert all(r["accuracy"] is not None and not r["pretrained"] for r in rows)  # recorded, shown as speed only
    md = dest.with_suffix(".md").read_text()
    assert all(line.split(" | ")[3:5] == ["–", "–"] for line in md.splitlines() if line.startswith("| ONNX"))
    assert "INT8 (CPU Q/DQ) ÷ FP32" in md and dest.with_suffix(".png").stat().st_size > 1000
    assert benchmark.main([str(tmp_path / "missing")]) == 2


def test_relative_output_folder(tiny_run, synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = run_export(ExportConfig(run_dir=str(tiny_run), out="rel/out", data_dir=str(synthetic_dir),
                                       formats=["fp32", "int8"], calib_images=16, bentoml=False))
    assert (tmp_path / "rel/out/model.int8.onnx").is_file() and "sha256" in manifest["artifacts"]["int8"]
