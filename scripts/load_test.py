"""Load test: the LitServe service (`python -m lightning_cls serve`) against a naive FastAPI baseline, same run.

Each server is started as a subprocess on a free 127.0.0.1 port, one after the other (never both at once), on the
same model folder. This process then sends the same fixed list of single-text requests at several concurrency levels
over loopback and prints throughput and p50/p95/p99 latency per server and level, then the throughput ratios last.
Request loops are bounded in count (--requests) and in time (--max_seconds per level).

    python scripts/load_test.py --model_dir exported/quickstart
    python scripts/load_test.py --fabricate            # a tiny untrained model made on the spot (a quick check)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group; ready once /health answers 200."""

    def __init__(self, name: str, command: list[str], port: int, log: Path) -> None:
        self.name, self.command, self.port, self.log = name, command, port, log
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"{self.name} was not ready in 300 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # anything it left behind: the group is ours
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log_file.close()


async def run_level(url: str, texts: list[str], concurrency: int, max_seconds: float) -> dict:
    """Send every text once as {"text": ...} with ``concurrency`` requests in flight; latency in seconds."""
    latencies, failures, queue = [], 0, list(reversed(texts))
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue and time.monotonic() < deadline:
            text = queue.pop()
            start = time.perf_counter()
            try:
                response = await client.post("/predict", json={"text": text})
                ok = response.status_code == 200 and response.json()["predictions"][0]["label"]
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            latencies.append(time.perf_counter() - start)
            failures += not ok

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


def fabricate_model(out: Path) -> Path:
    """A tiny untrained DistilBERT-shaped export (tokenizer trained on generated texts), for a quick check."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving_helpers import fabricate_export

    from lightning_cls.sample_data import generate_texts, train_wordpiece_tokenizer

    texts, _ = generate_texts(rows_per_label=30, seed=0)
    train_wordpiece_tokenizer(texts, out / "tokenizer", vocab_size=400)
    return fabricate_export(out / "tokenizer", out / "model")


def load_texts(path: str | None, n: int, seed: int) -> list[str]:
    if path:
        import pandas as pd

        column = pd.read_csv(path, usecols=["text"])["text"].dropna().astype(str)
        return column.sample(n=min(n, len(column)), random_state=seed, replace=len(column) < n).tolist()
    from lightning_cls.sample_data import generate_texts

    texts, _ = generate_texts(rows_per_label=n // 10 + 1, seed=seed, rare_rows=0)
    return texts[:n]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="exported model folder (python -m lightning_cls export)")
    parser.add_argument("--fabricate", action="store_true", help="make a tiny untrained model folder instead")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--texts", help="CSV with a text column to sample requests from (default: generated texts)")
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
    texts = load_texts(args.texts, args.requests, seed=0)
    threads = ["--num_threads", str(args.num_threads)] if args.num_threads else []
    litserve_cmd = [sys.executable, "-m", "lightning_cls", "serve", "--model_dir", model_dir, "--log_level", "warning"]
    litserve_cmd += ["--max_batch_size", str(args.max_batch_size), "--batch_timeout", str(args.batch_timeout), *threads]
    litserve_cmd += ["--workers_per_device", str(args.workers_per_device)]
    naive_cmd = [sys.executable, str(ROOT / "scripts" / "naive_server.py"), "--model_dir", model_dir, *threads]

    # Rounds alternate which server goes first, so that a change in the (shared) machine's load between the two
    # measurements does not always favour the same one.
    commands = {"litserve": litserve_cmd, "naive": naive_cmd}
    rounds: dict[str, list[list[dict]]] = {name: [] for name in commands}
    for r in range(args.rounds):
        for name in sorted(commands, reverse=r % 2 == 1):
            port = free_port()
            server = Server(name, [*commands[name], "--port", str(port)], port, scratch / f"{name}{r}.log")
            rounds[name].append(measure(server, texts, args.concurrency, args.warmup, args.max_seconds))
    levels = range(len(args.concurrency))
    results = {name: [summarize([run[i] for run in runs]) for i in levels] for name, runs in rounds.items()}

    import torch

    print(f"model: {model_dir}; {len(texts)} single-text requests per level and round, {args.rounds} rounds")
    print(
        f"litserve: max_batch_size {args.max_batch_size}, batch_timeout {args.batch_timeout} s, "
        f"{args.workers_per_device} inference worker(s); torch threads per process: {args.num_threads or 'default'}"
    )
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; server logs in {scratch}")
    print("req/s: median over the rounds; latency percentiles: over all requests of all rounds")
    columns = ("conc", "ok", "failed", "unsent", "req/s", "p50 ms", "p95 ms", "p99 ms")
    print(f"{'server':<9} " + " ".join(f"{c:>{6 if i < 4 else 8}}" for i, c in enumerate(columns)))
    for name, rows in results.items():
        for level, r in zip(args.concurrency, rows, strict=True):
            print(
                f"{name:<9} {level:>6} {r['sent'] - r['failed']:>6} {r['failed']:>6} {r['unsent']:>6} "
                f"{r['throughput']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f}"
            )
    lost = sum(r["failed"] + r["unsent"] for rows in results.values() for r in rows)
    print(f"failed or unsent requests: {lost}")
    for i, level in enumerate(args.concurrency):
        lit, naive = results["litserve"][i]["throughput"], results["naive"][i]["throughput"]
        pairs = zip(rounds["litserve"], rounds["naive"], strict=True)
        per_round = [a[i]["throughput"] / b[i]["throughput"] for a, b in pairs]
        spread = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"throughput ratio litserve / naive at concurrency {level}: {lit / naive:.2f}x (rounds: {spread})")
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
