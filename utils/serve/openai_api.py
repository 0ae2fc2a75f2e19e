"""The OpenAI-compatible API of generate.py: FastAPI routes that share the page's Generator.

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages in, rendered with the model's prompt (its training
                                 template, or the base's chat template for chat-tuned adapters)
    POST /v1/completions         raw prompt text in
Both POST routes stream server-sent events (`stream: true`, ending in `data: [DONE]`) or answer in
one JSON body, with usage token counts and finish_reason (stop / length).

Requests generate one at a time (the Generator's lock, which the page shares); at most
`max_queue` API requests wait, further ones get 429. A client that disconnects (mid-stream, or
while it waits for a non-streamed answer) cancels its generation, so the next request starts at
once. A prompt must fit: at most --max_prompt_tokens, and with max_tokens within the model's
context (400, code context_length_exceeded). Errors use OpenAI's JSON error shape.

With a key, KeyGate (below) stands in front of the whole app, the page's routes included; the
/v1 routes check the key again with the same function (presents_key).
"""

import asyncio
import hashlib
import hmac
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from utils.serve.generation import MAX_NEW_TOKENS, Completion, Generator

API_KEY_ENV = "CODEUP_API_KEY"
MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS = 512
SESSION_COOKIE = "codeup_session"
LOGIN_PATH = "/codeup-login"
MAX_LOGIN_BODY = 4096


# ---- the key: one check for every route (the page, its Gradio API and queue, /v1) ---------------

def session_token(api_key: str) -> str:
    """What the page's login cookie holds: derived from the key (never the key itself)."""
    return hmac.new(api_key.encode(), b"codeup page session", hashlib.sha256).hexdigest()


def presents_key(headers, api_key: str | None) -> bool:
    """Whether a request (its headers: a mapping with lower-case names, e.g. Starlette's) carries
    the key: `Authorization: Bearer KEY`, or the cookie the login page sets. Compared in constant
    time: the answer's timing says nothing about the key. No key configured: every request does."""
    if not api_key:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return True
    expected = session_token(api_key).encode()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and hmac.compare_digest(value.strip().encode(), expected):
            return True
    return False


class ApiError(Exception):
    """An HTTP status and an error in OpenAI's shape: message, type (`kind`), code, param."""

    def __init__(self, status: int, message: str, *, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, message=self.message, kind=self.kind, code=self.code, param=self.param)


