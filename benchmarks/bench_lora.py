"""Full fine-tuning vs LoRA on a mid-size decoder: trainable parameter share and peak training memory.

One run, both sides, each in a fresh process (its own peak RSS), same config, batch, steps and optimizer (the
module's AdamW, no decay on 1-d parameters). The model is Llama-shaped with random weights (about 310M parameters:
24 blocks of width 1024, 32k vocabulary); LoRA is rank 8 on the attention query and value projections, the head
trained in full. Targets (issue): LoRA trains at most 2% of the parameters and needs at most 60% of full
fine-tuning's peak training memory.

    python benchmarks/bench_lora.py [--steps 3] [--batch 4] [--length 256] [--device cpu]
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from harness import argument_parser, machine_line, peak_rss_mib, print_table, run_worker, worker_result

MID_SIZE = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 1024,
}


def worker(spec: dict) -> dict:
    """Build the model as `fit` does, train `steps` steps on random tokens, report memory and parameters."""
    from lightning_cls.data.labels import DEFAULT_LABELS
    from lightning_cls.data.sample_data import generate_texts, train_bpe_tokenizer
    from lightning_cls.model.classifier import TextClassifier

    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory() as folder:
        texts, _ = generate_texts(rows_per_label=5, seed=0)
        train_bpe_tokenizer(texts, folder, vocab_size=300)  # only its special tokens matter here
        torch.manual_seed(0)
        baseline_rss = peak_rss_mib()
        module = TextClassifier(
            "mid-size-llama",
            list(DEFAULT_LABELS),
            tokenizer=folder,
            model_config=MID_SIZE,
            lora_r=spec["lora_r"],
            gradient_checkpointing=spec["gradient_checkpointing"],
        ).to(device)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, MID_SIZE["vocab_size"], (spec["batch"], spec["length"]), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, len(DEFAULT_LABELS), (spec["batch"],), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(spec["steps"]):  # the optimizer state exists from the first step on: the peak is in the second
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(module(ids, mask).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in module.parameters())
    peak = peak_rss_mib()
    return {
        "name": spec["name"],
        "trainable": trainable,
        "total": total,
        "share_pct": 100 * trainable / total,
        "peak_rss_mib": peak,
        "training_mib": peak - baseline_rss,  # above the process before the model existed (torch, libraries)
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "step_s": sum(seconds[1:]) / max(1, len(seconds) - 1),
        "loss": float(loss),
    }


def main() -> None:
    parser = argument_parser(__doc__, worker=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.worker:
        worker_result(worker(args.worker))
        return

    print(machine_line())
    print(f"model: {json.dumps(MID_SIZE)}; batch {args.batch} x {args.length} tokens, {args.steps} AdamW steps")
    common = {"steps": args.steps, "batch": args.batch, "length": args.length, "device": args.device}
    sides = [
        {"name": "full fine-tuning", "lora_r": None, "gradient_checkpointing": False},
        {"name": "LoRA r=8", "lora_r": 8, "gradient_checkpointing": False},
        {"name": "LoRA r=8 + gradient checkpointing", "lora_r": 8, "gradient_checkpointing": True},
    ]
    rows = [run_worker(__file__, {**common, **side}) for side in sides]
    memory = "cuda_peak_mib" if args.device != "cpu" else "training_mib"
    print_table(
        rows,
        [
            ("name", "side", "s"),
            ("trainable", "trainable params", ",d"),
            ("share_pct", "share %", ".3f"),
            ("peak_rss_mib", "peak RSS MiB", ".0f"),
            (memory, "training MiB" if memory == "training_mib" else "CUDA peak MiB", ".0f"),
            ("step_s", "s/step", ".2f"),
        ],
    )
    full = rows[0]
    for row in rows[1:]:
        ratio = row[memory] / full[memory]
        print(
            f"{row['name']}: trains {row['share_pct']:.3f}% of the parameters (target <= 2%: "
            f"{'met' if row['share_pct'] <= 2 else 'MISSED'}); training memory {ratio:.2f}x full fine-tuning's "
            f"(target <= 0.60x: {'met' if ratio <= 0.6 else 'MISSED'}); "
            f"peak RSS {row['peak_rss_mib'] / full['peak_rss_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
