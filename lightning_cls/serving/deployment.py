"""Which model versions a running service answers with, and how that changes without a restart.

A `Deployment` names the champion (it answers), optionally a challenger beside it (in ``shadow``: it sees a sampled
share of the requests and its answers are stored, never returned; as a ``canary``: it answers a share of the
requests, sticky per client id), and the previous champion (what a rollback returns to). Each model is a `Slot`:
an export folder, its version (`feedback.model_version`) and what the operator named (the folder, or a registry
reference such as models:/subjects@challenger).

The history lives in the service's feedback database (table `deployments`, one row per change: the state, the
action, the reason, the time; `store.deployment_history`), the one place every process of the service, and every
replica on a shared PostgreSQL database, already reads. The main process records the first row at start; POST
/deployment (`DeploymentEndpoint`, API key required) records each change; every inference worker of every replica
looks for a newer row every half second (`DeploymentWatch`), loads the new models beside the ones serving, and
switches between two batches: a request is answered by the models that were serving when its batch began, so a swap
neither drops nor fails one (`serving.api`).

Changes (`changed`, a pure function): ``set`` (name the champion, the challenger, the mode and the share), ``promote``
(the challenger becomes the champion, the champion becomes the previous one), ``rollback`` (the previous champion
answers again; a second rollback undoes the first). With registry references on both sides, promote and rollback
also move the registry's aliases (`registry.Registry.promote` / `rollback`), so a restart from the alias serves the
same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from fastapi import Request
from fastapi.responses import JSONResponse

from lightning_cls.arg_parser import run_command
from lightning_cls.database import StoreError, redacted
from lightning_cls.errors import InputError, UserError
from lightning_cls.store import deployment_history
from lightning_cls.store.feedback_store import FeedbackStore, model_version

log = logging.getLogger(__name__)

Mode = Literal["shadow", "canary"]
MODES = get_args(Mode)
ACTIONS = ("set", "promote", "rollback")
DEPLOYMENT_PATH = "/deployment"


@dataclass(frozen=True)
class Slot:
    """One deployed model: its local export folder, its version, and what the operator named."""

    model_dir: str
    version: str
    source: str  # the folder or the registry reference, as given
    registry: dict[str, Any] | None = None  # `registry.ModelRef.to_dict()` when it came from a registry


@dataclass(frozen=True)
class Deployment:
    champion: Slot
    challenger: Slot | None = None
    mode: str | None = None  # shadow or canary, with a challenger
    share: float = 0.0  # of the requests the challenger sees (shadow) or answers (canary)
    previous: Slot | None = None  # the champion a rollback returns to

    def __post_init__(self) -> None:
        problems = []
        if self.challenger is not None and self.mode not in MODES:
            problems.append(f"mode must be one of {list(MODES)} with a challenger, got {self.mode!r}")
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 <= self.share <= 1:
            problems.append(f"share must be a number from 0 to 1, got {self.share!r}")
        if self.challenger is not None and self.challenger.version == self.champion.version:
            problems.append(f"the challenger is the champion (version {self.champion.version})")
        if problems:
            raise InputError("deployment: " + "; ".join(problems) + ".")

    def roles(self) -> dict[str, str]:
        """version -> role (champion, challenger)."""
        roles = {self.champion.version: "champion"}
        if self.challenger is not None:
            roles[self.challenger.version] = "challenger"
        return roles

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        data = json.loads(text)
        slots = {k: Slot(**data[k]) if data.get(k) else None for k in ("champion", "challenger", "previous")}
        return cls(**{**data, **slots})

    def describe(self) -> dict[str, Any]:
        """For /info and GET /deployment."""
        return {
            "champion": asdict(self.champion),
            "challenger": asdict(self.challenger) if self.challenger else None,
            "mode": self.mode,
            "share": self.share,
            "previous": asdict(self.previous) if self.previous else None,
        }


def local_slot(model_dir: str | Path, source: str | None = None, registry: dict | None = None) -> Slot:
    folder = str(Path(model_dir).resolve())
    return Slot(folder, model_version(folder), source or str(model_dir), registry)


def resolve_slot(reference: str, registry_uri: str | None = None) -> Slot:
    """A folder, or a registry reference (models:/NAME@ALIAS, models:/NAME/VERSION) downloaded once."""
    from lightning_cls.lifecycle.registry import is_model_uri

    if is_model_uri(reference):
        from lightning_cls.lifecycle.registry import Registry

        ref = Registry(registry_uri).resolve(reference)
        return local_slot(ref.folder, reference, ref.to_dict())
    from lightning_cls.export.folder import METADATA_FILE

    if not (Path(reference) / METADATA_FILE).is_file():
        raise InputError(f"{reference}: not an exported model folder (no {METADATA_FILE}).")
    return local_slot(reference)


def check_compatible(labels: list[str], multi_label: bool, slot: Slot) -> None:
    """A model that joins the service must speak its labels: clients, feedback and monitoring all use them."""
    from lightning_cls.export.folder import read_export_metadata

    meta = read_export_metadata(slot.model_dir)
    problems = []
    if list(meta.labels) != list(labels):
        problems.append(f"its labels {list(meta.labels)} are not the service's {list(labels)}")
    if meta.multi_label != multi_label:
        problems.append("it is " + ("not " if multi_label else "") + "a multi-label model and the service's is")
    if problems:
        raise InputError(f"{slot.source} (version {slot.version}) cannot join this service: " + "; ".join(problems))


def changed(current: Deployment, action: str, resolve: Callable[[str], Slot], body: dict[str, Any]) -> Deployment:
    """The deployment after ``action`` (set, promote, rollback); ``resolve`` turns a reference into a `Slot`.

    ``set`` takes ``champion`` (a reference; default: the current one), ``challenger`` (a reference, or null for
    none), ``mode`` and ``share`` (default: the current ones).
    """
    if action == "promote":
        if current.challenger is None:
            raise InputError("promote: there is no challenger to promote.")
        return Deployment(current.challenger, previous=current.champion)
    if action == "rollback":
        if current.previous is None:
            raise InputError("rollback: there is no previous champion to return to.")
        return Deployment(current.previous, previous=current.champion)
    if action != "set":
        raise InputError(f"action must be one of {list(ACTIONS)}, got {action!r}.")
    champion = resolve(body["champion"]) if body.get("champion") else current.champion
    challenger = current.challenger
    if "challenger" in body:
        challenger = resolve(body["challenger"]) if body["challenger"] else None
    mode = body.get("mode", current.mode if challenger is not None else None)
    share = body.get("share", current.share)
    previous = current.champion if champion.version != current.champion.version else current.previous
    return Deployment(champion, challenger, mode if challenger is not None else None, share, previous)


# ------------------------------------------------------------------------------------------------ the history
CHANGE_TRIES = 5  # a change computed again from the newer state when another replica's was recorded first


def record(db_path: str | Path, deployment: Deployment, action: str, reason: str = "", after: int | None = None) -> int:
    """Append a change to the history; returns its seq (the workers load the newest). ``after``: the seq it was
    computed from (`deployment_history.Superseded` if another change came since)."""
    store = FeedbackStore(db_path, setup=False)
    try:
        return deployment_history.record(store, deployment.to_json(), action, reason, after)
    finally:
        store.close()


def latest_seq(store: FeedbackStore) -> int:
    return deployment_history.latest_seq(store)


def latest(store: FeedbackStore) -> tuple[int, Deployment] | None:
    found = deployment_history.latest(store)
    return (found[0], Deployment.from_json(found[1])) if found else None


def history(store: FeedbackStore, limit: int = 100) -> list[dict[str, Any]]:
    """The last changes, oldest first."""
    return [
        {"seq": s, "time": t, "action": a, "reason": r, **Deployment.from_json(st).describe()}
        for s, t, a, r, st in deployment_history.history(store, limit)
    ]


class ConcurrentChange(UserError):
    """A change that other changes, recorded first each time, kept superseding."""


class DeploymentWatch:
    """In an inference worker: a thread that looks for a newer deployment every ``every`` seconds (one indexed
    read), loads its models beside the ones serving (``load``), and hands them over (``switch``). The worker reads
    its models once at the start of each batch, so a batch is answered by the models it began with and the next one
    by the new ones, also when the worker is idle when they arrive. A deployment that fails to load is logged and
    skipped: the models serving keep serving."""

    def __init__(
        self,
        db_path: str,
        load: Callable[[Deployment], Any],
        switch: Callable[[int, Deployment, Any], None],
        every: float = 0.5,
    ) -> None:
        self.db_path, self.load, self.switch, self.every = db_path, load, switch, every
        self.store = FeedbackStore(db_path, setup=False)
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def first(self) -> tuple[int, Deployment, Any]:
        """The newest deployment, loaded now (at the worker's start)."""
        found = latest(self.store)
        if found is None:
            raise InputError(f"{redacted(self.db_path)}: no deployment recorded (serve records one at start).")
        self.seq = found[0]
        return found[0], found[1], self.load(found[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="deployment-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll_once()

    def poll_once(self) -> bool:
        """One look; a newer deployment is loaded and switched to now. True when it switched."""
        try:
            found = latest(self.store) if latest_seq(self.store) > self.seq else None
        except StoreError as err:
            log.error(f"Could not read the deployment from {err}")
            return False
        if found is None:
            return False
        self.seq = found[0]  # tried once: a broken deployment is not retried at every look
        try:
            models = self.load(found[1])
        except Exception as err:  # the models serving keep serving
            log.error(f"Deployment {found[0]} could not be loaded ({type(err).__name__}: {err}); serving on.")
            return False
        self.switch(found[0], found[1], models)
        return True


# ------------------------------------------------------------------------------------------------ the endpoint
class DeploymentEndpoint:
    """GET /deployment: the current deployment and its history. POST /deployment: change it, with
    ``{"action": "set" | "promote" | "rollback", "champion": REF, "challenger": REF | null, "mode": "shadow" |
    "canary", "share": 0.1, "reason": "..."}`` (REF: an export folder or a registry reference). Changing it needs the
    service's API key (serve refuses to offer it without one: 403).

    Answers: 200 the new deployment (the workers switch within a second, between batches; /info and the
    ``lightning_cls_model_role`` gauge say when); 422 a bad body, a model of another label set, nothing to promote or
    roll back to; 409 other changes kept coming first (`change`); 502 the registry failed. Nothing changes unless the
    answer is 200.
    """

    def __init__(
        self,
        db_path: str,
        labels: list[str],
        multi_label: bool,
        registry_uri: str | None,
        keyed: bool,
        max_body_bytes: int = 100_000,
    ) -> None:
        self.db_path, self.labels, self.multi_label = db_path, list(labels), multi_label
        self.registry_uri, self.keyed, self.max_body_bytes = registry_uri, keyed, max_body_bytes
        self._lock = threading.Lock()  # one change at a time in this process

    def _current(self) -> tuple[int, Deployment]:
        store = FeedbackStore(self.db_path, setup=False)
        try:
            found = latest(store)
        finally:
            store.close()
        if found is None:
            raise InputError("no deployment recorded.")
        return found

    def _slot(self, reference: Any) -> Slot:
        if not isinstance(reference, str) or not reference.strip():
            raise InputError(f"a model reference must be a folder or models:/NAME@ALIAS, got {reference!r}.")
        slot = resolve_slot(reference, self.registry_uri)
        check_compatible(self.labels, self.multi_label, slot)
        return slot

    def change(self, body: dict[str, Any]) -> Deployment:
        """Validate, move the registry aliases when both models are registered, record (blocking: the database,
        MLflow). The record is a compare-and-set on the state the change was computed from: when another replica
        (or process) recorded a change meanwhile, the change is computed again from that one (a second promote then
        finds no challenger: 422), at most `CHANGE_TRIES` times. The aliases move only where the registry still
        shows the old state (`_move_aliases`), so moving them again on a retry is harmless."""
        action = body.get("action", "set")
        with self._lock:
            for _ in range(CHANGE_TRIES):
                seq, current = self._current()
                new = changed(current, action, self._slot, body)
                if action in ("promote", "rollback"):
                    self._move_aliases(current, new, action)
                try:
                    record(self.db_path, new, action, str(body.get("reason", "")), after=seq)
                except deployment_history.Superseded as err:
                    log.info(f"Deployment {action}: {err}; computing it again from the newer one.")
                    continue
                log.info(f"Deployment {action}: {json.dumps(new.describe())}")
                return new
        raise ConcurrentChange(f"the deployment kept changing under this {action} ({CHANGE_TRIES} tries): try again.")

    def _move_aliases(self, current: Deployment, new: Deployment, action: str) -> None:
        """promote/rollback of registered versions of one model move its aliases too (one record of the truth)."""
        a, b = current.champion.registry, new.champion.registry
        if not a or not b or a["name"] != b["name"]:
            return
        from lightning_cls.lifecycle.registry import Registry

        registry = Registry(self.registry_uri)
        if action == "promote" and registry.aliases(a["name"]).get("challenger") == b["version"]:
            registry.promote(a["name"], reason="promoted in the service")
        elif action == "rollback" and registry.aliases(a["name"]).get("previous") == b["version"]:
            registry.rollback(a["name"], reason="rolled back in the service")

    def read(self) -> dict[str, Any]:
        store = FeedbackStore(self.db_path, setup=False)
        try:
            found = latest(store)
            return {"deployment": found[1].describe() if found else None, "history": history(store)}
        finally:
            store.close()

    async def handle_get(self, request: Request) -> JSONResponse:

        return JSONResponse(await asyncio.to_thread(self.read))

    async def handle_post(self, request: Request) -> JSONResponse:

        if not self.keyed:
            detail = "Changing the deployment needs an API key: start serve with one (see --api_key_env)."
            return JSONResponse({"detail": detail}, status_code=403)
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return JSONResponse({"detail": f"The body is over {self.max_body_bytes} bytes."}, status_code=413)
        try:
            payload = json.loads(body)
        except ValueError as err:
            return JSONResponse({"detail": f"Malformed JSON: {err}."}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"detail": "Expected a JSON object."}, status_code=422)
        unknown = sorted(set(payload) - {"action", "champion", "challenger", "mode", "share", "reason"})
        if unknown:
            return JSONResponse({"detail": f"Unknown field(s) {unknown}."}, status_code=422)
        try:
            new = await asyncio.to_thread(self.change, payload)
        except InputError as err:
            return JSONResponse({"detail": str(err)}, status_code=422)
        except ConcurrentChange as err:
            return JSONResponse({"detail": str(err)}, status_code=409)
        except UserError as err:  # the registry: unreachable, unknown alias or version
            return JSONResponse({"detail": str(err)}, status_code=502)
        except StoreError as err:  # nothing recorded: the workers keep the deployment they have
            detail = f"The deployment database is unavailable ({err}); nothing changed: try again."
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"deployment": new.describe()})


