"""The LightningModule: a Hugging Face sequence classifier (DistilBERT, GPT-2, BERT, ...) with metrics."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MultilabelF1Score
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from lightning_cls.data.labels import label_maps
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.data.windows import per_text
from lightning_cls.errors import ConfigError, hub_errors
from lightning_cls.model.adapters import add_lora, is_peft
from lightning_cls.model.calibration import EpochLogits, calibration_report, fit_temperature
from lightning_cls.model.checkpoints import ADAPTER_ONLY_KEY, read_fitted, write_fitted
from lightning_cls.model.epoch_reports import (
    Epoch,
    label_set_report,
    label_set_scores,
    label_set_validation,
    paper_subjects_of,
    single_label_scores,
    write_label_set_report,
    write_single_label_report,
)
from lightning_cls.model.finetuning import freeze_all_but, trainable_names
from lightning_cls.model.lexical import LexicalExpert, LexicalSettings
from lightning_cls.model.lexical_fusion import LexicalFusion
from lightning_cls.model.pooling import MODEL_TYPE, POOLINGS, PooledClassifier, PooledClassifierConfig, position_ids
from lightning_cls.task import LabelSet, SingleLabel, Task, task_for
from lightning_cls.task.scores import fit_thresholds

# Checkpoints and exports of pooled classifiers name their config's model_type: Auto* classes must know it.
AutoConfig.register(MODEL_TYPE, PooledClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PooledClassifierConfig, PooledClassifier, exist_ok=True)


def data_reference(datamodule: Any) -> dict:
    """The training split's label counts and token-length statistics, plus the settings that shaped the inputs."""
    return {
        "train": datamodule.meta["splits"]["train"],
        "max_length": datamodule.hparams.max_length,
        "max_windows": datamodule.hparams.get("max_windows", 1),
        "window_stride": datamodule.hparams.get("window_stride"),
        "source": datamodule.meta["source"],
    }


