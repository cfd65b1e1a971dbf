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
if not console.is_terminal:  # a log file: room for the verdict table instead of 80 columns
    console = Console(width=160)
DEMO_CONFIGS = {"text": Path(__file__).parent / "configs" / "demo.toml",
                "sparse_parity": Path(__file__).parent / "configs" / "demo_sparse_parity.toml"}


def user_errors(command):
    """Turn CapshapeError into a one-line message and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CapshapeError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2)
        except OSError as error:  # the filesystem refused (full disk, permissions, read-only): name the file
            where = f" {error.filename}" if error.filename else ""
            typer.echo(f"error: cannot read or write{where}: {error.strerror or error}; check the path and "
                       f"free space, then rerun (with --resume to keep finished work).", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished runs and checkpoints are kept; rerun with --resume to continue.", err=True)
            raise typer.Exit(130)

    return wrapper


DEVICE_HELP = "auto (CUDA if available), cpu or cuda; bf16 autocast with --set train.precision=bf16."
EXECUTOR_HELP = "local (a pool of `workers` processes) or ray (Ray tasks; a local Ray unless --ray-address)."


def _run_and_report(config_path: Path, overrides: list[str], out: Path, resume: bool, device: str = "cpu",
                    executor: str = "local", address: Optional[str] = None, retries: int = 1) -> None:
    from capshape.experiments import raise_failures, run_comparison
    from capshape.report import build_report

    config = load_config(config_path, overrides)
    summary = run_comparison(config, out, resume=resume, device=device, executor=executor, address=address,
                             retries=retries)
    if not summary["objectives"]:  # nothing to report: the cause is the answer
        raise_failures(summary)
    report = build_report(out)
    raise_failures(summary)
    for objective, stats in summary["objectives"].items():
        console.print(f"{objective:>18}: mean accuracy {stats['mean_accuracy']['mean']:.3f}, "
                      f"mean held-out loss {stats['mean_eval_loss']['mean']:.3f} ({len(stats['seeds'])} seeds)")
    print_verdict(summary)
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


def print_verdict(summary: dict) -> None:
    """The verdict table of the report, in the terminal: the answer is the last thing printed."""
    from capshape.report.verdict import verdict

    found = verdict(summary)
    if found is None:
        return
    table = Table("metric", "+ means", *found.objectives, title=f"verdict: each objective − {summary.get('baseline', 'mean')}")
    for label, positive, cells in found.rows:
        table.add_row(label, positive, *(f"[bold green]{text} *[/]" if sure else text for text, sure in cells))
    console.print(table)
    for note in found.notes:
        console.print(note)


@app.command()
@user_errors
def run(
    config: Path = typer.Argument(..., help="TOML config file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set train.steps=500."),
    out: Path = typer.Option(Path("runs/run"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Continue unfinished runs in --out from their checkpoints."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    executor: str = typer.Option("local", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. auto or ray://head:10001."),
    retries: int = typer.Option(1, min=0, help="Times a failed run is retried (resuming its checkpoint) before it is reported."),
):
    """Train every objective x seed in CONFIG and write a comparison report."""
    _run_and_report(config, set_ or [], out, resume, device, executor, ray_address, retries)


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
    from capshape.experiments import raise_failures
    from capshape.experiments.transfer import TransferConfig, run_transfer
    from capshape.report import build_report

    overrides = (set_ or []) + ([] if workers is None else [f"workers={workers}"])
    summary = run_transfer(load_config(config, overrides, schema=TransferConfig), out, resume=resume)
    report = build_report(out)
    raise_failures(summary)
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
        console.print(f"{regime:>14}: target acc entering phase 2 {stats['phase2_start_accuracy']['mean']:.3f}, "
                      f"phase-2 AUC {stats['auc']['mean']:.3f}"
                      + ("" if saved is None else f", steps saved vs never trained {saved:+.0f}")
                      + (" (overhang)" if stats["overhang"] else ""))
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def distill(
    config: Path = typer.Argument(..., help="TOML config file with a distill section, e.g. configs/distill_digits.toml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set distill.rounds=1."),
    out: Path = typer.Option(Path("runs/distill"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Reuse finished runs in --out and compute only the rest."),
):
    """Self-distillation vs planted backdoors: plant, distil on clean data, measure ASR, DER and relearning."""
    from capshape.experiments.distill import DistillConfig, run_distill
    from capshape.report import build_report

    summary = run_distill(load_config(config, set_ or [], schema=DistillConfig), out, resume=resume, log=console.print)
    report = build_report(out)
    value = lambda stat, fmt: "—" if stat["mean"] is None else format(stat["mean"], fmt)
    for trigger, methods in summary["table"].items():
        for method, stats in methods.items():
            console.print(f"{trigger:>6} {method:>15}: clean acc {value(stats['clean_accuracy'], '.3f')}, "
                          f"ASR {value(stats['asr'], '.3f')}, DER {value(stats['der'], '.3f')}, "
                          f"relearn steps {value(stats['relearn_steps'], '.0f')}")
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def unlearn(
    config: Path = typer.Argument(..., help="TOML config file with an unlearn section, e.g. configs/unlearn.toml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set unlearn.era.neurons=32."),
    out: Path = typer.Option(Path("runs/unlearn"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Reuse finished stages in --out and compute only the rest."),
):
    """Expand-Route-Ablate vs plain, data filtering, gradient ascent and RMU, with relearning attacks."""
    from capshape.experiments.unlearn import UnlearnConfig, run_unlearn
    from capshape.report import build_report

    summary = run_unlearn(load_config(config, set_ or [], schema=UnlearnConfig), out, resume=resume)
    report = build_report(out)
    for method, stats in summary["methods"].items():
        final, tax = stats["stages"]["final"], stats["alignment_tax"]["vs_plain"]
        console.print(f"{method:>16}: forget loss {final['forget']['loss']:.3f} acc {final['forget']['accuracy']:.3f}, "
                      f"retain loss {final['retain']['loss']:.3f} acc {final['retain']['accuracy']:.3f}"
                      + (f", retain loss vs plain {tax:+.3f}" if tax is not None and method != "plain" else ""))
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


@app.command()
@user_errors
def demo(
    steps: Optional[int] = typer.Option(None, help="Training steps per run (default: the demo config's)."),
    suite: str = typer.Option("text", help="text (character tasks, Zipfian mixture) or sparse_parity (Michaud et al. 2023)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted demo."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    executor: str = typer.Option("local", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. auto or ray://head:10001."),
):
    """mean vs stratified, grouped, group_dro and doremi over 3 seeds; writes report.html and summary.json."""
    if suite not in DEMO_CONFIGS:
        raise CapshapeError(f"--suite {suite!r} has no demo: use one of {', '.join(DEMO_CONFIGS)}.")
    overrides = [] if steps is None else [f"train.steps={steps}"]
    _run_and_report(DEMO_CONFIGS[suite], overrides, out, resume, device, executor, ray_address)


@app.command("train-ddp")
@user_errors
def train_ddp(
    config: Path = typer.Argument(..., help="TOML config file."),
    objective: str = typer.Option(..., help="The objective to train, e.g. grouped."),
    seed: int = typer.Option(0, help="The run's seed."),
    out: Path = typer.Option(..., "--out", help="The run directory (written by rank 0 only)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field, e.g. --set train.steps=500."),
    device: str = typer.Option("auto", help="auto, cpu (gloo) or cuda (NCCL, one GPU per rank)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
):
    """One run, data-parallel over the processes torchrun starts:
    torchrun --nproc_per_node 2 -m capshape train-ddp CONFIG --objective grouped --out DIR.
    train.batch_size is the global batch, split across ranks; the result equals a single-process run."""
    import torch.distributed as dist

    from capshape import collectives
    from capshape.train import check_config, train_run
    from capshape.train.loop import single_run_config
    from capshape.train.parallel import init_distributed
    from capshape.train.preflight import preflight

    run_config = single_run_config(load_config(config, set_ or []), objective, seed)
    check_config(run_config)
    if resume and not (out / "config.json").exists():
        raise CapshapeError(f"--resume: {out} holds no run to resume: drop --resume to start one there.")
    device = init_distributed(device)
    preflight(run_config, device)
    ranks = collectives.world_size()
    try:
        summary = train_run(run_config, objective, seed, out, resume=resume, device=device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary:  # rank 0's
        console.print(f"{objective}: mean accuracy {summary['mean_accuracy']:.3f}, mean held-out loss "
                      f"{summary['mean_eval_loss']:.3f} ({ranks} ranks)\nrun: {out}")


@app.command()
@user_errors
def groups(
    run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo/mean-seed0."),
    out: Path = typer.Option(..., "--out", help="Output directory for groups.json, similarity.npy and report.html."),
    step: Optional[int] = typer.Option(None, help="Use the snapshot at this step (train.snapshot_every); default: the final model."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="A discovery option, e.g. --set similarity=cosine "
                                             "(fields of capshape.grads.discovery.DiscoveryOptions)."),
    per_task: int = typer.Option(64, help="Held-out examples per task."),
    min_task_accuracy: float = typer.Option(0.0, help="Leave out tasks whose held-out accuracy is below this."),
    seed: int = typer.Option(0, help="Seed of the clustering (and sketch)."),
):
    """Find capability groups offline from a stored model's per-example gradients; compare them with the true tasks."""
    from capshape.config import build_config
    from capshape.experiments.groups import discover_groups
    from capshape.grads.discovery import DiscoveryOptions
    from capshape.report import build_report

    options = build_config({}, set_ or [], schema=DiscoveryOptions)
    record = discover_groups(run_dir, out, options, step, per_task, min_task_accuracy, seed)
    report_path = build_report(out)
    console.print(f"step {record['step']}: k = {record['k']} (true {record['true_k']}), ARI {record['ari']:.3f}, "
                  f"NMI {record['nmi']:.3f}, purity {record['purity']:.3f} on {record['kept']} examples")
    console.print(f"report: {report_path}\ngroups: {Path(out) / 'groups.json'}")


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
        name = str(status_file.parent.relative_to(root))
        try:
            status = RunDir(status_file.parent).live_status()
            if not isinstance(status, dict) or "status" not in status:
                raise CapshapeError(f"{status_file} holds no status")
        except CapshapeError as error:  # one damaged entry is named, not fatal to the listing
            table.add_row(name, "unreadable", "", "", "", str(error))
            continue
        table.add_row(name, str(status["status"]), str(status.get("objective", "")), str(status.get("seed", "")),
                      str(status.get("step", "")), str(status.get("error", "")))
    console.print(table)


def main() -> None:  # pragma: no cover
    sys.exit(app())