def start_deployment(db_path: str, champion: Slot, challenger: Slot | None, mode: str | None, share: float) -> int:
    """At `serve`'s start: the flags' deployment, recorded unless it is the one recorded last (a restart of the
    same deployment adds no row); returns its seq."""
    flags = Deployment(champion, challenger, mode if challenger else None, share if challenger else 0.0)
    # Replicas started together on one database each check and record: compare-and-set, so that one records the
    # start and the others find it recorded.
    for _ in range(CHANGE_TRIES):
        store = FeedbackStore(db_path, setup=False)
        try:
            found = latest(store)
        finally:
            store.close()
        new = flags
        if found is not None:
            last = found[1]
            if replace(last, previous=None) == flags:
                return found[0]
            new = replace(flags, previous=last.champion if last.champion.version != champion.version else last.previous)
        try:
            return record(db_path, new, "start", "serve started", after=found[0] if found else 0)
        except deployment_history.Superseded:
            continue
    raise ConcurrentChange(f"{redacted(db_path)}: the deployment kept changing while serve started; start it again.")


# ------------------------------------------------------------------------------------------------ the command
class ServiceError(UserError):
    """The running service refused a change or could not be reached; the message gives its status and reason."""


@dataclass(frozen=True)
class Service:
    """The running service that `python -m lightning_cls deployment` talks to.

    Args:
        url: the service
        api_key_env: variable holding the API key
        timeout: seconds to wait (a registry download)
    """

    url: str = "http://127.0.0.1:8000"
    api_key_env: str = "LIGHTNING_CLS_API_KEY"
    timeout: float = 600.0

    def call(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET /deployment (``body`` None) or POST it; the service's JSON answer. A refusal or no answer is a
        ``ServiceError`` naming the status and the service's reason."""
        import os
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url.rstrip('/')}{DEPLOYMENT_PATH}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("detail", detail)
            raise ServiceError(f"{err.code} {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ServiceError(f"{self.url} is unreachable: {err}") from None


def show(service: Service = Service()) -> dict[str, Any]:
    """the deployment now and its history"""
    return service.call()


def set_deployment(
    champion: str | None = None,
    challenger: str | None = None,
    mode: Mode | None = None,
    share: float | None = None,
    reason: str = "",
    service: Service = Service(),
) -> dict[str, Any]:
    """name the champion, the challenger beside it, its mode and share (the ones not given stay)

    Args:
        champion: set: the model that answers (an export folder or models:/NAME@ALIAS)
        challenger: set: the model beside it ('none': no challenger)
        mode: set: how the challenger runs
        share: set: share of the requests it sees (shadow) or answers (canary)
        reason: recorded with the change
    """
    body: dict[str, Any] = {"action": "set", "reason": reason}
    body |= {k: v for k, v in {"champion": champion, "mode": mode, "share": share}.items() if v is not None}
    if challenger is not None:
        body["challenger"] = None if challenger.lower() == "none" else challenger
    return service.call(body)


def promote(reason: str = "", service: Service = Service()) -> dict[str, Any]:
    """the challenger becomes the champion, the champion the previous one

    Args:
        reason: recorded with the change
    """
    return service.call({"action": "promote", "reason": reason})


def rollback(reason: str = "", service: Service = Service()) -> dict[str, Any]:
    """the previous champion answers again (a second rollback undoes the first)

    Args:
        reason: recorded with the change
    """
    return service.call({"action": "rollback", "reason": reason})


def main(argv: list[str]) -> None:
    """`python -m lightning_cls deployment show|set|promote|rollback --url URL ...`: the running service's
    deployment, through its /deployment endpoint (the API key from $LIGHTNING_CLS_API_KEY, or --api_key_env)."""
    commands = {"show": show, "set": set_deployment, "promote": promote, "rollback": rollback}
    print(json.dumps(run_command(commands, argv, "deployment", description=main.__doc__), indent=2))
