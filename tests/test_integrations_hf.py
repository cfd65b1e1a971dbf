"""The Hugging Face Trainer integration: the same gradient as capshape's own step, per-token groups for
packed sequences, a real `trainer.train()`, and clear errors."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

from capshape.config import build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.integrations.hf import CapshapeTrainer  # noqa: E402
from capshape.models import build_model, cross_entropy_losses  # noqa: E402
from capshape.objectives import build_objective  # noqa: E402
from capshape.tasks import Batch  # noqa: E402
from capshape.tasks.tokenizer import IGNORE, PAD  # noqa: E402
from capshape.train import prepare_data  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


@pytest.fixture
def setup():
    config = build_config({"seeds": [0], "objectives": ["grouped"],
                           "data": {"tasks": ["copy", "add", "sub"], "train_examples": 200, "eval_examples": 16},
                           "model": {"kind": "hf", "max_len": 16, "hf_config": LLAMA},
                           "train": {"steps": 2, "batch_size": 12, "threads": 1}})
    prepared = prepare_data(config, 0)
    torch.manual_seed(0)
    model = build_model(config.model, prepared.suite.input_spec)
    batch = prepared.sampler(config, 0).draw(12, stream=1)
    pad = torch.full((len(batch), 1), PAD)  # one more position, so the last target survives HF's shift
    batch = Batch(torch.cat([batch.inputs, pad], 1), torch.cat([batch.labels, torch.full_like(pad, IGNORE)], 1),
                  batch.task_ids, batch.group_ids)
    return model, batch, len(prepared.group_names)


def hf_labels(batch: Batch) -> torch.Tensor:
    """capshape's labels (labels[t] predicted at t) in the HF convention (labels[t + 1] predicted at t)."""
    return torch.cat([torch.full((len(batch), 1), IGNORE), batch.labels[:, :-1]], 1)


def trainer_for(model, tmp_path, num_groups, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, logging_steps=1, save_strategy="no")
    return CapshapeTrainer(model=model, args=args, num_groups=num_groups, **kwargs)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_the_trainer_loss_has_the_gradient_of_capshapes_own_step(setup, tmp_path):
    model, batch, num_groups = setup
    assert len(set(batch.group_ids.tolist())) == num_groups
    objective = build_objective("grouped", {}, num_groups)
    loss, _ = objective.loss(cross_entropy_losses(model, batch), batch.group_ids)  # capshape's step
    loss.backward()
    ours = gradients(model)
    trainer = trainer_for(model.hf, tmp_path, num_groups)
    hf_loss = trainer.compute_loss(model.hf, {"input_ids": batch.inputs, "labels": hf_labels(batch),
                                              "group_ids": batch.group_ids})
    hf_loss.backward()
    theirs = gradients(model)
    torch.testing.assert_close(hf_loss, loss)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-7, msg=name)


def test_per_token_groups_weigh_every_target_token_by_its_group(setup, tmp_path):
    model, batch, num_groups = setup
    labels = hf_labels(batch)
    token_groups = torch.randint(0, num_groups, labels.shape, generator=torch.Generator().manual_seed(0))
    trainer = trainer_for(model.hf, tmp_path, num_groups)
    trainer.compute_loss(model.hf, {"input_ids": batch.inputs, "labels": labels, "group_ids": token_groups}).backward()
    theirs = gradients(model)
    logits = model.hf(input_ids=batch.inputs).logits[:, :-1]  # L = Σ_g (mean token loss of group g)², directly
    targets = labels[:, 1:] != IGNORE
    token_losses = torch.nn.functional.cross_entropy(logits[targets], labels[:, 1:][targets], reduction="none")
    groups = token_groups[:, 1:][targets]
    sum(token_losses[groups == g].mean() ** 2 for g in range(num_groups) if (groups == g).any()).backward()
    direct = gradients(model)
    for name in direct:
        torch.testing.assert_close(theirs[name], direct[name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_train_runs_a_grouped_loss_on_rows_with_a_group_column(setup, tmp_path):
    model, batch, num_groups = setup
    labels = hf_labels(batch)
    rows = [{"input_ids": batch.inputs[i], "labels": labels[i], "group_ids": batch.group_ids[i]} for i in range(len(batch))]
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    trainer = trainer_for(model.hf, tmp_path, num_groups, train_dataset=rows)
    trainer.train()
    assert trainer.last_weighting is not None and torch.isfinite(trainer.last_weighting.value)
    assert any(not torch.equal(before[n], p) for n, p in model.hf.named_parameters())


def test_clear_errors(setup, tmp_path):
    model, batch, num_groups = setup
    trainer = trainer_for(model.hf, tmp_path, num_groups)
    with pytest.raises(CapshapeError, match="remove_unused_columns=False"):
        trainer.compute_loss(model.hf, {"input_ids": batch.inputs, "labels": hf_labels(batch)})
    with pytest.raises(CapshapeError, match="group_ids: ids must be in 0..2"):
        trainer.compute_loss(model.hf, {"input_ids": batch.inputs, "labels": hf_labels(batch),
                                        "group_ids": batch.group_ids + 5})
    with pytest.raises(CapshapeError, match="capshape's own loop"):
        trainer_for(model.hf, tmp_path, num_groups, objective="gradient_cluster")
