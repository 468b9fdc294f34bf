"""``python -m export RUN_DIR [--out artifacts/NAME]``: export a trained run for deployment."""

from __future__ import annotations

import argparse
import sys

from export.exporter import ARTIFACTS, ExportConfig, run_export
from export.onnx_export import ExportError
from export.quantize import CALIBRATION_METHODS
from service.runtime import ArtifactError
from training.errors import UserError


def main(argv: list[str] | None = None) -> int:
    d = ExportConfig(run_dir="")
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("run_dir", help="a finished run folder (model.json + best.pt)")
    p.add_argument("--out", dest="out_dir", default=None, help="output folder (default: artifacts/<run name>)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run trained on)")
    p.add_argument("--formats", nargs="+", default=d.formats, choices=list(ARTIFACTS))
    p.add_argument("--opset", type=int, default=d.opset)
    p.add_argument("--calib-images", type=int, default=d.calib_images)
    p.add_argument("--calib-method", default=d.calib_method, choices=CALIBRATION_METHODS)
    p.add_argument("--keep-float", nargs="*", default=d.keep_float, metavar="PATTERN",
                   help="regexes of nodes (name or torch module scope) kept in float in INT8; 'preset' (the "
                        "default) adds the backbone's known-sensitive nodes (EfficientNet stem, early blocks, SE, "
                        "classifier); 'none' quantizes everything")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--min-batch", type=int, default=d.min_batch)
    p.add_argument("--opt-batch", type=int, default=d.opt_batch)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--workspace-mb", type=int, default=d.workspace_mb)
    p.add_argument("--no-bentoml", dest="bentoml", action="store_false", help="do not save to the BentoML store")
    p.add_argument("--force", action="store_true", help="re-export even artifacts that are up to date")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        run_export(ExportConfig(**vars(args)))
    except (UserError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
