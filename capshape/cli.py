"""The `capshape` command line: parse, load the config, call one function."""
from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from capshape.config import load_config
from capshape.errors import CapshapeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Shape and measure how capabilities emerge during training.")
console = Console()
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"


def user_errors(command):
    """Turn CapshapeError into a one-line message and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CapshapeError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished runs and checkpoints are kept; rerun with --resume to continue.", err=True)
            raise typer.Exit(130)

    return wrapper


def _run_and_report(config_path: Path, overrides: list[str], out: Path, resume: bool) -> None:
    from capshape.experiments import raise_failures, run_comparison
    from capshape.report import build_report

    config = load_config(config_path, overrides)
    summary = run_comparison(config, out, resume=resume)
    report = build_report(out)
    raise_failures(summary)
    for objective, stats in summary["objectives"].items():
        tax = stats["alignment_tax"]["mean"]
        console.print(f"{objective:>12}: mean accuracy {stats['mean_accuracy']['mean']:.3f}, "
                      f"mean held-out loss {stats['mean_eval_loss']['mean']:.3f}"
                      + (f", alignment tax {tax:+.3f}" if tax is not None else ""))
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def run(
    config: Path = typer.Argument(..., help="TOML config file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set train.steps=500."),
    out: Path = typer.Option(Path("runs/run"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Continue unfinished runs in --out from their checkpoints."),
):
    """Train every objective x seed in CONFIG and write a comparison report."""
    _run_and_report(config, set_ or [], out, resume)


@app.command()
@user_errors
def transfer(
    config: Path = typer.Argument(..., help="TOML config file with a transfer section, e.g. configs/transfer.toml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set transfer.n_b=20."),
    out: Path = typer.Option(Path("runs/transfer"), "--out", help="Output directory."),
    workers: Optional[int] = typer.Option(None, min=1, help="Parallel processes (default: the config's workers)."),
    resume: bool = typer.Option(False, help="Keep finished cells in --out and compute only the rest."),
):
    """Transfer matrix: fine-tune on A then B for every task pair, vs B alone; writes report.html and summary.json."""
    from capshape.experiments.transfer import TransferConfig, raise_transfer_failures, run_transfer
    from capshape.report import build_report

    overrides = (set_ or []) + ([] if workers is None else [f"workers={workers}"])
    summary = run_transfer(load_config(config, overrides, schema=TransferConfig), out, resume=resume)
    report = build_report(out)
    raise_transfer_failures(summary)
    for metric, stats in summary["metrics"].items():
        ranked = stats["ranked"]
        if ranked:
            best, worst = ranked[0], ranked[-1]
            console.print(f"{metric:>9} transfer ({stats['unit']}): most {best['a']}→{best['b']} {best['mean']:+.3g}, "
                          f"least {worst['a']}→{worst['b']} {worst['mean']:+.3g}")
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def overhang(
    config: Path = typer.Argument(..., help="TOML config file with an overhang section, e.g. configs/overhang.toml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set overhang.target=sub."),
    out: Path = typer.Option(Path("runs/overhang"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Reuse finished runs in --out and compute only the rest."),
):
    """Capability overhang: train under several regimes, fine-tune on natural data, time the target's return."""
    from capshape.experiments import raise_failures
    from capshape.experiments.overhang import OverhangConfig, run_overhang
    from capshape.report import build_report

    summary = run_overhang(load_config(config, set_ or [], schema=OverhangConfig), out, resume=resume)
    report = build_report(out)
    raise_failures(summary)
    for regime, stats in summary["regimes"].items():
        saved = stats["steps_saved_vs_never_trained"]["mean"]
        console.print(f"{regime:>14}: target acc after phase 1 {stats['phase1_target_accuracy']['mean']:.3f}, "
                      f"phase-2 AUC {stats['auc']['mean']:.3f}"
                      + ("" if saved is None else f", steps saved vs never trained {saved:+.0f}")
                      + (" (overhang)" if stats["overhang"] else ""))
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def demo(
    steps: Optional[int] = typer.Option(None, help="Training steps per run (default: the demo config's)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted demo."),
):
    """mean vs grouped vs group_dro on the built-in suite; writes report.html and summary.json."""
    overrides = [] if steps is None else [f"train.steps={steps}"]
    _run_and_report(DEMO_CONFIG, overrides, out, resume)


@app.command()
@user_errors
def report(path: Path = typer.Argument(..., help="A run or comparison directory.")):
    """(Re)build report.html from the stored results of a run or comparison."""
    from capshape.report import build_report

    console.print(f"report: {build_report(path)}")


@app.command()
@user_errors
def tasks():
    """List the built-in tasks with their group and an example."""
    from capshape.tasks import TASKS

    table = Table("task", "group", "example prompt", "target", "description")
    for name in TASKS:
        task = TASKS.get(name)
        prompt, target = task.example(random.Random(0))
        table.add_row(name, task.group, prompt, target, task.description)
    console.print(table)


@app.command()
@user_errors
def runs(root: Path = typer.Argument(Path("runs"), help="Directory holding run directories.")):
    """List run directories under ROOT with their status."""
    from capshape.runstore import RunDir

    if not root.is_dir():
        raise CapshapeError(f"{root} is not a directory: pass the folder that holds your runs.")
    table = Table("run", "status", "objective", "seed", "step", "error")
    for status_file in sorted(root.rglob("status.json")):
        status = RunDir(status_file.parent).status()
        table.add_row(str(status_file.parent.relative_to(root)), status["status"], str(status.get("objective", "")),
                      str(status.get("seed", "")), str(status.get("step", "")), status.get("error", ""))
    console.print(table)


def main() -> None:  # pragma: no cover
    sys.exit(app())
