"""The LightningModule: a Hugging Face sequence classifier (DistilBERT, GPT-2, BERT, ...) with metrics."""

from __future__ import annotations

import inspect
import json
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from lightning_cls.adapters import add_lora, is_peft
from lightning_cls.errors import ConfigError, hub_errors
from lightning_cls.finetuning import freeze_all_but, trainable_names
from lightning_cls.labels import label_maps
from lightning_cls.pooling import MODEL_TYPE, POOLINGS, PooledClassifier, PooledClassifierConfig, position_ids
from lightning_cls.tokenization import load_tokenizer

# Checkpoints and exports of pooled classifiers name their config's model_type: Auto* classes must know it.
AutoConfig.register(MODEL_TYPE, PooledClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PooledClassifierConfig, PooledClassifier, exist_ok=True)

# Checkpoint key set when the checkpoint holds only the trained parameters (adapters and head): `save_adapter_only`.
ADAPTER_ONLY_KEY = "lightning_cls_adapter_only"
# Checkpoint key of the training data's summary (see `data_reference`).
DATA_REFERENCE_KEY = "lightning_cls_data_reference"


def data_reference(datamodule: Any) -> dict:
    """The training split's label counts and token-length statistics, plus the settings that shaped the inputs."""
    return {
        "train": datamodule.meta["splits"]["train"],
        "max_length": datamodule.hparams.max_length,
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
        """
        super().__init__()
        self.save_hyperparameters()
        if not label_names:
            raise ValueError("model.label_names is empty: it is normally linked from the data module.")
        tok = load_tokenizer(tokenizer or model_name_or_path)
        self.label_names = list(label_names)
        # from_pretrained returns the model in eval mode; Lightning keeps module modes as they are, so without
        # train() dropout would stay off during fine-tuning.
        if save_adapter_only and (lora_r is None or not pretrained or model_config is not None):
            raise ConfigError(
                "model.save_adapter_only needs LoRA (model.lora_r) on pretrained weights (model.pretrained true, no "
                "model.model_config): the frozen weights it leaves out must be loadable again from "
                "model.model_name_or_path."
            )
        weights_dtype = getattr(torch, dtype, None) if dtype else None
        if dtype and not isinstance(weights_dtype, torch.dtype):
            raise ConfigError(f"model.dtype={dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32).")
        try:
            model = build_classifier(
                model_name_or_path, self.label_names, tok, pretrained, model_config, pooling, weights_dtype
            )
        except ConfigError as err:
            if save_adapter_only:  # most likely rebuilding an adapter-only checkpoint without its base model
                raise ConfigError(
                    f"{err} Checkpoints saved with model.save_adapter_only hold only the adapters and the head: "
                    f"loading one needs the base model {model_name_or_path!r}."
                ) from err
            raise
        if weights_dtype is not None:
            model.to(weights_dtype)
        # Decoders pool the last non-pad token: the model must know which id is padding.
        model.config.pad_token_id = tok.pad_token_id
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_r is not None:
            model = add_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules, train_last_n_blocks)
        else:
            freeze_all_but(model, trainable_names(model, train_last_n_blocks))
        self.model = model.train()
        # Positions counted over real tokens only, so that left padding does not shift a text's positions.
        self._position_ids = takes_position_ids(self.model)
        if tok.padding_side == "left" and not reads_any_padding(self.model):
            raise ConfigError(
                f"The tokenizer {tokenizer or model_name_or_path!r} pads on the left, but this model's head reads a "
                "fixed position (the first token) or takes no position ids: use a right-padding tokenizer, or "
                "model.pooling cls, mean or last."
            )
        if compile:
            # In place: parameter names, and so checkpoints, stay those of the uncompiled model.
            self.model.compile(dynamic=True)

        def metrics(stage: str) -> MetricCollection:
            n = len(self.label_names)
            return MetricCollection(
                {"acc": MulticlassAccuracy(n, average="micro"), "f1_macro": MulticlassF1Score(n, average="macro")},
                prefix=f"{stage}/",
            )

        self.train_metrics, self.val_metrics, self.test_metrics = metrics("train"), metrics("val"), metrics("test")
        # The reports (per-class scores, confusion matrix figure) are all derived from the epoch's confusion matrix.
        n = len(self.label_names)
        self.val_confmat, self.test_confmat = MulticlassConfusionMatrix(n), MulticlassConfusionMatrix(n)
        # What the model was trained on (set at fit start, saved in checkpoints): export and monitoring need it.
        self.data_reference: dict | None = None

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
        metrics: MetricCollection,
        confmat: MulticlassConfusionMatrix | None = None,
    ) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        metrics.update(logits, batch["labels"])
        if confmat is not None:
            confmat.update(logits, batch["labels"])
        n = len(batch["labels"])
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics, self.val_confmat)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_metrics, self.test_confmat)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a couple of batches only: not a report of the split
            self.val_confmat.reset()
            return
        self._write_report("val", self.val_confmat)

    def on_test_epoch_end(self) -> None:
        self._write_report("test", self.test_confmat)

    def _write_report(self, stage: str, confmat: MulticlassConfusionMatrix) -> None:
        """Per-class report (text + JSON) and confusion matrix (PNG + TensorBoard) of the epoch, in the log folder."""
        # Imported here: keeps matplotlib off the import path of code that only needs the model.
        from lightning_cls.evaluation import log_figure, write_evaluation

        matrix = confmat.compute().cpu().numpy()  # summed over all ranks: every rank must call compute()
        confmat.reset()
        log_dir = self.trainer.log_dir  # a broadcast: every rank must ask too
        if not self.trainer.is_global_zero or log_dir is None:
            return
        # During fit the report belongs to an epoch; `validate` / `test` report on a checkpoint.
        if self.trainer.state.fn == "fit":
            context = {"epoch": self.current_epoch, "global_step": self.global_step}
        else:
            context = {"checkpoint": str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None}
        report, fig, paths = write_evaluation(matrix, self.label_names, stage, log_dir, context)
        log_figure(self.trainer.loggers, f"{stage}/confusion_matrix", fig, self.global_step)
        rank_zero_info(
            f"{stage} report: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}; wrote "
            + ", ".join(str(p) for p in paths.values())
        )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        probs = self(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)  # (B, num_labels)
        return {
            "row_id": batch["row_id"].tolist(),
            "label": [self.label_names[i] for i in probs.argmax(-1).tolist()],
            "probs": probs.cpu(),
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
        if self.data_reference is not None:
            checkpoint[DATA_REFERENCE_KEY] = self.data_reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The label names reach the model from the data module; a data config selecting other labels than the
        # checkpoint was trained on would otherwise give wrong names to the right ids (or a shape error).
        trained_on = checkpoint.get("hyper_parameters", {}).get("label_names")
        if trained_on is not None and list(trained_on) != self.label_names:
            raise ConfigError(
                f"The checkpoint was trained on the labels {list(trained_on)}, but the data module selects "
                f"{self.label_names}: set data.labels (or data.min_count) as in training."
            )
        self.data_reference = checkpoint.get(DATA_REFERENCE_KEY, self.data_reference)
        if checkpoint.get(ADAPTER_ONLY_KEY):  # the frozen weights are this model's own, loaded from the base model
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
