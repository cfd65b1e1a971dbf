"""Real text: the `corpus` suite (`data.suite = "corpus"`), documents with a group label from local files,
a Hugging Face tokenizer from a local directory, packed into fixed-length sequences.

    [data.suite_params]
    files = ["corpus.jsonl"]        # local JSONL / Parquet / CSV, read with datasets.load_dataset
    tokenizer = "tokenizer/"        # a save_pretrained directory (or `capshape tokenizer train`)
    text_field = "text"
    group_field = "group"
    held_out = 0.1                  # share of each group's documents held out, by document
    groups = []                     # the groups trained on ([]: every group); eval_only: evaluated only

Each group is one task (its name), so every objective, the per-group evaluation and the verdict work
unchanged: the held-out loss per group is the continuous metric (perplexity = exp(loss), in the run's
suite metrics); exact match of a whole packed sequence is not meaningful and stays near zero. Probe sets
(`probes`) add the discontinuous metric: prompt → target pairs, evaluated only, exact match of every
target token (teacher-forced argmax, which equals greedy decoding whenever the whole target is right).
Documents are tokenized, followed by the tokenizer's EOS, and packed by `pack_documents` into rows of
model.max_len inputs whose labels are the next tokens. By default (`packing = "group"`) a row holds one
group's documents and is one unit of the objectives; with `packing = "mixed"` the trained groups' documents
are packed together, a row may hold several groups, and every target token is a unit in the group of the
document it belongs to (per-token group ids, as the Hugging Face integration also takes them); the
held-out sets stay one group's documents per row. Nothing is downloaded: files and tokenizer are local,
loaded with local_files_only.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from capshape.errors import CapshapeError
from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData, task_seed
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams
from capshape.tasks.tokenizer import IGNORE

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class CorpusParams(SuiteParams):
    files: list[Path] = Field(min_length=1, description="Local JSONL, Parquet or CSV files of documents.")
    tokenizer: Path = Field(description="A local Hugging Face tokenizer directory (save_pretrained).")
    text_field: str = Field("text", description="The column holding a document's text.")
    group_field: str = Field("group", description="The column holding a document's group (its capability label).")
    held_out: float = Field(0.1, gt=0, lt=1, description="Share of each group's documents held out (at least one).")
    groups: list[str] = Field([], description="Groups trained on, in this order ([]: every group of the files).")
    eval_only: list[str] = Field([], description="Groups evaluated on their held-out documents but never trained on.")
    packing: Literal["group", "mixed"] = Field("group", description="group: a packed row holds one group's documents "
                                              "(the objectives weigh rows); mixed: the groups' documents are packed "
                                              "together and every target token is a unit in its document's group.")
    probes: list[Path] = Field([], description="Local JSONL files of {prompt, target, group} probes: evaluated only, "
                               "one task '<group>/probe' per group, scored by exact match of the target's tokens.")


def load_documents(files: list[Path], text_field: str = "text", group_field: str = "group") -> list[tuple[str, str]]:
    """(text, group) of every document of the files, in file order."""
    for path in files:
        if not Path(path).is_file():
            raise CapshapeError(f"data.suite_params.files: {str(path)!r} does not exist: point it at a local file.")
        if Path(path).suffix not in BUILDERS:
            raise CapshapeError(f"data.suite_params.files: {Path(path).name!r} is not {', '.join(BUILDERS)}: convert it.")
    try:
        import datasets
    except ImportError:
        raise CapshapeError("data.suite = 'corpus' needs the datasets library: pip install 'capshape[hf]'.") from None
    datasets.disable_progress_bar()
    documents = []
    for path in files:
        table = datasets.load_dataset(BUILDERS[Path(path).suffix], data_files=str(path), split="train")
        missing = [f for f in (text_field, group_field) if f not in table.column_names]
        if missing:
            raise CapshapeError(f"data.suite_params: {Path(path).name} has no column {missing[0]!r} (it has "
                                f"{table.column_names}): set text_field / group_field.")
        documents += [(str(text), str(group)) for text, group in zip(table[text_field], table[group_field]) if text]
    if not documents:
        raise CapshapeError("data.suite_params.files hold no documents with text.")
    return documents


def load_tokenizer(path: Path):
    if not Path(path).is_dir():
        raise CapshapeError(f"data.suite_params.tokenizer: {str(path)!r} is not a directory: point it at a local "
                            f"save_pretrained tokenizer, or make one with `capshape tokenizer train`.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise CapshapeError(f"data.suite_params.tokenizer: {Path(path).name} has no EOS token, which separates packed "
                            f"documents: give it one (eos_token).")
    return tokenizer


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 512, text_field: str = "text",
                    group_field: str = "group") -> Path:
    """A byte-level BPE tokenizer (the `tokenizers` library) trained on the documents' text, with <pad> and
    <eos> specials, saved with save_pretrained to `out` (what data.suite_params.tokenizer takes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for text, _ in load_documents(files, text_field, group_field)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>").save_pretrained(str(out))
    return Path(out)


def pack_documents(documents: list[list[int]], groups: list[int], length: int, pad: int):
    """Documents (token ids, each ending with EOS) concatenated and cut into rows of `length`: inputs
    [N, length], labels [N, length] (the next token; IGNORE past the stream's end) and per-token group ids
    [N, length] (the group of the document the predicted token belongs to, so a row may hold several groups)."""
    stream = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    owner = torch.tensor([g for doc, g in zip(documents, groups) for _ in doc], dtype=torch.long)
    rows = max(1, -(-(len(stream) - 1) // length))
    inputs = torch.full((rows * length,), pad, dtype=torch.long)
    labels = torch.full((rows * length,), IGNORE, dtype=torch.long)
    token_groups = torch.full((rows * length,), -1, dtype=torch.long)
    inputs[:len(stream) - 1], labels[:len(stream) - 1], token_groups[:len(stream) - 1] = stream[:-1], stream[1:], owner[1:]
    shape = (rows, length)
    return inputs.view(shape), labels.view(shape), token_groups.view(shape)


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, else its EOS (padding never carries a label)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_probes(path: Path, tokenizer, max_len: int) -> dict[str, Split]:
    """One Split per group of a {prompt, target, group} JSONL file: labels only on the target tokens."""
    if not Path(path).is_file():
        raise CapshapeError(f"data.suite_params.probes: {str(path)!r} does not exist: point it at a local JSONL file.")
    pairs: dict[str, list[tuple[list[int], list[int]]]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, target, group = (str(record[k]) for k in ("prompt", "target", "group"))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CapshapeError(f"data.suite_params.probes: {Path(path).name} line {number} is not a JSON object with "
                                f"prompt, target and group.") from None
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids, target_ids = ids(prompt), ids(target)
        if not prompt_ids or not target_ids or len(prompt_ids) + len(target_ids) > max_len + 1:
            raise CapshapeError(f"data.suite_params.probes: {Path(path).name} line {number} needs "
                                f"{len(prompt_ids) + len(target_ids)} tokens, more than model.max_len + 1 = {max_len + 1} "
                                f"(or has an empty prompt or target): shorten it or raise model.max_len.")
        pairs.setdefault(group, []).append((prompt_ids, target_ids))
    return {group: prompt_split(rows, tokenizer, max_len) for group, rows in sorted(pairs.items())}


def prompt_split(pairs: list[tuple[list[int], list[int]]], tokenizer, max_len: int) -> Split:
    """(prompt ids, target ids) pairs, each fitting max_len + 1 tokens, as rows: labels only on the target tokens."""
    inputs = torch.full((len(pairs), max_len), pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(pairs), max_len), IGNORE, dtype=torch.long)
    for row, (prompt_ids, target_ids) in enumerate(pairs):
        sequence = prompt_ids + target_ids
        inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        labels[row, len(prompt_ids) - 1:len(sequence) - 1] = torch.tensor(target_ids)
    return Split([tokenizer.decode(p) for p, _ in pairs], [tokenizer.decode(t) for _, t in pairs], inputs, labels)


def chosen_groups(params: CorpusParams, present: list[str]) -> tuple[list[str], list[str]]:
    """(trained, evaluated-only) group names: `groups` (else every group present) and `eval_only`."""
    for field in ("groups", "eval_only"):
        names = getattr(params, field)
        unknown = next((g for g in names if g not in present), None)
        if unknown is not None:
            raise CapshapeError(f"data.suite_params.{field}: {unknown!r} is not a group of the corpus (it has "
                                f"{', '.join(present)}).")
        if len(set(names)) != len(names):
            raise CapshapeError(f"data.suite_params.{field} lists a group twice: list each once.")
    both = next((g for g in params.eval_only if g in params.groups), None)
    if both is not None:
        raise CapshapeError(f"data.suite_params: {both!r} is in both groups and eval_only: list it in one.")
    trained = params.groups or [g for g in present if g not in params.eval_only]
    if not trained:
        raise CapshapeError("data.suite_params.eval_only lists every group: leave at least one to train on.")
    return trained, list(params.eval_only)


def mixed_pools(kept: dict[str, list[list[int]]], groups: list[str], max_len: int, pad: int, seed: int, split) -> dict:
    """`packing = "mixed"`: the training documents of every trained group, in a seeded order, packed together
    (so a row may hold several groups, with per-token group ids: the index of the token's group in `groups`);
    each row goes to the pool of the group of its first target token."""
    documents = [(doc, index) for index, name in enumerate(groups) for doc in kept[name]]
    random.Random(task_seed(seed, "corpus/mixed")).shuffle(documents)
    packed = split(*pack_documents([d for d, _ in documents], [g for _, g in documents], max_len, pad))
    home = packed.token_groups[:, 0]
    pools = {}
    for index, name in enumerate(groups):
        rows = (home == index).nonzero().squeeze(1)
        if len(rows) == 0:
            raise CapshapeError(f"data.suite_params.packing='mixed': group {name!r} starts no packed row (its documents "
                                f"are too few or short for rows of {max_len} tokens): use packing='group'.")
        pools[name] = packed.rows(rows)
    return pools


class CorpusSuite(Suite):
    Params = CorpusParams

    def per_token_groups(self, params: CorpusParams) -> bool:
        return params.packing == "mixed"

    def task_names(self, data_config, params: CorpusParams) -> list[str]:
        present = sorted({group for _, group in load_documents(params.files, params.text_field, params.group_field)})
        return chosen_groups(params, present)[0]

    def select(self, data_config, trained: list[str], eval_only: list[str]):
        return data_config.model_copy(update={"suite_params": {**data_config.suite_params, "groups": trained,
                                                               "eval_only": eval_only}})

    def build(self, data_config, params: CorpusParams, seed: int, max_len: int) -> SuiteData:
        tokenizer = load_tokenizer(params.tokenizer)
        by_group: dict[str, list[list[int]]] = {}
        for text, group in load_documents(params.files, params.text_field, params.group_field):
            by_group.setdefault(group, []).append(tokenizer(text, add_special_tokens=False)["input_ids"]
                                                  + [tokenizer.eos_token_id])
        trained_groups, eval_groups = chosen_groups(params, sorted(by_group))
        pad = pad_id(tokenizer)
        decode = lambda ids: tokenizer.decode(ids)
        split = lambda inputs, labels, token_groups=None: Split(
            [], [decode(row[row != IGNORE].tolist()) for row in labels], inputs, labels, token_groups)
        kept, held = {}, {}  # group -> its training / held-out documents
        for name in trained_groups + eval_groups:
            documents = by_group[name]
            if len(documents) < 2:
                raise CapshapeError(f"data.suite_params: group {name!r} has {len(documents)} document; each group needs "
                                    f"at least 2 (one to hold out).")
            order = list(range(len(documents)))
            random.Random(task_seed(seed, name)).shuffle(order)
            cut = max(1, round(params.held_out * len(documents)))
            kept[name], held[name] = [documents[i] for i in sorted(order[cut:])], [documents[i] for i in sorted(order[:cut])]
        pools = mixed_pools(kept, trained_groups, max_len, pad, seed, split) if params.packing == "mixed" else {}
        for name in kept.keys() - pools.keys():  # one group's documents per row
            pools[name] = split(*pack_documents(kept[name], [0] * len(kept[name]), max_len, pad)[:2])
        first = lambda part, n: part.rows(torch.arange(min(n, len(part.inputs))))
        data, trained = [], []
        for name in trained_groups + eval_groups:
            held_out = split(*pack_documents(held[name], [0] * len(held[name]), max_len, pad)[:2])
            task = Task(name, name, tag="", sample_input=None, solve=None, decode=decode,
                        description=f"{len(by_group[name])} documents ({len(held[name])} held out)")
            data.append(TaskData(task, first(pools[name], data_config.train_examples), first(held_out, data_config.eval_examples)))
            trained.append(name in trained_groups)
        for path in params.probes:
            for group, split in load_probes(path, tokenizer, max_len).items():
                if group not in by_group:
                    raise CapshapeError(f"data.suite_params.probes: {Path(path).name} has probes of group {group!r}, "
                                        f"which has no documents (groups: {', '.join(sorted(by_group))}).")
                if group not in trained_groups + eval_groups:
                    continue
                probe = Task(f"{group}/probe", group, tag="", sample_input=None, solve=None,
                             description=f"{len(split.targets)} probes from {Path(path).name}", decode=decode)
                data.append(TaskData(probe, split, split))
                trained.append(False)
        return SuiteData(data, trained, InputSpec("tokens", vocab_size=len(tokenizer)), tokenizer=tokenizer)

    def summary_extras(self, rows: list[dict]) -> dict:
        """Held-out perplexity per group, exp(loss), at the last evaluation (probe sets are not text)."""
        return {"perplexity": {task: float(torch.tensor(stats["loss"]).exp()) for task, stats in rows[-1]["eval"].items()
                               if not task.endswith("/probe")}}


SUITES.add("corpus", CorpusSuite())
