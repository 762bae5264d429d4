"""The naive baseline for the load test: a plain FastAPI endpoint running one forward pass per request.

This is how a first deployment often looks: the model loaded at import, a synchronous `def` endpoint (FastAPI runs
it in its thread pool, so concurrent requests run concurrent forward passes), no batching, no request limits.

    python benchmarks/naive_server.py --model_dir DIR --port 8001
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI

from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.export.folder import load_classifier, read_export_metadata


def build_app(model_dir: str, top_k: int = 3, num_threads: int | None = None) -> FastAPI:
    """The FastAPI app: POST /predict {"text": ...} and GET /health."""
    if num_threads:
        torch.set_num_threads(num_threads)
    # The same folder reader and model classes as the service: the comparison is of serving, not of loading.
    max_length = read_export_metadata(model_dir).max_length
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, dtype=torch.float32).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: dict) -> dict:
        inputs = tokenizer(request["text"], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            probs = model(**inputs).logits.softmax(-1)[0]  # (num_labels,)
        top = probs.topk(top_k)
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        answer = [{"label": names[i], "probability": p} for p, i in pairs]
        return {"predictions": [{**answer[0], "top_k": answer}]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="exported model folder")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    app = build_app(args.model_dir, num_threads=args.num_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
