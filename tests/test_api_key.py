"""The optional API key of `serve`: POST /predict (and /metrics if asked) need `Authorization: Bearer <key>`."""

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from lightning_cls.serving.http import ApiKeyGuard

KEY = "s3cret-key"


def app_with_key(paths: list[str]) -> ApiKeyGuard:
    app = FastAPI()

    @app.post("/predict")
    def predict() -> dict:
        return {"ok": True}

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/metrics")
    def metrics() -> str:
        return "metrics"

    return ApiKeyGuard(app, key=KEY, paths=paths)


def call(app, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers or {}, json={"text": "a"})

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # no key
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {KEY}x"}, 401),  # a longer guess that starts right
        ({"Authorization": KEY}, 401),  # the key without the scheme
        ({"Authorization": f"Bearer {KEY}"}, 200),
    ],
)
def test_predict_needs_the_key(headers, status):
    response = call(app_with_key(["/predict"]), "POST", "/predict", headers)
    assert response.status_code == status
    if status == 401:
        assert "Authorization: Bearer" in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"


def test_health_stays_open_and_metrics_only_when_asked():
    open_metrics = app_with_key(["/predict"])
    assert call(open_metrics, "GET", "/health").status_code == 200
    assert call(open_metrics, "GET", "/metrics").status_code == 200
    closed_metrics = app_with_key(["/predict", "/metrics"])
    assert call(closed_metrics, "GET", "/health").status_code == 200
    assert call(closed_metrics, "GET", "/metrics").status_code == 401
    assert call(closed_metrics, "GET", "/metrics", {"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """Every check goes through hmac.compare_digest (a plain == stops at the first differing byte)."""
    import lightning_cls.serving.http as http

    seen = []
    monkeypatch.setattr(http.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or a == b)
    call(app_with_key(["/predict"]), "POST", "/predict", {"Authorization": "Bearer nope"})
    assert seen == [(b"Bearer nope", f"Bearer {KEY}".encode())]


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError, match="non-empty key"):
        ApiKeyGuard(FastAPI(), key="", paths=["/predict"])
