"""Replicas under faults, and what the PostgreSQL store costs one replica (issue #32).

`faults`: replicas behind HAProxy on one PostgreSQL (deploy/run_replicas.py's `Cluster`, the operator's script),
``--clients`` clients for ``--seconds``: each sends one text through the balancer, then the true label of the answer
straight to another replica than the one that answered (HAProxy's `X-Replica` header names it), waiting out 503s as
their Retry-After says. A third of the way in the challenger is promoted through the balancer, and each replica is
asked until it answers with the new champion; half way PostgreSQL is restarted (`pg_ctl restart -m fast`). At the
end the replicas are stopped (they store what they hold) and the store is read: answers whose ids are not stored
(predictions lost), acknowledged labels not stored (feedback lost), labels acknowledged as stored more often than
stored (double-counted); with the 5xx of /predict, the /feedback 503s (and whether each came with Retry-After and
within the outage), and the promotion's time to each replica.

`throughput`: one replica at concurrency ``--clients`` for ``--seconds``, its store a SQLite file or a PostgreSQL
database, alternately over ``--rounds`` rounds; the ratio last (the store must not be the bottleneck: >= 0.95x).

    python benchmarks/fault_bench.py faults --fabricate --seconds 60 --clients 32 --replicas 3
    python benchmarks/fault_bench.py throughput --fabricate --seconds 30 --clients 32 --rounds 3
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import ROOT, Server, argument_parser, cpu_name, fabricate_model, load_texts, ratio, serve_command
from load_test import run_level

sys.path.insert(0, str(ROOT / "deploy"))
from postgres_cluster import PostgresCluster
from run_replicas import Cluster, Settings, stop

GRACE = 30.0  # seconds a client keeps retrying a label after the run (the database may still be coming back)


@dataclass
class Tally:
    answers: dict[str, str] = field(default_factory=dict)  # prediction id -> the replica that answered
    predict_5xx: int = 0
    predict_failed: int = 0  # no answer at all (a transport error)
    acked: set[str] = field(default_factory=set)  # ids whose label a replica acknowledged (200)
    stored_claims: int = 0  # sum of the 200s' "stored": more than the rows stored is double counting
    feedback_503: list[tuple[float, bool]] = field(default_factory=list)  # (time, with Retry-After)
    feedback_other: int = 0  # any other refusal
    outage: tuple[float, float] | None = None
    propagation: dict[str, float] = field(default_factory=dict)


async def client(n: int, texts: list[str], cluster: Cluster, key: str, deadline: float, tally: Tally) -> None:
    replicas = cluster.state["replicas"]
    by_name = {r["name"]: i for i, r in enumerate(replicas)}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        i = n
        while time.monotonic() < deadline:
            i += 1
            try:
                response = await http.post(
                    f"{cluster.state['balancer']['url']}/predict", json={"text": texts[i % len(texts)]}
                )
            except httpx.HTTPError:
                tally.predict_failed += 1
                continue
            if response.status_code >= 500:
                tally.predict_5xx += 1
                continue
            answer, replica = response.json()["predictions"][0], response.headers["X-Replica"]
            tally.answers[answer["prediction_id"]] = replica
            other = replicas[(by_name[replica] + 1) % len(replicas)]["url"]  # never the one that answered
            body = {"feedback": [{"prediction_id": answer["prediction_id"], "label": answer["label"]}]}
            while time.monotonic() < deadline + GRACE:
                try:
                    fed = await http.post(f"{other}/feedback", json=body)
                except httpx.HTTPError:
                    await asyncio.sleep(0.5)
                    continue
                if fed.status_code == 503:
                    retry = fed.headers.get("Retry-After")
                    tally.feedback_503.append((time.monotonic(), retry is not None))
                    await asyncio.sleep(float(retry or 1))
                    continue
                if fed.status_code == 200:
                    tally.acked.add(answer["prediction_id"])
                    tally.stored_claims += fed.json()["stored"]
                else:
                    tally.feedback_other += 1
                break


async def promote(cluster: Cluster, key: str, at: float, tally: Tally) -> None:
    """Through the balancer (whichever replica gets it); then each replica is asked every 50 ms."""
    await asyncio.sleep(at)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        response = await http.post(f"{cluster.state['balancer']['url']}/deployment", json={"action": "promote"})
        response.raise_for_status()
        new, done = response.json()["deployment"]["champion"]["version"], time.monotonic()

        async def watch(replica: dict) -> None:
            while time.monotonic() - done < 30:
                answer = await http.post(f"{replica['url']}/predict", json={"text": "probe"})
                if answer.status_code == 200 and answer.json()["predictions"][0]["model_version"] == new:
                    tally.propagation[replica["name"]] = time.monotonic() - done
                    return
                await asyncio.sleep(0.05)

        await asyncio.gather(*(watch(r) for r in cluster.state["replicas"]))


async def restart_database(cluster: Cluster, at: float, tally: Tally) -> None:
    await asyncio.sleep(at)
    down = time.monotonic()
    await asyncio.to_thread(cluster.postgres.restart)
    tally.outage = (down, time.monotonic())


def stored(cluster: Cluster, ids: list[str]) -> tuple[set[str], list[str]]:
    """The answered ids stored, and the feedback rows on them (with repeats, if any)."""
    import sqlalchemy as sa

    from lightning_cls.store.feedback_store import FeedbackStore

    store = FeedbackStore(cluster.state["db"], setup=False)
    try:
        known = store.known_ids(ids)
        with store.transaction(write=False) as conn:
            rows = [r[0] for r in conn.execute(sa.text("SELECT prediction_id FROM feedback"))]
    finally:
        store.close()
    return known, [r for r in rows if r in set(ids)]


def faults(args, models: list[Path], scratch: Path) -> int:
    key = secrets.token_hex(16)
    os.environ["LIGHTNING_CLS_API_KEY"] = key  # every replica requires it (POST /deployment needs one)
    serve_args = ["--num_threads", str(args.num_threads), "--challenger", str(models[1]),
                  "--challenger_mode", "shadow", "--challenger_share", "0"]  # fmt: skip
    cluster = Cluster(Settings(str(models[0]), scratch / "state.json", args.replicas, serve_args=serve_args))
    texts = load_texts(args.texts, 400, seed=0)
    tally = Tally()
    cluster.start()
    try:
        start = time.monotonic()

        async def run() -> None:
            deadline = time.monotonic() + args.seconds
            await asyncio.gather(
                *(client(n, texts, cluster, key, deadline, tally) for n in range(args.clients)),
                promote(cluster, key, args.seconds / 3, tally),
                restart_database(cluster, args.seconds / 2, tally),
            )

        asyncio.run(run())
        # The replicas first (each stores what it holds), the database after the count.
        stop({k: v for k, v in cluster.state.items() if k != "postgres"})
        ids = list(tally.answers)
        known, rows = stored(cluster, ids)
    finally:
        cluster.stop()
    lost = len(set(ids) - known)
    feedback_lost = len(tally.acked - set(rows))
    double = max(0, tally.stored_claims - len(rows)) + (len(rows) - len(set(rows)))
    down, up = tally.outage
    outside = [t for t, _ in tally.feedback_503 if not down - 0.5 <= t <= up + args.after_outage]
    print(f"model: {models[0]}; {args.replicas} replicas behind HAProxy, {args.clients} clients, {args.seconds} s")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; logs in {scratch}")
    print(f"answers: {len(ids)} ({len(ids) / args.seconds:.1f}/s), by replica: "
          + ", ".join(f"{r['name']} {sum(v == r['name'] for v in tally.answers.values())}"
                      for r in cluster.state["replicas"]))  # fmt: skip
    print(f"PostgreSQL restart: from {down - start:.2f} s to {up - start:.2f} s ({up - down:.2f} s)")
    print(f"/predict 5xx: {tally.predict_5xx}; /predict without an answer: {tally.predict_failed}")
    print(f"predictions lost (answered, not stored): {lost}")
    print(f"feedback acknowledged: {len(tally.acked)}; lost: {feedback_lost}; double-counted: {double}; "
          f"other refusals: {tally.feedback_other}")  # fmt: skip
    without = sum(not r for _, r in tally.feedback_503)
    when = (f"first {tally.feedback_503[0][0] - down:+.2f} s, last {tally.feedback_503[-1][0] - up:+.2f} s after the "
            "restart's start / end") if tally.feedback_503 else "none"  # fmt: skip
    print(
        f"/feedback 503: {len(tally.feedback_503)} ({without} without Retry-After); {when}; "
        f"outside the outage (+{args.after_outage} s): {len(outside)}"
    )
    print("promotion answered by: " + ", ".join(f"{n} {s:.2f} s" for n, s in sorted(tally.propagation.items())))
    slow = [n for n in (r["name"] for r in cluster.state["replicas"]) if tally.propagation.get(n, 99) > 1.0]
    failures = {
        "predictions lost": lost, "feedback lost": feedback_lost, "feedback double-counted": double,
        "/predict 5xx": tally.predict_5xx, "/feedback 503 outside the outage": len(outside),
        "/feedback 503 without Retry-After": without, "replicas slower than 1 s to the promotion": len(slow),
    }  # fmt: skip
    print(
        "verdict: "
        + ("PASS" if not any(failures.values()) else "FAIL " + str({k: v for k, v in failures.items() if v}))
    )
    return int(any(failures.values()))


def throughput(args, models: list[Path], scratch: Path) -> int:
    os.environ.pop("LIGHTNING_CLS_API_KEY", None)  # no key: the load test's requests carry none
    texts = load_texts(args.texts, 400, seed=0) * 500  # sent in order until the time is up
    postgres = PostgresCluster(durable=True)
    rates: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    try:
        for r in range(args.rounds):
            order = ["sqlite", "postgres"] if r % 2 == 0 else ["postgres", "sqlite"]
            for name in order:
                db = scratch / f"r{r}.sqlite3" if name == "sqlite" else postgres.create_database(f"bench{r}")
                command = serve_command(models[0], "--num_threads", str(args.num_threads), feedback_db=db)
                with Server(name, command, scratch / f"{name}{r}.log") as server:
                    asyncio.run(run_level(server.url, texts[:50], 4, 30))  # warm up
                    level = asyncio.run(run_level(server.url, texts, args.clients, args.seconds))
                rates[name].append(level["throughput"])
                print(f"round {r}: {name:<8} {level['throughput']:8.1f} req/s ({level['failed']} failed)", flush=True)
    finally:
        postgres.stop()
    print(f"model: {models[0]}; one replica, concurrency {args.clients}, {args.seconds} s per round")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; logs in {scratch}")
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    per_round = ", ".join(f"{p / s:.2f}" for p, s in zip(rates["postgres"], rates["sqlite"], strict=True))
    print(f"PostgreSQL store against SQLite store (median req/s): {ratio(median['postgres'], median['sqlite'])} "
          f"(rounds: {per_round}); target >= 0.95x")  # fmt: skip
    return 0


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("mode", choices=("faults", "throughput"))
    parser.add_argument("--model_dir", help="the champion's export")
    parser.add_argument("--challenger_dir", help="faults: the export promoted mid-run")
    parser.add_argument("--fabricate", action="store_true", help="two tiny untrained exports made on the spot")
    parser.add_argument("--texts", help="CSV with a text column (default: generated texts)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="throughput: rounds of both stores")
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads per replica's worker")
    after = "faults: seconds after the restart in which a 503 still counts as the outage's"
    parser.add_argument("--after_outage", type=float, default=5.0, help=after)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lightning_cls_faults_"))
    if args.fabricate:
        models = [fabricate_model(scratch / "a", seed=1), fabricate_model(scratch / "b", seed=2)]
    elif args.model_dir and (args.challenger_dir or args.mode == "throughput"):
        models = [Path(args.model_dir).resolve(), Path(args.challenger_dir or args.model_dir).resolve()]
    else:
        parser.error("give --fabricate, or --model_dir (and --challenger_dir for faults)")
    sys.exit((faults if args.mode == "faults" else throughput)(args, models, scratch))


if __name__ == "__main__":
    main()
