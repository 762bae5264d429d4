"""The MLflow model registry (`lifecycle.registry`): versions of exported folders, aliases moved and recorded,
promotion and rollback, `models:/` references resolved to a folder that `serve` reads, and one clear error line for
an alias that points nowhere, a version of another label set, or an unreachable server."""

import json
import shutil

import pytest
from conftest import TINY_CONFIGS
from serving_helpers import fabricate_export

from lightning_cls.export.folder import read_export_metadata, write_export_metadata
from lightning_cls.lifecycle.registry import Registry, RegistryError, check_same_labels, main
from lightning_cls.serving.server import ServeSettings, build_server


@pytest.fixture(scope="module")
def exported(sample_dir, tmp_path_factory):
    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    # One database for the module (creating MLflow's tables takes seconds); each test registers its own model name.
    return Registry(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def relabelled(exported, out):
    """A copy of the export with another label set."""
    shutil.copytree(exported, out)
    meta = read_export_metadata(out)
    meta.labels = [f"other {i}" for i in range(len(meta.labels))]
    write_export_metadata(out, meta)
    return out


def test_register_resolve_promote_and_rollback_are_recorded(registry, exported, tmp_path):
    first = registry.register(exported, "subjects", alias="champion", note="first")
    second = registry.register(exported, "subjects", alias="challenger")
    assert (first.version, second.version) == ("1", "2")
    assert registry.aliases("subjects") == {"champion": "1", "challenger": "2"}

    resolved = registry.resolve("models:/subjects@champion", cache_dir=tmp_path / "cache")
    assert resolved.version == "1" and resolved.labels == read_export_metadata(exported).labels
    assert read_export_metadata(resolved.folder).labels == resolved.labels  # the export itself, downloaded
    assert (tmp_path / "cache" / "subjects" / "1" / "export" / "model.safetensors").is_file()
    assert registry.resolve("models:/subjects/2", cache_dir=tmp_path / "cache").version == "2"

    registry.promote("subjects")
    assert registry.aliases("subjects") == {"champion": "2", "previous": "1"}
    registry.rollback("subjects", reason="live accuracy fell")
    assert registry.aliases("subjects") == {"champion": "1", "previous": "2"}
    moves = [(m["alias"], m["version"], m["previous_version"]) for m in registry.history("subjects")]
    assert moves == [
        ("champion", "1", "None"),
        ("challenger", "2", "None"),
        ("previous", "1", "None"),
        ("champion", "2", "1"),
        ("previous", "2", "1"),  # the rollback: the replaced champion kept as `previous`, then the old one back
        ("champion", "1", "2"),
    ]
    assert registry.history("subjects")[-1]["reason"] == "live accuracy fell"


def test_each_failure_is_one_line_naming_what_is_wrong(registry, exported, tmp_path, monkeypatch):
    registry.register(exported, "failures", alias="champion")
    with pytest.raises(RegistryError, match=r"model 'failures' has no alias 'challenger'") as err:
        registry.resolve("models:/failures@challenger")
    assert "\n" not in str(err.value)
    with pytest.raises(RegistryError, match=r"has no version 7"):
        registry.resolve("models:/failures/7")
    with pytest.raises(RegistryError, match=r"is not a registry reference"):
        registry.resolve("models:/failures")
    with pytest.raises(RegistryError, match=r"no 'challenger' alias to promote"):
        registry.promote("failures")
    with pytest.raises(RegistryError, match=r"not an exported model folder"):
        registry.register(tmp_path, "failures")

    other = registry.register(relabelled(exported, tmp_path / "other"), "failures", alias="challenger")
    with pytest.raises(RegistryError, match=r"version 2 of 'failures' has the labels \['other 0'.* cannot replace it"):
        registry.promote("failures")
    assert registry.aliases("failures")["champion"] == "1"  # nothing moved
    check_same_labels(registry.version("failures", "1"), registry.version("failures", "1"))
    assert other.labels[0] == "other 0"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after MLflow's backoff
    unreachable = Registry("http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(RegistryError, match=r"MLflow registry http://127\.0\.0\.1:9"):
        unreachable.aliases("failures")


def test_serve_starts_from_a_registered_alias_and_says_which_version(registry, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default download cache, runs/mlflow/cache, lands here
    registry.register(exported, "served", alias="champion")
    settings = ServeSettings(
        "models:/served@champion", registry_uri=registry.uri, feedback_db=str(tmp_path / "f.sqlite3")
    )
    server = build_server(settings)
    info = server.model_metadata["registry"]
    assert (info["name"], info["version"], info["alias"]) == ("served", "1", "champion")
    assert info["requested"] == "models:/served@champion"
    assert server.model_metadata["model_dir"] == info["folder"]
    with pytest.raises(RegistryError, match=r"no alias 'challenger'"):
        build_server(ServeSettings("models:/served@challenger", registry_uri=registry.uri, feedback_db="x.db"))


def test_the_command_line(registry, exported, capsys):
    uri = ["--registry_uri", registry.uri]
    main([*uri, "register", "--export_dir", str(exported), "--name", "cli", "--alias", "champion"])
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    main([*uri, "register", "--export_dir", str(exported), "--name", "cli", "--alias", "challenger"])
    capsys.readouterr()
    main([*uri, "promote", "--name", "cli"])
    capsys.readouterr()
    main([*uri, "show", "--name", "cli"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == {"champion": "2", "previous": "1"} and len(shown["history"]) == 4
    with pytest.raises(RegistryError, match=r"^registry promote: .*no '(previous|challenger)'"):
        main([*uri, "promote", "--name", "cli"])


@pytest.mark.slow  # a fit of a tiny model and MLflow's tables created: about 20-40 s here
def test_lightnings_mlflow_logger_records_a_training_run_in_the_registrys_database(sample_dir, tmp_path):
    """The logger option of docs/lifecycle.md: MLFlowLogger beside TensorBoard, same SQLite database."""
    from test_cli import data_args

    from lightning_cls.cli import main as cli_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
        {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"experiment_name": "lightning_cls-training", "tracking_uri": uri},
        },
    ]
    cli_main(
        [
            "fit",
            *data_args(sample_dir, "distilbert"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger={json.dumps(loggers)}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lightning_cls-training")
    (run,) = client.search_runs([experiment.experiment_id])
    assert "val/f1_macro" in run.data.metrics and "learning_rate" in run.data.params


def test_the_service_promotes_registered_versions_and_moves_their_aliases(registry, sample_dir, tmp_path, monkeypatch):
    """POST /deployment with registry references: an alias that points nowhere is a 502 line and changes nothing;
    promote and rollback in the service move the registry's aliases too."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from lightning_cls.serving.deployment import DeploymentEndpoint, resolve_slot, start_deployment
    from lightning_cls.store.feedback_store import FeedbackStore

    monkeypatch.chdir(tmp_path)  # the download cache, runs/mlflow/cache, lands here
    a = fabricate_export(sample_dir / "wordpiece", tmp_path / "a", seed=1)
    b = fabricate_export(sample_dir / "wordpiece", tmp_path / "b", seed=2)
    registry.register(a, "served2", alias="champion")
    registry.register(b, "served2", alias="challenger")
    db = str(tmp_path / "f.sqlite3")
    FeedbackStore(db).close()
    start_deployment(db, resolve_slot("models:/served2@champion", registry.uri), None, "shadow", 0.0)
    endpoint = DeploymentEndpoint(db, read_export_metadata(a).labels, False, registry.uri, keyed=True)
    app = FastAPI()
    app.add_api_route("/deployment", endpoint.handle_post, methods=["POST"])

    async def post(body: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/deployment", json=body)

    nowhere = asyncio.run(post({"challenger": "models:/served2@nowhere", "mode": "shadow"}))
    assert nowhere.status_code == 502 and "has no alias 'nowhere'" in nowhere.json()["detail"]
    assert [h["action"] for h in endpoint.read()["history"]] == ["start"]  # nothing changed
    assert asyncio.run(post({"challenger": "models:/served2@challenger", "mode": "shadow"})).status_code == 200
    promoted = asyncio.run(post({"action": "promote", "reason": "better"})).json()["deployment"]
    assert promoted["champion"]["registry"]["version"] == "2"
    assert registry.aliases("served2") == {"champion": "2", "previous": "1"}
    assert asyncio.run(post({"action": "rollback"})).status_code == 200
    assert registry.aliases("served2") == {"champion": "1", "previous": "2"}
    assert [h["action"] for h in endpoint.read()["history"]] == ["start", "set", "promote", "rollback"]
