"""The robustness benchmark (benchmarks/robustness.py): its files are what they claim, it measures through the
service's own decoding, ``--split val`` is training's validation split, and the target marks follow the numbers."""

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image, JpegImagePlugin

from benchmarks import robustness as rb
from service import preprocessing as sp
from service.preprocessing import METADATA_KEY, Preprocessing
from training.data import load_cifar, stratified_split
from utils import UserError, sha256_file

PRE = Preprocessing(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(f"c{i}" for i in range(10)))
LUMA_DC = 16  # first entry of the standard (IJG) luminance quantization table


def images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (blurred noise), closer to photos than white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC)) for a in small])


def ijg_dc(quality: int) -> int:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return int(min(255, max(1, (LUMA_DC * scale + 50) // 100)))


@pytest.mark.parametrize("name", list(rb.VARIANTS))
def test_variants_decode_to_what_they_claim(name):
    v = rb.VARIANTS[name]
    a = images(1)[0]
    im = Image.open(io.BytesIO(rb.make_variant(a, name)))
    assert (im.format, im.size, im.mode) == (v.fmt, (v.size, v.size), v.mode)
    if v.fmt == "JPEG":
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0, Pillow's default
        assert im.quantization[0][0] == ijg_dc(v.quality)  # the quality it claims
    if v.mode == "RGBA":
        assert set(np.unique(np.asarray(im)[..., 3])) == {rb.RGBA_ALPHA}
    if name == "png32":
        np.testing.assert_array_equal(np.asarray(im), a)
    if v.size > 32 and v.fmt == "PNG":  # a bicubic upscale of the image itself
        expected = Image.fromarray(a).resize((v.size, v.size), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(np.asarray(im), np.asarray(expected))


def test_jpeg_quality_orders_size_and_error():
    a = images(4)
    errors = [np.abs(rb.served_images(a, f"jpeg32_q{q}", 32).astype(int) - a).mean() for q in (95, 75, 50)]
    assert errors[0] < errors[1] < errors[2]


def test_png32_round_trip_is_exactly_the_model_input_of_the_raw_array():
    a, labels = images(7), np.arange(7) % 10
    seen = []

    def predict(x):
        seen.append(x)
        return np.eye(10, dtype=np.float32)[labels[sum(len(s) for s in seen[:-1]):][:len(x)]]

    acc = rb.variant_accuracy(predict, PRE, a, labels, ["png32"], batch_size=3)
    assert [len(x) for x in seen] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(seen), PRE.to_input(a))
    assert acc == {"png32": 1.0}


def test_measurement_calls_the_service_functions(monkeypatch):
    calls = {"open_image": [], "load_rgb": 0, "fit_image": []}
    open_image, load_rgb, fit_image = sp.open_image, sp.load_rgb, sp.fit_image

    def spy_open(data, max_megapixels=40.0):
        im = open_image(data, max_megapixels)
        calls["open_image"].append((im.format, im.size))
        return im

    def spy_load(im):
        calls["load_rgb"] += 1
        return load_rgb(im)

    def spy_fit(im, size):
        calls["fit_image"].append(size)
        return fit_image(im, size)

    monkeypatch.setattr(sp, "open_image", spy_open)
    monkeypatch.setattr(sp, "load_rgb", spy_load)
    monkeypatch.setattr(sp, "fit_image", spy_fit)
    a = images(3)
    got = rb.served_images(a, "jpeg256_q90", PRE.image_size)
    assert calls == {"open_image": [("JPEG", (256, 256))] * 3, "load_rgb": 3, "fit_image": [32] * 3}
    for img, out in zip(a, got, strict=True):
        np.testing.assert_array_equal(out, fit_image(sp.decode_image(rb.make_variant(img, "jpeg256_q90")), 32))


def test_rgba_and_grayscale_take_the_service_conversions():
    a = images(2)
    rgba = rb.served_images(a, "rgba_png32", 32).astype(float)
    on_white = (a.astype(int) * rb.RGBA_ALPHA + 255 * (255 - rb.RGBA_ALPHA)) / 255  # composited on white
    assert np.abs(rgba - on_white).max() <= 1
    gray = rb.served_images(a, "gray_png32", 32)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(gray[..., 0], np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in a]))


# --------------------------------------------------------------------------- a tiny export, end to end


@pytest.fixture
def fake_export(tmp_path, synthetic_dir):
    """An export folder (fp32 and int8: the same tiny ONNX graph, mean colour → logits) whose source run
    records a validation split of 20% with seed 3."""
    run_dir, art = tmp_path / "runs" / "fake", tmp_path / "artifacts" / "fake"
    run_dir.mkdir(parents=True)
    art.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"config": {
        "model": "scratch_cnn", "dataset": "cifar10", "data_dir": "elsewhere", "val_fraction": 0.2, "seed": 3,
        "no_longer_an_option": 1}}))
    w = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["logits"])], "fake",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(proto, {METADATA_KEY: PRE.to_json()})
    entries = {}
    for fmt, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        onnx.save(proto, str(art / file))
        entries[fmt] = {"file": file, "format": "onnx", "precision": fmt, "sha256": sha256_file(art / file)}
    (art / "manifest.json").write_text(json.dumps({"run": "fake", "backbone": "fake", "dataset": "synthetic-cifar10",
                                                   "source_run": str(run_dir), "artifacts": entries}))
    return art, run_dir


