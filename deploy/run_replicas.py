"""Several `serve` replicas on one machine, the way they run on several: one PostgreSQL store, N replicas of one
export, HAProxy in front (haproxy.cfg.template) and, with --prometheus, a Prometheus scraping every replica and
HAProxy with prometheus/rules.yml.

    python deploy/run_replicas.py start --model_dir DIR --replicas 3 --port 8000 --state runs/replicas/state.json
    python deploy/run_replicas.py stop --state runs/replicas/state.json

`start` returns once everything answers, leaving the processes running (each in its own process group, its log
beside the state file); the state file lists their pids, ports and URLs. `stop` stops them in the order that loses
nothing: the balancer (no new requests), the replicas (SIGTERM: each answers what it holds and stores its
predictions), Prometheus, and last the PostgreSQL this script started. Without --db a PostgreSQL is started in the
state file's folder (deploy/postgres_cluster.py); with --db URL the replicas use that database (and `stop` leaves
it). An API key in $LIGHTNING_CLS_API_KEY (or --api_key_env) is required by every replica, as by one.

The tests (tests/test_replicas.py) and the fault benchmark (benchmarks/fault_bench.py) run this same code; the
replicas are started by the benchmarks' harness (`harness.Server`), the one place a serve process is started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
sys.path.insert(0, str(DEPLOY.parent / "benchmarks"))
from harness import Server, free_port, serve_command, stop_group  # noqa: E402
from postgres_cluster import PostgresCluster  # noqa: E402

TEMPLATE = DEPLOY / "haproxy.cfg.template"
RULES = DEPLOY / "prometheus" / "rules.yml"
READY_SECONDS = 30  # HAProxy and Prometheus (the replicas: `Server.READY_SECONDS`)
DATABASE = "lightning_cls"


@dataclass
class Settings:
    model_dir: str
    state: Path  # the state file; its folder gets the logs, the configs and the local PostgreSQL
    replicas: int = 2
    db: str | None = None  # a PostgreSQL URL; None: start one in `folder`
    port: int | None = None  # the balancer's (None: a free one)
    prometheus: bool = False
    serve_args: list[str] = field(default_factory=list)  # extra `serve` options of every replica


def haproxy_config(port: int, stats_port: int, replicas: list[tuple[str, int]], host: str = "127.0.0.1") -> str:
    """The template with its fields filled in: one `server NAME HOST:PORT check` line per replica."""
    servers = "\n".join(f"    server {name} {host}:{p} check" for name, p in replicas)
    fields = {"bind": host, "port": str(port), "stats_port": str(stats_port), "servers": servers}
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def prometheus_config(replica_targets: list[str], haproxy_target: str) -> str:
    """deploy/prometheus/prometheus.yml's job, over every replica (each exports its own /metrics; the rules' `sum
    by (job, ...)` adds them up), and HAProxy's exporter; 5 s scrapes (a trial, not the 15 s of production)."""
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "lightning_cls", "static_configs": [{"targets": replica_targets}]},
            {"job_name": "haproxy", "static_configs": [{"targets": [haproxy_target]}]},
        ],
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def _wait_http(url: str, process: subprocess.Popen, name: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not answer {url} in {READY_SECONDS} s; see {log}")


def _launch(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


class Cluster:
    """`start` everything, `stop` it all (also after a partial start); `state` is what the state file holds. Used
    as a library by the benchmark (which restarts `postgres` mid-run) and through `main` by the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_file = Path(settings.state).resolve()
        self.folder = self.state_file.parent
        self.postgres: PostgresCluster | None = None
        self.replicas: list[Server] = []
        self.state: dict = {"folder": str(self.folder), "replicas": []}

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def start(self) -> Cluster:
        s = self.settings
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            db = s.db
            if db is None:  # a PostgreSQL of our own, in the folder (as root: a temporary one that the postgres
                # system user it runs as can reach; the state file's folder may be private to root)
                own = self.folder / "postgres" if os.geteuid() != 0 else None
                self.postgres = PostgresCluster(own, durable=True)
                self.state["postgres"] = {"folder": str(self.postgres.folder), "data": str(self.postgres.data),
                                          "port": self.postgres.port}  # fmt: skip
                self._save()
                db = self.postgres.create_database(DATABASE)
            self.state["db"] = db
            # Side by side: each replica spends most of its start importing and loading the model.
            for i in range(s.replicas):
                name = f"r{i + 1}"
                command = serve_command(s.model_dir, *s.serve_args, feedback_db=db)
                server = Server(name, command, self.folder / f"{name}.log")
                self.replicas.append(server.launch())
                self.state["replicas"].append({"name": name, "pid": server.process.pid, "port": server.port,
                                               "url": server.url, "log": str(server.log)})  # fmt: skip
                self._save()
            for server in self.replicas:
                server.wait_ready()
            self._start_balancer()
            if s.prometheus:
                self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_balancer(self) -> None:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy)")
        port, stats = self.settings.port or free_port(), free_port()
        config = self.folder / "haproxy.cfg"
        config.write_text(haproxy_config(port, stats, [(r["name"], r["port"]) for r in self.state["replicas"]]))
        log = self.folder / "haproxy.log"
        process = _launch([haproxy, "-f", str(config), "-db"], log)  # -db: in the foreground, its pid is ours
        url = f"http://127.0.0.1:{port}"
        self.state["balancer"] = {"pid": process.pid, "port": port, "url": url, "stats_port": stats,
                                  "config": str(config), "log": str(log)}  # fmt: skip
        self._save()
        _wait_http(f"{url}/health", process, "haproxy", log)

    def _start_prometheus(self) -> None:
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
        port, config = free_port(), self.folder / "prometheus.yml"
        targets = [f"127.0.0.1:{r['port']}" for r in self.state["replicas"]]
        config.write_text(prometheus_config(targets, f"127.0.0.1:{self.state['balancer']['stats_port']}"))
        log = self.folder / "prometheus.log"
        command = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'prometheus-data'}",
                   f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        process = _launch(command, log)
        url = f"http://127.0.0.1:{port}"
        self.state["prometheus"] = {"pid": process.pid, "port": port, "url": url, "config": str(config)}
        self._save()
        _wait_http(f"{url}/-/ready", process, "prometheus", log)

    def stop(self) -> dict:
        result = stop(self.state)
        for server in self.replicas:
            if not server.log_file.closed:
                server.log_file.close()
        return result


def stop(state: dict) -> dict:
    """Stop what ``state`` lists, in the order that loses nothing; returns {name: exited on SIGTERM}."""
    clean: dict[str, bool] = {}
    if "balancer" in state:
        clean["haproxy"] = stop_group(state["balancer"]["pid"], grace=5)

    def one(replica: dict) -> None:  # side by side: each drains its own requests
        clean[replica["name"]] = stop_group(replica["pid"])

    threads = [threading.Thread(target=one, args=(r,)) for r in state.get("replicas", [])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "prometheus" in state:
        clean["prometheus"] = stop_group(state["prometheus"]["pid"], grace=10)
    if "postgres" in state:  # ours: stopped after the replicas have stored what they held
        from postgres_cluster import stop_data_dir

        stop_data_dir(Path(state["postgres"]["data"]))
        shutil.rmtree(state["postgres"]["folder"], ignore_errors=True)  # a trial's database: gone with it
        clean["postgres"] = True
    return clean


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("start", help="start PostgreSQL (unless --db), N replicas, HAProxy (and Prometheus)")
    up.add_argument("--model_dir", required=True, help="the export every replica serves")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--state", required=True, type=Path, help="state file; logs and configs go beside it")
    up.add_argument("--db", help="a PostgreSQL URL (default: a PostgreSQL started beside the state file)")
    up.add_argument("--port", type=int, help="the balancer's port (default: a free one)")
    up.add_argument("--prometheus", action="store_true", help="also a Prometheus scraping every replica")
    up.add_argument("--serve_args", default="", help="extra `serve` options of every replica, one string")
    down = commands.add_parser("stop", help="stop everything the state file lists")
    down.add_argument("--state", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "stop":
        print(json.dumps(stop(json.loads(args.state.read_text()))))
        return
    settings = Settings(str(Path(args.model_dir).resolve()), args.state, args.replicas, args.db, args.port,
                        args.prometheus, shlex.split(args.serve_args))  # fmt: skip
    cluster = Cluster(settings).start()
    print(json.dumps(cluster.state, indent=2))


if __name__ == "__main__":
    main()
