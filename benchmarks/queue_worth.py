"""What the review queue's labels are worth (#31): labels chosen by the queue against labels chosen at random.

A model is trained on older papers and served (`serve --keep_texts`) on a pool of newer abstracts. Then N of the
served answers get their true subject (the CSV's label) in two ways, each in its own copy of the served store:

- **queue**: a reviewer takes N items one at a time from the review page's queue (GET /pages/review/next, the
  page's own call: reasons first, then the least certain) and labels each through POST /feedback;
- **random**: N served answers drawn at random (one arm per seed), labelled through POST /feedback.

Each arm retrains the same recipe from the same pretrained model with the same seed, its labels added to the
training split (`fit --data.feedback_db`), fuses the lexical expert (`calibrate --model.lexical true`, the expert
fitted on the same training rows) and is tested on papers newer than the pool, which no arm saw. The improvement of
an arm is its test macro-F1 minus the model's without any labels; the target is the queue's improvement at least
1.5x the random arms' mean.

    python benchmarks/queue_worth.py --data ../shared/data/arxiv/scientific_text.csv

Every step writes its result under ``--work`` and is skipped when that result is there, so a stopped run continues
where it stopped. The data files it writes there are subsets of the CSV: keep them out of the repository (runs/ is
ignored). The summary goes to experiments/review_queue_worth/output.txt and results.json.
"""

from __future__ import annotations

import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from harness import ROOT, Server, argument_parser, machine_line, serve_command

from lightning_cls.data.labels import DEFAULT_LABELS

CONFIG = ROOT / "experiments" / "review_queue_worth" / "config.yaml"
RESULTS = ROOT / "experiments" / "review_queue_worth"
REVIEWER = "queue-worth-reviewer"
TARGET = 1.5
# Rows of the older period (training and validation) and of the test period: the config's split fractions
# (val 0.1, test 1/3 of 6,000) are set from these; tests/test_benchmarks.py checks they still agree.
SIZES = {"old": 4000, "test": 2000}
# The review page's reasons (`serving.review`), counted by kind.
REASONS = (("least certain", "least certain"), ("drift", "drift"), ("the network says", "experts disagree"),
           ("the challenger", "challenger"), ("abstained", "abstained"))  # fmt: skip


def make_data(csv: str, work: Path, sizes: dict[str, int], seed: int) -> None:
    """base.csv (older papers, then the test papers: the config's split by arxiv_id puts the newest 2,000 in test)
    and pool.csv (the papers served), each a seeded sample of the ten subjects' rows of one period."""
    if (work / "pool.csv").exists():
        return
    frame = pd.read_csv(csv, dtype={"arxiv_id": str})
    frame = frame[frame["label"].isin(DEFAULT_LABELS)]
    month = frame["arxiv_id"].str[:4]
    periods = {"old": month < "2511", "pool": (month >= "2512") & (month <= "2602"), "test": month >= "2605"}
    parts = {}
    for name, mask in periods.items():
        rows = frame[mask]
        if len(rows) < sizes[name]:
            raise SystemExit(f"{csv}: only {len(rows)} rows in the {name} period, {sizes[name]} asked for.")
        parts[name] = rows.sample(sizes[name], random_state=seed)
    work.mkdir(parents=True, exist_ok=True)
    base = pd.concat([parts["old"], parts["test"]])[["arxiv_id", "text", "label"]]
    base.to_csv(work / "base.csv", index=False)
    parts["pool"][["arxiv_id", "text", "label"]].to_csv(work / "pool.csv", index=False)