def error_response(status, *, message, kind, code=None, param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---- request bodies (unknown fields are allowed and ignored, as clients send many) -----------

class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS[1])
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS[1])
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def settings(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, stop=self.stop or [], seed=self.seed,
                    max_new_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are understood
            if any(part.get("type") != "text" for part in self.content):
                raise ApiError(400, "only text content parts are supported", kind="invalid_request_error",
                               param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request")
            prompt = prompt[0]
        return prompt


# ---- the routes ------------------------------------------------------------------------------

class OpenAIServer:
    """Routes for one Generator served under one model name."""

    def __init__(self, generator: Generator, *, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_prompt_tokens: int | None = None):
        self.generator, self.model_name, self.api_key, self.max_queue = generator, model_name, api_key, max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.created = int(time.time())
        self.admitted = 0  # API requests waiting or generating
        self.admitted_lock = threading.Lock()

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/models", self.wrap(self.models), methods=["GET"])
        router.add_api_route("/v1/models/{model_id:path}", self.wrap(self.model), methods=["GET"])
        router.add_api_route("/v1/chat/completions", self.wrap(self.chat_completions), methods=["POST"])
        router.add_api_route("/v1/completions", self.wrap(self.completions), methods=["POST"])
        # Anything else under /v1 is OpenAI's 404, not the page's.
        router.add_api_route("/v1/{rest:path}", self.wrap(self.unknown_route),
                             methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        return router

    def wrap(self, handler):
        async def route(request: Request):
            try:
                self.check_key(request)
                return await handler(request)
            except ApiError as error:
                return error.response()
        route.__name__ = handler.__name__
        return route

    def check_key(self, request: Request) -> None:
        if not presents_key(request.headers, api_key=self.api_key):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer YOUR_KEY'.",
                           kind="invalid_request_error", code="invalid_api_key")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "codeup"}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request):
        if request.path_params["model_id"] != self.model_name:
            raise self.unknown_model(request.path_params["model_id"])
        return JSONResponse(self.model_card())

    async def unknown_route(self, request: Request):
        raise ApiError(404, f"Unknown route {request.method} {request.url.path}", kind="invalid_request_error",
                       code="unknown_url")

    def unknown_model(self, name) -> ApiError:
        return ApiError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}.",
                        kind="invalid_request_error", code="model_not_found", param="model")

    async def chat_completions(self, request: Request):
        body = await self.parse(request, schema=ChatRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's", kind="invalid_request_error", param="messages")
        prompt = self.generator.chat_prompt(messages)
        return await self.respond(request, body=body, prompt=prompt, chat=True, add_special_tokens=None, strip=True)

    async def completions(self, request: Request):
        body = await self.parse(request, schema=CompletionRequest)
        return await self.respond(request, body=body, prompt=body.prompt, chat=False, add_special_tokens=True,
                                  strip=False)

    async def parse(self, request: Request, *, schema):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise self.too_large()
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise self.too_large()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"The body is not valid JSON: {error}", kind="invalid_request_error") from error
        try:
            body = schema.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", kind="invalid_request_error",
                           param=where or None) from error
        if body.model != self.model_name:
            raise self.unknown_model(body.model)
        return body

    def too_large(self) -> ApiError:
        return ApiError(413, f"The body is larger than {MAX_BODY_BYTES} bytes.", kind="invalid_request_error",
                        code="request_too_large")

    # ---- generation: one worker thread per request, the Generator's lock orders them ----------

    def admit(self) -> None:
        with self.admitted_lock:
            if self.admitted >= self.max_queue + 1:  # one generating, max_queue waiting
                raise ApiError(429, f"The server is busy: {self.max_queue} requests are waiting. Retry later.",
                               kind="rate_limit_error", code="queue_full")
            self.admitted += 1

    def release(self) -> None:
        with self.admitted_lock:
            self.admitted -= 1

    def start(self, prompt: str, *, settings: dict):
        """Runs the generation in a thread; returns (queue of deltas then a Completion or an
        exception, the cancel event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            try:
                for item in self.generator.stream_completion(prompt, cancel=cancel, **settings):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if cancel.is_set():
                        break
                if cancel.is_set():  # cancelled (the client left): the end, for whoever still waits for it
                    loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as error:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                self.release()

        self.admit()
        threading.Thread(target=work, daemon=True, name="openai-api-request").start()
        return queue, cancel

    async def token_budget(self, body: Sampling, *, prompt: str, chat: bool, add_special_tokens) -> int:
        """The answer's max_new_tokens, once the prompt is known to fit: at most --max_prompt_tokens
        (when set) and, with max_tokens, at most the model's context (a 400 in OpenAI's shape
        otherwise); without max_tokens the default is cut to what the context leaves."""
        prompt_tokens = await asyncio.to_thread(self.generator.count_tokens, prompt,
                                                add_special_tokens=add_special_tokens)
        requested = body.max_completion_tokens or body.max_tokens
        context = self.generator.context_length()
        param = "messages" if chat else "prompt"
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"The prompt has {prompt_tokens} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}.",
                           kind="invalid_request_error", code="context_length_exceeded", param=param)
        if context is None:
            return requested or DEFAULT_MAX_TOKENS
        if prompt_tokens + (requested or 1) > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens}"
                                + (f" and max_tokens asks for {requested} more." if requested else "."),
                           kind="invalid_request_error", code="context_length_exceeded", param=param)
        return requested or min(DEFAULT_MAX_TOKENS, context - prompt_tokens)

    async def respond(self, request: Request, *, body: Sampling, prompt: str, chat: bool, add_special_tokens, strip):
        max_new_tokens = await self.token_budget(body, prompt=prompt, chat=chat, add_special_tokens=add_special_tokens)
        settings = dict(body.settings(), max_new_tokens=max_new_tokens, add_special_tokens=add_special_tokens, strip=strip)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        queue, cancel = self.start(prompt, settings=settings)
        if not body.stream:
            watcher = asyncio.ensure_future(cancel_on_disconnect(request, cancel=cancel))
            try:
                while not isinstance(item := await queue.get(), (Completion, Exception, type(None))):
                    pass
            finally:
                cancel.set()  # a client that left stops the generation too
                watcher.cancel()
            if item is None:  # the client left before its answer: nobody to answer
                raise ApiError(499, "The client closed the request.", kind="invalid_request_error",
                               code="client_closed_request")
            if isinstance(item, Exception):
                raise ApiError(500, f"generation failed: {item}", kind="server_error") from item
            text = (prompt + item.text) if getattr(body, "echo", False) else item.text
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": item.finish_reason}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": item.finish_reason})
            return JSONResponse({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                                 "created": int(time.time()), "model": self.model_name, "choices": [choice],
                                 "usage": usage(item)})
        return StreamingResponse(self.events(queue, cancel=cancel, request_id=request_id, chat=chat, body=body),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, queue, *, cancel, request_id, chat, body):
        """Server-sent events: a first role delta (chat), the text deltas, the finish_reason, usage when
        asked for (stream_options.include_usage), then [DONE]. Cancelled when the client leaves."""
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((getattr(body, "stream_options", None) or {}).get("include_usage"))

        def chunk(delta_text=None, finish_reason=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish_reason}
            return sse({"id": request_id, "object": kind, "created": created, "model": self.model_name, "choices": [choice]})

        try:
            if chat:
                yield chunk(role=True)
            if getattr(body, "echo", False):
                yield chunk(body.prompt)
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield chunk(item)
                    continue
                if isinstance(item, Completion):
                    yield chunk(finish_reason=item.finish_reason)
                    if include_usage:
                        yield sse({"id": request_id, "object": kind, "created": created, "model": self.model_name,
                                   "choices": [], "usage": usage(item)})
                elif isinstance(item, Exception):
                    yield sse({"error": {"message": f"generation failed: {item}", "type": "server_error",
                                         "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
        finally:
            cancel.set()  # the client disconnected (or the stream ended): free the worker


async def cancel_on_disconnect(request: Request, *, cancel: threading.Event) -> None:
    """Sets `cancel` when the client of a non-streaming request goes away: its generation (or its
    wait for the model) ends at the next token, and the next request starts."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: OpenAIServer, *, title="CodeUp"):
    """A FastAPI app with the /v1 routes; generate.py mounts the Gradio page on it (same port)."""
    from fastapi import FastAPI

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(server.router())
    return app


