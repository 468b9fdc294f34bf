"""The accuracy-bounded INT8 search (export/int8_search.py) and its place in the export."""

import json

import numpy as np
import onnx
import pytest

from export import benchmark, int8_search, quantize
from export.exporter import ExportConfig, run_export, run_split
from export.onnx_export import load_run
from training.data import load_dataset


def test_block_of_groups_nodes_by_numbered_module():
    lite = ["", "backbone", "backbone.net._blocks.3", "backbone.net._blocks.3._bn1", "_native_batch_norm"]
    b0 = ["", "backbone", "backbone.features", "backbone.features.2", "backbone.features.2.0",
          "backbone.features.2.0.block", "backbone.features.2.0.block.1", "conv2d"]
    assert int8_search.block_of(lite, "n") == "backbone.net._blocks.3"
    assert int8_search.block_of(b0, "n") == "backbone.features.2.0"  # the MBConv block, not its stage
    assert int8_search.block_of(["", "backbone", "backbone.net._bn0", "bn"], "n") == "backbone.net._bn0"
    assert int8_search.block_of(["", "head", "linear"], "n") == "head"
    assert int8_search.block_of(["", "upsample_bilinear2d"], "n") == "upsample_bilinear2d"
    assert int8_search.block_of([], "node_7") == "node_7"


def test_compare_counts_flips_both_ways():
    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4)[[0, 1, 2, 0]] * 5  # right, right, right, wrong
    got = np.eye(4)[[0, 2, 2, 3]] * 5  # right, WRONG, right, RIGHT
    s = int8_search.compare(got, ref, labels)
    assert (s["lost"], s["won"]) == (1, 1) and s["drop_pts"] == 0 and s["agreement"] == 0.5
    assert s["se_pts"] == pytest.approx(100 * np.sqrt(2) / 4) and s["kl"] > 0
    assert int8_search.compare(ref, ref, labels)["kl"] == pytest.approx(0, abs=1e-12)


def fake_evaluate(penalty: dict[str, float]):
    """A drop of the sum of the penalties of the blocks left in INT8; agreement falls with it."""
    calls = []

    def evaluate(float_blocks):
        calls.append(float_blocks)
        drop = sum(p for b, p in penalty.items() if b not in float_blocks)
        return {"drop_pts": drop, "se_pts": 0.0, "agreement": 1 - drop / 100, "kl": drop}

    return evaluate, calls


def test_greedy_adds_the_most_sensitive_block_first_then_prunes():
    # the sensitivity ranking is wrong about "a": greedy adds it first, and the pruning pass takes it out again
    penalty = {"a": 0.1, "b": 1.0, "c": 0.3, "d": 0.0}
    sens = {"a": 0.5, "b": 0.4, "c": 0.2, "d": 0.1}
    evaluate, calls = fake_evaluate(penalty)
    chosen, steps = int8_search.choose(["d", "c", "b", "a"], sens, evaluate, bound=0.5, min_agreement=0.9)
    assert [s["action"] for s in steps[:3]] == ["all INT8", "+ a", "+ b"]
    assert chosen == ["b"]
    assert steps[-1]["accepted"] and int8_search.accepted(evaluate(("b",)), 0.5, 0.9)
    assert not int8_search.accepted(evaluate(()), 0.5, 0.9)


def test_greedy_refuses_a_small_drop_with_many_flips():
    evaluate, _ = fake_evaluate({"a": 0.4, "b": 0.1})
    chosen, _ = int8_search.choose(["a", "b"], {"a": 1, "b": 0.5}, evaluate, bound=0.5, min_agreement=0.9)
    assert chosen == []  # drop 0.5 within the bound, agreement 0.995
    chosen, _ = int8_search.choose(["a", "b"], {"a": 1, "b": 0.5}, evaluate, bound=0.5, min_agreement=0.998)
    assert chosen == ["a"]  # the same drop, but the agreement floor needs "a" in float