def lightning(*args: str, log: Path) -> None:
    """One `python -m lightning_cls` command, its output appended to ``log``; a failure stops the run."""
    with open(log, "a") as out:
        out.write(f"\n$ lightning_cls {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "lightning_cls", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"lightning_cls {args[0]} failed ({done.returncode}); see {log}")


def train_arm(arm: str, work: Path, db: Path | None) -> dict:
    """Fit, fuse and test one arm (each step skipped when its output exists); its test reports."""
    out = work / arm
    out.mkdir(exist_ok=True)
    log, cpu0 = out / "log.txt", _children_cpu()
    data = ["--config", str(CONFIG), "--data.path", str(work / "base.csv")]
    data += ["--data.feedback_db", str(db)] if db is not None else []
    logger = ["--trainer.logger.init_args.save_dir", str(work / "logs"), "--trainer.logger.init_args.name", arm]
    ckpts = out / "checkpoints"
    if not list(ckpts.glob("epoch*.ckpt")):
        lightning("fit", *data, *logger, "--checkpoint.dirpath", str(ckpts), log=log)
    best = max(ckpts.glob("epoch*.ckpt"), key=lambda p: float(p.stem.rsplit("-f1", 1)[1]))
    fused = out / "fused.ckpt"
    if not fused.exists():
        lightning("calibrate", *data, "--ckpt_path", str(best), "--model.lexical", "true", "--output_path", str(fused),
                  log=log)  # fmt: skip
    reports = {}
    for name, ckpt in (("network", best), ("fused", fused)):
        report = out / f"{name}_test_report.json"
        if not report.exists():
            lightning("test", *data, *logger[:3], f"{arm}_{name}_test", "--ckpt_path", str(ckpt), log=log)
            found = sorted((work / "logs" / f"{arm}_{name}_test").glob("version_*/test_report.json"))
            shutil.copy(found[-1], report)
        reports[name] = json.loads(report.read_text())
    spent = out / "cpu_seconds.txt"
    if not spent.exists():
        spent.write_text(f"{_children_cpu() - cpu0:.0f}\n")
    return reports


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def serve_pool(work: Path, batch: int = 32) -> None:
    """The base model's export served on the pool's texts, kept in pool.sqlite3; pool_answers.json maps each
    answer's prediction_id to its text's true label."""
    answers = work / "pool_answers.json"
    if answers.exists():
        return
    export = work / "base" / "export"
    if not (export / "lightning_cls.json").exists():
        lightning("export", "--ckpt_path", str(work / "base" / "fused.ckpt"), "--output_dir", str(export),
                  log=work / "base" / "log.txt")  # fmt: skip
    pool = pd.read_csv(work / "pool.csv")
    db = work / "pool.sqlite3"
    db.unlink(missing_ok=True)
    found = {}
    server = Server("base", serve_command(export, "--keep_texts", "true", feedback_db=db), work / "serve_pool.log")
    with server, httpx.Client(base_url=server.url, timeout=300) as client:
        for start in range(0, len(pool), batch):
            rows = pool.iloc[start : start + batch]
            response = client.post("/predict", json={"texts": rows["text"].tolist()})
            response.raise_for_status()
            for answer, (_, row) in zip(response.json()["predictions"], rows.iterrows(), strict=True):
                found[answer["prediction_id"]] = {
                    "truth": row["label"], "label": answer["label"], "probability": answer["probability"],
                }  # fmt: skip
    answers.write_text(json.dumps(found))


def copy_store(work: Path, arm: str) -> Path:
    """A copy of the served store for one arm (SQLite's backup: whole, whatever the journal holds)."""
    db = work / f"{arm}.sqlite3"
    # A stopped earlier copy may have left its journal beside it: SQLite would replay that WAL onto the new copy.
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    with sqlite3.connect(work / "pool.sqlite3") as source, sqlite3.connect(db) as target:
        source.backup(target)
    return db


def label_arm(work: Path, arm: str, n: int, seed: int | None) -> Path:
    """Label ``n`` served answers in the arm's store copy: from the review queue (``seed`` None) or at random."""
    chosen_file = work / arm / "chosen.json"
    if chosen_file.exists():
        return work / f"{arm}.sqlite3"
    (work / arm).mkdir(exist_ok=True)
    answers = json.loads((work / "pool_answers.json").read_text())
    db = copy_store(work, arm)
    export = work / "base" / "export"
    chosen = []
    server = Server(arm, serve_command(export, "--keep_texts", "true", feedback_db=db), work / arm / "serve.log")
    with server, httpx.Client(base_url=server.url, timeout=300) as client:
        if seed is None:  # a reviewer working through the queue, one item at a time, as the page does
            for _ in range(n):
                response = client.get("/pages/review/next", params={"reviewer": REVIEWER})
                response.raise_for_status()
                item = response.json()["item"]
                if item is None:
                    raise SystemExit(f"{db}: the review queue ran out after {len(chosen)} of {n} items.")
                pid = item["prediction_id"]
                _feedback(client, [pid], answers)
                chosen.append({"prediction_id": pid, "reasons": item["reasons"]})
        else:
            rng = np.random.default_rng(seed)
            ids = sorted(answers)
            picked = [ids[i] for i in rng.choice(len(ids), size=n, replace=False)]
            _feedback(client, picked, answers)
            chosen = [{"prediction_id": pid, "reasons": []} for pid in picked]
        # The logger process stores feedback after answering: wait until all of it is in the store.
        deadline = time.monotonic() + 60
        while _feedback_rows(db) < n and time.monotonic() < deadline:
            time.sleep(0.5)
    if _feedback_rows(db) != n:
        raise SystemExit(f"{db}: {_feedback_rows(db)} feedback rows stored, {n} sent.")
    chosen_file.write_text(json.dumps(chosen))
    return db


def _feedback(client: httpx.Client, ids: list[str], answers: dict) -> None:
    body = {"feedback": [{"prediction_id": pid, "label": answers[pid]["truth"]} for pid in ids]}
    response = client.post("/feedback", json=body)
    response.raise_for_status()


def _feedback_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM feedback").fetchone()[0]


def describe_labels(work: Path, arm: str) -> dict:
    """What an arm's labels were: how many of the served answers were wrong, how certain they were, the subjects."""
    answers = json.loads((work / "pool_answers.json").read_text())
    chosen = json.loads((work / arm / "chosen.json").read_text())
    picked = [answers[c["prediction_id"]] for c in chosen]
    reasons: dict[str, int] = {}
    for c in chosen:
        for r in c["reasons"]:
            key = next((k for prefix, k in REASONS if r.startswith(prefix)), r)
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "served_wrong": float(np.mean([p["label"] != p["truth"] for p in picked])),
        "mean_probability": float(np.mean([p["probability"] for p in picked])),
        "subjects": len({p["truth"] for p in picked}),
        "reasons": reasons,
    }


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--data", required=True, help="the shared arXiv CSV (text, label, arxiv_id)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "experiments" / "review_queue_worth"))
    parser.add_argument("--labels", type=int, default=300, help="labels each arm adds")
    parser.add_argument("--draws", type=int, default=3, help="random arms (seeds 1..draws)")
    parser.add_argument("--pool", type=int, default=3000, help="newer abstracts served")
    args = parser.parse_args()
    work = Path(args.work)
    make_data(args.data, work, {**SIZES, "pool": args.pool}, seed=0)
    reports = {"base": train_arm("base", work, None)}
    serve_pool(work)
    arms = {"queue": None, **{f"random{k}": k for k in range(1, args.draws + 1)}}
    for arm, seed in arms.items():
        db = label_arm(work, arm, args.labels, seed)
        reports[arm] = train_arm(arm, work, db)
    summarize(work, reports, list(arms), args)


