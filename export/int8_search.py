"""Accuracy-bounded INT8 (``python -m export RUN --max-accuracy-drop 0.5``): which blocks stay in float.

Everything is measured on the run's validation split, never on the test set; calibration images come
from the training split. Per candidate graph: Q/DQ with cached tensor ranges (no re-calibration), then
its logits on the validation images against the FP32 graph's.

1. Calibration: one pass of ONNX Runtime's calibrator per method gives the ranges of every candidate
   (method × number of images: the ranges after the first N images are saved on the way).
2. The calibration whose all-INT8 graph is closest to FP32 is kept (the least logit noise: mean
   ‖INT8 − FP32 logits‖² / mean ‖FP32 logits‖²), but only if it beats the first candidate (the
   ``--calib-method``/``--calib-images`` default) by 10%: closer than that is noise, and the default
   stays. Per-tensor weights are tried with the first candidate.
3. Sensitivity: each block (a torch module: an EfficientNet block, a ResNet bottleneck, the stem, the
   classifier) alone in float; how much that lowers the logit noise. It ranks finer than accuracy, of
   which one validation image is a whole step, and unlike KL divergence it cannot prefer a graph whose
   logits have collapsed to uniform over one that is right but sometimes confidently wrong.
4. Greedy: the most sensitive blocks go to float until the graph is accepted; then each float block goes
   back to INT8 if the graph stays accepted (the fewest float blocks: the fastest graph).

Accepted: validation accuracy drop ≤ the bound AND top-1 agreement with FP32 ≥ ``min_agreement``. One
validation image is 0.25 points of a 407-image split, and INT8 flips images both ways: a graph that flips
5% of them can show no drop by luck, so the agreement floor refuses it. The paired standard error of the
drop, √(images only FP32 gets right + images only INT8 gets right) / N, is recorded with every figure.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from export import quantize

VERSION = 3  # of the search: part of the export's up-to-date key
MIN_VAL_IMAGES = 100  # below this a validation drop says little about a 0.5-point bound
CALIBRATION_MARGIN = 0.9  # another calibration replaces the default only with 10% less logit noise
SHAPE_OPS = {"Shape", "Concat", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Transpose", "Identity",
             "Constant", "Slice", "Cast"}
FUSED_ACTIVATIONS = {"Relu", "Clip"}  # Q/DQ folds them into their producer: never split them from it
RULE = "val accuracy drop ≤ bound and val top-1 agreement with FP32 ≥ min_agreement"


def block_of(scopes: list[str], name: str) -> str:
    """The block of a node from its torch name scopes (``['', module, …, aten op]``): the first numbered
    module (``…_blocks.3``, ``…layer1.0``, descending through directly nested numbers such as
    ``features.2.0``), else its innermost module, else its op."""
    modules = [s for s in scopes[:-1] if s]
    for i, s in enumerate(modules):
        if re.search(r"\.\d+$", s):
            for deeper in modules[i + 1:]:
                if not re.fullmatch(re.escape(s) + r"\.\d+", deeper):
                    break
                s = deeper
            return s
    return modules[-1] if modules else (scopes[-1] if scopes else name)


def blocks(model_path: Path) -> dict[str, list[str]]:
    """Block name → node names (graph order). ReLU/Clip join their producer's block; blocks of shape ops
    only (nothing to quantize) are left out."""
    model = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    where: dict[str, str] = {}
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if node.op_type in FUSED_ACTIVATIONS and src is not None and src.name in where:
            b = where[src.name]
        else:
            b = block_of(quantize._scopes(node), node.name)
        where[node.name] = b
        out.setdefault(b, []).append(node)
    return {b: [n.name for n in nodes] for b, nodes in out.items() if any(n.op_type not in SHAPE_OPS for n in nodes)}


def compare(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    """A candidate's logits against FP32's on the same labelled images (drops in points)."""
    pred, ref_pred = logits.argmax(1), ref.argmax(1)
    n = len(labels)
    lost = int(((ref_pred == labels) & (pred != labels)).sum())
    won = int(((ref_pred != labels) & (pred == labels)).sum())

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    p, q = log_softmax(ref.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return {"accuracy": float((pred == labels).mean()), "drop_pts": 100 * (lost - won) / n,
            "se_pts": float(100 * np.sqrt(lost + won) / n), "lost": lost, "won": won,
            "agreement": float((pred == ref_pred).mean()),
            "kl": float((np.exp(p) * (p - q)).sum(1).mean()),
            "noise": float(((logits - ref) ** 2).sum(1).mean() / max((ref.astype(np.float64) ** 2).sum(1).mean(),
                                                                     1e-30))}


def accepted(s: dict, bound: float, min_agreement: float) -> bool:
    return bool(s["drop_pts"] <= bound + 1e-9 and s["agreement"] >= min_agreement - 1e-9)


def choose(names: list[str], sensitivity: dict[str, float], evaluate: Callable[[tuple[str, ...]], dict],
           bound: float, min_agreement: float) -> tuple[list[str], list[dict]]:
    """Greedy float set: add blocks, most sensitive first, until ``evaluate(float blocks)`` is accepted; then
    drop each (least sensitive first) that is not needed. Returns the set and every step evaluated."""
    steps: list[dict] = []

    def step(chosen: list[str], action: str) -> bool:
        s = evaluate(tuple(sorted(chosen)))
        ok = accepted(s, bound, min_agreement)
        steps.append({"action": action, "float_blocks": list(chosen), **s, "accepted": ok})
        return ok

    chosen: list[str] = []
    ok = step(chosen, "all INT8")
    for b in sorted(names, key=lambda b: -sensitivity[b]):
        if ok:
            break
        chosen.append(b)
        ok = step(chosen, f"+ {b}")
    for b in sorted(chosen[:-1], key=lambda b: sensitivity[b]):  # without the last one it was refused
        trial = [c for c in chosen if c != b]
        if step(trial, f"- {b}"):
            chosen = trial
    return chosen, steps


def _logits(path: Path, x: np.ndarray, threads: int | None, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    from export.exporter import batched

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return batched(lambda b: sess.run(None, {name: b})[0], x, batch)


def search(fp32_path: Path, calib_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, bound: float,
           min_agreement: float, calibrations: list[tuple[str, int]], work: Path, threads: int | None = None) -> dict:
    """The float set of the fastest INT8 graph within ``bound`` points of FP32 on (``val_x``, ``val_y``).
    ``calibrations``: (method, images) candidates, the first one the default; their caches are written
    to ``work`` (the chosen one's path is returned as ``cache``, for the final quantization)."""
    t0 = time.perf_counter()
    groups = blocks(fp32_path)
    ref = _logits(fp32_path, val_x, threads)
    caches: dict[tuple[str, int], Path] = {}
    for method in dict.fromkeys(m for m, _ in calibrations):
        counts = [n for m, n in calibrations if m == method]
        print(f"int8 search: {method} calibration on {max(counts)} training images")
        for n, path in quantize.calibrate(fp32_path, calib_x, method, counts, work).items():
            caches[method, n] = path
    calib_seconds = time.perf_counter() - t0
    memo: dict[tuple, dict] = {}

    def evaluate(cal: tuple[str, int, bool], float_blocks: tuple[str, ...]) -> dict:
        if (cal, float_blocks) not in memo:
            method, n, per_channel = cal
            path = work / "candidate.onnx"
            nodes = [x for b in float_blocks for x in groups[b]]
            quantize.quantize_int8(fp32_path, path, None, "cpu", method, nodes, "input",
                                   caches[method, min(n, len(calib_x))], per_channel)
            memo[cal, float_blocks] = compare(_logits(path, val_x, threads), ref, val_y)
        return memo[cal, float_blocks]

    cands = [(m, min(n, len(calib_x)), True) for m, n in dict.fromkeys(calibrations)]
    cands.insert(1, (*cands[0][:2], False))
    cal_rows = [{"method": m, "images": n, "per_channel": pc, **evaluate((m, n, pc), ())} for m, n, pc in cands]
    best = min(range(len(cands)), key=lambda i: cal_rows[i]["noise"])
    cal = cands[best] if cal_rows[best]["noise"] < CALIBRATION_MARGIN * cal_rows[0]["noise"] else cands[0]
    print(f"int8 search: calibration {cal[0]} on {cal[1]} images ({'per-channel' if cal[2] else 'per-tensor'}); "
          f"ablating {len(groups)} blocks on {len(val_y)} validation images")
    base = evaluate(cal, ())
    sens, rows = {}, []
    for b, nodes in groups.items():
        s = evaluate(cal, (b,))
        sens[b] = base["noise"] - s["noise"]
        rows.append({"block": b, "nodes": len(nodes), **s, "sensitivity": sens[b]})
    rows.sort(key=lambda r: -r["sensitivity"])
    chosen, steps = choose(list(groups), sens, lambda fb: evaluate(cal, fb), bound, min_agreement)
    final = evaluate(cal, tuple(sorted(chosen)))
    if len(chosen) == len(groups):
        print("WARNING: int8 search: no INT8 graph is within the bound; every block stays in float", file=sys.stderr)
    print(f"int8 search: {len(chosen)} of {len(groups)} blocks in float, val drop {final['drop_pts']:+.2f} pts "
          f"(± {final['se_pts']:.2f}), agreement {final['agreement']:.4f}, {time.perf_counter() - t0:.0f} s")
    return {"bound_pts": bound, "min_agreement": min_agreement, "rule": RULE, "val_images": int(len(val_y)),
            "fp32_val_accuracy": float((ref.argmax(1) == val_y).mean()),
            "calibration": {"method": cal[0], "images": cal[1], "per_channel": cal[2], "candidates": cal_rows},
            "cache": str(caches[cal[0], cal[1]]),
            "blocks": rows, "steps": steps, "float_blocks": chosen,
            "float_nodes": [x for b in chosen for x in groups[b]], "val": final,
            "graphs_evaluated": len(memo), "calibration_seconds": round(calib_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- report

def sensitivity_table(manifest: dict) -> str:
    """The search of an export manifest as markdown: its outcome and the per-block sensitivity table."""
    s = manifest.get("int8_search") or {}
    if "blocks" not in s:
        return f"No INT8 search for {manifest.get('run', '?')}" + (f": {s['skipped']}" if s.get("skipped") else "")
    cal, v = s["calibration"], s["val"]
    lines = [f"INT8 search for {manifest.get('run', '?')}: bound {s['bound_pts']:g} pts and agreement ≥ "
             f"{s['min_agreement']:g} on {s['val_images']} "
             f"validation images (FP32 {100 * s['fp32_val_accuracy']:.2f}%); calibration {cal['method']} on "
             f"{cal['images']} training images, {'per-channel' if cal['per_channel'] else 'per-tensor'} weights; "
             f"{len(s['float_blocks'])} of {len(s['blocks'])} blocks in float ({len(s['float_nodes'])} nodes): val "
             f"drop {v['drop_pts']:+.2f} ± {v['se_pts']:.2f} pts, agreement {v['agreement']:.4f}; "
             f"{s['graphs_evaluated']} graphs in {s['seconds']:.0f} s.", "",
             "| block | nodes | val drop alone in float (pts) | agreement | logit noise | KL | sensitivity | float |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    chosen = set(s["float_blocks"])
    for r in s["blocks"]:
        mark = "✓" if r["block"] in chosen else ""
        lines.append(f"| `{r['block']}` | {r['nodes']} | {r['drop_pts']:+.2f} | {r['agreement']:.4f} | "
                     f"{r['noise']:.4f} | {r['kl']:.4f} | {r['sensitivity']:+.4f} | {mark} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(manifest: dict, path: str | Path) -> None:
    """A bar per block: its sensitivity (logit noise saved when alone in float), float blocks highlighted."""
    from utils import pyplot, save_figure

    s = manifest["int8_search"]
    rows = s["blocks"][::-1]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    chosen = set(s["float_blocks"])
    ax.barh([r["block"] for r in rows], [r["sensitivity"] for r in rows],
            color=["tab:red" if r["block"] in chosen else "tab:blue" for r in rows])
    ax.set_xlabel("logit noise (‖INT8 − FP32‖² / ‖FP32‖²) saved on validation when the block alone stays float")
    ax.set_title(f"{manifest.get('run', '')}: INT8 sensitivity (red: kept in float, bound {s['bound_pts']:g} pts)",
                 fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, path)
