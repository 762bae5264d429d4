"""Prediction speed of an exported model: `transformers.pipeline(batch_size=32)` in fp32 (the baseline) against
`export.runtime.Runner` (what `serve` runs) at fp32, bf16 (where the CPU runs it well), ONNX fp32 (the plain
graph and ONNX Runtime's optimized one), ONNX int8 and `auto` (what `serve --backend auto` takes, by the folder's
recorded gate), on the same texts, in one process, with each side's labels compared with fp32's and, with
`--split test`, its macro-F1 on the test split's true labels in the same table.

    python benchmarks/bench_predict.py                                   # a small generated model and texts (smoke)
    python benchmarks/bench_predict.py --model_dir runs/export/pooling_mean_400 \\
        --data ../shared/data/arxiv/scientific_text.csv --rows 512
    # the test split of the data the export's checkpoint was trained on, with its labels
    python benchmarks/bench_predict.py --model_dir runs/export/minilm_mean_full_len256 --split test --rows 1000

Each side classifies the same texts from their strings (tokenizing included, loading excluded), in rounds: every
round runs every side once, in turn, so that the load of a shared machine falls on all of them alike; texts/s is the
median over the rounds. A folder without model.onnx, model.opt.onnx or model.int8.onnx gets them in a temporary copy,
made as `export --format onnx --quantize int8` makes them. Texts are truncated at the export's max_length on every
side. A folder with a lexical expert is scored on its fused answers (the pipeline gives the network's alone).

With --ckpt_path and --config it also times `lightning_cls predict` (Lightning, `--trainer.precision` 32-true and
bf16-mixed) against the pipeline end to end, each a fresh process (start-up, loading and writing included).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from harness import (
    argument_parser,
    export_split,
    machine_line,
    matmul_gflops,
    minilm_dir,
    non_embedding_params,
    print_table,
    ratio,
)

from lightning_cls.export.answer import Answers, ExportedModel
from lightning_cls.export.folder import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    ExportMetadata,
    load_classifier,
    read_export_metadata,
    write_export_metadata,
)
from lightning_cls.export.onnx_optimize import OPTIMIZED_ONNX_FILE
from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.export.variants import agreement
from lightning_cls.hardware import cpu_flags, detect_hardware
from lightning_cls.task.scores import task_scores

SMALL_CONFIG = {"model_type": "distilbert", "n_layers": 2, "n_heads": 4, "dim": 128, "hidden_dim": 512}
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16")


# ------------------------------------------------------------------------------------------------ inputs
def small_export(folder: Path) -> tuple[Path, list[str]]:
    """A small DistilBERT-shaped model with random weights and a WordPiece tokenizer trained on generated texts,
    saved as an export folder; and texts to classify."""
    from lightning_cls.data.labels import DEFAULT_LABELS
    from lightning_cls.data.sample_data import generate_texts, train_wordpiece_tokenizer
    from lightning_cls.data.tokenization import load_tokenizer
    from lightning_cls.model.classifier import build_classifier

    texts, _ = generate_texts(rows_per_label=40, seed=0, rare_rows=0)
    tokenizer = load_tokenizer(str(train_wordpiece_tokenizer(texts, folder / "tokenizer", vocab_size=1000)))
    torch.manual_seed(0)
    names = sorted(DEFAULT_LABELS)
    model = build_classifier("small", names, tokenizer, False, SMALL_CONFIG)
    model.config.problem_type = "single_label_classification"
    out = folder / "export"
    model.save_pretrained(out)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(out)
    write_export_metadata(out, ExportMetadata(labels=names, max_length=128, model_name_or_path="small (random)"))
    return out, texts


def read_texts(path: str, rows: int, column: str) -> list[str]:
    with open(path, newline="") as f:
        return [row[column] for _, row in zip(range(rows), csv.DictReader(f), strict=False)]


def with_onnx(model_dir: Path, scratch: Path) -> Path:
    """`model_dir` itself if it has model.onnx, model.opt.onnx and model.int8.onnx, else a copy with them, made as
    `export --format onnx --quantize int8` makes them (int8 from the optimized graph)."""
    files = (ONNX_FILE, OPTIMIZED_ONNX_FILE, INT8_ONNX_FILE)
    if all((model_dir / name).is_file() for name in files):
        return model_dir
    from lightning_cls.data.tokenization import load_tokenizer
    from lightning_cls.export.exporter import export_onnx, quantize_int8
    from lightning_cls.export.onnx_optimize import optimized_onnx
    from lightning_cls.model.classifier import max_positions

    copy = scratch / "with_onnx"
    shutil.copytree(model_dir, copy)
    model = load_classifier(copy, dtype=torch.float32).eval()
    pad = load_tokenizer(str(copy)).pad_token_id
    if not (copy / ONNX_FILE).is_file():
        limit = max_positions(model) or read_export_metadata(copy).max_length
        export_onnx(model, copy / ONNX_FILE, limit, pad)
    if not (copy / OPTIMIZED_ONNX_FILE).is_file():
        optimized_onnx(model, copy / OPTIMIZED_ONNX_FILE, pad)
    if not (copy / INT8_ONNX_FILE).is_file():
        quantize_int8(copy / OPTIMIZED_ONNX_FILE, copy / INT8_ONNX_FILE)
    return copy


def without_optimized_graph(model_dir: Path, scratch: Path) -> Path:
    """A folder of links to `model_dir`'s files but model.opt.onnx: where ONNX fp32 runs the plain graph."""
    plain = scratch / "plain_graph"
    plain.mkdir()
    for file in model_dir.iterdir():
        if file.name != OPTIMIZED_ONNX_FILE:
            (plain / file.name).symlink_to(file.resolve())
    return plain


