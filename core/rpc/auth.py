"""Who may call the service over HTTP: the one check every HTTP transport makes.

`headscope serve` (JSON-RPC and the dashboard's requests) and `headscope mcp
--http` both ask an `Authorize` callable about each request's `Authorization`
header; it answers the `Caller` or None (refused, HTTP 401). The check is
injected rather than built into a transport, so a token store can replace the
single static token without touching the transports.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

#: what a caller may do: read findings, submit runs, manage the service
SCOPES = frozenset({"read", "submit", "admin"})


@dataclass(frozen=True)
class Caller:
    """Who is calling and what they may do."""

    name: str
    scopes: frozenset[str] = SCOPES


#: an `Authorization` header (None when absent) -> the caller, or None if refused
Authorize = Callable[[str | None], Caller | None]

ANONYMOUS = Caller("anonymous")


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None for anything else."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def static_token(token: str | None) -> Authorize:
    """One token that allows everything, compared in constant time. Without a token
    (only allowed on loopback addresses, see `http.check_binding`) everyone may call."""
    if not token:
        return lambda _header: ANONYMOUS
    expected = token.encode()
    holder = Caller("token")

    def authorize(header: str | None) -> Caller | None:
        given = bearer_token(header)
        if given is not None and hmac.compare_digest(given.encode(), expected):
            return holder
        return None

    return authorize
