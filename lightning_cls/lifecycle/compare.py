"""`python -m lightning_cls compare`: a challenger export against the champion, on the same held-out rows and on
recent feedback, before it is shadowed or promoted.

    python -m lightning_cls compare --champion runs/export/v1 --challenger runs/export/v2 \\
        --config configs/quickstart.yaml --feedback_db runs/feedback.sqlite3 --recent 500 --output_path compare.json

Both folders answer as `serve` answers (`inference.Runner` in torch fp32, windows and their mean, the folder's
lexical expert fused in, a multi-label folder's thresholds) on two sets:

- the test split of the config's data (`data.*`, rebuilt by the data module: the same rows for both models, and
  the rows `fit` held out, feedback or not: `data.feedback_db` only ever grows the training split);
- the most recent `--recent` labelled feedback rows with texts of `--feedback_db` (one per text, the latest
  feedback; `feedback_data`), received after `--feedback_after` if given. A model that trained on feedback
  (`data.feedback_db`, recorded in its checkpoint) may have seen some of them: the report counts them per model.

Single-label models are scored by accuracy and macro-F1, multi-label ones by micro-F1, macro-F1, subset accuracy,
micro precision and recall, and the share whose most probable label is one of the text's (`top_label_in_set`);
the report gives each model's scores per set and the challenger's difference (challenger - champion).
An empty set is reported as empty, with the reason, never left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.arg_parser import run_command
from lightning_cls.atomic import atomic_file
from lightning_cls.data.feedback import (
    format_time,
    latest_per_text,
    parse_time,
    read_feedback,
    true_labels,
)
from lightning_cls.errors import ConfigError, UserError
from lightning_cls.task import Task
from lightning_cls.task.scores import top_label_in_set


@dataclass
class Model:
    """An exported folder and how it answers."""

    role: str  # champion / challenger
    folder: Path
    labels: list[str]
    task: Task  # what it answers: one label, or label sets (`lightning_cls.task`)
    version: str
    checkpoint_read: bool  # whether the export's checkpoint could be read (for what its training held)
    trained_on: dict[str, Any] | None  # the feedback its training split held (the checkpoint's data state)

    @classmethod
    def load(cls, role: str, folder: str | Path) -> Model:
        from lightning_cls.export.folder import read_export_metadata
        from lightning_cls.store.feedback_store import model_version

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"--{role} {folder} is not a folder: give a folder written by `lightning_cls export`.")
        meta = read_export_metadata(folder)
        read, trained_on = _trained_on(meta.checkpoint)
        return cls(role, folder, list(meta.labels), meta.task(), model_version(folder), read, trained_on)

    def answers(self, texts: list[str], device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Class ids (N,) or, for a multi-label folder, multi-hot decisions (N, labels), and the probabilities
        (N, labels), in the folder's label order, as `serve` answers (`ExportedModel.answer`, in torch fp32)."""
        from lightning_cls.export.answer import ExportedModel

        if getattr(self, "_model", None) is None:  # loaded once, for both sets
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fp32 asked explicitly: no note about faster variants
                self._model = ExportedModel.load(self.folder, device=device)
        answers = self._model.answer(texts)
        return answers.decided.astype(np.int64), answers.probs.numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.folder),
            "version": self.version,
            "labels": self.labels,
            # None: its training held no feedback, or (checkpoint_read false) its checkpoint could not be read
            "trained_on_feedback": self.trained_on,
            "checkpoint_read": self.checkpoint_read,
        }


def _trained_on(checkpoint: str | None) -> tuple[bool, dict[str, Any] | None]:
    """Whether the export's checkpoint could be read (it may have moved, or the folder was made elsewhere), and the
    feedback its training split held (`ScientificTextDataModule.state_dict`; None: none)."""
    from lightning_cls.model.checkpoints import load_checkpoint

    try:
        state = load_checkpoint(checkpoint or "", mmap=True).get("ScientificTextDataModule") or {}
    except UserError:
        return False, None
    return True, state.get("feedback")


# ------------------------------------------------------------------------------------------------ scores
def scores(task: Task, answers: tuple[np.ndarray, np.ndarray], truth: np.ndarray) -> dict[str, float]:
    """The task's scores: accuracy and macro-F1 of class ids, or micro-F1, macro-F1, subset accuracy, micro precision
    and recall of sets and the share whose most probable label is one of the text's (a tagger's first suggestion)."""
    predicted, probs = answers
    found = task.scores(predicted, truth)
    if task.multi_label:
        found["top_label_in_set"] = top_label_in_set(probs, truth)
    return {k: round(float(v), 6) for k, v in found.items()}


