"""What the lexical expert adds to the time per text of a fused export, as `serve`'s worker and `predict` run it.

    python scripts/bench_lexical.py --model_dir runs/export/minilm_mean_full_len256_fused \
        --data ../shared/data/arxiv/scientific_text.csv --rows 256

The service's LitAPI (the code an inference worker runs: tokenizing, windows, the network, the expert, top-k)
answers the same real abstracts in batches of 1 (a lone request), 16 (serve's default batch) and 64 (`predict`'s
eval batch), with the fusion on and off, in alternating rounds; the median of the rounds is kept. Printed last: the
expert's share of the time per text (fused / network alone - 1); the issue's bound is 5%.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time

import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="an export with a lexical expert (lightning_cls.json)")
    parser.add_argument("--data", required=True, help="a CSV with a `text` column (real abstracts)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from lightning_cls.export.folder import read_export_metadata
    from lightning_cls.serving.api import ClassifierAPI

    torch.set_num_threads(args.threads)
    texts = pd.read_csv(args.data, usecols=["text"])["text"].sample(args.rows, random_state=0).tolist()
    meta = read_export_metadata(args.model_dir)
    api = ClassifierAPI(args.model_dir, meta.max_length, temperature=meta.temperature, max_windows=meta.max_windows)
    logs = queue.Queue()  # the monitoring messages: drained, not kept
    api.set_logger_queue(logs)
    api.setup("cpu")
    fusion = api.fusion
    if fusion is None:
        sys.exit(f"{args.model_dir} has no lexical expert: nothing to measure")
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads; {args.rows} abstracts from {args.data}")
    print(f"model {args.model_dir}: {api.runner.describe()}; expert {fusion.expert.coef.shape[1]} n-grams")

    def run(batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            api.predict((texts[i : i + batch], 1))
        logs.queue.clear()
        return (time.perf_counter() - start) / len(texts)

    results = {}
    for batch in args.batches:
        times = {"network": [], "fused": []}
        for _ in range(args.rounds):
            for name, value in (("network", None), ("fused", fusion)):
                api.fusion = value
                times[name].append(run(batch))
        network, fused = statistics.median(times["network"]), statistics.median(times["fused"])
        results[batch] = (network, fused)
        print(
            f"batches of {batch:3d}: network alone {network * 1e3:7.2f} ms/text, fused {fused * 1e3:7.2f} ms/text "
            f"(rounds: {', '.join(f'{t * 1e3:.2f}' for t in times['fused'])})"
        )
    api.fusion = fusion
    start = time.perf_counter()
    fusion.expert.scores(texts)
    expert_alone = (time.perf_counter() - start) / len(texts)
    print(f"the expert alone on all {len(texts)} texts at once: {expert_alone * 1e3:.3f} ms/text")
    for batch, (network, fused) in results.items():
        print(f"RATIO batches of {batch}: fused / network alone = {fused / network:.3f} ({fused / network - 1:+.1%})")


if __name__ == "__main__":
    main()