# ---- the gate in front of the whole app: the page, its Gradio API and queue, /v1 -----------------

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>CodeUp: sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:15vh auto;padding:0 1rem}}
input{{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box;margin:.5rem 0}}
button{{font-size:1rem;padding:.4rem 1rem}}.error{{color:#b00020}}</style></head>
<body><h1>CodeUp</h1><p>This server needs its API key.</p>{message}
<form method="post" action="{action}"><label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Sign in</button></form></body></html>
"""


class KeyGate:
    """ASGI middleware around the whole app: with a key set, every request (the page, its assets,
    its Gradio API and queue, websockets, /v1) must present it (`presents_key`): a bearer header
    (API clients: openai, curl, gradio_client's `headers=`) or the cookie that the login page
    (LOGIN_PATH) sets once the key is typed in. A browser without it gets the login page; anything
    else a 401 in OpenAI's error shape. Without a key it passes everything through."""

    def __init__(self, app, *, api_key: str | None, open_paths=()):
        """open_paths: GET paths that need no key (launch_page's: the one Gradio's own launch()
        calls on itself, which starts the queue once and answers true or false)."""
        self.app, self.api_key, self.open_paths = app, api_key, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.api_key:
            return await self.app(scope, receive, send)
        headers = request_headers(scope)
        path = scope.get("path", "")
        if scope["type"] == "http" and path == LOGIN_PATH:
            return await self.login(scope, receive, send)
        if presents_key(headers, api_key=self.api_key) or (scope.get("method") == "GET" and path in self.open_paths):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        wants_page = scope.get("method") in ("GET", "HEAD") and "text/html" in headers.get("accept", "") \
            and not path.startswith("/v1")
        if wants_page:
            return await self.page(send, status=401, message="")
        await send_response(send, status=401, content_type="application/json", body=json.dumps(
            {"error": {"message": "Incorrect or missing API key: send 'Authorization: Bearer YOUR_KEY'.",
                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode(),
                            extra_headers=[(b"www-authenticate", b"Bearer")])

    async def page(self, send, *, status: int, message: str):
        html = LOGIN_PAGE.format(message=message, action=LOGIN_PATH)
        await send_response(send, status=status, content_type="text/html; charset=utf-8", body=html.encode(),
                            extra_headers=[(b"cache-control", b"no-store")])

    async def login(self, scope, receive, send):
        """GET: the form. POST: the key typed in; right, the session cookie and the page; wrong, the
        form again (401)."""
        if scope.get("method") != "POST":
            return await self.page(send, status=200, message="")
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BODY:
                return await send_response(send, status=413, content_type="text/plain", body=b"request too large")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        from urllib.parse import parse_qs

        typed = (parse_qs(body.decode("utf-8", errors="replace")).get("key") or [""])[0].strip()
        if not hmac.compare_digest(typed.encode(), self.api_key.encode()):
            return await self.page(send, status=401, message='<p class="error" role="alert">Wrong key.</p>')
        cookie = f"{SESSION_COOKIE}={session_token(self.api_key)}; Path=/; HttpOnly; SameSite=Strict"
        await send_response(send, status=303, content_type="text/plain", body=b"",
                            extra_headers=[(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                           (b"cache-control", b"no-store")])


def request_headers(scope) -> dict:
    """An ASGI scope's headers as {lower-case name: value}; repeated cookies joined."""
    headers: dict = {}
    for name, value in scope.get("headers", []):
        name, value = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[name] = f"{headers[name]}; {value}" if name == "cookie" and name in headers else value
    return headers


async def send_response(send, *, status: int, content_type: str, body: bytes, extra_headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})
