"""The server's limits, and the guards that enforce them before a request costs anything.

One client must not be able to hurt the others, so everything a request can make the server do
is bounded, and each bound is refused with a 4xx and an OpenAI error body (``ServerLimits``,
one ``leanlm serve`` flag each; the README lists them):

- the body: ``max_body_bytes``, checked on ``Content-Length`` before a byte is kept and then on
  the bytes as they arrive (a chunked body), 413 (a body up to 4x the limit is read and dropped
  first, so that a client still sending it reads the 413 rather than a connection reset);
- the prompt: ``max_prompt_chars`` characters before it is tokenized (a chat: all its messages),
  400. The default is the context times the tokenizer's longest token in characters: a prompt
  with more characters than that has more tokens than the context, so nothing that could be
  served is refused;
- a request's reservation: ``n <= max_n`` copies, ``n x (prompt + max_tokens) <=
  max_request_tokens`` tokens of KV cache (default: a quarter of the cache, at least one full
  context), ``max_stop`` stop strings of at most ``max_stop_chars`` characters each (a stream
  holds back up to the longest one's length), 400;
- connections: ``max_connections`` at once (uvicorn's ``limit_concurrency``: 503 beyond it),
  ``timeout_keep_alive`` seconds idle between requests (uvicorn's), and ``timeout_request``
  seconds for a request's headers and body to arrive in full, from the connection's start or the
  last response (a connection that sends nothing or trickles its request in — slowloris — is
  closed: uvicorn itself has no such timeout), headers of at most ``max_header_bytes``
  (``h11_max_incomplete_event_size``).

:class:`Guard` is the ASGI middleware for the key and the body size. It is written here rather
than taken from FastAPI's ``max_body_size`` because that one answers 413 in plain text (it
replaces any response to a request whose declared length is too large), where clients of an
OpenAI API expect ``{"error": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, replace
from typing import Any

import h11
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from leanlm.errors import LeanLMError


@dataclass
class ServerLimits:
    max_n: int = 16  # completions per request (OpenAI's ``n``)
    max_request_tokens: int = 0  # n x (prompt + max_tokens); 0: a quarter of the KV cache, >= context
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters of one stop string
    max_prompt_chars: int = 0  # 0: the context x the tokenizer's longest token (in characters)
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    max_connections: int = 256
    timeout_keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    timeout_request: float = 30.0  # seconds for a request's headers and body to arrive
    tokenizer_threads: int = 2  # worker threads that tokenize and render chat templates

    def __post_init__(self) -> None:
        for name in ("max_n", "max_stop", "max_stop_chars", "max_body_bytes", "max_header_bytes",
                     "max_connections", "timeout_keep_alive", "timeout_request", "tokenizer_threads"):
            if getattr(self, name) <= 0:
                raise LeanLMError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_request_tokens < 0 or self.max_prompt_chars < 0:
            raise LeanLMError("max_request_tokens and max_prompt_chars must be >= 0 (0: the default)")

    def resolved(self, context: int, kv_tokens: int, longest_token_chars: int) -> ServerLimits:
        """A copy with the derived defaults filled in."""
        return replace(self, max_request_tokens=self.max_request_tokens or max(context, kv_tokens // 4),
                       max_prompt_chars=self.max_prompt_chars or context * max(1, longest_token_chars))

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config``/``uvicorn.run`` that apply these limits."""
        return {"http": request_deadline_protocol(self.timeout_request),
                "timeout_keep_alive": self.timeout_keep_alive,
                "limit_concurrency": self.max_connections,
                "h11_max_incomplete_event_size": self.max_header_bytes}


def publish_limits(schema: dict[str, Any], limits: ServerLimits, models: list[str], context: int,
                   vocab_size: int, seed_range: tuple[int, int]) -> None:
    """Write what the server refuses into its OpenAPI ``schema`` (in place): the served model
    names, the limits, the context and the vocabulary. Clients — and schema fuzzers — then know a
    request the server will refuse from the schema alone, except where fields depend on each
    other (prompt tokens + max_tokens within the context, min_tokens <= max_tokens), which JSON
    Schema cannot say."""
    comps = schema["components"]["schemas"]

    def on(prop: dict[str, Any], kind: str, **bounds: Any) -> None:
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == kind:
                branch.update(bounds)

    token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps[name]["properties"]
        props["model"]["enum"] = models
        props["n"]["maximum"] = limits.max_n
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in props:
                on(props[field], "integer", maximum=context)
        on(props["stop"], "string", maxLength=limits.max_stop_chars)
        on(props["stop"], "array", maxItems=limits.max_stop, items=text)
        on(props["seed"], "integer", minimum=seed_range[0], maximum=seed_range[1])
        on(props["logit_bias"], "object", propertyNames={"pattern": "^(0|[1-9][0-9]*)$"})
    prompt = comps["CompletionRequest"]["properties"]["prompt"]
    on(prompt, "string", maxLength=limits.max_prompt_chars)
    on(prompt, "array", maxItems=context, items=token)
    comps["ChatMessage"]["properties"]["content"]["maxLength"] = limits.max_prompt_chars
    comps["TokenizeRequest"]["properties"]["prompt"]["maxLength"] = limits.max_prompt_chars
    comps["DetokenizeRequest"]["properties"]["tokens"]["items"] = token


def error_response_body(status: int, message: str, kind: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


async def send_error(send: Send, status: int, message: str, kind: str, code: str | None,
                     extra_headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    body = error_response_body(status, message, kind, code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body grows past the limit (the app answers 413; an
    ``HTTPException``, which FastAPI passes through its body parsing unchanged)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-body-bytes)")

    def __str__(self) -> str:
        return self.detail


DRAIN = 4  # a body up to this many times the limit is read and dropped before the 413


class Guard:
    """API key on every path but the open ones, then the body size, before the app reads a byte
    (a body past the limit is never kept: at most ``DRAIN`` times the limit is read and dropped)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: frozenset[str],
                 max_body_bytes: int) -> None:
        self.app, self.api_key, self.open_paths = app, api_key, open_paths
        self.max_body_bytes = max_body_bytes

    async def _drain(self, receive: Receive, received: int) -> None:
        """Read (and drop) the rest of a body up to ``DRAIN`` times the limit, so that the client,
        still sending, reads the 413 instead of a connection reset: closing a socket with
        unread data resets it. A body larger than that is cut off."""
        while received <= DRAIN * self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in self.open_paths:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, b"Bearer " + self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await send_error(send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                             "authentication_error", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            if length.isdigit() and int(length) <= DRAIN * self.max_body_bytes:
                await self._drain(receive, 0)
            await send_error(send, 413, str(BodyTooLarge(self.max_body_bytes)), "invalid_request_error",
                             "request_too_large", [(b"connection", b"close")])
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # a chunked body: stop here
                    if message.get("more_body"):
                        await self._drain(receive, received)
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, limited, send)


def request_deadline_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request to arrive in full (headers and
    body), counted from the connection's start and from each response's end. uvicorn only times
    out a keep-alive connection that stays silent after a response, and any byte resets that; a
    connection that sends nothing, or a few bytes now and then, stays open for ever."""

    class RequestDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.SEND_BODY and self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request has arrived (or the connection is closing)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():  # a handler waiting for the body sees a disconnect
                self.transport.close()

    return RequestDeadlineProtocol