def build_classifier(
    model_name_or_path: str,
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    pretrained: bool,
    model_config: dict[str, Any] | None,
    pooling: str = "default",
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """The HF classifier: from `model_config` (random init), pretrained weights, or the checkpoint's config alone.

    `pooling` "default" keeps the architecture's own classification head; any other builds a `PooledClassifier`
    on the architecture's base model. A `model_config` of a pooled classifier (a checkpoint's) rebuilds one.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling={pooling!r}: use one of {', '.join(POOLINGS)}.")
    id2label, label2id = label_maps(label_names)
    labels = {"num_labels": len(label_names), "id2label": id2label, "label2id": label2id}
    if model_config is not None:
        if "model_type" not in model_config:
            raise ConfigError("model.model_config needs a `model_type` (e.g. distilbert or gpt2).")
        if model_config["model_type"] == MODEL_TYPE:  # a checkpoint of a pooled classifier: its config says it all
            return PooledClassifier(PooledClassifierConfig(**{**model_config, **labels}))
        # The tokenizer decides the vocabulary and the special ids of a model built from scratch.
        specials = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
        config = AutoConfig.for_model(**{"vocab_size": len(tokenizer), **specials, **model_config, **labels})
        if pooling != "default":
            return PooledClassifier(PooledClassifierConfig(backbone=config.to_dict(), pooling=pooling, **labels))
        return AutoModelForSequenceClassification.from_config(config)
    with hub_errors("model.model_name_or_path", model_name_or_path):  # a wrong name: one line saying so
        if pooling != "default":
            if pretrained:
                backbone = AutoModel.from_pretrained(model_name_or_path, dtype=dtype)
                return PooledClassifier.from_backbone(backbone, pooling, **labels)
            backbone = AutoConfig.from_pretrained(model_name_or_path).to_dict()
            return PooledClassifier(PooledClassifierConfig(backbone=backbone, pooling=pooling, **labels))
        if pretrained:
            # A checkpoint that already has a classifier head of another size gets a fresh head for our labels.
            return AutoModelForSequenceClassification.from_pretrained(
                model_name_or_path, ignore_mismatched_sizes=True, dtype=dtype, **labels
            )
        config = AutoConfig.from_pretrained(model_name_or_path, **labels)
    return AutoModelForSequenceClassification.from_config(config)


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft(model) else model


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes position ids (DistilBERT's does not)."""
    model = base_model(model)
    net = model.backbone if isinstance(model, PooledClassifier) else model
    return "position_ids" in inspect.signature(net.forward).parameters


def reads_any_padding(model: torch.nn.Module) -> bool:
    """Whether the model gives a text the same logits padded on either side: positions must be counted over real
    tokens, and the head must find its token by the mask (pooled heads) or pool the last real one (decoders' `score`
    heads) rather than read position 0 ([CLS] heads)."""
    base = base_model(model)
    return takes_position_ids(model) and (isinstance(base, PooledClassifier) or hasattr(base, "score"))


def max_positions(model: PreTrainedModel) -> int | None:
    """How many tokens the model can read (None if its config does not say): a pooled classifier's backbone's."""
    model = base_model(model)
    config = model.backbone.config if isinstance(model, PooledClassifier) else model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def build_network(hp: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The network a `TextClassifier` trains, from its hyperparameters (its arguments): built by `build_classifier`,
    in `dtype`, with LoRA adapters or all but its trained parts frozen, in train mode, checked against the tokenizer's
    padding side."""
    name = hp["model_name_or_path"]
    if hp["save_adapter_only"] and (hp["lora_r"] is None or not hp["pretrained"] or hp["model_config"] is not None):
        raise ConfigError(
            "model.save_adapter_only needs LoRA (model.lora_r) on pretrained weights (model.pretrained true, no "
            "model.model_config): the frozen weights it leaves out must be loadable again from "
            "model.model_name_or_path."
        )
    dtype = getattr(torch, hp["dtype"], None) if hp["dtype"] else None
    if hp["dtype"] and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype={hp['dtype']!r} is not a torch dtype (e.g. bfloat16, float16, float32).")
    try:
        model = build_classifier(
            name, list(hp["label_names"]), tokenizer, hp["pretrained"], hp["model_config"], hp["pooling"], dtype
        )
    except ConfigError as err:
        if hp["save_adapter_only"]:  # most likely rebuilding an adapter-only checkpoint without its base model
            raise ConfigError(
                f"{err} Checkpoints saved with model.save_adapter_only hold only the adapters and the head: "
                f"loading one needs the base model {name!r}."
            ) from err
        raise
    if dtype is not None:
        model.to(dtype)
    # Decoders pool the last non-pad token: the model must know which id is padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    if hp["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hp["lora_r"] is not None:
        model = add_lora(
            model,
            hp["lora_r"],
            hp["lora_alpha"],
            hp["lora_dropout"],
            hp["lora_target_modules"],
            hp["train_last_n_blocks"],
        )
    else:
        freeze_all_but(model, trainable_names(model, hp["train_last_n_blocks"]))
    # from_pretrained returns the model in eval mode; Lightning keeps module modes as they are, so without
    # train() dropout would stay off during fine-tuning.
    model.train()
    if tokenizer.padding_side == "left" and not reads_any_padding(model):
        raise ConfigError(
            f"The tokenizer {hp['tokenizer'] or name!r} pads on the left, but this model's head reads a "
            "fixed position (the first token) or takes no position ids: use a right-padding tokenizer, or "
            "model.pooling cls, mean or last."
        )
    # What `transformers.pipeline` applies to an export: a sigmoid per label, or a softmax over them.
    task = LabelSet if hp["multi_label"] else SingleLabel
    model.config.problem_type = task.problem_type
    return model


def train_metrics(num_labels: int, multi_label: bool) -> MetricCollection:
    """The training metrics, per batch: micro- and macro-F1 of label sets at a 0.5 threshold (validation fits the
    thresholds), or accuracy and macro-F1."""
    if multi_label:
        metrics = {
            "f1_micro": MultilabelF1Score(num_labels, average="micro"),
            "f1_macro": MultilabelF1Score(num_labels, average="macro"),
        }
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_labels, average="micro"),
            "f1_macro": MulticlassF1Score(num_labels, average="macro"),
        }
    return MetricCollection(metrics, prefix="train/")


class TextClassifier(pl.LightningModule):
    """Fine-tunes a Hugging Face sequence-classification model; logs loss, accuracy and macro-F1 per epoch."""

    def __init__(
        self,
        model_name_or_path: str = "distilbert/distilbert-base-uncased",
        label_names: list[str] | None = None,
        tokenizer: str | None = None,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        train_last_n_blocks: int | None = None,
        pooling: str = "default",
        lora_r: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        save_adapter_only: bool = False,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        compile: bool = False,
        calibrate: bool = True,
        use_temperature: bool = True,
        lexical: bool = False,
        lexical_c: float = 16.0,
        lexical_max_features: int = 300_000,
        multi_label: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Hub name or local folder of the model (e.g. distilbert/distilbert-base-uncased,
                openai-community/gpt2).
            label_names: Class names in id order. Filled in from the data module; not set by hand.
            tokenizer: The tokenizer's hub name or folder. Filled in from `data.tokenizer`.
            pretrained: Load pretrained weights; false builds the architecture of `model_name_or_path` with random
                weights.
            model_config: Build a randomly initialised model from this Hugging Face config instead, e.g.
                `{model_type: distilbert, n_layers: 2, dim: 64, hidden_dim: 128, n_heads: 2}`; `vocab_size` defaults
                to the tokenizer's. Checkpoints record the full config here, so reloading them needs no download.
            train_last_n_blocks: Train the head and only the last N transformer blocks (0: the head only; null: all).
            pooling: How a text's token states become one vector for the head: `default` (the architecture's own
                head: the [CLS] pooler of BERT-like encoders, the last real token of GPT-2), `cls` (first token),
                `mean` (mean over real tokens: what sentence encoders such as all-MiniLM-L6-v2 were trained with)
                or `last` (last real token, whichever side is padded).
            lora_r: Train LoRA adapters of this rank (PEFT) instead of the weights themselves; the head is always
                trained in full. With `train_last_n_blocks` N, only the last N blocks get adapters. Null: no LoRA.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: Dropout on the LoRA branch's input.
            lora_target_modules: Names of the linear layers that get adapters (default: the family's attention
                query and value projections, e.g. q_proj/v_proj, c_attn for GPT-2, qkv_proj for Phi-3).
            save_adapter_only: Checkpoints hold only the trained parameters (adapters and head), not the frozen
                base weights: small, but loading one needs the pretrained base model `model_name_or_path`.
            dtype: Load the weights in this dtype, e.g. `bfloat16` for large models on a GPU (null: float32).
            gradient_checkpointing: Recompute activations in the backward pass instead of keeping them: less memory
                for more compute.
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
            warmup_ratio: Share of the optimizer steps with a linear warm-up; the rate then decays linearly to 0.
            compile: Compile the network with torch.compile (dynamic shapes; the first steps are slow: it compiles).
            calibrate: During `fit`, fit a temperature on the validation split after each validation (temperature
                scaling), so that every checkpoint carries the one of its own weights.
            use_temperature: `predict` divides the logits by the checkpoint's temperature (calibrated
                probabilities); false gives the raw softmax. Never changes a predicted label.
            lexical: Fuse a lexical expert with the network (`model.fusion`): TF-IDF over word 1-2 grams and a
                logistic regression (one per label for multi-label data), fitted on the training split at the start
                of `fit` (or by `calibrate` on a checkpoint that has none); its logits, times a weight fitted on the
                validation split, are added to the network's. Every answer (validate, test, predict, export,
                serve) is then the fused one.
            lexical_c: Inverse regularisation strength of the lexical expert's logistic regression.
            lexical_max_features: Most n-grams the lexical expert keeps (the most frequent ones).
            multi_label: A text has a set of labels: a sigmoid per label and binary cross-entropy, per-label
                thresholds fitted on validation (with `calibrate`), micro/macro-F1, subset accuracy and Hamming loss.
                Filled in from `data.multi_label`.
        """
        super().__init__()
        # `use_temperature` is an inference switch, not a property of the weights: saved in the checkpoint's
        # hyperparameters, it would override `--model.use_temperature false` given beside `--ckpt_path`. The same
        # for the lexical settings: they say whether to fit an expert where there is none (the checkpoint keeps the
        # expert itself), so `calibrate --model.lexical true` can add one to a checkpoint trained without.
        self.save_hyperparameters(ignore=["use_temperature", "lexical", "lexical_c", "lexical_max_features"])
        self.use_temperature = use_temperature
        # The lexical expert and its fusion weight (saved in checkpoints) and its scores of the splits read so far.
        settings = LexicalSettings(max_features=lexical_max_features, C=lexical_c) if lexical else None
        self.lexical_fusion = LexicalFusion(settings)
        if not label_names:
            raise ValueError("model.label_names is empty: it is normally linked from the data module.")
        tok = load_tokenizer(tokenizer or model_name_or_path)
        self.label_names = list(label_names)
        self.model = build_network(self.hparams, tok)
        # Positions counted over real tokens only, so that left padding does not shift a text's positions.
        self._position_ids = takes_position_ids(self.model)
        self.multi_label = multi_label
        if compile:
            # In place: parameter names, and so checkpoints, stay those of the uncompiled model.
            self.model.compile(dynamic=True)

        self.train_metrics = train_metrics(len(self.label_names), multi_label)
        # A multi-label model's decision threshold per label (fitted on validation; None: 0.5 for every label).
        self.thresholds: list[float] | None = None
        # Validation and test keep every row's logits and row id (gathered from all ranks): the metrics, the report
        # (per-class scores, confusion matrix) and the calibration are computed per text at the end of the epoch.
        self.val_logits, self.test_logits = EpochLogits(), EpochLogits()
        # softmax(logits / temperature), or each label's sigmoid(logits / temperature), are the calibrated
        # probabilities; None: never calibrated (T = 1). Saved in checkpoints with `calibration`, the validation scores.
        self.temperature: float | None = None
        self.calibration: dict | None = None
        # Set by the `calibrate` command: fit the temperature at the end of the next validation too (then cleared).
        self.refit_temperature = False
        # What the model was trained on (set at fit start, saved in checkpoints): export and monitoring need it.
        self.data_reference: dict | None = None

    @property
    def lexical(self) -> LexicalExpert | None:
        """The lexical expert fused with the network (`model.lexical`), or None."""
        return self.lexical_fusion.expert

    @property
    def lexical_weight(self) -> float | None:
        """The lexical expert's fusion weight (fitted on validation), or None."""
        return self.lexical_fusion.weight

    def setup(self, stage: str) -> None:
        limit = max_positions(self.model)
        max_length = getattr(self.trainer.datamodule, "hparams", {}).get("max_length")
        if limit and max_length and max_length > limit:
            raise ConfigError(f"data.max_length={max_length} is more than the model's {limit} positions: lower it.")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"position_ids": position_ids(attention_mask)} if self._position_ids else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # (B, num_labels)

    def _step(
        self,
        batch: dict[str, torch.Tensor],
        stage: str,
        metrics: MetricCollection | None = None,
        epoch_logits: EpochLogits | None = None,
    ) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()
        loss = self.task.loss(logits, batch["labels"])
        n = len(batch["labels"])
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=n)
        if metrics is not None:  # training: per batch (per window, when texts are read as windows)
            metrics.update(logits, batch["labels"])
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n)
        if epoch_logits is not None:  # validation and test: per text, at the end of the epoch (`_evaluate`)
            epoch_logits.update(logits, batch["labels"], batch["row_id"])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", epoch_logits=self.val_logits)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", epoch_logits=self.test_logits)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", self.val_logits)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", self.test_logits)

    def _evaluate(self, stage: str, epoch_logits: EpochLogits) -> None:
        """The epoch's metrics and report, per text: a text read as several windows is answered with the mean of
        their logits (`windows.per_text`), so validation and test count texts, whatever the reading."""
        logits, labels, row_ids = (t.cpu() for t in epoch_logits.compute())  # gathered: every rank must call it
        epoch_logits.reset()
        logits, labels, row_ids = per_text(logits, labels, row_ids)
        if not len(labels):
            return
        epoch = self._epoch(stage)
        logits, components = self.lexical_fusion.fuse_epoch(epoch, logits, labels, row_ids, self.trainer.datamodule)
        if self.multi_label:
            self._evaluate_label_sets(epoch, logits, labels, components)
        else:
            subjects = paper_subjects_of(self.trainer.datamodule, row_ids)
            self._evaluate_single_label(epoch, logits, labels, components, subjects)

    def _epoch(self, stage: str) -> Epoch:
        """This evaluation epoch, as `epoch_reports` and the lexical fusion need it."""
        trainer = self.trainer
        # The rows to fit on: validation during `fit` (with `model.calibrate`), or for the `calibrate` command.
        fitting = trainer.state.fn == "fit" and self.hparams.get("calibrate", True)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        return Epoch(
            stage=stage,
            fit=stage == "val" and (fitting or self.refit_temperature) and not trainer.sanity_checking,
            sanity=trainer.sanity_checking,
            during_fit=trainer.state.fn == "fit",
            epoch=self.current_epoch,
            step=self.global_step,
            checkpoint=str(trainer.ckpt_path) if trainer.ckpt_path else None,
            log_dir=log_dir if trainer.is_global_zero else None,
            broadcast=partial(trainer.strategy.broadcast, src=0),
            loggers=trainer.loggers,
        )

    def _evaluate_single_label(
        self, epoch: Epoch, logits: torch.Tensor, labels: torch.Tensor, parts: dict | None, subjects: np.ndarray | None
    ) -> None:
        """Log the epoch's scores; fit the temperature if the epoch says so, then write the report with the scores
        before and after the temperature in use (test only ever reports with the stored one). `parts`: a fusion's
        components; `subjects`: each text's subjects (`data.subjects_path`); each or None."""
        scores = single_label_scores(epoch.stage, logits, labels, len(self.label_names), parts, subjects)
        self.log_dict(scores, prog_bar=True, batch_size=len(labels))
        if epoch.sanity:
            return
        if epoch.fit:
            self.temperature = epoch.broadcast(fit_temperature(logits, labels))
            self.refit_temperature = False
        calibration = calibration_report(logits, labels, self.temperature)
        if epoch.fit:
            self.calibration = {**calibration, "split": "validation", "global_step": epoch.step}
        write_single_label_report(epoch, logits, labels, self.label_names, calibration, parts, subjects)

    def _evaluate_label_sets(
        self, epoch: Epoch, logits: torch.Tensor, labels: torch.Tensor, components: dict | None
    ) -> None:
        """Fit the thresholds if the epoch says so, then log the scores of the thresholded label sets and write the
        report."""
        y = labels.numpy()
        if epoch.fit:  # the temperature first, then the thresholds on the probabilities it gives
            self.temperature = epoch.broadcast(fit_temperature(logits, y))
            # Scaled whatever `use_temperature` says: the thresholds are on the scaled probabilities.
            scaled = task_for(self.label_names, [0.5] * len(self.label_names), self.temperature)
            probs = scaled.probabilities(logits).numpy()
            self.thresholds = epoch.broadcast(fit_thresholds(probs, y).tolist())
            self.refit_temperature = False
        task = self.task
        report = label_set_report(task, logits, y, components)
        if epoch.fit:
            self.calibration = label_set_validation(report, epoch.step)
        self.log_dict(label_set_scores(epoch.stage, report, components), prog_bar=True, batch_size=len(y))
        write_label_set_report(epoch, report)

    @property
    def task(self) -> Task:
        """What the model answers (`lightning_cls.task`): label sets at their thresholds (0.5 until fitted), or one
        label, under the calibrated temperature (unless `use_temperature` is off)."""
        thresholds = (self.thresholds or [0.5] * len(self.label_names)) if self.multi_label else None
        return task_for(self.label_names, thresholds, self.temperature, self.use_temperature)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()  # (B, num_labels)
        if self.lexical is not None:  # linear: fusing each window and then averaging = averaging and then fusing
            logits = self.lexical_fusion.fused(logits, "predict", batch["row_id"], self.trainer.datamodule)
        probs, decided = self.task.answer(logits)
        return {
            "row_id": batch["row_id"].tolist(),
            "label": [labels[0] for labels in self.task.labels_of(decided, probs)],  # a set's most probable
            "probs": probs.cpu(),
            "logits": logits.cpu(),  # the prediction writer averages a long text's windows' logits, then asks the task
        }

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            # Biases and LayerNorm weights (the 1-d parameters) are not decayed.
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "meta", None):
            self.data_reference = data_reference(datamodule)
        self.lexical_fusion.fit_expert(datamodule, len(self.label_names))

    def on_validation_start(self) -> None:
        if self.refit_temperature:  # `calibrate` on a checkpoint without a lexical expert, with `model.lexical`
            self.lexical_fusion.fit_expert(self.trainer.datamodule, len(self.label_names))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint carries its weights, so whatever rebuilds it (`--ckpt_path`, load_from_checkpoint) should build
        # the architecture from its config, offline, instead of downloading the pretrained weights again.
        if self.hparams.save_adapter_only:
            # Only what was trained; the frozen weights come back from the pretrained model when it is loaded.
            trained = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
            checkpoint[ADAPTER_ONLY_KEY] = True
        else:
            config = json.loads(base_model(self.model).config.to_json_string())
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "model_config": config}
        write_fitted(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        read_fitted(checkpoint, self)
        if checkpoint.get(ADAPTER_ONLY_KEY):  # the frozen weights are this model's own, loaded from the base model
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
