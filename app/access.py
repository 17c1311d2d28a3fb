"""Who may drive the service: the Host allow-list, the Origin check and API keys (pure ASGI).

- Host: a request whose Host header names none of VAE_ALLOWED_HOSTS is refused (400).
  vae-serve bound to a loopback address allows only loopback names unless told otherwise:
  a web page the user visits can otherwise point a DNS name it controls at 127.0.0.1 and
  read the answers (DNS rebinding), as Ollama found.
- Origin: a browser names the page that sent a request in `Origin`. A request from another
  site (cross-origin) is refused (403) unless its origin is in VAE_ALLOWED_ORIGINS: a
  multipart POST is a CORS "simple" request, which the browser sends without asking first,
  so any page could otherwise make the service compute. The page at / is same-origin.
- API keys: with VAE_API_KEYS (or VAE_API_KEYS_FILE) set, every endpoint but the page, the
  docs, health, readiness and metrics (those too with VAE_OPEN_OPS=false) needs
  `Authorization: Bearer <key>`: 401 with `WWW-Authenticate` when it is missing or wrong.
  Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response_for
from app.exceptions import Forbidden, MisdirectedHost, Unauthorized

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# What a browser loads to show the page and the docs; never needs a key (the page asks for one).
PAGE_PATHS = ("/", "/docs", "/redoc", "/openapi.json", "/favicon.ico")
PAGE_PREFIXES = ("/static/", "/docs-assets/")
OPS_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready",
             "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass(frozen=True)
class AccessRules:
    hosts: tuple[str, ...] = ("*",)  # names, or "*" for any
    origins: tuple[str, ...] = ()  # scheme://host[:port] besides the page's own, or "*" for any
    keys: tuple[bytes, ...] = ()  # none: no key needed
    open_ops: bool = True

    @classmethod
    def parse(cls, hosts: str, origins: str, keys: Iterable[str], open_ops: bool = True) -> AccessRules:
        """From the settings' text; `keys` as Settings.api_key_list gives them (stripped, none empty)."""
        return cls(_split(hosts) or ("*",), _split(origins), tuple(k.encode() for k in keys), open_ops)

    def needs_key(self, path: str) -> bool:
        if not self.keys or path in PAGE_PATHS or path.startswith(PAGE_PREFIXES):
            return False
        return not (self.open_ops and path in OPS_PATHS)

    def key_matches(self, given: bytes) -> bool:
        """Constant time in the key's content: every configured key is compared, whichever matches."""
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(given, key)
        return found


def key_refusal(rules: AccessRules, path: str, authorization: bytes) -> Unauthorized | None:
    """Why a call to `path` with this Authorization value (header or gRPC metadata) is refused, or None."""
    if not rules.needs_key(path):
        return None
    scheme, _, given = authorization.partition(b" ")
    if not given or scheme.lower() != b"bearer":
        return Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    if not rules.key_matches(given.strip()):
        return Unauthorized("the API key is not valid", error="invalid API key")
    return None


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in value.split(",") if part.strip())


def host_name(host: str) -> str:
    """The Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AccessMiddleware:
    def __init__(self, app: ASGIApp, rules: AccessRules) -> None:
        self.app, self.rules = app, rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await error_response_for(scope["path"], refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> MisdirectedHost | Forbidden | Unauthorized | None:
        rules = self.rules
        host = origin = authorization = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"authorization":
                authorization = value
        host_text = host.decode("latin-1").lower()
        if rules.hosts != ("*",) and host_name(host_text) not in rules.hosts:
            return MisdirectedHost(f"Host {host_text!r} is not one this service answers to; it answers to "
                                   f"{', '.join(rules.hosts)} (VAE_ALLOWED_HOSTS)")
        if origin:
            sent_by = origin.decode("latin-1").lower()
            # the page's own origin names the host its Host header does; the scheme is left out, as a
            # proxy that ends TLS forwards https pages' requests as http
            own = sent_by.partition("://")[2] == host_text
            if not own and "*" not in rules.origins and sent_by not in rules.origins:
                return Forbidden(f"requests from web pages at {sent_by} are not allowed; only from this service's "
                                 "own page and VAE_ALLOWED_ORIGINS")
        return key_refusal(rules, scope["path"], authorization)
