"""The OpenAI-compatible HTTP API: a FastAPI app over an OpenAIService, and its Serve ingress.

    app = build_openai_app(OpenAIService(info, tokenizer, LocalBackend(engine), args))
    # a plain FastAPI app: TestClient/httpx work on it. Under Ray Serve, OpenAIIngress builds
    # the same app around a RayBackend to the ModelServer replicas.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(`suffix` = fill-in-the-middle), POST /v1/fim/completions (Mercury's FIM API), GET /health;
with lora.dynamic_loading, vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (an API
key required; only directories under lora.root). /v1/models lists LoRA adapters with `parent`.

Errors are the OpenAI envelope {"error": {message, type, param, code}} (deployments/errors.py):
400 bad parameters or malformed JSON, 401 missing/wrong API key, 404 unknown model or route, 413
prompt too long for the model, 429 overloaded (this ingress' in-flight cap, or the cluster's
drain time above `max_drain_s`) and 503 when the model servers reject work, both with
Retry-After. Bad input never gives a 500. A client that disconnects cancels its engine requests
(the slot frees at the next step).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.backends import RayBackend
from deployments.config import AppArgs, parse_args
from deployments.errors import APIError, internal_error
from deployments.metrics import IngressMetrics, RouterMetrics
from deployments.openai_service import OpenAIService
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FIMCompletionRequest,
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from deployments.slo import make_router

log = logging.getLogger(__name__)


def load_api_keys(env_var: str | None = "DLLM_API_KEYS", file: str | None = None) -> frozenset[str]:
    """Keys from a comma-separated environment variable and/or a file (one per line, # comments)."""
    keys: set[str] = set()
    if env_var and os.environ.get(env_var):
        keys |= {k.strip() for k in os.environ[env_var].split(",") if k.strip()}
    if file:
        for line in Path(file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    return frozenset(keys)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers)


# pydantic names the member of a union it tried in the error's location ("str", "list[...]")
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|tuple|none|function-\w+)(\[.*\])?$")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # a check of ours (a value error) says more than "not a string" from a union's other member
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    loc = [str(p) for p in first.get("loc", ())
           if p != "body" and not _UNION_MEMBER.match(str(p))]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', msg)}",
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = ".".join(loc) or None
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def build_openai_app(service: OpenAIService) -> FastAPI:
    app = FastAPI(title="dllm-serve", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # the exception's headers go out with it (405 carries Allow, as RFC 9110 requires)
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}",
                           code="not_found", headers=exc.headers)
        else:
            err = APIError(exc.status_code, str(exc.detail), code=None, headers=exc.headers)
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return error_response(internal_error())

    @app.get("/health")
    async def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=service.model_cards()).model_dump(exclude_none=True)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return service.model_card(service.check_model(model_id)).model_dump(exclude_none=True)

    # LoRA adapters at run time (vLLM's endpoints; 404 unless lora.dynamic_loading)
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
        return await service.load_adapter(body.lora_name, body.lora_path,
                                          request.headers.get("authorization"))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
        return await service.unload_adapter(body.lora_name, request.headers.get("authorization"))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await service.respond(body, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await service.respond(body, "completion", "/v1/completions")

    @app.post("/v1/fim/completions")
    async def fim_completions(body: FIMCompletionRequest):
        return await service.respond(body, "completion", "/v1/fim/completions")

    if service.args.ingress.playground:
        from deployments.playground import add_playground

        add_playground(app, service)
    app.add_middleware(_RequestGuard, service=service)
    return app


class _RequestGuard:
    """Before the app sees a /v1/* request: the API key (so 401 wins over 400), then the body
    size (413 past limits.max_request_bytes, by Content-Length or by counting what arrives, so
    a huge body is refused before it is parsed).

    Pure ASGI rather than BaseHTTPMiddleware, which would buffer streams and swallow the
    cancellation that tells us a client disconnected."""

    def __init__(self, app, service: OpenAIService):
        self.app, self.service = app, service
        self.max_bytes = service.limits.max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            try:
                self.service.check_auth(headers.get(b"authorization"))
                receive = await self._bounded_body(headers, receive)
            except APIError as e:
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.max_bytes} bytes "
                        "(limits.max_request_bytes)", code="request_too_large")

    async def _bounded_body(self, headers: dict, receive):
        """Read the body up to the limit, then hand the app a receive that replays it (and
        after it, the client's own messages: a disconnect still reaches the app)."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise self._too_large()
            if not message.get("more_body", False):
                break
        messages.reverse()

        async def replay():
            return messages.pop() if messages else await receive()

        return replay


# Every option comes from args.ingress through deployments.app, so no default is written here.
@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    """The FastAPI app of this module over a RayBackend (ModelServer + LoadBoard handles)."""

    async def __init__(self, server, board, args: AppArgs | dict):
        args = parse_args(args)
        info, tokenizer = await server.model_info.remote()
        api_keys = load_api_keys(args.auth.api_keys_env, args.auth.api_keys_file)
        if not api_keys:
            log.warning("no API keys configured: the API is open")
        backend = RayBackend(server, board, args.limits.retry_after_s)
        router = make_router(args, info, metrics=RouterMetrics(args.ladder.steps))
        self.service = OpenAIService(info, tokenizer, backend, args, api_keys, router,
                                     metrics=IngressMetrics())
        await self.service.start()

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.service)

    async def __del__(self):
        await self.service.stop()
