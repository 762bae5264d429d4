"""`python -m lightning_cls distill`: a shallower student distilled from a fine-tuned checkpoint.

The student is the teacher with fewer transformer layers (default: half, evenly spaced and ending with the last, e.g.
layers 1, 3, 5 of 6), initialised from the teacher's weights (embeddings, the kept layers, the head), then trained
to give the teacher's probabilities (soft targets at a temperature, KL divergence) on texts of the training split;
the true labels are not used. The training is a LightningModule (`distillation.py`) run by a Trainer, on batches of
the project's own collator; what comes out is a checkpoint like any other, with the teacher's data settings: `export`
measures it on the validation split (macro-F1 beside the teacher's is the accuracy it costs), `serve` and `predict`
run it.

    python -m lightning_cls distill --ckpt_path runs/.../last.ckpt --output student.ckpt --layers 3 --texts 8000
    python -m lightning_cls export --ckpt_path student.ckpt --output_dir runs/export/student --format onnx \\
        --quantize int8

A teacher's temperature, calibration and lexical fusion weight were fitted to its own logits: the student has none
(`calibrate` fits them for it; export refuses a lexical expert without its weight and says so).
"""

from __future__ import annotations

import copy
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_cls.atomic import atomic_file
from lightning_cls.data.samplers import LengthGroupedSampler, LengthSortedSampler
from lightning_cls.data.token_cache import TokenizedSplit
from lightning_cls.data.tokenization import PadCollator, load_tokenizer, tokenize
from lightning_cls.errors import ExportError
from lightning_cls.lifecycle.distillation import DistillationModule, distillation_trainer, quiet_lightning
from lightning_cls.model.checkpoints import (
    ADAPTER_ONLY_KEY,
    CALIBRATION_KEY,
    DATA_REFERENCE_KEY,
    LEXICAL_WEIGHT_KEY,
    TEMPERATURE_KEY,
    load_checkpoint,
)
from lightning_cls.model.classifier import TextClassifier

