"""Two measurements of the lifecycle (issue #25), each against a baseline run side by side in the same run:

- ``shadow``: what a challenger in shadow costs the answered requests. The service is started once per shadow share
  (no challenger at all, the baseline; then 0, 10%, 50%, 100% of the requests copied to the shadow), the same
  requests are sent at each concurrency, and throughput and p99 of the answered requests are printed against the
  baseline's, with how many copies the shadow answered and how many it dropped (the saturated worker drops them).
- ``swap``: the answering version swapped under load. One service, ``--concurrency`` clients sending requests for
  ``--seconds``; the champion is swapped (POST /deployment) ``--swaps`` times, alternating the two models. Printed:
  failed requests, p99 of the requests in flight during each swap (from the change to the first answer of the new
  version, plus 2 s) against the p99 before the first swap, and which versions answered.

    python benchmarks/lifecycle_bench.py shadow --champion runs/export/a --challenger runs/export/b \\
        --texts ../shared/data/arxiv/scientific_text.csv
    python benchmarks/lifecycle_bench.py swap --champion runs/export/a --challenger runs/export/b \\
        --texts ../shared/data/arxiv/scientific_text.csv --concurrency 32 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from harness import ROOT, Server, cpu_name, load_texts, ratio, serve_command

KEY = "lifecycle-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}


SERVE_ARGS: list[str] = []  # --serve_args: the same for every server of the run


async def send(url: str, texts: list[str], concurrency: int, seconds: float, on_start=None) -> list[dict]:
    """``concurrency`` clients sending one text per request, round the list, for ``seconds`` (or until every text
    was sent once when ``seconds`` is 0). Each request: start time, latency, status, version."""
    records, queue = [], list(reversed(texts))
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while True:
            if seconds:
                if time.monotonic() - t0 >= seconds:
                    return
                text = texts[(i + n * concurrency) % len(texts)]
                n += 1
            elif queue:
                text = queue.pop()
            else:
                return
            start = time.monotonic()
            try:
                r = await client.post("/predict", json={"text": text}, headers=AUTH)
                ok = r.status_code == 200
                version = r.json()["predictions"][0]["model_version"] if ok else None
            except (httpx.HTTPError, ValueError, KeyError):
                ok, version = False, None
            records.append({"start": start - t0, "latency": time.monotonic() - start, "ok": ok, "version": version})

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = [client_loop(client, i) for i in range(concurrency)]
        if on_start is not None:
            tasks.append(on_start(t0))
        await asyncio.gather(*tasks)
    return records


def stats(records: list[dict], wall: float | None = None) -> dict:
    lat = np.asarray([r["latency"] for r in records if r["ok"]]) * 1000
    wall = wall or (max(r["start"] + r["latency"] for r in records) - min(r["start"] for r in records))
    ok = int(sum(r["ok"] for r in records))
    return {
        "requests": len(records),
        "failed": len(records) - ok,
        "throughput": ok / wall if wall else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def metric_sum(page: str, name: str) -> float:
    """The sum of a metric's samples over its labels in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if re.match(rf"{name}(\{{| )", line))


def shadow(args: argparse.Namespace, texts: list[str]) -> dict:
    """Each configuration started and measured once per round, the configurations interleaved within a round (so a
    slow spell of the machine hits all of them); the median round per configuration and level is reported."""
    names = {"no challenger": None, **{f"shadow {share:.0%}": share for share in args.shares}}
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name, share in names.items():
            extra = ["--num_threads", str(args.num_threads)] if args.num_threads else []
            if share is not None:
                extra += ["--challenger", args.challenger, "--challenger_mode", "shadow"]
                extra += ["--challenger_share", str(share)]
            with tempfile.TemporaryDirectory() as tmp:
                command = serve_command(args.champion, *SERVE_ARGS, *extra, feedback_db=f"{tmp}/f.sqlite3")
                with Server(name, command, Path(tmp) / "server.log") as server:
                    asyncio.run(send(server.url, texts[: args.warmup], 1, 0))
                    levels = {c: stats(asyncio.run(send(server.url, texts, c, 0))) for c in args.concurrency}
                    time.sleep(2)  # the shadow's last copies, and the logger process's counts
                    page = httpx.get(f"{server.url}/metrics", timeout=30).text
            run = {
                "levels": levels,
                "shadow_texts": metric_sum(page, "lightning_cls_shadow_texts_total"),
                "shadow_dropped": metric_sum(page, "lightning_cls_shadow_dropped_total"),
            }
            rounds[name].append(run)
            print(f"round {r + 1}, {name}: {json.dumps(run)}", flush=True)
    return {"runs": report_shadow(rounds, names, len(texts), args), "rounds": rounds}


