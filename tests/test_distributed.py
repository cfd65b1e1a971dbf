"""Data parallelism: two CPU processes (gloo) reproduce the single-process run on the same global batch."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capshape import collectives
from capshape.config import build_config
from capshape.models import build_model
from capshape.objectives import build_objective
from capshape.runstore import RunDir
from capshape.train import RunSpec, prepare_data, read_tensors, train_run

OBJECTIVES = ["mean", "grouped", "group_dro", "gradient_cluster", "svd_grouped"]
REGROUP = {"regroup_every": 3, "n_examples": 11, "feature_dim": 16}
CLUSTER = {**REGROUP, "num_groups": 2, "neighbours": 4}


def _config():
    """An odd global batch (9 rows: ranks hold 5 and 4) and an odd regrouping draw (11 examples)."""
    return build_config({
        "seeds": [0], "objectives": OBJECTIVES, "objective": {"gradient_cluster": CLUSTER, "svd_grouped": REGROUP},
        "data": {"tasks": ["copy", "add"], "train_examples": 200, "eval_examples": 16},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_mlp": 32, "max_len": 16},
        "train": {"steps": 6, "batch_size": 9, "eval_every": 1, "checkpoint_every": 3, "warmup_steps": 2,
                  "threads": 1, "lr": 3e-3},
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, config, root) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for objective in OBJECTIVES:  # ranks > 0 get their own --out, which they must never write
            train_run(RunSpec.of(config, objective, 0), root / (f"ddp-{objective}" if rank == 0 else f"rank{rank}-{objective}"))
        # A regrouping on its own: each rank sketches its share of the draw; all must fit the same groups.
        prepared = prepare_data(config, 0)
        torch.manual_seed(0)
        model = build_model(config.model, prepared.suite.input_spec)
        objective = build_objective("gradient_cluster", CLUSTER, len(prepared.group_names))
        record = objective.observe(0, model, prepared.sampler(config, 0))
        torch.save({"members": objective.members, "member_groups": objective.member_groups, "record": record, "world": collectives.world_size()},
                   root / f"regroup-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, config, root, timeout: float = 120, target=_rank) -> None:
    """`world` gloo ranks of `target`, forked: they inherit this process's imports (torch, capshape and
    torch._dynamo, which DDP loads), which spawned processes would each repeat for seconds."""
    import torch._dynamo  # noqa: F401

    context = mp.start_processes(target, args=(world, _free_port(), config, root), nprocs=world, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish within {timeout} s")


def _rows(run):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in RunDir(run).read_metrics()]


def _assert_rows_close(ddp, single):
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for a, b in zip(ddp, single):
        for part in ("train", "eval"):
            flat_a = torch.tensor(_numbers(a.get(part, {})), dtype=torch.float64)
            flat_b = torch.tensor(_numbers(b.get(part, {})), dtype=torch.float64)
            torch.testing.assert_close(flat_a, flat_b, rtol=1e-4, atol=1e-5)


def _numbers(tree):
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _numbers(tree[key])]
    return [float(tree)]


def test_ddp_on_two_processes_equals_the_single_process_run(tmp_path):
    config = _config()
    _run_ranks(2, config, tmp_path)
    for objective in OBJECTIVES:
        single = tmp_path / f"single-{objective}"
        train_run(RunSpec.of(config, objective, 0), single)
        ddp = tmp_path / f"ddp-{objective}"
        assert RunDir(ddp).status()["status"] == "finished"
        assert not (tmp_path / f"rank1-{objective}").exists(), "only rank 0 writes"
        # per-step training loss, objective value and gradient norm, and every held-out metric
        _assert_rows_close(_rows(ddp), _rows(single))
        a, _ = read_tensors(ddp / "model.safetensors")
        b, _ = read_tensors(single / "model.safetensors")
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{objective}: {name}")
    ddp_records = RunDir(tmp_path / "ddp-gradient_cluster").read_records("objective_records.jsonl")
    single_records = RunDir(tmp_path / "single-gradient_cluster").read_records("objective_records.jsonl")
    assert [(r["step"], r["k"], r["sizes"]) for r in ddp_records] == [(r["step"], r["k"], r["sizes"]) for r in single_records]
    ranks = [torch.load(tmp_path / f"regroup-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for key in ("members", "member_groups"):  # identical groups
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    assert ranks[0]["record"] == ranks[1]["record"]


def _corpus_rank(rank: int, world: int, port: int, config, root) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_run(RunSpec.of(config, "grouped", 0), root / ("ddp" if rank == 0 else f"rank{rank}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("packing", ["group", "mixed"])
def test_ddp_with_accumulation_on_a_corpus_and_a_hf_llama_equals_one_process(tmp_path, packing):
    """The scale path: packed documents, a Hugging Face Llama, grouped loss over document groups (per row, or
    per token in rows packed across groups); two ranks each accumulating two micro-batches of their share
    reproduce the single-process run."""
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from test_corpus import config_for, corpus, rows

    from capshape.tasks.corpus import train_tokenizer
    path = corpus(tmp_path, rows())
    base = config_for(tmp_path, [path], train_tokenizer([path], tmp_path / "tok", vocab_size=300), packing=packing)
    config = base.model_copy(update={"train": base.train.model_copy(update={"steps": 4, "batch_size": 9, "eval_every": 2})})
    accumulating = config.model_copy(update={"train": config.train.model_copy(update={"accumulation_steps": 2})})
    _run_ranks(2, accumulating, tmp_path, target=_corpus_rank)
    train_run(RunSpec.of(config, "grouped", 0), tmp_path / "single")
    assert not (tmp_path / "rank1").exists()
    _assert_rows_close(_rows(tmp_path / "ddp"), _rows(tmp_path / "single"))
    a, _ = read_tensors(tmp_path / "ddp" / "model.safetensors")
    b, _ = read_tensors(tmp_path / "single" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_collectives_are_the_identity_in_one_process():
    x = torch.arange(5.0)
    assert collectives.world_size() == 1 and collectives.is_main()
    assert collectives.global_sum(x) is x and collectives.shard(x) is x
    assert collectives.gather_rows(x, 5) is x and float(collectives.global_mean(x)) == 2.0


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow  # three Python processes start up: about 30 s on a busy 2-core machine
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_torchrun_train_ddp_writes_one_run_equal_to_a_single_process(tmp_path):
    """The documented launch path: torchrun -m capshape train-ddp, 2 gloo ranks, against one process."""
    config = tmp_path / "tiny.toml"
    config.write_text('[data]\ntasks = ["copy", "add"]\ntrain_examples = 200\neval_examples = 16\n'
                      '[model]\nn_layer = 1\nn_head = 2\nd_model = 16\nd_mlp = 32\nmax_len = 16\n'
                      '[train]\nsteps = 4\nbatch_size = 8\neval_every = 2\ncheckpoint_every = 2\nwarmup_steps = 1\nthreads = 1\n')
    args = ["-m", "capshape", "train-ddp", str(config), "--objective", "grouped", "--device", "cpu"]
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 ranks" in done.stdout
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")], check=True, capture_output=True, timeout=120)
    _assert_rows_close(_rows(tmp_path / "ddp"), _rows(tmp_path / "single"))
    a, _ = read_tensors(tmp_path / "ddp" / "model.safetensors")
    b, _ = read_tensors(tmp_path / "single" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