def outlier_net(path):
    """input → conv "a" → relu → conv "b" → pool → gemm "c". Every output channel of "b" carries one huge
    weight (on an input channel that is always 0): quantizing "b" ruins the output, so it is THE sensitive
    block. (Float "b" still loses a little: ONNX Runtime's WeightBiasQuantization gives a float Conv that
    reads a DequantizeLinear per-tensor INT8 weights when it loads the graph.)"""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    wa = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wa[3] = 0.0
    wb = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    wb[:, 3] = 1000.0
    wc = rng.standard_normal((10, 8)).astype(np.float32) * 3
    bc = np.zeros(10, np.float32)
    inits = [numpy_helper.from_array(w, n) for w, n in ((wa, "wa"), (wb, "wb"), (wc, "wc"), (bc, "bc"))]
    nodes = [helper.make_node("Conv", ["input", "wa"], ["ya"], "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"], "a_relu"),
             helper.make_node("Conv", ["ra", "wb"], ["yb"], "b"),
             helper.make_node("GlobalAveragePool", ["yb"], ["p"], "pool"),
             helper.make_node("Flatten", ["p"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "wc", "bc"], ["logits"], "c", transB=1)]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_search_on_real_quantization_keeps_the_sensitive_block_float(tmp_path):
    fp32 = tmp_path / "model.onnx"
    outlier_net(fp32)
    assert int8_search.blocks(fp32) == {"a": ["a", "a_relu"], "b": ["b"], "pool": ["pool"], "c": ["c"]}
    rng = np.random.default_rng(1)
    calib, val = (rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (64, 200))
    labels = int8_search._logits(fp32, val, 1).argmax(1)  # FP32 is right on every image
    s = int8_search.search(fp32, calib, val, labels, bound=10.0, min_agreement=0.9,
                           calibrations=[("minmax", 64), ("minmax", 32)], work=tmp_path, threads=1)
    all_int8 = s["steps"][0]
    assert not all_int8["accepted"] and all_int8["agreement"] < 0.5
    assert s["blocks"][0]["block"] == "b" and s["steps"][1]["action"] == "+ b"
    assert s["float_blocks"] == ["b"] and s["float_nodes"] == ["b"]
    assert s["val"]["drop_pts"] <= 10.0 and s["val"]["agreement"] >= 0.9
    assert {(c["method"], c["images"], c["per_channel"]) for c in s["calibration"]["candidates"]} == {
        ("minmax", 64, True), ("minmax", 64, False), ("minmax", 32, True)}


def _run_data(run, data_dir):
    """The run's preprocessing and the data its export reads (model.json's dataset) with its split."""
    _, mj, pre, _ = load_run(run)
    data = load_dataset(mj["dataset"], data_dir, download=False)
    return pre, data, *run_split(data, json.loads((run / "metrics.json").read_text()))


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(x).reshape(len(x), -1)}


@pytest.fixture(scope="module")
def searched(tiny_run, synthetic_dir, tmp_path_factory):
    """The tiny run exported with the search forced (strict: every validation image must keep its class), and
    every array the search ran a graph on or calibrated with."""
    seen = {"logits": [], "calib": []}
    real_logits, real_calibrate = int8_search._logits, quantize.calibrate
    mp = pytest.MonkeyPatch()
    mp.setattr(int8_search, "_logits", lambda p, x, *a: seen["logits"].append(x) or real_logits(p, x, *a))
    mp.setattr(quantize, "calibrate", lambda p, x, *a: seen["calib"].append(x) or real_calibrate(p, x, *a))
    out = tmp_path_factory.mktemp("searched")
    cfg = ExportConfig(run_dir=str(tiny_run), out=str(out), data_dir=str(synthetic_dir), formats=["fp32", "int8"],
                       calib_images=64, keep_float=["search"], max_accuracy_drop=0.0, min_agreement=1.0,
                       bentoml=False, threads=2)
    try:
        manifest = run_export(cfg)
    finally:
        mp.undo()
    return cfg, out, manifest, seen


def test_search_result_meets_the_bound_on_validation(searched, tiny_run, synthetic_dir):
    cfg, out, manifest, _ = searched
    s = manifest["int8_search"]
    assert s["val"]["drop_pts"] <= 0 and s["val"]["agreement"] == 1.0
    # measured again here, on the shipped file: the same validation images, the same verdict
    pre, data, _, va, _ = _run_data(tiny_run, synthetic_dir)
    x, y = pre.to_input(data.train_x[va]), data.train_y[va]
    again = int8_search.compare(int8_search._logits(out / "model.int8.onnx", x, 2),
                                int8_search._logits(out / "model.onnx", x, 2), y)
    assert again["agreement"] == 1.0 and again["drop_pts"] <= cfg.max_accuracy_drop
    assert s["val_images"] == len(va) and s["split"]["val_fraction"] == 0.1


