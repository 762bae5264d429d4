"""ONNX Runtime's transformer graph optimizations for an exported encoder classifier, and int8 weights that keep
accuracy.

onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`, model type `bert`) replaces an encoder's
attention by its fused `Attention` operator, LayerNorm plus the residual by `SkipLayerNormalization` and the GELU
after its bias by `BiasGelu`, but only where the graph has the shapes it knows. The graph `torch.onnx.export` traces
from transformers 5's BERT does not: the attention mask goes through boolean `And` / `Where` nodes and each softmax
through a NaN guard, so no attention is fused (measured: 0 of 6 on MiniLM, only the LayerNorms and GELUs). Here the
same weights are traced through a plain forward pass written in the classic BERT form (the mask as ``(1 - mask) *
-10000`` added to the scores, the scale as one division), which the optimizer fuses whole; the result is checked
against the PyTorch model before it is kept (`optimized_onnx`).

    info = optimized_onnx(hf_model, folder / OPTIMIZED_ONNX_FILE, pad_token_id)   # {"fused": {...}, "max_prob_diff"}

Supported: BERT-like encoders (BERT, MiniLM; the [CLS] pooler head or `lightning_cls.model.pooling`'s pooled head) and
DistilBERT. Anything else (GPT-2, Llama, ...) gets no optimized graph (`fusable_parts` is None), and `model.onnx`
runs as it is.

int8 (`quantize_int8`): weights of the matrix products in int8 with one scale per output channel, activations
quantized on the fly (dynamic quantization: the attention's softmax and the LayerNorms stay fp32), optionally leaving
out the nodes that cost most accuracy (`int8_sensitivity` measures each one's effect on the answers).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

OPTIMIZED_ONNX_FILE = "model.opt.onnx"  # model.onnx's weights in ONNX Runtime's fused transformer graph
# The optimized graph must answer as PyTorch does: the largest probability difference allowed (fp32 both; measured
# 1e-6 on MiniLM). The same bound as `export` puts on model.onnx.
OPTIMIZED_MAX_PROB_DIFF = 1e-3
# How far int8 answers may stray from PyTorch's in the tests (largest probability difference): a bound that says the
# quantized graph is the same model, not a gate; what decides whether int8 is used is the macro-F1 it keeps on the
# validation split (`inference.choose`). Measured on the fine-tuned MiniLM: see docs/benchmarks.md.
INT8_MAX_PROB_DIFF = 0.2


# ------------------------------------------------------------------------------------------------ the model's parts
@dataclass
class _Layer:
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_out: nn.Linear
    attention_norm: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    output_norm: nn.LayerNorm


@dataclass
class FusableParts:
    """An encoder classifier as plain parts: embeddings, layers and a head (hidden states, mask -> logits)."""

    word: nn.Embedding
    position: nn.Embedding
    token_type: nn.Embedding | None
    embedding_norm: nn.LayerNorm
    layers: list[_Layer]
    num_heads: int
    hidden_size: int
    activation: str
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, T, H), (B, T) -> (B, num_labels)


def fusable_parts(model: nn.Module) -> FusableParts | None:
    """The parts of a BERT-like or DistilBERT classifier (None for any other architecture)."""
    from lightning_cls.model.pooling import MODEL_TYPE, pool

    config = model.config
    if config.model_type == MODEL_TYPE:
        backbone = model.backbone

        def head(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.classifier(pool(hidden, mask, config.pooling))

    elif config.model_type in ("bert", "distilbert") and hasattr(model, "classifier"):
        backbone = getattr(model, config.model_type)
        if config.model_type == "bert":
            if backbone.pooler is None:
                return None

            def head(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model.classifier(backbone.pooler(hidden))  # tanh(dense(h[:, 0]))

        else:

            def head(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model.classifier(F.relu(model.pre_classifier(hidden[:, 0])))

    else:
        return None
    inner = backbone.config
    if inner.model_type == "bert" and getattr(inner, "hidden_act", None) == "gelu":
        e = backbone.embeddings
        layers = [
            _Layer(
                b.attention.self.query,
                b.attention.self.key,
                b.attention.self.value,
                b.attention.output.dense,
                b.attention.output.LayerNorm,
                b.intermediate.dense,
                b.output.dense,
                b.output.LayerNorm,
            )
            for b in backbone.encoder.layer
        ]
        parts = (e.word_embeddings, e.position_embeddings, e.token_type_embeddings, e.LayerNorm)
        shape = inner.num_attention_heads, inner.hidden_size
    elif inner.model_type == "distilbert" and getattr(inner, "activation", None) == "gelu":
        e = backbone.embeddings
        layers = [
            _Layer(
                b.attention.q_lin,
                b.attention.k_lin,
                b.attention.v_lin,
                b.attention.out_lin,
                b.sa_layer_norm,
                b.ffn.lin1,
                b.ffn.lin2,
                b.output_layer_norm,
            )
            for b in backbone.transformer.layer
        ]
        parts = (e.word_embeddings, e.position_embeddings, None, e.LayerNorm)
        shape = inner.n_heads, inner.dim
    else:
        return None
    return FusableParts(*parts, layers, *shape, "gelu", head)


class FusableClassifier(nn.Module):
    """The classifier's forward pass in the classic BERT form that onnxruntime's optimizer fuses; the same weights
    (shared, not copied). Inputs are right-padded (positions 0..T-1 on every real token), as `Runner` pads encoders."""

    def __init__(self, model: nn.Module, parts: FusableParts) -> None:
        super().__init__()
        self.model, self.parts = model, parts  # the model registered: its parameters are this module's (tracing)
        self.heads, self.head_size = parts.num_heads, parts.hidden_size // parts.num_heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        return x.reshape(batch, length, self.heads, self.head_size).transpose(1, 2)  # (B, heads, T, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        p = self.parts
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
        x = p.word(input_ids) + p.position(positions)
        if p.token_type is not None:
            x = x + p.token_type.weight[0]  # every token of a single text is of type 0
        x = F.layer_norm(x, (p.hidden_size,), p.embedding_norm.weight, p.embedding_norm.bias, p.embedding_norm.eps)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0  # (B, 1, 1, T)
        for layer in p.layers:
            q, k, v = self._split(layer.query(x)), self._split(layer.key(x)), self._split(layer.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / float(self.head_size) ** 0.5 + bias  # (B, heads, T, T)
            context = torch.matmul(scores.softmax(-1), v).transpose(1, 2)  # (B, T, heads, d)
            context = context.reshape(x.shape)
            n = layer.attention_norm
            x = F.layer_norm(layer.attention_out(context) + x, (p.hidden_size,), n.weight, n.bias, n.eps)
            n = layer.output_norm
            x = F.layer_norm(layer.ffn_out(F.gelu(layer.ffn_in(x))) + x, (p.hidden_size,), n.weight, n.bias, n.eps)
        return p.head(x, attention_mask)  # (B, num_labels)


# ------------------------------------------------------------------------------------------------ the optimized graph
@contextmanager
def _quiet():
    """onnxruntime's optimizer and quantizer log advice and notes at WARNING level; keep errors only."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def test_batch(pad_token_id: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (3, 11) with one row right-padded: what a graph is checked on."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(min(vocab, 1000), pad_token_id + 1), (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_token_id, 0
    return ids, mask


