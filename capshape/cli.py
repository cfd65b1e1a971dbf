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


def _run_protocol(name: str, config_path: Path, overrides: list[str], out: Path, runtime) -> None:
    """Load the config against the protocol's schema, run it, write the report, print the headline;
    failures are raised after the report is written."""
    from capshape.experiments import build_report, get_protocol, raise_failures, run_protocol

    protocol = get_protocol(name)
    summary = run_protocol(protocol, load_config(config_path, overrides, schema=protocol.schema), out, runtime)
    report = build_report(out)
    raise_failures(summary)
    for line in protocol.headline(summary):
        console.print(line)
    console.print(f"report: {report}\nsummary: {out / 'summary.json'}")


def _runtime(resume: bool, device: str, executor: str, ray_address: Optional[str], retries: int,
             workers: Optional[int], log: Optional[List[str]] = None):
    from capshape.experiments import Runtime

    _stream_to(log or [])
    return Runtime(device=device, executor=executor, address=ray_address, retries=retries, resume=resume,
                   workers=workers)


def _stream_to(trackers: List[str]) -> None:
    """--log: checked now, then handed to every run (worker processes inherit the environment)."""
    import os

    from capshape.train.tracking import ENVIRONMENT, check_trackers

    os.environ[ENVIRONMENT] = ",".join(check_trackers(trackers))


# The runtime options, the same on every protocol command (and the demo).
RESUME = typer.Option(False, help="Keep finished work in --out and compute only the rest.")
DEVICE = typer.Option("auto", help=DEVICE_HELP)
EXECUTOR = typer.Option("local", help=EXECUTOR_HELP)
RAY_ADDRESS = typer.Option(None, help="Ray cluster to join, e.g. auto or ray://head:10001.")
RETRIES = typer.Option(1, min=0, help="Times a failed cell is retried (resuming its checkpoint) before it is reported.")
WORKERS = typer.Option(None, min=1, help="Cells trained at once (default: the config's workers).")
SET = typer.Option(None, "--set", help="Override a field, e.g. --set train.steps=500.")
LOG = typer.Option(None, "--log", help="Also stream every run's metrics to tensorboard, wandb (offline) or mlflow "
                   "(a local store in the run directory); repeatable. The run store stays the source of truth.")


def _protocol_command(name: str, help_text: str, aliases: tuple[str, ...] = ()) -> None:
    """`capshape NAME CONFIG`: one command per registered protocol, with the same options."""

    def command(
        config: Path = typer.Argument(..., help=f"TOML config file, e.g. configs/{name}.toml."),
        set_: Optional[List[str]] = SET,
        out: Path = typer.Option(Path(f"runs/{name}"), "--out", help="Output directory."),
        resume: bool = RESUME, device: str = DEVICE, executor: str = EXECUTOR, ray_address: Optional[str] = RAY_ADDRESS,
        retries: int = RETRIES, workers: Optional[int] = WORKERS, log: Optional[List[str]] = LOG,
    ):
        _run_protocol(name, config, set_ or [], out, _runtime(resume, device, executor, ray_address, retries, workers, log))

    app.command(name, help=help_text)(user_errors(command))
    for alias in aliases:  # a former name, kept working but out of --help
        app.command(alias, help=help_text, hidden=True)(user_errors(command))


def _register_protocols() -> None:
    from capshape.experiments.registry import PROTOCOLS, help_line

    for name in PROTOCOLS:
        _protocol_command(name, help_line(name), ("run",) if name == "compare" else ())


_register_protocols()