def test_manifest_records_the_float_set_and_the_table(searched):
    _, out, manifest, _ = searched
    s, entry = manifest["int8_search"], manifest["artifacts"]["int8"]
    blocks = int8_search.blocks(out / "model.onnx")
    assert {r["block"] for r in s["blocks"]} == set(blocks)
    assert [r["sensitivity"] for r in s["blocks"]] == sorted((r["sensitivity"] for r in s["blocks"]), reverse=True)
    assert s["float_nodes"] == [n for b in s["float_blocks"] for n in blocks[b]]
    assert entry["calibration"]["keep_float_source"] == "search"
    assert entry["calibration"]["float_blocks"] == s["float_blocks"]
    assert entry["calibration"]["keep_float_nodes"] == len(s["float_nodes"])
    assert s["seconds"] > 0 and s["graphs_evaluated"] >= len(blocks) + 2
    assert {(c["method"], c["images"]) for c in s["calibration"]["candidates"]} >= {("minmax", 64), ("entropy", 16)}
    # the float nodes are really float in the shipped graph: no weighted one reads a dequantized input
    model = onnx.load(str(out / "model.int8.onnx"))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name in s["float_nodes"] and node.op_type in quantize.WEIGHTED_OPS:
            assert producer.get(node.input[1]) != "DequantizeLinear"
        elif node.op_type in ("Conv", "Gemm"):
            assert producer.get(node.input[1]) == "DequantizeLinear"
    table = int8_search.sensitivity_table(manifest)
    assert all(f"`{b}`" in table for b in blocks) and table.count("✓") == len(s["float_blocks"])


def test_search_never_sees_test_images(searched, tiny_run, synthetic_dir):
    _, _, _, seen = searched
    pre, data, tr, va, _ = _run_data(tiny_run, synthetic_dir)
    test, val, train = (_rows(pre.to_input(a)) for a in (data.test_x, data.train_x[va], data.train_x[tr]))
    assert seen["logits"] and seen["calib"]
    for x in seen["logits"]:
        assert _rows(x) == val  # every graph is scored on exactly the validation images
    for x in seen["calib"]:
        assert _rows(x) <= train and not _rows(x) & (val | test)


def test_rerun_skips_the_search_and_a_new_bound_redoes_it(searched, capsys):
    cfg, out, manifest, _ = searched
    capsys.readouterr()
    again = run_export(cfg)
    printed = capsys.readouterr().out
    assert "model.int8.onnx: up to date" in printed and "INT8 search" not in printed
    assert again["int8_search"] == manifest["int8_search"]
    cfg.max_accuracy_drop = 100.0
    try:
        looser = run_export(cfg)
    finally:
        cfg.max_accuracy_drop = 0.0
    assert "INT8 search" in capsys.readouterr().out
    assert looser["int8_search"]["bound_pts"] == 100.0
    assert looser["artifacts"]["int8"]["key"] != manifest["artifacts"]["int8"]["key"]


def test_export_benchmark_carries_the_table_and_plot(searched, exported, tmp_path):
    manifest, preset = searched[2], exported[1]
    md = benchmark.write_sensitivity([manifest, preset], tmp_path / "export")
    assert md.count("## INT8 sensitivity") == 1 and int8_search.sensitivity_table(manifest) in md
    png = tmp_path / f"export-int8-{manifest['run']}.png"
    assert png.stat().st_size > 1000 and f"]({png.name})" in md
    assert [p.name for p in tmp_path.iterdir()] == [png.name]  # the preset export has no search to show


def test_random_init_runs_fall_back_to_the_preset(exported):
    _, manifest = exported  # tiny_run: scratch_cnn from random init, default --keep-float auto
    assert "random-init" in manifest["int8_search"]["skipped"]
    assert manifest["artifacts"]["int8"]["calibration"]["keep_float_source"].startswith("preset")
    assert "No INT8 search" in int8_search.sensitivity_table(manifest)