def test_val_split_is_trainings_and_never_the_test_set(fake_export, synthetic_dir):
    art, run_dir = fake_export
    manifest = json.loads((art / "manifest.json").read_text())
    data = load_cifar(synthetic_dir, download=False)
    _, va = stratified_split(data.train_y, 0.2, 3)
    val = rb.split_data(manifest, "val", synthetic_dir)
    np.testing.assert_array_equal(val["images"], data.train_x[va])
    np.testing.assert_array_equal(val["labels"], data.train_y[va])
    assert val["total"] == len(va) == 100
    test_rows = {x.tobytes() for x in data.test_x}
    assert not any(x.tobytes() in test_rows for x in val["images"])
    np.testing.assert_array_equal(rb.split_data(manifest, "val", synthetic_dir, limit=5)["images"],
                                  data.train_x[va][:5])
    np.testing.assert_array_equal(rb.split_data(manifest, "test", synthetic_dir)["images"], data.test_x)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "num_val": 99}))  # trained on other data
    with pytest.raises(UserError, match="99"):
        rb.split_data(manifest, "val", synthetic_dir)


def test_cli_measures_val_images_writes_and_merges(fake_export, synthetic_dir, tmp_path, monkeypatch, capsys):
    art, _ = fake_export
    out = tmp_path / "rob" / "robustness"
    out.parent.mkdir()
    old = [{"run": "other", "format": "fp32", "split": "val", "variant": v, "variant_label": v, "accuracy": 0.5,
            "n": 3, "split_size": 3, "delta_vs_png32": 0.0, "data_source": "x", "device": "cpu", "command": "old"}
           for v in ("png32", "jpeg32_q75")]
    stale = {**old[0], "run": "fake", "accuracy": 0.123}
    out.with_suffix(".json").write_text(json.dumps([*old, stale]))
    measured = []
    served = rb.served_images
    monkeypatch.setattr(rb, "served_images", lambda x, v, s: measured.append(x.copy()) or served(x, v, s))
    argv = [str(art), "--split", "val", "--limit", "6", "--data-dir", str(synthetic_dir), "--out", str(out)]
    assert rb.main(argv) == 0
    data = load_cifar(synthetic_dir, download=False)
    _, va = stratified_split(data.train_y, 0.2, 3)
    assert len(measured) == len(rb.VARIANTS)  # decoded once, shared by fp32 and int8
    for x in measured:
        np.testing.assert_array_equal(x, data.train_x[va][:6])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r for r in rows if r["run"] == "other"] == old
    mine = [r for r in rows if r["run"] == "fake"]
    assert len(mine) == 2 * len(rb.VARIANTS) and 0.123 not in [r["accuracy"] for r in mine]
    assert {(r["format"], r["split"], r["n"], r["split_size"]) for r in mine} == {("fp32", "val", 6, 100),
                                                                                  ("int8", "val", 6, 100)}
    for r in mine:
        ref = next(x for x in mine if x["format"] == r["format"] and x["variant"] == "png32")
        assert r["delta_vs_png32"] == pytest.approx(r["accuracy"] - ref["accuracy"])
    md = out.with_suffix(".md").read_text()
    assert "## Split: val" in md and "6 of 100" in md and "--split val --formats fp32 int8 --limit 6" in md
    assert md.count("pts: **") == 2 + 2 + 1  # fake FP32 and INT8 two targets each; other FP32 has jpeg32_q75 only
    assert out.with_suffix(".png").stat().st_size > 0
    assert rb.main([*argv, "--formats", "fp32", "--no-keep-others"]) == 0  # afresh: only what it measured
    assert {(r["run"], r["format"]) for r in json.loads(out.with_suffix(".json").read_text())} == {("fake", "fp32")}
    assert rb.main([str(art), "--formats", "fp16", "--limit", "2", "--data-dir", str(synthetic_dir),
                    "--out", str(out)]) == 2
    assert "none of the formats fp16" in capsys.readouterr().err


def rows_for(accs: dict[tuple[str, str], dict[str, float]]) -> list[dict]:
    rows = []
    for (run, fmt), by_variant in accs.items():
        for v, acc in by_variant.items():
            rows.append({"run": run, "format": fmt, "split": "test", "variant": v, "accuracy": acc, "n": 1000,
                         "split_size": 1000, "delta_vs_png32": acc - by_variant["png32"], "data_source": "d",
                         "device": "cpu", "command": "cmd", "pillow": "x"})
    return rows


def test_target_marks_are_computed_from_the_numbers():
    rows = rows_for({("a", "fp32"): {"png32": 0.900, "jpeg32_q75": 0.886, "jpeg256_q90": 0.884},
                     ("a", "int8"): {"png32": 0.800, "jpeg32_q75": 0.810, "jpeg256_q90": 0.785}})
    status = {(t["format"], t["variant"]): (round(t["delta_points"], 6), t["met"]) for t in rb.target_status(rows)}
    assert status == {("fp32", "jpeg32_q75"): (-1.4, True), ("fp32", "jpeg256_q90"): (-1.6, False),
                      ("int8", "jpeg32_q75"): (1.0, True), ("int8", "jpeg256_q90"): (-1.5, True)}
    md = rb.to_markdown(rows)
    assert "- a FP32: JPEG q75 32 px -1.40 pts: **met**; JPEG q90 256 px (bicubic up) -1.60 pts: **not met**" in md
    assert "- a INT8: JPEG q75 32 px +1.00 pts: **met**; JPEG q90 256 px (bicubic up) -1.50 pts: **met**" in md
    flipped = rows_for({("a", "fp32"): {"png32": 0.900, "jpeg32_q75": 0.880, "jpeg256_q90": 0.890}})
    assert [t["met"] for t in rb.target_status(flipped)] == [False, True]
