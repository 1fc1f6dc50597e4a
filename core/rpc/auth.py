"""Who is calling, and what they may do: bearer tokens with scopes.

A transport asks one `Authenticate` callable about each request's headers and gets
the `Caller` (a name and its scopes) or None, a refusal. Scopes are levels, each
including those below it: `read` (query runs and findings), `submit` (also start
and cancel runs), `admin` (also load and unload models). The scope each method
needs is in `methods.SCOPES`.

The server's own token (`--token`, HEADSCOPE_TOKEN) holds every scope. Named
tokens (`headscope tokens create`) are stored as SHA-256 hashes: they are 256
random bits, so a fast hash is as safe as a slow one and costs microseconds per
request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import InvalidParamsError

SCOPES = ("read", "submit", "admin")  # each includes the ones before it
TOKEN_PREFIX = "hs_"
SERVER_TOKEN_NAME = "server-token"  # the caller name of --token / HEADSCOPE_TOKEN


@dataclass(frozen=True)
class Caller:
    """An authenticated client: its token's name (None: no token was needed)."""

    name: str | None
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """True when one of the caller's scopes is `scope` or above it."""
        needed = SCOPES.index(scope)
        return any(SCOPES.index(held) >= needed for held in self.scopes if held in SCOPES)


#: headers -> the caller, or None to refuse the request (HTTP 401)
Authenticate = Callable[[Mapping[str, str]], Caller | None]
#: a token's hash -> (name, scopes) of the live token with it, or None
TokenLookup = Callable[[str], tuple[str, list[str]] | None]

EVERYONE = Caller(None, frozenset(SCOPES))


def new_token() -> str:
    """A fresh random token (shown once; only its hash is stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    """The scopes, checked and deduplicated, in level order; a clear error otherwise."""
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown or not scopes:
        raise InvalidParamsError(
            f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}"
            if unknown
            else f"give at least one scope ({', '.join(SCOPES)})"
        )
    return [scope for scope in SCOPES if scope in scopes]


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header."""
    scheme, _, given = (headers.get("Authorization") or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def authenticator(
    server_token: str | None = None, lookup: TokenLookup | None = None, required: bool = True
) -> Authenticate:
    """The check for a server: its own token (every scope), then named tokens through
    `lookup`; without `required` (an open server on loopback), a request without a
    token, or with one that matches none, gets every scope as before tokens existed."""
    expected = server_token.encode() if server_token else None
    server = Caller(SERVER_TOKEN_NAME, frozenset(SCOPES))

    def authenticate(headers: Mapping[str, str]) -> Caller | None:
        given = bearer(headers)
        if given is None:
            return None if required else EVERYONE
        if expected is not None and hmac.compare_digest(given.encode(), expected):
            return server
        found = lookup(token_hash(given)) if lookup is not None else None
        if found is not None:
            return Caller(found[0], frozenset(found[1]))
        return None if required else EVERYONE

    return authenticate
