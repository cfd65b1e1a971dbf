"""Tokens per second of a grouped-loss Hugging Face Trainer step (capshape.integrations.hf.CapshapeTrainer)
against a plain `Trainer` step (the model's own mean loss) on the same model and batches, measured side by
side: alternating rounds of `--steps` `trainer.train()` steps each, median over rounds. Target: ratio ≥ 0.9.

    python benchmarks/hf_trainer.py [--rounds 5] [--steps 20] [--threads 1] [--model llama|gpt2]
        [--hidden 256] [--layers 4] [--length 128] [--batch 8]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from capshape.integrations.hf import CapshapeTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = (dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                  num_key_value_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                  max_position_embeddings=args.length) if args.model == "llama" else
             dict(n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64, n_positions=args.length))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(args.model, vocab_size=8000, **sizes))
    n = args.batch * args.steps
    ids = torch.randint(0, 8000, (n, args.length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "labels": ids[i], "group_ids": torch.tensor(i % args.groups)} for i in range(n)]
    plain_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                      report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                                      save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainers = {"plain Trainer": Trainer(model=model, args=arguments, train_dataset=plain_rows),
                    "CapshapeTrainer grouped": CapshapeTrainer(model=model, args=arguments, train_dataset=rows,
                                                               objective="grouped", num_groups=args.groups)}
        seconds = {name: [] for name in trainers}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, trainer in trainers.items():
                started = time.perf_counter()
                trainer.train()
                if round_:
                    seconds[name].append(time.perf_counter() - started)
    tokens = n * args.length
    rates = {name: tokens / statistics.median(times) for name, times in seconds.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"{args.model} hidden {args.hidden} x {args.layers} layers, batch {args.batch} x {args.length} tokens, {device}")
    for name, rate in rates.items():
        print(f"{name:>26}: {rate:9.0f} tokens/s")
    print(f"{'ratio (grouped / plain)':>26}: {rates['CapshapeTrainer grouped'] / rates['plain Trainer']:.3f}")


if __name__ == "__main__":
    main()