@app.command()
@user_errors
def demo(
    steps: Optional[int] = typer.Option(None, help="Training steps per run (default: the demo config's)."),
    suite: str = typer.Option("text", help="text (character tasks, Zipfian mixture) or sparse_parity (Michaud et al. 2023)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    resume: bool = RESUME, device: str = DEVICE, executor: str = EXECUTOR, ray_address: Optional[str] = RAY_ADDRESS,
    retries: int = RETRIES, workers: Optional[int] = WORKERS, log: Optional[List[str]] = LOG,
):
    """`compare` on the demo config: mean vs stratified, grouped, group_dro and doremi over 3 seeds."""
    if suite not in DEMO_CONFIGS:
        raise CapshapeError(f"--suite {suite!r} has no demo: use one of {', '.join(DEMO_CONFIGS)}.")
    overrides = [] if steps is None else [f"train.steps={steps}"]
    _run_protocol("compare", DEMO_CONFIGS[suite], overrides, out,
                  _runtime(resume, device, executor, ray_address, retries, workers, log))


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
    log: Optional[List[str]] = LOG,
):
    """One run, data-parallel over the processes torchrun starts:
    torchrun --nproc_per_node 2 -m capshape train-ddp CONFIG --objective grouped --out DIR.
    train.batch_size is the global batch, split across ranks; the result equals a single-process run."""
    import torch.distributed as dist

    from capshape import collectives
    from capshape.train import RunSpec, TrainRuntime, check_config, train_run
    from capshape.train.parallel import init_distributed
    from capshape.train.preflight import preflight

    spec = RunSpec.of(load_config(config, set_ or []), objective, seed)
    check_config(spec.config)
    _stream_to(log or [])
    if resume and not (out / "config.json").exists():
        raise CapshapeError(f"--resume: {out} holds no run to resume: drop --resume to start one there.")
    device = init_distributed(device)
    preflight(spec.config, device)
    ranks = collectives.world_size()
    try:
        summary = train_run(spec, out, TrainRuntime(device=device, resume=resume))
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
    from capshape.experiments import build_report

    options = build_config({}, set_ or [], schema=DiscoveryOptions)
    record = discover_groups(run_dir, out, options, step, per_task, min_task_accuracy, seed)
    report_path = build_report(out)
    console.print(f"step {record['step']}: k = {record['k']} (true {record['true_k']}), ARI {record['ari']:.3f}, "
                  f"NMI {record['nmi']:.3f}, purity {record['purity']:.3f} on {record['kept']} examples")
    console.print(f"report: {report_path}\ngroups: {Path(out) / 'groups.json'}")


@app.command()
@user_errors
def report(path: Path = typer.Argument(..., help="A run, protocol or groups directory.")):
    """(Re)build report.html from the stored results of a run, protocol or groups directory."""
    from capshape.experiments import build_report

    console.print(f"report: {build_report(path)}")


tokenizer_app = typer.Typer(no_args_is_help=True, help="Tokenizers for the corpus suite.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    files: List[Path] = typer.Argument(..., help="Local JSONL, Parquet or CSV files of documents."),
    out: Path = typer.Option(..., "--out", help="Directory to save the tokenizer in (save_pretrained)."),
    vocab_size: int = typer.Option(512, "--vocab-size", min=258, help="Vocabulary size (256 bytes + 2 specials + merges)."),
    text_field: str = typer.Option("text", "--text-field", help="The column holding a document's text."),
    group_field: str = typer.Option("group", "--group-field", help="The column holding a document's group."),
):
    """Train a byte-level BPE tokenizer on FILES, for data.suite_params.tokenizer of the corpus suite."""
    from capshape.tasks.corpus import train_tokenizer

    console.print(f"tokenizer: {train_tokenizer(files, out, vocab_size, text_field, group_field)}")


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


def _fields_table(title: str, components: dict) -> Table:
    """Each component's parameter fields (a pydantic Params class): name, default, description."""
    from rich.markup import escape

    table = Table("name", "parameter", "default", "description", title=escape(title))
    for name, params in components.items():
        fields = params.model_fields
        if not fields:
            table.add_row(name, "—", "", "no parameters")
        for index, (field, info) in enumerate(fields.items()):
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            table.add_row(name if index == 0 else "", field, escape(default), escape(info.description or ""))
    return table


@app.command()
@user_errors
def objectives():
    """List the objectives with their parameters ([objective.<name>] in a config)."""
    from capshape.objectives import OBJECTIVES

    console.print(_fields_table("objectives: [objective.<name>] fields", {name: OBJECTIVES.get(name).Params
                                                                             for name in OBJECTIVES}))


@app.command()
@user_errors
def suites():
    """List the data suites with their parameters (data.suite_params in a config)."""
    from capshape.tasks.suites import SUITES

    console.print(_fields_table("suites: data.suite_params fields", {name: SUITES.get(name).Params for name in SUITES}))


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
