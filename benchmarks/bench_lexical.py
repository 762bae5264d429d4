"""What the lexical expert adds to the time per text of a fused export, as `serve`'s worker and `predict` run it.

    python benchmarks/bench_lexical.py --model_dir runs/export/minilm_mean_full_len256_fused \
        --data ../shared/data/arxiv/scientific_text.csv --rows 256

The package's answer path (`lightning_cls.export.answer.ExportedModel.answer`, what each model of `serve`'s
inference worker answers with: tokenizing, windows, the network, the expert, the task's probabilities), run as `serve`
runs it by default, answers the same real abstracts in batches of 1 (a lone request), 16 (serve's default batch) and
64 (`predict`'s eval batch), with the fusion on and off (the same loaded model, its expert left out), in alternating
rounds; the median of the rounds is kept. Printed last: the expert's share of the time per text (fused / network
alone - 1); the issue's bound is 5%.
"""

from __future__ import annotations

import statistics
import sys
import time

import pandas as pd
import torch
from harness import argument_parser, cpu_name

from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.runtime import InferenceSettings


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", required=True, help="an export with a lexical expert (lightning_cls.json)")
    parser.add_argument("--data", required=True, help="a CSV with a `text` column (real abstracts)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    texts = pd.read_csv(args.data, usecols=["text"])["text"].sample(args.rows, random_state=0).tolist()
    fused = ExportedModel.load(args.model_dir, InferenceSettings())  # serve's defaults: --backend torch, auto
    if fused.fusion is None:
        sys.exit(f"{args.model_dir} has no lexical expert: nothing to measure")
    network = ExportedModel(fused.model_dir, fused.runner, fused.task, fused.windows, fusion=None)
    fusion = fused.fusion
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads; {args.rows} abstracts from {args.data}")
    print(f"model {args.model_dir}: {fused.runner.describe()}; expert {fusion.expert.coef.shape[1]} n-grams")
    fused.network_logits(texts[:8])  # warm up: the first pass picks kernels and allocates

    def run(model: ExportedModel, batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            model.answer(texts[i : i + batch])
        return (time.perf_counter() - start) / len(texts)

    results = {}
    for batch in args.batches:
        times = {"network": [], "fused": []}
        for _ in range(args.rounds):
            for name, model in (("network", network), ("fused", fused)):
                times[name].append(run(model, batch))
        network_s, fused_s = statistics.median(times["network"]), statistics.median(times["fused"])
        results[batch] = (network_s, fused_s)
        print(
            f"batches of {batch:3d}: network alone {network_s * 1e3:7.2f} ms/text, fused {fused_s * 1e3:7.2f} ms/text "
            f"(rounds: {', '.join(f'{t * 1e3:.2f}' for t in times['fused'])})"
        )
    start = time.perf_counter()
    fusion.expert.scores(texts)
    expert_alone = (time.perf_counter() - start) / len(texts)
    print(f"the expert alone on all {len(texts)} texts at once: {expert_alone * 1e3:.3f} ms/text")
    for batch, (network_s, fused_s) in results.items():
        print(
            f"RATIO batches of {batch}: fused / network alone = {fused_s / network_s:.3f} "
            f"({fused_s / network_s - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
