"""The benchmarks' shared harness (benchmarks/harness.py) and that every benchmark script still finds what it
imports (the harness, the package's answer path) after the move to benchmarks/."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402

SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "harness")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name):
    module = importlib.import_module(name)
    assert callable(module.main)


def test_the_worker_option_carries_the_spec_parsed_and_stays_out_of_the_help():
    parser = harness.argument_parser("A benchmark.", worker=True)
    assert parser.parse_args(["--worker", '{"name": "a", "rows": 3}']).worker == {"name": "a", "rows": 3}
    assert parser.parse_args([]).worker is None
    assert "--worker" not in parser.format_help()
    assert not hasattr(harness.argument_parser("A benchmark.").parse_args([]), "worker")


def test_ratio_and_serve_command():
    assert harness.ratio(3.0, 2.0) == "1.50x"
    command = harness.serve_command("model", "--num_threads", "1", feedback_db="f.sqlite3")
    assert command[1:] == [
        "-m", "lightning_cls", "serve", "--model_dir", "model", "--feedback_db", "f.sqlite3",
        "--log_level", "warning", "--num_threads", "1",
    ]  # fmt: skip
    server = harness.Server("serve", command, Path("server.log"))
    assert server.command[-2:] == ["--port", str(server.port)] and server.url.endswith(f":{server.port}")


def test_config_split_is_the_data_modules_split(sample_dir, tmp_path):
    from lightning_cls.data.datamodule import data_module_from_settings

    data = {"path": "elsewhere.csv", "tokenizer": str(sample_dir / "wordpiece"), "seed": 3}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    section, plan = harness.config_split(config, str(sample_dir / "abstracts.csv"))
    assert section == data
    expected = data_module_from_settings({**data, "path": str(sample_dir / "abstracts.csv")}).plan()
    assert plan.names == expected.names
    for split in ("train", "val", "test"):
        assert list(plan.rows[split]) == list(expected.rows[split])


def test_queue_worth_data_puts_the_test_period_in_the_configs_test_split(tmp_path):
    """The review queue's experiment (benchmarks/queue_worth.py): the config's split by arxiv_id must put exactly the
    newest papers (none served, none trained on) in test, and only older papers in validation."""
    import numpy as np
    import pandas as pd

    from lightning_cls.data.labels import DEFAULT_LABELS, ordered_split

    queue_worth = importlib.import_module("queue_worth")
    rng = np.random.default_rng(0)
    months = ["2503", "2507", "2510", "2512", "2601", "2603", "2605", "2607"]
    n = 16000
    frame = pd.DataFrame({
        "arxiv_id": [f"{rng.choice(months)}.{i:05d}" for i in range(n)],
        "text": [f"text {i}" for i in range(n)],
        "label": rng.choice([*DEFAULT_LABELS, "nuclear theory"], size=n),
    })  # fmt: skip
    csv = tmp_path / "data.csv"
    frame.to_csv(csv, index=False)
    queue_worth.make_data(str(csv), tmp_path / "work", {**queue_worth.SIZES, "pool": 50}, seed=0)
    base = pd.read_csv(tmp_path / "work" / "base.csv", dtype={"arxiv_id": str})
    pool = pd.read_csv(tmp_path / "work" / "pool.csv", dtype={"arxiv_id": str})
    assert base["label"].isin(DEFAULT_LABELS).all() and len(pool) == 50
    assert pool["arxiv_id"].str[:4].isin(["2512", "2601"]).all() and not set(pool["text"]) & set(base["text"])

    data = yaml.safe_load(queue_worth.CONFIG.read_text())["data"]
    rows = ordered_split(base["arxiv_id"], data["val_fraction"], data["test_fraction"])
    month = base["arxiv_id"].str[:4]
    assert len(rows["test"]) == queue_worth.SIZES["test"] and (month.iloc[rows["test"]] >= "2605").all()
    assert (month.iloc[np.concatenate([rows["train"], rows["val"]])] < "2511").all()
