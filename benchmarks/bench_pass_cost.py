"""A forward pass's fixed cost, in tokens: what `lightning_cls.export.runtime.DEFAULT_MAX_PADDING` is set from.

Times forward passes of 1 and 4 rows of 8 to 128 tokens through the Runner (torch fp32 and ONNX int8, one thread)
and fits time = overhead + per_token x tokens; overhead / per_token is how many tokens a pass costs by itself, so
padding a short text into a pass of long ones pays only while it adds fewer tokens than that.

    python benchmarks/bench_pass_cost.py --model_dir runs/export/pooling_mean_400_onnx
"""

from __future__ import annotations

import time

import numpy as np
import torch
from harness import argument_parser

from lightning_cls.export.runtime import InferenceSettings, Runner


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model_dir", required=True, help="an export with model.onnx and model.int8.onnx")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per shape")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for backend, precision in (("torch", "fp32"), ("onnx", "int8")):
        runner = Runner(args.model_dir, InferenceSettings(backend=backend, precision=precision))
        tokens, ms = [], []
        for length in (8, 16, 32, 64, 128):
            for rows in (1, 4):
                ids = np.full((rows, length), 1000, dtype=np.int64)
                mask = np.ones_like(ids)
                runner._forward(ids, mask)  # warm up this shape
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < args.seconds:
                    runner._forward(ids, mask)
                    n += 1
                tokens.append(rows * length)
                ms.append((time.perf_counter() - start) / n * 1000)
        per_token, overhead = np.polyfit(tokens, ms, 1)
        shapes = ", ".join(f"{t}: {m:.1f} ms" for t, m in zip(tokens, ms, strict=True))
        print(f"{backend} {precision}: {shapes}")
        cost = overhead / per_token
        print(f"  pass overhead {overhead:.2f} ms, {per_token * 1000:.0f} us per token -> {cost:.0f} tokens")


if __name__ == "__main__":
    main()
