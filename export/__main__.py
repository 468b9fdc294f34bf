"""``python -m export RUN_DIR [--out artifacts/NAME]``: export a trained run for deployment."""

from __future__ import annotations

import sys

from export.exporter import ExportConfig, run_export
from export.onnx_export import ExportError
from service.runtime import ArtifactError
from utils import UserError, config_parser, parse_config, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(ExportConfig, "python -m export", __doc__, positional=("run_dir",))
    cfg, _ = parse_config(ExportConfig, parser, argv, section="export")

    def body() -> int:
        try:
            run_export(cfg)
        except ArtifactError as e:
            raise UserError(str(e)) from e
        except ExportError as e:
            print(f"export failed: {e}", file=sys.stderr)
            return 1
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
