"""Helpers every stage shares: errors, atomic writes, sha256, device names, versions, and the one
configuration pattern (a dataclass is the source of a stage's options; argparse is generated from it;
a YAML file only sets defaults, as in timm).

Only the standard library is imported at module level: the service bento has neither torch nor
matplotlib, and imports this module too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (names, paths, files, options); the message says what to do.
    CLIs print it as one line and exit 2, never with a traceback."""


# --------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on an
    exception it is removed. Readers see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write bytes or text atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def atomic_write_json(obj: object, path: str | Path) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_torch(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically (checkpoints, feature caches)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (for reports and benchmarks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- files, devices, versions

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_name() -> str:
    """``model name (N cores)`` of this machine's CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def gpu_name(index: int = 0) -> str | None:
    """Name of a GPU through nvidia-ml-py, or None where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else name
    except Exception:
        return None


def device_name(device: str = "cpu") -> str:
    """A readable name for a device string (``cpu``, ``cuda``, ``cuda:1``)."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return gpu_name(index) or device
    return cpu_name()


def versions(*packages: str) -> dict[str, str]:
    """Python's version and those of the installed ``packages`` (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


# --------------------------------------------------------------------------- configuration

def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple[object, bool]:
    """(inner type, optional) of ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _argument_type(parse):
    """``parse`` for argparse: a :class:`UserError` becomes argparse's own "invalid value" message."""
    if parse in (int, float, str):
        return parse

    def convert(text: str):
        try:
            return parse(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    convert.__name__ = getattr(parse, "__qualname__", "value")
    return convert


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = (),
                            skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per dataclass field, typed and defaulted from the field. Help comes
    from ``field(metadata={"help": …})``; ``choices`` and ``metavar`` metadata are passed on too.
    Booleans get ``--x/--no-x``; lists take several values."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _unwrap(hints[f.name])
        kw: dict = {"help": f.metadata.get("help", "")}
        for k in ("choices", "metavar"):
            if k in f.metadata:
                kw[k] = f.metadata[k]
        if "choices" in kw and "metavar" not in kw:  # one short name in the usage line, the choices in the help
            kw["metavar"] = f.name.removesuffix("s").upper()
            kw["help"] = (kw["help"] + "; " if kw["help"] else "") + "one of " + ", ".join(map(str, kw["choices"]))
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        if typing.get_origin(tp) is list:
            kw["nargs"] = "+" if f.name not in positional else "*"
            (item,) = typing.get_args(tp) or (str,)
            kw["type"] = _argument_type(getattr(item, "parse", item))  # e.g. ModelRef.parse: name=tag@backend
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kw["type"] = tp
        default = kw.get("default")
        if tp is not bool and default not in (None, [], ""):
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            kw["help"] = (kw["help"] + " " if kw["help"] else "") + f"(default: {shown})"
        if f.name in positional:  # optional on the command line, so that --config may give it instead
            kw.setdefault("nargs", "?")
            kw.setdefault("default", None)
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def yaml_defaults(path: str | Path, cls, section: str | None = None) -> dict:
    """The options a YAML file sets for ``cls``: the whole mapping, or its ``section`` (one file may hold a
    section per stage: ``train:``, ``export:`` …). Unknown keys are refused with the list of valid ones."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {e}") from e
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of options")
    names = {f.name for f in dataclasses.fields(cls)}
    if section is not None and isinstance(raw.get(section), dict):
        raw = raw[section]
    elif section is not None and raw and not set(raw) & names and all(isinstance(v, dict) for v in raw.values()):
        raw = {}  # a file of other stages' sections
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{path}: unknown options {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return raw


def config_parser(cls, prog: str, description: str | None, positional: tuple[str, ...] = (),
                  skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser generated from ``cls``, with ``--config FILE`` (YAML defaults)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="YAML file whose keys (the options below, with underscores) "
                   "set defaults; options given on the command line win")
    add_dataclass_arguments(p, cls, positional, skip)
    return p


def parse_config(cls, parser: argparse.ArgumentParser, argv: list[str] | None = None,
                 section: str | None = None) -> tuple[object, argparse.Namespace]:
    """Parse ``argv`` into ``cls``: YAML (``--config``) defaults first, from its ``section`` (a parser's own
    ``--section`` option wins), then the command line. Returns the config and the namespace (for options that
    are not fields, such as actions)."""
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        parser.set_defaults(**yaml_defaults(first.config, cls, getattr(first, "section", section)))
    args = parser.parse_args(argv)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if getattr(args, name, None) in (None, [])]
    if missing:
        parser.error(f"missing {', '.join(missing)} (give it on the command line or in --config)")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}), args


def from_mapping(cls, raw: dict, where: str = "config"):
    """``cls(**raw)`` with unknown keys refused by name (for configs nested in other configs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(**raw)


def run_cli(fn, *args) -> int:
    """Run a CLI body and return its exit code: ``fn``'s int result, else 0; a :class:`UserError` is one
    line on stderr and exit 2; Ctrl-C exits 130."""
    try:
        result = fn(*args)
        return result if isinstance(result, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- served models

# A served name, and each of a tag's name and version (BentoML's rule): letters, digits and . _ - inside, at most
# 63 characters; so no path separator or leading dot ever reaches the model store or a file name.
MODEL_NAME = re.compile(r"[a-z0-9]([-._a-z0-9]{0,61}[a-z0-9])?", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A served model: the name clients use (``?model=…``), its BentoML model tag and its backend.
    Written ``{name, tag, backend}`` in YAML and ``name=tag[@backend]`` on a command line."""

    name: str
    tag: str
    backend: str = "onnxruntime"

    @classmethod
    def parse(cls, item: str | dict | ModelRef) -> ModelRef:
        if isinstance(item, ModelRef):
            return item
        if isinstance(item, str):
            name, _, rest = item.partition("=")
            tag, _, backend = rest.partition("@")
            item = {"name": name.strip(), "tag": tag.strip(), "backend": backend.strip() or "onnxruntime"}
        if not isinstance(item, dict) or not item.get("name") or not item.get("tag"):
            raise UserError(f"model entry {item!r} needs a name and a tag ({{name, tag, backend}} in YAML, "
                            "name=tag[@backend] on the command line)")
        unknown = set(item) - {"name", "tag", "backend"}
        if unknown:
            raise UserError(f"model entry {item!r}: unknown keys {', '.join(sorted(unknown))}")
        ref = cls(str(item["name"]), str(item["tag"]), str(item.get("backend") or "onnxruntime"))
        tag_name, colon, version = ref.tag.partition(":")
        for what, value in {"name": ref.name, "tag": tag_name, **({"tag version": version} if colon else {})}.items():
            if not MODEL_NAME.fullmatch(value):
                raise UserError(f"{what} {value[:100]!r} is not valid: letters, digits and . _ - only, "
                                "starting and ending with a letter or digit, at most 63 characters")
        return ref

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cli(cls, fn, argv: list[str] | None, prog: str, description: str | None, positional: tuple[str, ...] = (),
        section: str | None = None) -> int:
    """A whole CLI in one call: the parser generated from ``cls`` (``--config`` YAML defaults, ``section``),
    then ``fn(config)`` under :func:`run_cli`; returns the exit code."""
    cfg, _ = parse_config(cls, config_parser(cls, prog, description, positional), argv, section)
    return run_cli(fn, cfg)
