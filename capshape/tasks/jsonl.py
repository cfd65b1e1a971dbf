"""User tasks from a JSONL file: one object per line, `{"prompt": str, "target": str, "group": str}`.

Each distinct group becomes one task named `<file stem>/<group>`; every line is validated and a bad
line is reported by number and field.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from capshape.errors import CapshapeError
from capshape.tasks.base import FixedTask
from capshape.tasks.tokenizer import TOKENIZER

FIELDS = ("prompt", "target", "group")
MAX_LINE = 100_000  # characters: far above any model.max_len, far below what would exhaust memory


def load_jsonl_tasks(path: Path) -> list[FixedTask]:
    path = Path(path)
    if not path.is_file():
        raise CapshapeError(f"data.jsonl: file {str(path)!r} does not exist: check the path.")
    examples: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        if len(line) > MAX_LINE:
            raise CapshapeError(f"{where} is {len(line):,} characters long (limit {MAX_LINE:,}): an example's prompt and "
                                f"target must fit model.max_len tokens; shorten it.")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CapshapeError(f"{where}: not valid JSON ({error.msg}): write one JSON object per line.") from None
        if not isinstance(record, dict):
            raise CapshapeError(f"{where}: expected an object with fields {FIELDS}.")
        extra = set(record) - set(FIELDS)
        if extra:
            raise CapshapeError(f"{where}: unknown field {sorted(extra)[0]!r}: allowed fields are {FIELDS}.")
        for field in FIELDS:
            value = record.get(field)
            if not isinstance(value, str) or not value:
                raise CapshapeError(f"{where}: field {field!r} must be a non-empty string.")
        try:
            TOKENIZER.encode(record["prompt"] + record["target"])
        except CapshapeError as error:
            raise CapshapeError(f"{where}: {error}") from None
        examples[record["group"]].append((record["prompt"], record["target"]))
    if not examples:
        raise CapshapeError(f"data.jsonl: {path.name} holds no examples.")
    return [
        FixedTask(name=f"{path.stem}/{group}", group=group, tag="", sample_input=None, solve=None,
                  description=f"{len(pairs)} examples from {path.name}", examples=tuple(pairs))
        for group, pairs in sorted(examples.items())
    ]
