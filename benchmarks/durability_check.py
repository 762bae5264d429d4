"""Durability of `serve` (issue #21): a locked database under load, and SIGTERM under load.

    # a 30 s lock on --feedback_db while 8 clients keep sending /predict; feedback for ids served during the lock
    python benchmarks/durability_check.py lock --model_dir DIR --lock_seconds 30 --concurrency 8
    # 10 stops with SIGTERM while 8 clients keep sending /predict
    python benchmarks/durability_check.py sigterm --model_dir DIR --runs 10 --concurrency 8
    python benchmarks/durability_check.py lock --fabricate     # a tiny untrained model made on the spot

lock: every id served (before, during and after the lock) must be in the database once the lock is gone; /predict
must never answer 5xx; feedback for ids served during the lock must be a 503 (with Retry-After) while they are not
stored, then 200. sigterm: every request sent before the signal must be answered 200; the server must exit 0 with no
traceback, no leaked-semaphore warning and no process of its group left; every id it served must be stored. Prints
one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import ROOT, Server, argument_parser, fabricate_model, load_texts, serve_command


class Traffic:
    """``concurrency`` clients sending single-text /predict requests until `stop`; every outcome is kept."""

    def __init__(self, url: str, texts: list[str], concurrency: int) -> None:
        self.url, self.texts, self.concurrency = url, texts, concurrency
        self.results: list[tuple[float, float, int | str, list[str]]] = []  # (sent, answered, status, ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            text = self.texts[i % len(self.texts)]
            i += self.concurrency
            sent = time.monotonic()
            try:
                response = await client.post("/predict", json={"text": text})
                status: int | str = response.status_code
                ids = [p["prediction_id"] for p in response.json()["predictions"]] if status == 200 else []
            except (httpx.HTTPError, ValueError, KeyError) as err:
                status, ids = type(err).__name__, []
                await asyncio.sleep(0.05)  # the server is gone: do not spin
            self.results.append((sent, time.monotonic(), status, ids))

    def served_ids(self) -> list[str]:
        return [pid for _, _, status, ids in self.results if status == 200 for pid in ids]


def stored(db: Path, ids: list[str]) -> set[str]:
    with sqlite3.connect(db) as conn:
        found = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = f"SELECT id FROM predictions WHERE id IN ({','.join('?' * len(chunk))})"
            found |= {r[0] for r in conn.execute(query, chunk)}
        return found


def check(results: list[bool], ok: bool, line: str) -> None:
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {line}", flush=True)


def lock_scenario(args: argparse.Namespace, model_dir: Path, work: Path, texts: list[str]) -> list[bool]:
    results: list[bool] = []
    db = work / "lock.sqlite3"
    with Server("serve", serve_command(model_dir, *args.serve_args, feedback_db=db), work / "lock.log") as server:
        with Traffic(server.url, texts, args.concurrency) as traffic:
            time.sleep(args.before)
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")  # another writer holds the database
            lock_start = time.monotonic()
            print(f"lock taken; held {args.lock_seconds:g} s", flush=True)
            time.sleep(min(5.0, args.lock_seconds / 2))
            during = [pid for sent, _, s, ids in list(traffic.results) if sent > lock_start and s == 200 for pid in ids]
            items = [{"prediction_id": pid, "label": "physics"} for pid in during[:20]]
            with httpx.Client(base_url=server.url, timeout=60) as client:
                asked = time.monotonic()
                early = client.post("/feedback", json={"feedback": items})
                early_seconds = time.monotonic() - asked
                time.sleep(max(0.0, lock_start + args.lock_seconds - time.monotonic()))
                conn.execute("COMMIT")
                conn.close()
                released = time.monotonic()
                print(f"lock released after {released - lock_start:.1f} s", flush=True)
                statuses = []
                while True:  # the client's retry loop, as Retry-After says
                    late = client.post("/feedback", json={"feedback": items})
                    statuses.append(late.status_code)
                    if late.status_code != 503 or time.monotonic() - released > 60:
                        break
                    time.sleep(float(late.headers.get("Retry-After", 1)))
                labelled_after = time.monotonic() - released
            time.sleep(args.after)
        served = traffic.served_ids()
        deadline = time.monotonic() + 60
        while (missing := set(served) - stored(db, served)) and time.monotonic() < deadline:
            time.sleep(0.5)
        page = httpx.get(f"{server.url}/metrics").text
    codes: dict = {}
    for _, _, status, _ in traffic.results:
        codes[status] = codes.get(status, 0) + 1
    in_lock = [r for r in traffic.results if lock_start < r[0] < released]
    print(f"/predict answers: {codes}; {len(in_lock)} requests sent during the lock; {len(served)} ids served")
    lines = [line.split(" ") for line in page.splitlines() if line.startswith("lightning_cls_prediction_log")]
    metrics = {name: float(value) for name, value, *_ in lines}
    print(f"prediction log metrics after: {metrics}")
    check(results, not missing, f"predictions lost: {len(missing)} of {len(served)} served")
    fivexx = sum(n for s, n in codes.items() if isinstance(s, int) and s >= 500)
    check(results, fivexx == 0 and all(s == 200 for s in codes), f"/predict 5xx: {fivexx}; non-200: {codes}")
    check(
        results,
        bool(items) and early.status_code == 503 and early.headers.get("Retry-After") is not None,
        f"feedback for {len(items)} ids served during the lock, sent during it: {early.status_code} "
        f"(Retry-After {early.headers.get('Retry-After')}) after {early_seconds:.1f} s: {early.json()}"[:400],
    )
    check(
        results,
        statuses[-1] == 200,
        f"the same feedback after the lock, retried as told: {statuses}, 200 {labelled_after:.1f} s after the release",
    )
    return results


def sigterm_run(args: argparse.Namespace, model_dir: Path, work: Path, texts: list[str], run: int) -> list[bool]:
    results: list[bool] = []
    db, log = work / f"stop{run}.sqlite3", work / f"stop{run}.log"
    server = Server("serve", serve_command(model_dir, *args.serve_args, feedback_db=db), log).start()
    try:
        with Traffic(server.url, texts, args.concurrency) as traffic:
            time.sleep(args.before)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=120)
            stopped = time.monotonic() - signalled
            time.sleep(0.5)
            ps = ["ps", "-o", "pid=,stat=,args=", "-g", str(server.process.pid)]
            listed = subprocess.run(ps, capture_output=True, text=True).stdout.splitlines()
            # a zombie has ended; it waits for this container's init to reap it
            left = "; ".join(line.strip() for line in listed if line.split()[1][0] != "Z")
    finally:
        server.stop()
    before = [r for r in traffic.results if r[0] < signalled]
    unanswered = [r[2] for r in before if r[2] != 200]
    after = [r for r in traffic.results if r[0] >= signalled]
    text = log.read_text()
    served = traffic.served_ids()
    lost = set(served) - stored(db, served)
    bad = [line for line in text.splitlines() if "Traceback" in line or "leaked" in line or "Error" in line]
    check(
        results,
        code == 0 and not unanswered and not bad and not left and not lost,
        f"run {run}: exit {code} {stopped:.1f} s after SIGTERM; {len(before)} requests sent before it, "
        f"{len(unanswered)} not answered 200 {unanswered[:5]}; {len(after)} sent after it "
        f"({sum(r[2] == 200 for r in after)} answered); ids served {len(served)}, not stored {len(lost)}; "
        f"error lines {bad[:3]}; processes left: {left or 'none'}",
    )
    return results


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("scenario", choices=["lock", "sigterm"])
    parser.add_argument("--model_dir", help="exported model folder")
    parser.add_argument("--fabricate", action="store_true", help="make a tiny untrained model folder instead")
    parser.add_argument("--texts", help="CSV with a text column (default: generated abstracts)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lock_seconds", type=float, default=30.0)
    parser.add_argument("--before", type=float, default=3.0, help="seconds of traffic before the lock / signal")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of traffic after the lock")
    parser.add_argument("--runs", type=int, default=10, help="sigterm: how many stops")
    parser.add_argument("--serve_args", default="--num_threads 1", help="more serve flags, one string")
    args = parser.parse_args()
    args.serve_args = args.serve_args.split()
    with tempfile.TemporaryDirectory(prefix="durability_") as tmp:
        work = Path(tmp)
        model_dir = fabricate_model(work) if args.fabricate else Path(args.model_dir).resolve()
        texts = load_texts(args.texts, 400, seed=0)
        print(f"{args.scenario}: {model_dir}, concurrency {args.concurrency}, serve {args.serve_args}", flush=True)
        os.chdir(ROOT)
        if args.scenario == "lock":
            results = lock_scenario(args, model_dir, work, texts)
        else:
            results = [ok for run in range(1, args.runs + 1) for ok in sigterm_run(args, model_dir, work, texts, run)]
    print(f"{sum(results)} of {len(results)} checks passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