def onnx_probabilities(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return torch.from_numpy(logits).float().softmax(-1)


def optimized_onnx(model: nn.Module, output: Path, pad_token_id: int, opset: int = 17) -> dict[str, Any]:
    """Write `model` as ONNX Runtime's fused transformer graph at `output`; returns {"fused": operator counts,
    "max_prob_diff": against PyTorch}. Raises ValueError (nothing written) for an architecture it does not know or a
    graph that answers differently from PyTorch."""
    from onnxruntime.transformers.optimizer import optimize_model

    parts = fusable_parts(model)
    if parts is None:
        raise ValueError(f"no optimized graph for model type {model.config.model_type!r} (BERT-like and DistilBERT)")
    fusable = FusableClassifier(model, parts).eval()
    ids, mask = test_batch(pad_token_id, parts.word.num_embeddings)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
        ours = fusable(ids, mask).float().softmax(-1)
    if (ours - reference).abs().max() > 1e-4:  # a module this rewrite does not know (another attention, ...)
        raise ValueError(f"the rewritten forward pass differs from the model by {(ours - reference).abs().max():.1e}")
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        plain = Path(tmp) / "plain.onnx"
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            fusable,
            (ids, mask),
            str(plain),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,  # the TorchScript tracer keeps the classic node pattern the optimizer matches
        )
        optimized = optimize_model(
            str(plain), model_type="bert", num_heads=parts.num_heads, hidden_size=parts.hidden_size, use_gpu=False
        )
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(output))
    diff = float((onnx_probabilities(output, ids, mask) - reference).abs().max())
    if diff > OPTIMIZED_MAX_PROB_DIFF:
        output.unlink()
        raise ValueError(f"the optimized graph differs from PyTorch by {diff:.1e} in probability")
    return {"fused": fused, "max_prob_diff": float(f"{diff:.3g}")}