def in_names(model: Model, answers: tuple[np.ndarray, np.ndarray], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A model's answers and probabilities in the order of ``names`` (the same labels in another order are the same
    model)."""
    predicted, probs = answers
    order = np.asarray([model.labels.index(n) for n in names])
    if model.task.multi_label:
        return predicted[:, order], probs[:, order]
    position = np.argsort(order)  # model class id -> its position in names
    return (position[predicted] if len(predicted) else predicted), probs[:, order]


def scored_set(
    champion: Model, challenger: Model, texts: list[str], truth: np.ndarray, names: list[str], device: str
) -> dict[str, Any]:
    """Both models' scores on one set of texts, and the difference (challenger - champion)."""
    task = champion.task
    found = {m.role: scores(task, in_names(m, m.answers(texts, device), names), truth) for m in (champion, challenger)}
    difference = {k: round(found["challenger"][k] - found["champion"][k], 6) for k in found["champion"]}
    return {"rows": len(texts), **found, "difference": difference}


# ------------------------------------------------------------------------------------------------ the sets
def data_settings(config: str | Path) -> dict[str, Any]:
    """The `data` section of a `fit` config (YAML; omegaconf interpolations such as ${oc.env:...} resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist: give the config the models were trained with.")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("data")
    except (OmegaConfBaseException, AttributeError, ValueError) as err:
        raise ConfigError(f"--config {path} cannot be read as a config: {err}".rstrip(".") + ".") from None
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--config {path} has no `data` section: give the config the models were trained with.")
    return data


def held_out_rows(config: str | Path) -> tuple[list[str], np.ndarray, list[str], str]:
    """The test split of the config's data: texts, class ids (or multi-hot rows), label names, and where from.
    Feedback settings are left out: they only ever add training rows (and the database need not be at hand)."""
    from lightning_cls.data.datamodule import data_module_from_settings

    data = {k: v for k, v in data_settings(config).items() if not k.startswith("feedback_")}
    module = data_module_from_settings(data, where=f"--config {config}")
    _, texts, truth = module.split_texts("test")
    names = module.plan().names
    return texts, np.asarray(truth), names, f"the test split of {module.source} ({config})"


def recent_feedback(
    path: str | Path, task: Task, names: list[str], recent: int, after: float | None, drop_unknown: bool
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Any]]:
    """The most recent ``recent`` labelled feedback rows with texts (one per text, the latest feedback): texts,
    truth, feedback times, and what the set is (its source and times, the rows left out, why it is empty)."""
    raw = read_feedback(path, after)
    labelled, unknown = true_labels(raw, names, task.multi_label, drop_unknown)
    latest, repeated = latest_per_text(labelled)
    rows = latest.tail(recent) if recent > 0 else latest.iloc[:0]
    since = f" received after {format_time(after)}" if after is not None else ""
    info: dict[str, Any] = {"source": f"the {recent} most recent labelled feedback rows with texts of {path}{since}"}
    info.update(read=len(raw), repeated=repeated, unknown_dropped=unknown, without_text=raw.attrs["without_text"])
    if raw.empty:
        without = raw.attrs["without_text"]
        kept = f" ({without} labelled rows have none: serve --keep_texts keeps them)" if without else ""
        info["note"] = f"empty: {path} has no labelled predictions with texts{since}{kept}"
    elif rows.empty:
        info["note"] = (
            "empty: --recent 0" if recent <= 0 else f"empty: every labelled row of {path}{since} was left out"
        )
    else:
        info.update(oldest=format_time(rows["feedback_time"].min()), newest=format_time(rows["feedback_time"].max()))
    truth = dataclasses.replace(task, names=tuple(names)).encode(rows["label"].tolist())  # in the order of `names`
    return rows["text"].tolist(), truth, rows["feedback_time"].to_numpy(dtype=float), info


def seen_in_training(model: Model, times: np.ndarray) -> int | None:
    """How many of the feedback rows (by their feedback times) the model's training may have held: those received
    after its `data.feedback_after` and up to the latest feedback its training read. By time alone, whichever
    database it read (a copy of the service's is the same rows), so the count errs on the side of "seen". None:
    unknown (its checkpoint could not be read)."""
    trained = model.trained_on
    if trained is None or trained.get("newest") is None:
        return 0 if model.checkpoint_read else None
    after = trained.get("after")
    low = -math.inf if after is None else float(after)
    return int(((times > low) & (times <= float(trained["newest"]))).sum())


# ------------------------------------------------------------------------------------------------ the command
def compare(
    champion: str,
    challenger: str,
    config: str,
    feedback_db: str | None = None,
    recent: int = 500,
    feedback_after: str | None = None,
    feedback_drop_unknown: bool = False,
    output_path: str = "compare_report.json",
    device: str = "cpu",
) -> dict[str, Any]:
    """Compare a challenger export with the champion on the config's test split and on recent feedback.

    Args:
        champion: The exported folder that answers now (`python -m lightning_cls export`).
        challenger: The exported folder to judge against it (e.g. retrained with `--data.feedback_db`); it must have
            the champion's labels.
        config: The `fit` config whose `data` section gives the held-out rows: its test split, the same for both.
        feedback_db: The service's feedback database (`serve --feedback_db ... --keep_texts`): the recent labelled
            feedback is the second set. Without it, that set is reported as empty.
        recent: How many of the most recent labelled feedback rows with texts to score (one per text).
        feedback_after: Only feedback received after this time (Unix seconds or an ISO 8601 date or date and time,
            UTC unless it has an offset): e.g. the time of the retraining, to score only feedback neither model saw.
        feedback_drop_unknown: Leave out feedback whose true label is not one of the models' labels (counted); by
            default such a row is an error naming the prediction and the label.
        output_path: Where to write the JSON report.
        device: Where to run the models (cpu, cuda).
    """
    after = parse_time(feedback_after, "--feedback_after")
    if feedback_after is not None and not feedback_db:
        raise ConfigError("--feedback_after filters the feedback of --feedback_db: give --feedback_db.")
    models = Model.load("champion", champion), Model.load("challenger", challenger)
    first, second = models
    if set(first.labels) != set(second.labels) or first.task.multi_label != second.task.multi_label:
        kind = {True: "multi-label", False: "single-label"}
        raise ConfigError(
            f"--champion {champion} ({kind[first.task.multi_label]}) has the labels {first.labels}, --challenger "
            f"{challenger} ({kind[second.task.multi_label]}) {second.labels}: compare needs models of the same "
            "labels."
        )
    texts, truth, names, source = held_out_rows(config)
    if set(names) != set(first.labels):
        raise ConfigError(
            f"--config {config}: its data has the labels {names}, the models {first.labels}: give the config the "
            "models were trained with."
        )
    multi = first.task.multi_label
    test = {"source": source, **scored_set(first, second, texts, truth, names, device)} if texts else {}
    report: dict[str, Any] = {
        "champion": first.describe(),
        "challenger": second.describe(),
        "problem": "multi-label" if multi else "single-label",
        "metrics": list(first.task.metrics) + (["top_label_in_set"] if first.task.multi_label else []),
        "sets": {"test": test or {"source": source, "rows": 0, "note": "empty: no test rows (data.test_fraction)"}},
    }
    if feedback_db is None:
        report["sets"]["recent_feedback"] = {"rows": 0, "note": "empty: no --feedback_db given"}
    else:
        texts, truth, times, info = recent_feedback(
            feedback_db, first.task, names, recent, after, feedback_drop_unknown
        )
        entry = {**info, **scored_set(first, second, texts, truth, names, device)} if texts else {**info, "rows": 0}
        if texts:
            entry["seen_in_training"] = {m.role: seen_in_training(m, times) for m in models}
        report["sets"]["recent_feedback"] = entry
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(format_comparison(report))
    print(f"wrote {output}")
    return report


def format_comparison(report: dict[str, Any]) -> str:
    """The report as a small table: per set and metric, both models' scores and the difference."""
    lines = [
        f"champion   {report['champion']['model_dir']} (version {report['champion']['version']})",
        f"challenger {report['challenger']['model_dir']} (version {report['challenger']['version']})",
        f"{'set':<16} {'rows':>6}  {'metric':<16} {'champion':>9} {'challenger':>10} {'difference':>10}",
    ]
    names = {"test": "test split", "recent_feedback": "recent feedback"}
    for key, entry in report["sets"].items():
        if not entry["rows"]:
            lines.append(f"{names[key]:<16} {0:>6}  {entry.get('note', 'empty')}")
            continue
        for i, metric in enumerate(report["metrics"]):
            head = f"{names[key]:<16} {entry['rows']:>6}" if i == 0 else " " * 23
            lines.append(
                f"{head}  {metric.replace('_f1', '-F1'):<16} {entry['champion'][metric]:>9.4f} "
                f"{entry['challenger'][metric]:>10.4f} {entry['difference'][metric]:>+10.4f}"
            )
        seen = entry.get("seen_in_training") or {}
        for role, count in seen.items():
            if count:
                lines.append(f"{'':<23}  note: the {role} trained on feedback: {count} of these rows may be in it")
            elif count is None:
                lines.append(f"{'':<23}  note: whether the {role} trained on these rows is unknown (no checkpoint)")
    return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
    """`python -m lightning_cls compare --champion DIR --challenger DIR --config CFG [...]`. Its `--config` is the
    training config whose test split is scored (a parameter), not a config file of this command."""
    return run_command(compare, argv, "compare")