def summarize(work: Path, reports: dict, arms: list[str], args) -> None:
    rows, gains = [], {}
    for arm in ["base", *arms]:
        row = {"arm": arm, **{f"{k}_macro_f1": reports[arm][k]["macro_f1"] for k in ("network", "fused")}}
        row["fused_accuracy"] = reports[arm]["fused"]["accuracy"]
        row["cpu_minutes"] = round(float((work / arm / "cpu_seconds.txt").read_text()) / 60, 1)
        if arm != "base":
            row.update(describe_labels(work, arm))
            for k in ("network", "fused"):
                row[f"{k}_gain"] = row[f"{k}_macro_f1"] - reports["base"][k]["macro_f1"]
        rows.append(row)
    randoms = [r for r in rows if r["arm"].startswith("random")]
    queue = next(r for r in rows if r["arm"] == "queue")
    for k in ("network", "fused"):
        mean_random = float(np.mean([r[f"{k}_gain"] for r in randoms]))
        gains[k] = {"queue": queue[f"{k}_gain"], "random_mean": mean_random,
                    "random_sd": float(np.std([r[f"{k}_gain"] for r in randoms], ddof=1)) if len(randoms) > 1 else 0.0,
                    "ratio": queue[f"{k}_gain"] / mean_random if mean_random > 0 else None}  # fmt: skip
    ratio = gains["fused"]["ratio"]
    verdict = "met" if ratio is not None and ratio >= TARGET else "missed"
    setup = f"labels per arm: {args.labels}; pool served: {args.pool}; test: {SIZES['test']:,} papers from 2026-05 on"
    pool = json.loads((work / "pool_answers.json").read_text()).values()
    served = f"the base model's answers to the pool: {np.mean([p['label'] != p['truth'] for p in pool]):.2f} wrong, "
    served += f"mean top probability {np.mean([p['probability'] for p in pool]):.2f}"
    lines = [machine_line(), setup, served, ""]
    lines.append(f"{'arm':9} {'net F1':>7} {'fused F1':>8} {'fused acc':>9} {'net gain':>9} {'fused gain':>10} "
                 f"{'served wrong':>12} {'mean p':>6}  reasons")  # fmt: skip
    for r in rows:
        gain = f"{r.get('network_gain', 0):+9.4f} {r.get('fused_gain', 0):+10.4f}" if r["arm"] != "base" else " " * 20
        chosen = f"{r['served_wrong']:12.2f} {r['mean_probability']:6.2f}  {r['reasons']}" if r["arm"] != "base" else ""
        lines.append(f"{r['arm']:9} {r['network_macro_f1']:7.4f} {r['fused_macro_f1']:8.4f} {r['fused_accuracy']:9.4f} "
                     f"{gain} {chosen}")  # fmt: skip
    lines.append("")
    for k in ("fused", "network"):
        g = gains[k]
        shown = f"{g['ratio']:.2f}x" if g["ratio"] is not None else "n/a (random labels did not improve)"
        lines.append(f"{k}: queue gain {g['queue']:+.4f}, random gain {g['random_mean']:+.4f} "
                     f"(sd {g['random_sd']:.4f} over {len(randoms)} draws): ratio {shown}")  # fmt: skip
    lines.append(f"target: the queue's fused gain >= {TARGET}x the random mean: {verdict}")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "output.txt").write_text(text)
    summary = {"rows": rows, "gains": gains, "verdict": verdict}
    (RESULTS / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