# ------------------------------------------------------------------------------------------------ int8
def quantize_int8(model: Path, output: Path, exclude: Sequence[str] = ()) -> None:
    """`model` (ONNX) with the weights of its matrix products in int8, one scale per output channel, activations
    quantized on the fly (onnxruntime dynamic quantization); the nodes named in `exclude` stay fp32. Per channel: on
    the fine-tuned MiniLM here, 97.3% of labels agreed with fp32 against 94.1% with one scale per matrix (256
    abstracts)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():  # not its advice to run shape-inference pre-processing first
        quantize_dynamic(
            str(model),
            str(output),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=list(exclude),
            # The fused operators (com.microsoft) defeat ONNX shape inference; their tensors are fp32.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


def quantizable_nodes(model: Path) -> list[str]:
    """Names of the nodes with weights that dynamic quantization turns to int8, in graph order: matrix products,
    the fused attention, embedding lookups (onnxruntime's `IntegerOpsRegistry`; `Gemm`, the classifier, stays fp32)."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    graph = onnx.load(str(model), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    kinds = set(IntegerOpsRegistry)
    return [n.name for n in graph.node if n.op_type in kinds and any(i in weights for i in n.input)]


def int8_sensitivity(
    model: Path, feeds: Sequence[dict[str, np.ndarray]], nodes: Sequence[str] | None = None
) -> dict[str, float]:
    """How much each node costs when it alone is left in fp32: for every node, the mean KL divergence from the fp32
    graph's answers of the int8 graph *without* that node, over `feeds` (batches of input_ids / attention_mask).
    The nodes whose exclusion lowers it most are the ones to leave out. ``{"": all quantized, node: ...}``."""
    import onnxruntime

    def probabilities(path: Path) -> np.ndarray:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(["logits"], feed)[0] for feed in feeds])
        logits = logits - logits.max(-1, keepdims=True)
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    reference = probabilities(model)

    def divergence(path: Path) -> float:
        p = probabilities(path)
        kl = np.sum(reference * (np.log(reference + 1e-12) - np.log(p + 1e-12)), -1)
        return max(float(np.mean(kl)), 0.0)  # rounding can make a divergence of nothing slightly negative

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for node in ["", *(nodes if nodes is not None else quantizable_nodes(model))]:
            path = Path(tmp) / "int8.onnx"
            quantize_int8(model, path, [node] if node else [])
            out[node] = divergence(path)
    return out