def report_shadow(rounds: dict[str, list[dict]], names: dict, requests: int, args: argparse.Namespace) -> dict:
    """The mean over the rounds per configuration and level, printed against the baseline's."""
    runs = {}
    for name, share in names.items():
        levels = {}
        for c in args.concurrency:
            measured = [run["levels"][str(c)] if str(c) in run["levels"] else run["levels"][c] for run in rounds[name]]
            levels[c] = {k: float(np.mean([m[k] for m in measured])) for k in ("throughput", "p50_ms", "p99_ms")}
            levels[c]["failed"] = sum(m["failed"] for m in measured)
        shadowed = sum(run["shadow_texts"] for run in rounds[name])
        dropped = sum(run["shadow_dropped"] for run in rounds[name])
        runs[name] = {"share": share, "levels": levels, "shadow_texts": shadowed, "shadow_dropped": dropped}
    base = runs["no challenger"]["levels"]
    sent = requests * len(args.concurrency) * len(rounds["no challenger"])
    print(f"\nShadow share against no challenger ({requests} requests a level, means of {args.rounds} rounds):")
    print(
        f"{'run':>14} {'conc':>5} {'req/s':>7} {'ratio':>6} {'p99 ms':>8} {'p99 x':>6} {'failed':>6} "
        f"{'shadowed':>9} {'dropped':>8} {'of sent':>8}"
    )
    for name, run in runs.items():
        for c, level in run["levels"].items():
            print(
                f"{name:>14} {c:>5} {level['throughput']:7.2f} {level['throughput'] / base[c]['throughput']:6.2f} "
                f"{level['p99_ms']:8.0f} {level['p99_ms'] / base[c]['p99_ms']:6.2f} {level['failed']:6d} "
                f"{run['shadow_texts']:9.0f} {run['shadow_dropped']:8.0f} {run['shadow_texts'] / sent:8.1%}"
            )
    return runs


def reprint(path: str) -> None:
    """The table of a saved shadow run (--out), with this script's aggregation."""
    saved = json.loads(Path(path).read_text())
    args = argparse.Namespace(**saved["args"])
    names = {"no challenger": None, **{f"shadow {share:.0%}": share for share in args.shares}}
    report_shadow(saved["result"]["rounds"], names, args.requests, args)


def swap(args: argparse.Namespace, texts: list[str]) -> dict:
    models = [str(Path(args.champion).resolve()), str(Path(args.challenger).resolve())]
    changes = []

    async def swapper(url: str, t0: float) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for i in range(args.swaps):
                await asyncio.sleep(max(0.0, args.seconds * (i + 1) / (args.swaps + 1) - (time.monotonic() - t0)))
                at = time.monotonic() - t0
                r = await client.post(
                    "/deployment", json={"champion": models[(i + 1) % 2], "reason": "bench"}, headers=AUTH
                )
                changes.append({"at": at, "status": r.status_code, "to": r.json()["deployment"]["champion"]["version"]})

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LIGHTNING_CLS_API_KEY"] = KEY
        extra = ["--num_threads", str(args.num_threads)] if args.num_threads else []
        command = serve_command(models[0], *SERVE_ARGS, *extra, feedback_db=f"{tmp}/f.sqlite3")
        with Server("serve", command, Path(tmp) / "server.log") as server:
            asyncio.run(send(server.url, texts[: args.warmup], 1, 0))
            records = asyncio.run(
                send(server.url, texts, args.concurrency, args.seconds, lambda t0: swapper(server.url, t0))
            )
    steady = [r for r in records if r["start"] + r["latency"] < changes[0]["at"]]
    windows = []
    for change in changes:
        first_new = min(
            (r["start"] + r["latency"] for r in records if r["version"] == change["to"] and r["start"] >= change["at"]),
            default=args.seconds,
        )
        end = first_new + 2.0
        during = [r for r in records if r["start"] < end and r["start"] + r["latency"] > change["at"]]
        windows.append({**change, "took_over_after_s": first_new - change["at"], **stats(during, end - change["at"])})
    result = {"steady": stats(steady), "swaps": windows, "all": stats(records)}
    s = result["steady"]
    print(f"\nSwap under load: concurrency {args.concurrency}, {args.seconds:.0f} s, {cpu_name()}")
    print(f"  all requests: {result['all']['requests']}, failed {result['all']['failed']}")
    print(
        f"  steady (before the first swap): {s['throughput']:.2f} req/s, "
        f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms"
    )
    for w in windows:
        print(
            f"  swap at {w['at']:.1f} s -> {w['to']}: new version answering after {w['took_over_after_s']:.1f} s; "
            f"{w['requests']} requests in flight, failed {w['failed']}, p99 {w['p99_ms']:.0f} ms = "
            f"{ratio(w['p99_ms'], s['p99_ms'])} steady"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["shadow", "swap", "reprint"])
    parser.add_argument("--champion")
    parser.add_argument("--challenger")
    parser.add_argument("--texts", help="CSV with a text column (default: generated texts)")
    parser.add_argument("--requests", type=int, default=300, help="requests per level (shadow)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the swap run")
    parser.add_argument("--swaps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="shadow: each configuration measured this many times")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve_args", default="", help="more serve flags for every server, e.g. '--backend torch'")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.what == "reprint":  # python benchmarks/lifecycle_bench.py reprint --out shadow.json
        return reprint(args.out)
    if not (args.champion and args.challenger):
        parser.error("--champion and --challenger are needed")
    SERVE_ARGS.extend(shlex.split(args.serve_args))
    texts = load_texts(args.texts, args.requests, args.seed)
    if args.what == "swap":
        args.concurrency = args.concurrency[-1]
        result = swap(args, texts)
    else:
        result = shadow(args, texts)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(), "result": result}, indent=2))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
