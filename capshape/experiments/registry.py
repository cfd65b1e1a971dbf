"""The protocol registry: one line per protocol, naming the module that defines its `PROTOCOL`
(a kit.Protocol). The CLI builds one command per entry and `build_report` picks the page by the
`kind` in summary.json, both from here. Modules are imported when used, so that `capshape --help`
does not wait for torch; the help line is the first line of the module's docstring.

Adding a protocol: its module (config section, `run`, `headline`, a report page) and one line below.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from capshape.errors import CapshapeError
from capshape.experiments.kit import Protocol
from capshape.report import write_report
from capshape.runstore import read_json

PROTOCOLS = {
    "compare": "capshape.experiments.compare",
    "transfer": "capshape.experiments.transfer",
    "overhang": "capshape.experiments.overhang",
    "distill": "capshape.experiments.distill",
    "unlearn": "capshape.experiments.unlearn",
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise CapshapeError(f"Unknown protocol '{name}': use one of {', '.join(PROTOCOLS)}.")
    return importlib.import_module(PROTOCOLS[name]).PROTOCOL


def help_line(name: str) -> str:
    """The first line of the protocol module's docstring, without importing the module."""
    source = Path(importlib.util.find_spec(PROTOCOLS[name]).origin).read_text(encoding="utf-8")
    first = " ".join((ast.get_docstring(ast.parse(source)) or name).split("\n\n")[0].split()).split(": ", 1)[-1]
    return first[:1].upper() + first[1:]


def build_report(path: Path) -> Path:
    """report.html (and plots/) for any directory capshape wrote: a protocol's by its summary's `kind`
    (a comparison written before summaries had one is a `compare`), else a run or a groups directory."""
    path = Path(path)
    summary = read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    kind = summary.get("kind") or ("compare" if "objectives" in summary else None)
    if kind not in PROTOCOLS:
        return write_report(path)
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    return write_report(path, get_protocol(kind).page(summary, config, path))
