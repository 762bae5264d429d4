"""Load test: the LitServe service (`python -m lightning_cls serve`) against a naive FastAPI baseline, same run.

Each server is started as a subprocess on a free 127.0.0.1 port, one after the other (never both at once), on the
same model folder. This process then sends the same fixed list of single-text requests at several concurrency levels
over loopback and prints throughput and p50/p95/p99 latency per server and level, then the throughput ratios last.
Request loops are bounded in count (--requests) and in time (--max_seconds per level).

    python benchmarks/load_test.py --model_dir exported/quickstart
    python benchmarks/load_test.py --fabricate            # a tiny untrained model made on the spot (a quick check)
    # real abstracts, half of them cut to short queries; two service configurations against the naive server
    python benchmarks/load_test.py --model_dir DIR --texts ../shared/data/arxiv/scientific_text.csv --short_share 0.5 \
        --serve fp32="--backend torch --precision fp32" --serve onnx_int8="--backend onnx --precision int8"

Every answer's label is kept: each service configuration's labels are compared with the naive server's (fp32, one
text per forward pass, so the reference) on the same texts, and the agreement is printed with the speed. With
`--split test` the requests are a seeded sample of the test split of the data the export's checkpoint was trained on,
and each server's macro-F1 against their true labels is printed too:

    python benchmarks/load_test.py --model_dir DIR --split test --serve auto="--backend auto" \
        --serve int8="--backend onnx --precision int8"
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from harness import (
    BENCHMARKS,
    Server,
    argument_parser,
    cpu_name,
    export_split,
    fabricate_model,
    load_texts,
    ratio,
    serve_command,
)


async def run_level(url: str, texts: list[str], concurrency: int, max_seconds: float) -> dict:
    """Send every text once as {"text": ...} with ``concurrency`` requests in flight; latency in seconds.

    ``labels`` maps a text's position to the label answered for it (failed requests have none).
    """
    latencies, failures, labels = [], 0, {}
    queue = list(reversed(list(enumerate(texts))))
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue and time.monotonic() < deadline:
            index, text = queue.pop()
            start = time.perf_counter()
            try:
                response = await client.post("/predict", json={"text": text})
                ok = response.status_code == 200 and response.json()["predictions"][0]["label"]
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            latencies.append(time.perf_counter() - start)
            failures += not ok
            if ok:
                labels[index] = ok

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "sent": done,
        "failed": failures,
        "unsent": len(queue),
        "throughput": (done - failures) / wall if wall else 0.0,
        "latencies": latencies,
        "labels": labels,
    }


def measure(server: Server, texts: list[str], levels: list[int], warmup: int, max_seconds: float) -> list[dict]:
    """Start the server, warm it up, and run every concurrency level once."""
    with server:
        asyncio.run(run_level(server.url, texts[:warmup], 1, max_seconds))
        return [asyncio.run(run_level(server.url, texts, c, max_seconds)) for c in levels]


def summarize(rounds: list[dict]) -> dict:
    """One level over several rounds: summed counts, median throughput, percentiles of all latencies."""
    latencies = np.asarray([x for r in rounds for x in r["latencies"]]) * 1000
    ms = np.percentile(latencies, [50, 95, 99]) if len(latencies) else [float("nan")] * 3
    total = {k: sum(r[k] for r in rounds) for k in ("sent", "failed", "unsent")}
    throughput = float(np.median([r["throughput"] for r in rounds]))
    return {**total, "throughput": throughput, "p50": ms[0], "p95": ms[1], "p99": ms[2]}


def label_agreement(runs: list[list[dict]], reference: list[list[dict]]) -> tuple[float, int]:
    """Share of answers equal to the reference server's label for the same text, over every level and round.

    The reference answers each text the same way every time (one text per forward pass), so any of its answers for
    a text will do; answers without a reference answer are left out. Returns (share, answers compared).
    """
    truth = {i: label for levels in reference for level in levels for i, label in level["labels"].items()}
    pairs = [
        (label, truth[i]) for levels in runs for level in levels for i, label in level["labels"].items() if i in truth
    ]
    return (sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def shorten(text: str, words: int) -> str:
    """A short query made from a text: its first ``words`` words (a title or a search box's length)."""
    return " ".join(text.split()[:words])


def mix_short(texts: list[str], share: float, seed: int) -> list[str]:
    """Mixed traffic: a ``share`` of the texts, picked at random, replaced by short queries of 4 to 12 words."""
    rng = np.random.default_rng(seed)
    short = rng.random(len(texts)) < share
    lengths = rng.integers(4, 13, size=len(texts))
    return [shorten(t, int(n)) if s else t for t, s, n in zip(texts, short, lengths, strict=True)]


def answers_scores(runs: list[list[dict]], truth: list[str]) -> tuple[dict[str, float], int]:
    """Accuracy and macro-F1 of every answer of every level and round against the texts' true labels."""
    from lightning_cls.task.scores import task_scores

    pairs = [(label, truth[i]) for levels in runs for level in levels for i, label in level["labels"].items()]
    names = sorted({x for pair in pairs for x in pair})
    ids = {name: k for k, name in enumerate(names)}
    return task_scores([ids[a] for a, _ in pairs], [ids[b] for _, b in pairs]), len(pairs)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", help="exported model folder (python -m lightning_cls export)")
    parser.add_argument("--fabricate", action="store_true", help="make a tiny untrained model folder instead")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--texts", help="CSV with a text column to sample requests from (default: generated texts)")
    parser.add_argument(
        "--split", choices=("test",), help="requests from the test split of the export's data, scored by macro-F1"
    )
    parser.add_argument(
        "--short_share", type=float, default=0.0, help="share of requests cut to 4-12 word queries: mixed traffic"
    )
    parser.add_argument(
        "--serve",
        action="append",
        metavar="NAME=ARGS",
        help="a service configuration to measure: a name and extra `serve` options (repeatable; default: serve=)",
    )
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_timeout", type=float, default=0.002)
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads of both servers")
    parser.add_argument("--workers_per_device", type=int, default=1, help="LitServe inference worker processes")
    parser.add_argument("--max_seconds", type=float, default=120, help="time limit per level and server")
    parser.add_argument("--warmup", type=int, default=20, help="requests sent before measuring")
    parser.add_argument("--rounds", type=int, default=3, help="each server is started and measured this many times")
    args = parser.parse_args()
    if bool(args.model_dir) == args.fabricate:
        parser.error("give --model_dir or --fabricate")

    scratch = Path(tempfile.mkdtemp(prefix="lightning_cls_load_"))
    model_dir = str(fabricate_model(scratch) if args.fabricate else Path(args.model_dir).resolve())
    if not 0 <= args.short_share <= 1:
        parser.error(f"--short_share must be between 0 and 1, got {args.short_share}")
    truth = None
    if args.split:
        texts, truth, _ = export_split(model_dir, "test", args.requests)
    else:
        texts = load_texts(args.texts, args.requests, seed=0)
    texts = mix_short(texts, args.short_share, seed=0)
    threads = ["--num_threads", str(args.num_threads)] if args.num_threads else []
    serve_cmd = serve_command(
        model_dir,
        *("--max_batch_size", str(args.max_batch_size), "--batch_timeout", str(args.batch_timeout), *threads),
        *("--workers_per_device", str(args.workers_per_device)),
    )
    naive_cmd = [sys.executable, str(BENCHMARKS / "naive_server.py"), "--model_dir", model_dir, *threads]

    commands = {"naive": naive_cmd}
    for spec in args.serve or ["serve="]:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name in commands:
            parser.error(f"--serve takes NAME=ARGS with a new name, got {spec!r}")
        commands[name] = [*serve_cmd, *shlex.split(extra)]
    # Rounds rotate the order of the servers, so that a change in the (shared) machine's load between measurements
    # does not always favour the same one.
    names = list(commands)
    rounds: dict[str, list[list[dict]]] = {name: [] for name in commands}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            server = Server(name, commands[name], scratch / f"{name}{r}.log")
            rounds[name].append(measure(server, texts, args.concurrency, args.warmup, args.max_seconds))
    levels = range(len(args.concurrency))
    results = {name: [summarize([run[i] for run in runs]) for i in levels] for name, runs in rounds.items()}

    import torch

    words = np.array([len(t.split()) for t in texts])
    print(f"model: {model_dir}; {len(texts)} single-text requests per level and round, {args.rounds} rounds")
    print(
        f"requests: {args.texts or (args.split and 'test split') or 'generated texts'}; {args.short_share:.0%} cut to "
        "short queries; words per request: "
        f"median {np.median(words):.0f}, p10 {np.percentile(words, 10):.0f}, p90 {np.percentile(words, 90):.0f}"
    )
    print(
        f"serve: max_batch_size {args.max_batch_size}, batch_timeout {args.batch_timeout} s, "
        f"{args.workers_per_device} inference worker(s); torch threads per process: {args.num_threads or 'default'}"
    )
    for name, command in commands.items():
        print(f"  {name}: {shlex.join(command)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; server logs in {scratch}")
    print("req/s: median over the rounds; latency percentiles: over all requests of all rounds")
    columns = ("conc", "ok", "failed", "unsent", "req/s", "p50 ms", "p95 ms", "p99 ms")
    print(f"{'server':<12} " + " ".join(f"{c:>{6 if i < 4 else 8}}" for i, c in enumerate(columns)))
    for name, rows in results.items():
        for level, r in zip(args.concurrency, rows, strict=True):
            print(
                f"{name:<12} {level:>6} {r['sent'] - r['failed']:>6} {r['failed']:>6} {r['unsent']:>6} "
                f"{r['throughput']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f}"
            )
    lost = sum(r["failed"] + r["unsent"] for rows in results.values() for r in rows)
    print(f"failed or unsent requests: {lost}")
    if truth is not None:
        for name in names:
            scores, count = answers_scores(rounds[name], truth)
            print(
                f"{name}: macro-F1 {scores['macro_f1']:.4f}, accuracy {scores['accuracy']:.4f} against the true labels"
                f" ({count} answers)"
            )
    base = results["naive"]
    for name in names[1:]:
        share, compared = label_agreement(rounds[name], rounds["naive"])
        print(f"{name}: labels equal to the naive server's (fp32) on {share:.2%} of {compared} answers")
        for i, level in enumerate(args.concurrency):
            ours = results[name][i]
            pairs = zip(rounds[name], rounds["naive"], strict=True)
            per_round = ", ".join(f"{a[i]['throughput'] / b[i]['throughput']:.2f}" for a, b in pairs)
            print(
                f"  concurrency {level:>3}: throughput {ratio(ours['throughput'], base[i]['throughput'])} naive "
                f"(rounds: {per_round}); p50 {ratio(ours['p50'], base[i]['p50'])}, "
                f"p99 {ratio(ours['p99'], base[i]['p99'])} naive's"
            )
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
