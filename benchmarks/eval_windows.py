"""Long documents: test macro-F1 and cost per text of truncation vs sliding windows, with one exported model.

    python benchmarks/eval_windows.py --model_dir runs/export/minilm_mean_full \
        --config experiments/minilm_mean_full/config.yaml --data-path ../shared/data/arxiv/scientific_text.csv \
        --out experiments/long_documents/minilm_mean_full.json

Reads exactly the experiment's test split (same labels, subsample, seed, split), then scores each reading of the
texts (`--readings`, max_length:max_windows[:stride]): `128:1` is truncation at 128 tokens, `128:8` windows of 128
over the whole abstract (at most 8). A second set of long texts is made by joining `--join` test abstracts of one
subject (thousands of tokens), to show what happens far past the window, and is scored the same way.

Cost per text: wall seconds of the package's answer path (`ExportedModel.answer`: tokenization, forward passes in
torch fp32 with `--threads` threads, at most `--max_batch_tokens` tokens per pass, longest first, the folder's
lexical expert fused in when it has one) and the windows run per text. The machine should be otherwise idle for
the seconds to mean anything; the windows per text are the machine-independent part.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from harness import argument_parser, config_split, cpu_name
from sklearn.metrics import accuracy_score, f1_score

from lightning_cls.data.windows import WindowSpec, window_token_ids
from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.export.runtime import InferenceSettings


def parse_reading(text: str) -> WindowSpec:
    parts = [int(p) for p in text.split(":")]
    return WindowSpec(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else None)


def classify(model: ExportedModel, texts: list[str], spec: WindowSpec) -> tuple[np.ndarray, dict]:
    """Predicted class ids of the texts read with `spec` (the package's answer path), and what it cost."""
    start = time.perf_counter()
    windows = window_token_ids(model.tokenizer, texts, spec)  # timed alone: tokenization's share of the cost
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = model.with_windows(spec).answer(texts)
    seconds = time.perf_counter() - start
    cost = {
        "seconds_per_text": seconds / len(texts),
        "tokenize_seconds_per_text": tokenize_s / len(texts),
        "windows_per_text": float(windows.counts.mean()),
        "windows_max": int(windows.counts.max()),
        "texts_cut": float(windows.cut.mean()),
        "tokens_read_per_text": float(windows.tokens.mean()),
    }
    return answers.decided, cost


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", required=True, help="a folder written by `python -m lightning_cls export`")
    parser.add_argument(
        "--config", required=True, type=Path, help="experiment YAML whose `data` section sets the split"
    )
    parser.add_argument("--data-path", help="override data.path of the config")
    parser.add_argument("--readings", nargs="*", default=["128:1", "256:1", "128:8"], help="max_length:max_windows")
    parser.add_argument("--join", type=int, default=8, help="abstracts joined into one long text (0: skip)")
    parser.add_argument("--long-readings", nargs="+", default=["128:1", "256:1", "128:8", "128:32", "128:64"])
    parser.add_argument("--limit", type=int, help="score only the first N test texts")
    parser.add_argument(
        "--max_batch_tokens", type=int, default=None, help="tokens per forward pass (default: the runtime's)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, plan = config_split(args.config, args.data_path)
    rows = plan.rows["test"][: args.limit]
    texts, labels = plan.table["text"].to_numpy()[rows].tolist(), plan.label_ids[rows]
    meta = read_export_metadata(args.model_dir)
    if meta.labels != plan.names:
        raise SystemExit(f"The model's labels {meta.labels} are not the split's {plan.names}.")
    model = ExportedModel.load(args.model_dir, InferenceSettings("fp32", "torch", args.max_batch_tokens))
    tokenizer = model.tokenizer

    def score(name: str, texts: list[str], labels: np.ndarray, readings: list[str]) -> list[dict]:
        results = []
        for reading in readings:
            spec = parse_reading(reading)
            predicted, cost = classify(model, texts, spec)
            result = {
                "texts": name,
                "reading": reading,
                "max_length": spec.max_length,
                "max_windows": spec.max_windows,
                "stride": spec.step(tokenizer),
                "macro_f1": f1_score(labels, predicted, average="macro"),
                "accuracy": accuracy_score(labels, predicted),
                **cost,
            }
            print(
                f"{name:>14} {reading:>8}: macro-F1 {result['macro_f1']:.4f}  acc {result['accuracy']:.4f}  "
                f"{cost['windows_per_text']:.2f} windows/text (max {cost['windows_max']}, {cost['texts_cut']:.1%} cut)"
                f"  {1000 * cost['seconds_per_text']:.1f} ms/text",
                flush=True,
            )
            results.append(result)
        return results

    lengths = np.asarray([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    print(f"{len(texts)} test abstracts: median {np.median(lengths):.0f} tokens, {np.mean(lengths > 126):.0%} over 126")
    results = score("abstracts", texts, labels, args.readings)
    long_summary = None
    if args.join > 1:
        # Long texts: `join` abstracts of one subject, in test order, one after another.
        long_texts, long_labels = [], []
        for label in np.unique(labels):
            members = [t for t, y in zip(texts, labels, strict=True) if y == label]
            for s in range(0, len(members) - args.join + 1, args.join):
                long_texts.append("\n\n".join(members[s : s + args.join]))
                long_labels.append(label)
        long_lengths = np.asarray([len(x) for x in tokenizer(long_texts, add_special_tokens=False)["input_ids"]])
        long_summary = {"texts": len(long_texts), "joined": args.join, "median_tokens": float(np.median(long_lengths))}
        print(f"{len(long_texts)} long texts of {args.join} abstracts: median {np.median(long_lengths):.0f} tokens")
        results += score(f"{args.join}-abstract", long_texts, np.asarray(long_labels), args.long_readings)
    out = {
        "model_dir": str(args.model_dir),
        "config": str(args.config),
        "test_texts": len(texts),
        "median_tokens": float(np.median(lengths)),
        "long_texts": long_summary,
        "results": results,
        "threads": args.threads,
        "cpu": cpu_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
