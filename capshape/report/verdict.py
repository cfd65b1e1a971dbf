"""The verdict: for every objective vs `mean`, each verdict metric's paired difference over seeds with
its interval, as rows of text that the report page and the CLI both render. It reads only the
comparison summary (`comparison`, `verdict_metrics`, `interval`), where the protocol put them."""
from __future__ import annotations

from dataclasses import dataclass


def number(value) -> str:
    """3 significant digits, but whole numbers from 100 up (steps, widths) without an exponent."""
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def signed(value) -> str:
    return "—" if value is None else ("+" if value > 0 else "") + number(value)


@dataclass
class Verdict:
    objectives: list[str]  # the columns: every objective compared with the baseline
    rows: list[tuple[str, str, list[tuple[str, bool]]]]  # (label, what + means, [(cell text, interval excludes 0)])
    seeds: int  # the most pairs behind any figure
    notes: list[str]


def cell(stat: dict | None, seeds: int) -> tuple[str, bool]:
    """`diff [low, high]`, with `(n = k)` where fewer pairs than `seeds` define it."""
    if not stat or stat["diff"] is None:
        return "—", False
    text = signed(stat["diff"])
    if stat["low"] is not None:
        text += f" [{signed(stat['low'])}, {signed(stat['high'])}]"
    if stat["n"] < seeds:
        text += f" (n = {stat['n']})"
    return text, bool(stat["excludes_zero"])


def verdict(summary: dict) -> Verdict | None:
    """None when the summary holds no comparison (a single run, or no `mean` to compare with)."""
    comparison = summary.get("comparison") or {}
    if not comparison:
        return None
    objectives = list(comparison)
    metrics = [m for m in summary["verdict_metrics"]  # a metric undefined everywhere (no composed task) is left out
               if any((comparison[o].get(m) or {}).get("diff") is not None for o in objectives)]
    seeds = max(stat["n"] for o in objectives for stat in comparison[o].values())
    rows = [(summary["verdict_metrics"][m]["label"], summary["verdict_metrics"][m]["positive"],
             [cell(comparison[o].get(m), seeds) for o in objectives]) for m in metrics]
    baseline = summary.get("baseline", "mean")
    notes = [f"Each cell: objective − {baseline}, mean over {seeds} paired seed(s)"
             + (f" [{summary['interval']}]; * marks an interval that excludes 0." if seeds > 1 else ".")]
    if seeds < 2:
        notes.append("One seed: these differences cannot be told apart from seed-to-seed noise. "
                     "Run 3 or more seeds (seeds = [0, 1, 2]) before drawing a conclusion.")
    widths = [(o, comparison[o]["transition_width"]) for o in objectives if "transition_width" in comparison[o]]
    if widths:
        o, width = widths[0]
        notes.append(f"Per-task metrics (width, jump, breakthroughness) average the tasks that reach accuracy 0.1 "
                     f"(chance-corrected) in both runs of a pair: {width['tasks']:.1f} tasks per pair for {o}"
                     + (f"; left out in some pair: {', '.join(width['excluded'])}." if width["excluded"] else "."))
    return Verdict(objectives, rows, seeds, notes)


def verdict_lines(summary: dict) -> list:
    """The verdict for the terminal: a rich table (bold green and * where the interval excludes 0), then
    the notes; nothing when the summary holds no comparison."""
    from rich.table import Table

    found = verdict(summary)
    if found is None:
        return []
    table = Table("metric", "+ means", *found.objectives, title=f"verdict: each objective − {summary.get('baseline', 'mean')}")
    for label, positive, cells in found.rows:
        table.add_row(label, positive, *(f"[bold green]{text} *[/]" if sure else text for text, sure in cells))
    return [table, *found.notes]
