"""Model versions in an MLflow model registry: an exported folder registered as a version (with its metrics,
calibration, training-data reference and export metadata), aliases such as `champion` and `challenger`, and
`models:/NAME@ALIAS` (or `models:/NAME/VERSION`) resolved to a local folder that `serve` reads like any export.

The embedded default is a local SQLite registry (`runs/mlflow/mlflow.db`, artifacts beside it); any MLflow server
(`http://...`) is the shared one (`--registry_uri`, or MLflow's own MLFLOW_TRACKING_URI). MLflow keeps the versions
and the aliases; it keeps no history of alias moves, so each move is also recorded here as a run of the
`lightning_cls-deployments` experiment (alias, version, previous version, reason, time): `history` reads them back.
Every failure of the registry (unreachable server, unknown model, alias or version) is one `RegistryError` line.

    python -m lightning_cls registry register --export_dir runs/export/x --name subjects --alias challenger
    python -m lightning_cls registry promote --name subjects        # challenger -> champion (previous kept)
    python -m lightning_cls registry rollback --name subjects       # champion <- the previous champion
    python -m lightning_cls registry show --name subjects
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_cls.arg_parser import run_command
from lightning_cls.errors import UserError
from lightning_cls.export.folder import METADATA_FILE, read_export_metadata

DEFAULT_URI = "sqlite:///runs/mlflow/mlflow.db"
EXPORTS_EXPERIMENT = "lightning_cls-exports"
DEPLOYMENTS_EXPERIMENT = "lightning_cls-deployments"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
# How MLflow words a server that does not answer (after its retries), as opposed to an answer that says no.
_UNREACHABLE = re.compile(r"Failed to establish a new connection|Max retries exceeded|Connection (refused|reset)")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(UserError):
    """The registry cannot do what was asked (unreachable, unknown model, alias or version, bad reference)."""


def is_model_uri(value: str) -> bool:
    return str(value).startswith("models:/")


@dataclass(frozen=True)
class ModelRef:
    """A registered version, and where its export lies on this machine once resolved (`folder`)."""

    name: str
    version: str
    alias: str | None
    run_id: str | None
    labels: list[str]
    folder: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """An MLflow registry (`uri`: sqlite:///..., file:..., http(s)://...)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RegistryError("The model registry needs MLflow: pip install 'lightning_cls[registry]'.") from None
        self.artifacts = None
        if self.uri.startswith("sqlite:///"):  # embedded: the database's folder holds the artifacts too
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            self.artifacts = (db.parent / "artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # ------------------------------------------------------------------------------------------------ calls
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one MLflow call; any failure becomes one line naming the registry and what was asked (``what``
        names the question, e.g. "model 'x' has no alias 'y'", only when the server answered it)."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as err:
            message = str(err.message if hasattr(err, "message") else err).strip().splitlines()[0]
            if _UNREACHABLE.search(message):  # MLflow wraps the connection error after its retries
                raise RegistryError(f"MLflow registry {self.uri} is unreachable ({what}): {message}") from None
            raise RegistryError(f"MLflow registry {self.uri}: {what}: {message}") from None
        except (OSError, ConnectionError) as err:  # requests' connection errors are OSErrors
            raise RegistryError(f"MLflow registry {self.uri} is unreachable ({what}): {err}") from None

    def _experiment(self, name: str) -> str:
        found = self._call(f"reading experiment {name!r}", self.client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        return self._call(f"creating experiment {name!r}", self.client.create_experiment, name, self.artifacts)

    # ------------------------------------------------------------------------------------------------ register
    def register(self, export_dir: str | Path, name: str, alias: str | None = None, note: str = "") -> ModelRef:
        """Log the export folder as a run's artifacts (params, metrics and metadata with it) and register it as a
        new version of `name`; move `alias` to it when given."""
        folder = Path(export_dir)
        if not (folder / METADATA_FILE).is_file():
            raise RegistryError(f"{folder} is not an exported model folder (no {METADATA_FILE}).")
        meta = read_export_metadata(folder)
        problem = "multi_label" if meta.multi_label else "single_label"
        labels_json = json.dumps(list(meta.labels))
        run = self._call(
            "starting a run",
            self.client.create_run,
            self._experiment(EXPORTS_EXPERIMENT),
            tags={"mlflow.runName": f"{name} export", "lightning_cls.labels": labels_json, "note": note},
        )
        run_id = run.info.run_id
        params = {
            "model_name_or_path": meta.model_name_or_path,
            "checkpoint": meta.checkpoint,
            "exported_at": meta.exported_at,
            "max_length": meta.max_length,
            "problem_type": problem,
            "num_labels": len(meta.labels),
            "temperature": meta.temperature,
            "fused_lexical": meta.lexical is not None,
            # The training data's reference (label counts, token lengths) is in export/lightning_cls.json.
            "training_rows": meta.reference.rows if meta.reference is not None else None,
        }
        for key, value in params.items():
            self._call(f"logging param {key}", self.client.log_param, run_id, key, str(value)[:500])
        for key, value in export_metrics(meta).items():
            self._call(f"logging metric {key}", self.client.log_metric, run_id, key, value)
        self._call("uploading the export", self.client.log_artifacts, run_id, str(folder), "export")
        self._call("ending the run", self.client.set_terminated, run_id)
        self._ensure_model(name)
        source = f"{run.info.artifact_uri}/export"
        tags = {"labels": labels_json, "problem_type": problem, "exported_at": str(meta.exported_at)}
        version = self._call(
            f"registering a version of {name!r}",
            self.client.create_model_version,
            name,
            source,
            run_id,
            tags=tags,
            description=note or None,
        )
        ref = ModelRef(name, str(version.version), None, run_id, list(meta.labels))
        if alias:
            self.set_alias(name, alias, ref.version, reason=note or "registered")
            ref = ModelRef(name, ref.version, alias, run_id, ref.labels)
        return ref

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self._call(f"creating registered model {name!r}", self.client.create_registered_model, name)
        except (OSError, ConnectionError) as err:
            raise RegistryError(f"MLflow registry {self.uri} is unreachable (reading model {name!r}): {err}") from None

    # ------------------------------------------------------------------------------------------------ aliases
    def version(self, name: str, version: str | None = None, alias: str | None = None) -> ModelRef:
        """The version `version`, or the one `alias` points to (an alias that points nowhere is an error)."""
        if alias is not None:
            what, fn, args = f"model {name!r} has no alias {alias!r}", self.client.get_model_version_by_alias, alias
        else:
            what, fn, args = f"model {name!r} has no version {version}", self.client.get_model_version, version
        found = self._call(what, fn, name, args)
        labels = json.loads(found.tags.get("labels", "[]"))
        return ModelRef(name, str(found.version), alias, found.run_id, labels)

    def aliases(self, name: str) -> dict[str, str]:
        model = self._call(f"reading model {name!r}", self.client.get_registered_model, name)
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def set_alias(self, name: str, alias: str, version: str, reason: str = "") -> dict[str, Any]:
        """Point `alias` at `version` (which must exist); the move is recorded (`history`)."""
        target = self.version(name, version=str(version))
        previous = self.aliases(name).get(alias)
        self._call(f"setting alias {alias!r}", self.client.set_registered_model_alias, name, alias, target.version)
        record = {
            "model": name,
            "alias": alias,
            "version": target.version,
            "previous_version": previous,
            "reason": reason,
            "time": time.time(),
        }
        run = self._call(
            "recording the alias move",
            self.client.create_run,
            self._experiment(DEPLOYMENTS_EXPERIMENT),
            tags={"mlflow.runName": f"{name}@{alias} -> {target.version}"},
        )
        for key, value in record.items():
            self._call("recording the alias move", self.client.log_param, run.info.run_id, key, str(value))
        self._call("recording the alias move", self.client.set_terminated, run.info.run_id)
        return record

    def promote(self, name: str, reason: str = "promoted") -> list[dict[str, Any]]:
        """The challenger becomes the champion; the champion it replaces stays reachable as `previous`."""
        aliases = self.aliases(name)
        if CHALLENGER not in aliases:
            raise RegistryError(f"model {name!r} has no {CHALLENGER!r} alias to promote (aliases: {aliases}).")
        challenger = self.version(name, version=aliases[CHALLENGER])
        if CHAMPION in aliases:
            champion = self.version(name, version=aliases[CHAMPION])
            check_same_labels(champion, challenger)
        moves = []
        if CHAMPION in aliases and aliases[CHAMPION] != challenger.version:
            moves.append(self.set_alias(name, PREVIOUS, aliases[CHAMPION], reason=reason))
        moves.append(self.set_alias(name, CHAMPION, challenger.version, reason=reason))
        self._call("removing the challenger alias", self.client.delete_registered_model_alias, name, CHALLENGER)
        return moves

    def rollback(self, name: str, reason: str = "rolled back") -> list[dict[str, Any]]:
        """The previous champion answers again; the champion it replaces becomes `previous` (a second rollback
        undoes the first)."""
        aliases = self.aliases(name)
        if PREVIOUS not in aliases:
            raise RegistryError(f"model {name!r} has no {PREVIOUS!r} version to roll back to (aliases: {aliases}).")
        back = aliases[PREVIOUS]
        moves = [self.set_alias(name, PREVIOUS, aliases[CHAMPION], reason=reason)] if CHAMPION in aliases else []
        return [*moves, self.set_alias(name, CHAMPION, back, reason=reason)]

    def history(self, name: str) -> list[dict[str, str]]:
        """Every recorded alias move of `name`, oldest first."""
        found = self._call("reading experiment", self.client.get_experiment_by_name, DEPLOYMENTS_EXPERIMENT)
        if found is None:
            return []
        runs = self._call(
            "reading the alias moves",
            self.client.search_runs,
            [found.experiment_id],
            filter_string=f"params.model = '{name}'",
            max_results=10_000,
        )
        return sorted((dict(r.data.params) for r in runs), key=lambda p: float(p.get("time", 0)))

    # ------------------------------------------------------------------------------------------------ resolve
    def resolve(self, uri: str, cache_dir: str | Path | None = None) -> ModelRef:
        """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the version, its export downloaded into `cache_dir`
        (default: runs/mlflow/cache/NAME/VERSION; reused when already there)."""
        match = MODEL_URI.match(str(uri))
        if not match:
            raise RegistryError(f"{uri!r} is not a registry reference: models:/NAME@ALIAS or models:/NAME/VERSION.")
        ref = self.version(match["name"], version=match["version"], alias=match["alias"])
        model = self._call(
            f"reading version {ref.version} of {ref.name!r}", self.client.get_model_version, ref.name, ref.version
        )
        target = Path(cache_dir or Path("runs/mlflow/cache")) / ref.name / ref.version
        if not (target / "export" / METADATA_FILE).is_file():
            from mlflow.artifacts import download_artifacts

            target.mkdir(parents=True, exist_ok=True)
            self._call(
                f"downloading version {ref.version} of {ref.name!r}",
                download_artifacts,
                artifact_uri=model.source,
                dst_path=str(target),
                tracking_uri=self.uri,
            )
        folder = target / "export"
        if not (folder / METADATA_FILE).is_file():
            raise RegistryError(f"version {ref.version} of {ref.name!r} ({model.source}) holds no exported model.")
        return ModelRef(ref.name, ref.version, match["alias"], ref.run_id, ref.labels, str(folder.resolve()))


def check_same_labels(serving: ModelRef, candidate: ModelRef) -> None:
    """A version of another label set cannot take over from the one serving (clients, feedback and monitoring all
    speak its labels)."""
    if list(serving.labels) != list(candidate.labels):
        raise RegistryError(
            f"version {candidate.version} of {candidate.name!r} has the labels {candidate.labels}, not those of "
            f"version {serving.version} ({serving.labels}): it cannot replace it."
        )


def export_metrics(meta: Any) -> dict[str, float]:
    """The numbers an export records about itself: validation calibration and each variant's validation scores."""
    out: dict[str, float] = {}
    for key, value in (meta.calibration or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"calibration_{key}"] = float(value)
    for variant, record in (meta.inference or {}).items():
        for key in ("macro_f1", "accuracy", "agreement", "texts_per_s"):
            if isinstance((record or {}).get(key), int | float):
                out[f"{variant}_{key}"] = float(record[key])
    return out


class RegistryCommand:
    """`python -m lightning_cls registry [--registry_uri URI] ACTION ...`: each action a method, its options the
    method's parameters; the answer is printed as JSON."""

    def __init__(self, registry_uri: str | None = None) -> None:
        """
        Args:
            registry_uri: MLflow tracking and registry URI (default: $MLFLOW_TRACKING_URI, else
                sqlite:///runs/mlflow/mlflow.db)
        """
        self.registry = Registry(registry_uri)

    def register(self, export_dir: str, name: str, alias: str | None = None, note: str = "") -> dict[str, Any]:
        """register an exported folder as a new version

        Args:
            export_dir: the exported folder (`python -m lightning_cls export`)
            name: the registered model's name
            alias: e.g. challenger
            note: recorded with the version
        """
        return self.registry.register(export_dir, name, alias, note).to_dict()

    def alias(self, name: str, alias: str, version: str, reason: str = "") -> Any:
        """point an alias at a version (recorded)

        Args:
            name: the registered model's name
            alias: e.g. champion, challenger
            version: the version it points at
            reason: recorded with the move
        """
        return self.registry.set_alias(name, alias, version, reason)

    def promote(self, name: str, reason: str = "promote") -> Any:
        """the challenger becomes the champion (the champion becomes the previous one)

        Args:
            name: the registered model's name
            reason: recorded with the move
        """
        return self.registry.promote(name, reason)

    def rollback(self, name: str, reason: str = "rollback") -> Any:
        """the previous champion becomes the champion again

        Args:
            name: the registered model's name
            reason: recorded with the move
        """
        return self.registry.rollback(name, reason)

    def show(self, name: str) -> dict[str, Any]:
        """the aliases of a registered model and the history of their moves

        Args:
            name: the registered model's name
        """
        return {"aliases": self.registry.aliases(name), "history": self.registry.history(name)}

    def resolve(self, uri: str, /) -> dict[str, Any]:
        """download a models:/ reference, print its folder

        Args:
            uri: models:/NAME@ALIAS or models:/NAME/VERSION
        """
        return self.registry.resolve(uri).to_dict()


def main(argv: list[str]) -> None:
    """`python -m lightning_cls registry register|alias|promote|rollback|show|resolve ...`."""
    out = run_command(RegistryCommand, argv, "registry", description=__doc__.split("\n\n")[0])
    print(json.dumps(out, indent=2))
