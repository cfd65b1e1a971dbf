"""What every protocol shares after its runs: failed runs or cells are reported (after the report is
written), never dropped. The output directory's lock and resume contract are runstore.output_directory."""
from __future__ import annotations

from capshape.errors import CapshapeError


def raise_failures(summary: dict) -> None:
    """`summary["failed"]` ({run or cell: error}) non-empty is an error for the caller."""
    failures = summary["failed"]
    if failures:
        name, error = next(iter(failures.items()))
        more = f"; {len(failures) - 1} more failed (their status.json holds each cause)" if len(failures) > 1 else ""
        raise CapshapeError(f"{name} failed: {error.rstrip('.')}{more}. Finished runs are kept: fix the cause, then rerun "
                            f"with --resume.")
