"""The Serve application: an ingress deployment in front of the engine deployment
(cluster/engine.py).

The ingress here is the minimal one of the cluster issue (`POST /v1/completions`,
`GET /healthz`); the router package gives the full OpenAI API.
"""

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.engine import classify, engine_deployment, root_cause
from replicas import EngineConfig

log = logging.getLogger(__name__)


api = FastAPI(title="tpserve (cluster ingress)")


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind}}, status, headers=headers)


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """Minimal HTTP front of the cluster: completions, streamed or not."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine.options(stream=True)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        try:
            body = await request.json()
            engine_request = {"prompt": body["prompt"], "params": {
                k: body[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "seed",
                                     "stop", "ignore_eos") if k in body}}
        except (ValueError, KeyError, TypeError) as e:
            return error_response(400, f"bad request body: {e!r}", "invalid_request_error")
        try:
            first, stream = await self._start(engine_request)
        except Exception as e:  # noqa: BLE001 - mapped to a status below
            status, kind = classify(e)
            return error_response(status, str(root_cause(e)), kind)
        if "error" in first:  # the engine refused the request
            error = first["error"]
            return error_response(error["status"], error["message"], error["type"])
        if body.get("stream"):
            return StreamingResponse(self._sse(first, stream), media_type="text/event-stream")
        return await self._collect(first, stream)

    async def _start(self, engine_request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """First delta and the rest of the stream; a replica that dies before the first
        token is retried once (Serve routes the retry to a live replica)."""
        for attempt in (1, 2):
            stream = self.engine.generate.remote(engine_request)
            try:
                return await stream.__anext__(), stream
            except Exception as e:
                if attempt == 2 or classify(e)[0] != 503:
                    raise
                log.warning("replica failed before the first token, retrying: %r", e)
        raise AssertionError("unreachable")

    async def _collect(self, first: dict[str, Any], stream: Any) -> JSONResponse:
        deltas = [first]
        try:
            async for delta in stream:
                deltas.append(delta)
        except Exception as e:  # noqa: BLE001
            status, kind = classify(e)
            return error_response(status, str(root_cause(e)), kind)
        return JSONResponse({
            "text": "".join(d["text"] for d in deltas),
            "token_ids": [t for d in deltas for t in d["token_ids"]],
            "finish_reason": deltas[-1]["finish_reason"],
            "replica": first["replica"],
        }, headers={"X-Replica-ID": first["replica"]})

    async def _sse(self, first: dict[str, Any], stream: Any) -> AsyncIterator[str]:
        yield f"data: {json.dumps(first)}\n\n"
        try:
            async for delta in stream:
                yield f"data: {json.dumps(delta)}\n\n"
        except Exception as e:  # noqa: BLE001 - the client hears of it in-band
            status, kind = classify(e)
            error = {"error": {"message": str(root_cause(e)), "type": kind}}
            yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"


def build(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files (`import_path: cluster.app:build`).

    args: {"engine": EngineConfig fields, "cpus_per_rank": float, "num_replicas": int}; a
    config file's `deployments:` section overrides num_replicas / autoscaling_config.
    """
    config = EngineConfig(**(args.get("engine") or {}))
    engine = engine_deployment(config, float(args.get("cpus_per_rank", 1.0)),
                               num_replicas=int(args.get("num_replicas", 1)))
    return Ingress.bind(engine)