# A key of the student checkpoint: how it was made (teacher, layers kept, texts, epochs, the KL before and after).
DISTILLED_KEY = "lightning_cls_distilled"
# Fitted to the teacher's logits, not the student's: not carried over.
_TEACHER_ONLY = (TEMPERATURE_KEY, CALIBRATION_KEY, LEXICAL_WEIGHT_KEY)
# Resume state of the teacher's training run: meaningless for the student.
_RESUME = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
_LAYER_COUNT = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")
_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers|h)\.)(\d+)(\..*)$")


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` of `total` layers, evenly spaced, the last always kept (it feeds the head): 6 -> 3 gives 1, 3, 5."""
    if not 1 <= count <= total:
        raise ExportError(f"--layers must be between 1 and the teacher's {total} layers, got {count}.")
    return [round((i + 1) * total / count) - 1 for i in range(count)]


def _config_with_layers(config: dict[str, Any], count: int) -> tuple[dict[str, Any], int]:
    """The model config (a pooled classifier's nests its backbone's) with `count` layers, and the old count."""
    config = copy.deepcopy(config)
    inner = config["backbone"] if isinstance(config.get("backbone"), dict) else config
    key = next((k for k in _LAYER_COUNT if isinstance(inner.get(k), int)), None)
    if key is None:
        raise ExportError("the checkpoint's model_config names no layer count: this architecture cannot be distilled.")
    total, inner[key] = inner[key], count
    return config, total


def student_checkpoint(checkpoint: dict[str, Any], layers: int | None) -> tuple[dict[str, Any], list[int]]:
    """The teacher's checkpoint with only some of its layers (renumbered), and the layers kept."""
    if checkpoint.get(ADAPTER_ONLY_KEY):
        raise ExportError("the checkpoint holds LoRA adapters only: distil a checkpoint with every weight in it.")
    hparams = dict(checkpoint["hyper_parameters"])
    if not isinstance(hparams.get("model_config"), dict):
        raise ExportError("the checkpoint records no model_config: it was saved by an older lightning_cls.")
    _, total = _config_with_layers(hparams["model_config"], 1)
    keep = evenly_spaced(total, layers or max(1, total // 2))
    hparams["model_config"], _ = _config_with_layers(hparams["model_config"], len(keep))
    hparams["train_last_n_blocks"] = None  # every weight of the student trains
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in checkpoint["state_dict"].items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match[2]) in renumber:
            state[f"{match[1]}{renumber[int(match[2])]}{match[3]}"] = value
    student = {k: v for k, v in checkpoint.items() if k not in _RESUME + _TEACHER_ONLY}
    return {**student, "hyper_parameters": hparams, "state_dict": state}, keep


# Batches are padded to a multiple of this many tokens: bf16 on a CPU builds a kernel for every new input shape (its
# first pass measured several times slower than fp32 here), and a few widths keep the shapes few.
PAD_MULTIPLE = 64
# The divergence before and after training is read on (up to) this many of the training texts.
HELD_TEXTS = 512


def check_options(texts: int, epochs: int, batch_size: int, learning_rate: float, temperature: float) -> None:
    """Raise one `ExportError` naming every option out of its range."""
    rules = [
        ("texts", texts, texts >= 1, "at least 1"),
        ("epochs", epochs, epochs >= 1, "at least 1"),
        ("batch_size", batch_size, batch_size >= 1, "at least 1"),
        ("learning_rate", learning_rate, learning_rate > 0, "positive"),
        ("temperature", temperature, temperature > 0, "positive"),
    ]
    problems = [f"--{name} must be {rule}, got {value}" for name, value, ok, rule in rules if not ok]
    if problems:
        raise ExportError("; ".join(problems) + ".")


def _loader(split: TokenizedSplit, batch_size: int, sampler: Sampler, collator: PadCollator) -> DataLoader:
    return DataLoader(split, batch_size=batch_size, sampler=sampler, collate_fn=collator)


def _student(checkpoint: dict[str, Any]) -> TextClassifier:
    """The student `TextClassifier` built from its checkpoint dictionary, in memory (as `load_from_checkpoint` would
    from a file: its config, its fitted values, its weights)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return TextClassifier.load_from_checkpoint(buffer, map_location="cpu", weights_only=True, compile=False)


def distill(
    ckpt_path: str,
    output: str,
    layers: int | None = None,
    texts: int = 8000,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    temperature: float = 2.0,
    bf16: bool | None = None,
    seed: int = 0,
) -> Path:
    """Distil a fine-tuned checkpoint into a shallower student checkpoint.

    Args:
        ckpt_path: The teacher: a checkpoint written by `fit` (every weight in it; LoRA adapters merged first).
        output: The student checkpoint to write (a .ckpt; written whole or not at all).
        layers: Transformer layers of the student (default: half the teacher's), evenly spaced, the last kept.
        texts: Training texts whose teacher probabilities the student learns (a seeded sample of the training
            split, rebuilt from the teacher's data settings; their labels are not used).
        epochs: Passes over those texts.
        batch_size: Texts per step (batches of similar length).
        learning_rate: AdamW's peak learning rate (6% warm-up, then linear decay to 0).
        temperature: Softmax temperature of the soft targets (the loss is scaled by its square, as in Hinton et al.).
        bf16: Run teacher and student under bf16 autocast (default: where the CPU or GPU runs bf16 well).
        seed: Seed of the sample, the batch order and dropout.
    """
    from lightning_cls.export.exporter import split_sample
    from lightning_cls.hardware import detect_hardware

    out = Path(output)
    if out.exists():
        raise ExportError(f"--output {out} exists: choose another path.")
    check_options(texts, epochs, batch_size, learning_rate, temperature)
    torch.manual_seed(seed)
    checkpoint = load_checkpoint(ckpt_path)
    student_ckpt, keep = student_checkpoint(checkpoint, layers)
    sample, _, source = split_sample(checkpoint, "train", texts)
    teacher = TextClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, compile=False)
    hp = checkpoint["hyper_parameters"]
    tokenizer = load_tokenizer(hp.get("tokenizer") or hp["model_name_or_path"])
    reference = checkpoint.get(DATA_REFERENCE_KEY) or {}
    max_length = int(reference.get("max_length") or checkpoint["datamodule_hyper_parameters"]["max_length"])
    ids = tokenize(tokenizer, sample, max_length)
    split = TokenizedSplit.from_lists(ids, labels=[], row_ids=np.arange(len(ids)))  # row id = index of the text
    held = TokenizedSplit.from_lists(ids[:HELD_TEXTS], labels=[], row_ids=np.arange(min(len(ids), HELD_TEXTS)))
    collator = PadCollator(int(tokenizer.pad_token_id), PAD_MULTIPLE, tokenizer.padding_side)
    use_bf16 = detect_hardware("cuda" if torch.cuda.is_available() else "cpu").bf16 if bf16 is None else bf16
    print(
        f"teacher {ckpt_path}: {len(keep)} of its layers kept ({keep}); {len(ids)} texts from {source}; bf16 {use_bf16}"
    )

    module = DistillationModule(_student(student_ckpt), teacher, temperature, learning_rate)
    del teacher  # the module drops it once it has its logits
    with quiet_lightning():
        trainer = distillation_trainer(epochs, use_bf16)
        start = time.perf_counter()
        answers = trainer.predict(module, _loader(split, 32, LengthSortedSampler(split.lengths), collator))
        module.keep_teacher_logits(answers)
        print(f"teacher logits of {len(ids)} texts in {time.perf_counter() - start:.0f} s")

        held_loader = _loader(held, 32, LengthSortedSampler(held.lengths), collator)
        before = trainer.validate(module, held_loader, verbose=False)[0]["kl"]
        start = time.perf_counter()
        # Batches of similar lengths in a seeded order, another each epoch (the Trainer sets the sampler's epoch).
        sampler = LengthGroupedSampler(split.lengths, batch_size, seed)
        trainer.fit(module, _loader(split, batch_size, sampler, collator))
        after = trainer.validate(module, held_loader, verbose=False)[0]["kl"]
    print(f"KL divergence from the teacher (T={temperature}), {len(held)} training texts: {before:.4g} -> {after:.4g}")

    student_ckpt["state_dict"] = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
    student_ckpt[DISTILLED_KEY] = {
        "teacher": str(Path(ckpt_path).resolve()),
        "layers_kept": keep,
        "texts": len(ids),
        "epochs": epochs,
        "temperature": temperature,
        "kl_before": float(f"{before:.4g}"),
        "kl_after": float(f"{after:.4g}"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:  # whole or not at all
        torch.save(student_ckpt, tmp)
    print(f"Student checkpoint: {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    from lightning_cls.arg_parser import run_command

    return run_command(distill, argv, "distill", config_file=True)


if __name__ == "__main__":
    main()
