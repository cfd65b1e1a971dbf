"""What every protocol's output directory shares: it is resumed only with the config it was started
with, and failed runs or cells are reported (after the report is written), never dropped."""
from __future__ import annotations

from pathlib import Path

from capshape.errors import CapshapeError
from capshape.runstore import read_json

MAY_CHANGE = ("workers", "train.threads")  # how the work is spread, not what is computed


def flatten(raw: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in raw.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def check_resumable(out: Path, config: dict, resume: bool, what: str) -> None:
    """`out` holds no `what` yet, or `resume` is set and its stored config.json equals `config`
    (apart from MAY_CHANGE); otherwise a one-line error naming the first differing field."""
    stored = Path(out) / "config.json"
    if not stored.exists():
        return
    if not resume:
        raise CapshapeError(f"{out} already holds {what}: pass --resume or choose another --out.")
    old, new = flatten(read_json(stored)), flatten(config)
    changed = next((f for f in new if f not in MAY_CHANGE and old.get(f) != new[f]), None)
    if changed:
        raise CapshapeError(f"{out} holds {what} with {changed}={old.get(changed)!r} but this config has "
                            f"{new[changed]!r}: resume with the same config or choose another --out.")


def raise_failures(summary: dict) -> None:
    """`summary["failed"]` ({run or cell: error}) non-empty is an error for the caller."""
    failures = summary["failed"]
    if failures:
        name, error = next(iter(failures.items()))
        raise CapshapeError(f"{len(failures)} run(s) failed; first: {name}: {error} "
                            f"(finished runs are kept; fix and rerun with --resume).")
