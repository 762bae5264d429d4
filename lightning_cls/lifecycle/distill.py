"""`python -m lightning_cls distill`: a shallower student distilled from a fine-tuned checkpoint.

The student is the teacher with fewer transformer layers (default: half, evenly spaced and ending with the last, e.g.
layers 1, 3, 5 of 6), initialised from the teacher's weights (embeddings, the kept layers, the head), then trained
to give the teacher's probabilities (soft targets at a temperature, KL divergence) on texts of the training split;
the true labels are not used. What comes out is a checkpoint like any other, with the teacher's data settings: `export`
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
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lightning_cls.errors import ExportError
from lightning_cls.model.checkpoints import (
    ADAPTER_ONLY_KEY,
    CALIBRATION_KEY,
    DATA_REFERENCE_KEY,
    LEXICAL_WEIGHT_KEY,
    TEMPERATURE_KEY,
    load_checkpoint,
)

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


def _batches(lengths: list[int], rows: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Batches of `rows` texts of similar length (sorted, then cut); in a seeded random order when `rng` is given."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i : i + rows] for i in range(0, len(order), rows)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# Batches are padded to a multiple of this many tokens: bf16 on a CPU builds a kernel for every new input shape (its
# first pass measured several times slower than fp32 here), and a few widths keep the shapes few.
PAD_MULTIPLE = 64


def _pad(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(row) for row in ids) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return input_ids, mask


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
    from lightning_cls.data.tokenization import load_tokenizer
    from lightning_cls.export.exporter import split_sample
    from lightning_cls.export.runtime import detect_hardware
    from lightning_cls.model.classifier import TextClassifier

    out = Path(output)
    if out.exists():
        raise ExportError(f"--output {out} exists: choose another path.")
    torch.manual_seed(seed)
    checkpoint = load_checkpoint(ckpt_path)
    student_ckpt, keep = student_checkpoint(checkpoint, layers)
    sample, _, source = split_sample(checkpoint, "train", texts)
    teacher = TextClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, compile=False)
    teacher = teacher.model.eval()
    hp = checkpoint["hyper_parameters"]
    tokenizer = load_tokenizer(hp.get("tokenizer") or hp["model_name_or_path"])
    reference = checkpoint.get(DATA_REFERENCE_KEY) or {}
    max_length = int(reference.get("max_length") or checkpoint["datamodule_hyper_parameters"]["max_length"])
    ids = tokenizer(sample, truncation=True, max_length=max_length)["input_ids"]
    pad = int(tokenizer.pad_token_id)
    use_bf16 = detect_hardware("cpu").bf16 if bf16 is None else bf16
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": use_bf16}
    print(
        f"teacher {ckpt_path}: {len(keep)} of its layers kept ({keep}); {len(ids)} texts from {source}; bf16 {use_bf16}"
    )

    start = time.perf_counter()
    targets = torch.empty(len(ids), int(teacher.config.num_labels))
    with torch.inference_mode(), torch.autocast(**autocast):
        for rows in _batches([len(r) for r in ids], 32):
            input_ids, mask = _pad([ids[i] for i in rows], pad)
            targets[torch.as_tensor(rows)] = teacher(input_ids=input_ids, attention_mask=mask).logits.float()
    del teacher
    print(f"teacher logits of {len(ids)} texts in {time.perf_counter() - start:.0f} s")

    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(student_ckpt, tmp)
    try:
        lit = TextClassifier.load_from_checkpoint(tmp, map_location="cpu", weights_only=True, compile=False)
    finally:
        tmp.unlink(missing_ok=True)
    model = lit.model.train()

    def divergence(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        soft = F.log_softmax(teacher_logits / temperature, -1)
        return F.kl_div(F.log_softmax(logits.float() / temperature, -1), soft, log_target=True, reduction="batchmean")

    held = np.arange(min(len(ids), 512))  # the divergence before and after is read on (up to) 512 of the texts

    def mean_divergence() -> float:
        model.eval()
        total = 0.0
        with torch.inference_mode(), torch.autocast(**autocast):
            for rows in _batches([len(ids[i]) for i in held], 32):
                input_ids, mask = _pad([ids[i] for i in held[rows]], pad)
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                total += float(divergence(logits, targets[torch.as_tensor(held[rows])])) * len(rows)
        model.train()
        return total / len(held)

    before = mean_divergence()
    rng = np.random.default_rng(seed)
    steps = epochs * math.ceil(len(ids) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for rows in _batches([len(r) for r in ids], batch_size, rng):
            input_ids, mask = _pad([ids[i] for i in rows], pad)
            with torch.autocast(**autocast):
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss = divergence(logits, targets[torch.as_tensor(rows)]) * temperature**2
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(
                    f"epoch {epoch} step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)"
                )
    after = mean_divergence()
    print(f"KL divergence from the teacher (T={temperature}), {len(held)} training texts: {before:.4g} -> {after:.4g}")

    student_ckpt["state_dict"] = {k: v.detach().clone() for k, v in lit.state_dict().items()}
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
    torch.save(student_ckpt, tmp)
    os.replace(tmp, out)  # whole or not at all
    print(f"Student checkpoint: {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    from jsonargparse import CLI

    return CLI(distill, args=argv, as_positional=False, prog="python -m lightning_cls distill")


if __name__ == "__main__":
    main()