def test_split(model_dir: Path, rows: int) -> tuple[list[str], list[int], str]:
    """Up to `rows` texts of the test split (and their class ids) of the data the export's checkpoint was trained
    on (the harness's `export_split`)."""
    texts, names, source = export_split(model_dir, "test", rows)
    labels = read_export_metadata(model_dir).labels
    return texts, [labels.index(n) for n in names], source


# ------------------------------------------------------------------------------------------------ the sides
class PipelineSide:
    """transformers.pipeline("text-classification"), fp32, batch_size as given: the naive alternative."""

    def __init__(self, model_dir: Path, batch_size: int, max_length: int) -> None:
        from transformers import pipeline

        remote = "auto_map" in json.loads((model_dir / "config.json").read_text())  # a pooled classifier's folder
        self.pipe = pipeline(
            "text-classification", model=str(model_dir), device="cpu", trust_remote_code=remote, dtype=torch.float32
        )
        self.label2id = self.pipe.model.config.label2id
        self.batch_size, self.max_length = batch_size, max_length

    def labels(self, texts: list[str]) -> list[int]:
        out = self.pipe(texts, batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        return [self.label2id[r["label"]] for r in out]


class RunnerSide:
    """The package's answer path (`ExportedModel.answer`: windows, the runtime as `settings` say, the folder's lexical
    expert fused in, the task's decision), as `serve` answers."""

    def __init__(self, model_dir: Path, settings: InferenceSettings) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an explicitly asked precision that is slow here, or unmeasured
            self.model = ExportedModel.load(model_dir, settings, use_temperature=False)
        self.runner = self.model.runner

    def answers(self, texts: list[str]) -> Answers:
        return self.model.answer(texts)

    def labels(self, texts: list[str]) -> list[int]:
        return self.answers(texts).decided.tolist()


# ------------------------------------------------------------------------------------------------ the run
def benchmark(args: argparse.Namespace, scratch: Path) -> None:
    truth, source = None, None
    if args.model_dir and args.split == "test":
        model_dir = Path(args.model_dir)
        texts, truth, source = test_split(model_dir, args.rows)
    elif args.model_dir:
        model_dir = Path(args.model_dir)
        if not args.data:
            raise SystemExit("--model_dir needs --data (a CSV with a text column) or --split test for its texts.")
        texts = read_texts(args.data, args.rows, args.text_column)
    else:
        model_dir, texts = small_export(scratch)
        texts = (texts * (args.rows // len(texts) + 1))[: args.rows]
    model_dir = with_onnx(model_dir, scratch)
    plain_dir = without_optimized_graph(model_dir, scratch)
    meta = read_export_metadata(model_dir)
    hardware = detect_hardware("cpu")

    budget = args.max_batch_tokens
    settings = {
        "Runner torch fp32": (model_dir, InferenceSettings(precision="fp32", max_batch_tokens=budget)),
        "Runner torch bf16": (model_dir, InferenceSettings(precision="bf16", max_batch_tokens=budget)),
        "Runner onnx fp32 (plain graph)": (plain_dir, InferenceSettings("fp32", "onnx", budget)),
        "Runner onnx fp32 (optimized graph)": (model_dir, InferenceSettings("fp32", "onnx", budget)),
        "Runner onnx int8": (model_dir, InferenceSettings("int8", "onnx", budget)),
    }
    for extra in args.student or []:  # another export (a distilled student), run by its own `auto`
        settings[f"student {Path(extra).name} (auto)"] = (Path(extra), InferenceSettings(backend="auto"))
    skipped = {}
    if args.bf16 == "off" or (args.bf16 == "auto" and not hardware.bf16):
        skipped["Runner torch bf16"] = (
            f"not run: {hardware.note} (bf16 is slower than fp32 here); --bf16 on runs it anyway"
            if args.bf16 == "auto"
            else "not run (--bf16 off)"
        )
        settings.pop("Runner torch bf16")
    baseline = f"transformers.pipeline fp32 (batch {args.batch_size})"
    sides: dict[str, PipelineSide | RunnerSide] = {
        baseline: PipelineSide(model_dir, args.batch_size, int(meta.max_length))
    }
    for name, (folder, s) in settings.items():
        sides[name] = RunnerSide(folder, s)
    auto = RunnerSide(model_dir, InferenceSettings(backend="auto", max_batch_tokens=budget))
    picked = next(
        (
            n
            for n, side in sides.items()
            if isinstance(side, RunnerSide)
            and side.runner.choice.variant == auto.runner.choice.variant
            and side.runner.model_dir == model_dir
        ),
        None,
    )
    fp32 = sides["Runner torch fp32"]
    tokenizer = fp32.runner.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=int(meta.max_length))["input_ids"]]
    flops_per_token = 2 * non_embedding_params(fp32.runner.model)  # matrix products only; attention scores left out

    print(machine_line())
    flags = cpu_flags()
    print(f"cpu flags: {', '.join(f for f in RELEVANT_FLAGS if f in flags) or 'none of note'}; {hardware.note}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"texts: {source or args.data or 'generated'}")
    print(
        f"auto (serve --backend auto): {auto.runner.choice.variant} = the row '{picked}'; {auto.runner.choice.reason}"
    )
    print(
        f"model: {meta.model_name_or_path} ({model_dir}), max_length {meta.max_length}; {len(texts)} texts, tokens "
        f"per text min {min(lengths)} / median {statistics.median(lengths):.0f} / max {max(lengths)}; "
        f"Runner: at most {fp32.runner.max_batch_tokens} tokens per forward pass; {args.rounds} rounds"
    )

    for side in sides.values():  # warm up: the first pass picks kernels and allocates
        side.labels(texts[: min(8, len(texts))])
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    labels: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, side in sides.items():
            start = time.perf_counter()
            labels[name] = side.labels(texts)
            seconds[name].append(time.perf_counter() - start)
    reference = fp32.answers(texts)
    probs_diff = {}
    for name, side in sides.items():
        if isinstance(side, RunnerSide):
            probs_diff[name] = agreement(fp32.model.task, reference, side.answers(texts))[1]
    scores = {name: task_scores(labels[name], truth) for name in sides} if truth is not None else {}

    base_rate = len(texts) / statistics.median(seconds[baseline])
    rows = []
    for name in sides:
        rate = len(texts) / statistics.median(seconds[name])
        rows.append(
            {
                "side": name,
                "texts_per_s": rate,
                "spread": f"{len(texts) / max(seconds[name]):.1f}-{len(texts) / min(seconds[name]):.1f}",
                "ratio": ratio(rate, base_rate),
                "agreement": sum(a == b for a, b in zip(labels[name], labels["Runner torch fp32"], strict=True))
                / len(texts),
                "diff": f"{probs_diff[name]:.1e}" if name in probs_diff else "-",
                "gflops": flops_per_token * sum(lengths) * rate / len(texts) / 1e9,
                "f1": f"{scores[name]['macro_f1']:.4f}" if scores else "-",
                "delta": f"{(scores[name]['macro_f1'] - scores['Runner torch fp32']['macro_f1']) * 100:+.2f}"
                if scores
                else "-",
            }
        )
        rows[-1]["auto"] = "<- auto" if name == picked else ""
    print()
    print_table(
        rows,
        [
            ("side", "side", "s"),
            ("texts_per_s", "texts/s", ".1f"),
            ("spread", "over rounds", "s"),
            ("ratio", "vs pipeline", "s"),
            ("f1", "test macro-F1", "s"),
            ("delta", "vs fp32 (points)", "s"),
            ("agreement", "same label as fp32", ".2%"),
            ("diff", "max prob diff", "s"),
            ("gflops", "GFLOP/s", ".1f"),
            ("auto", "", "s"),
        ],
    )
    for name, why in skipped.items():
        print(f"{name}: {why}")
    # The ceiling: this machine's dense matrix-product rate right now (the model is almost all matrix products).
    fp32_rate, bf16_rate = matmul_gflops(torch.float32, 1024, 5), matmul_gflops(torch.bfloat16, 1024, 2)
    ours = next(r["gflops"] for r in rows if r["side"] == "Runner torch fp32")
    print(
        f"matrix product 1024x1024 now, {torch.get_num_threads()} threads: fp32 {fp32_rate:.1f} GFLOP/s, bf16 "
        f"{bf16_rate:.1f} GFLOP/s; Runner torch fp32 ran the model's matrix products at {ours / fp32_rate:.0%} of "
        "the fp32 rate"
    )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ratios = ", ".join(f"{r['side'].removeprefix('Runner ')} {r['ratio']}" for r in rows[1:] if "ratio" in r)
    if picked is not None:
        row = next(r for r in rows if r["side"] == picked)
        print(
            f"auto ({auto.runner.choice.variant}): {row['ratio']} the pipeline, test macro-F1 {row['f1']} "
            f"({row['delta']} points against torch fp32)"
        )
    print(f"texts/s relative to transformers.pipeline fp32 (same run, same texts): {ratios}")


# ------------------------------------------------------------------------------------------------ predict, end to end
PIPELINE_SCRIPT = """
import json, sys
from transformers import pipeline
model_dir, texts_path, out_path, batch_size = sys.argv[1:5]
texts = [json.loads(line)["text"] for line in open(texts_path)]
remote = "auto_map" in json.load(open(model_dir + "/config.json"))
classify = pipeline("text-classification", model=model_dir, batch_size=int(batch_size), device="cpu",
                    trust_remote_code=remote)
labels = [r["label"] for r in classify(texts, truncation=True)]
json.dump(labels, open(out_path, "w"))
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def predict_end_to_end(args: argparse.Namespace, tmp: Path) -> None:
    """`lightning_cls predict` (32-true, bf16-mixed) against the pipeline, each a fresh process, end to end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("MINILM_DIR", minilm_dir() or "")  # the experiments' configs name the pretrained MiniLM by it
    texts = read_texts(args.data, args.rows, args.text_column)
    with open(tmp / "texts.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    export = [sys.executable, "-m", "lightning_cls", "export", "--ckpt_path", args.ckpt_path]
    subprocess.run([*export, "--output_dir", str(tmp / "e2e"), "--agreement_texts", "0"], check=True, env=env)
    print(f"\n{len(texts)} abstracts, batch size {args.batch_size}, each side a fresh process, end to end\n")
    script = [sys.executable, "-c", PIPELINE_SCRIPT, str(tmp / "e2e"), str(tmp / "texts.jsonl")]
    pipeline_s = timed([*script, str(tmp / "pipeline.json"), str(args.batch_size)], env)
    theirs = json.loads((tmp / "pipeline.json").read_text())
    rows = [{"side": "transformers.pipeline (fp32)", "seconds": pipeline_s, "agreement": 1.0}]
    for precision in ("32-true", "bf16-mixed"):
        out = tmp / f"ours-{precision}.csv"
        predict = [sys.executable, "-m", "lightning_cls", "predict", "--config", args.config, "--ckpt_path"]
        seconds = timed(
            [
                *predict,
                args.ckpt_path,
                f"--data.predict_path={tmp / 'texts.jsonl'}",
                f"--prediction_writer.output_path={out}",
                f"--trainer.precision={precision}",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp}",
                f"--data.eval_batch_size={args.batch_size}",
            ],
            env,
        )
        with open(out, newline="") as f:
            ours = [row["label"] for row in csv.DictReader(f)]
        agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(texts)
        rows.append({"side": f"lightning_cls predict ({precision})", "seconds": seconds, "agreement": agree})
    for row in rows:
        row["texts_per_s"] = len(texts) / row["seconds"]
        row["ratio"] = ratio(pipeline_s, row["seconds"])
    print_table(
        rows,
        [
            ("side", "side", "s"),
            ("seconds", "seconds", ".1f"),
            ("texts_per_s", "texts/s", ".1f"),
            ("ratio", "vs pipeline", "s"),
            ("agreement", "same label as pipeline", ".2%"),
        ],
    )


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", help="an exported folder (default: a small generated model)")
    parser.add_argument("--data", help="CSV with a text column; its first --rows texts are classified")
    parser.add_argument(
        "--split",
        choices=("test",),
        help="classify a seeded sample of --rows texts of the test split of the export's training data (labels: "
        "macro-F1 per side)",
    )
    parser.add_argument("--student", action="append", help="another export to run by its own auto (repeatable)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="the pipeline's batch size")
    parser.add_argument("--max_batch_tokens", type=int, default=None, help="the Runner's (default: its own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--bf16", choices=("auto", "on", "off"), default="auto", help="auto: only where the CPU runs it well"
    )
    parser.add_argument("--ckpt_path", help="with --config: also time `lightning_cls predict` end to end")
    parser.add_argument("--config", help="the config the checkpoint was trained with")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        benchmark(args, Path(tmp))
        if args.ckpt_path and args.config and args.data:
            predict_end_to_end(args, Path(tmp))


if __name__ == "__main__":
    main()
