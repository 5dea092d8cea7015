"""API keys: who is calling (`Principal`), checked once per request by a route dependency.

A key is presented as `Authorization: Bearer <key>` (what the OpenAI client sends). The config
never holds a key: each is named, and read from an environment variable at start (`key_env`) or
given as its SHA-256 (`key_sha256`). A presented key is hashed and compared with every known hash
with `hmac.compare_digest`, all of them, so the time taken says nothing about which came close.
Keys are never logged; their names are.

Tenancy: a principal's `owner` is its key's name (None with auth off or for `admin`): jobs,
results and uploaded or trained LoRAs made under a key belong to it, and another key is told
they do not exist (404). Stored files (`/v1/files/{id}`, OpenAI `url` answers) are capability
URLs: unguessable 128-bit ids with an expiry, fetchable without a key, as the `url`s of hosted
image APIs are.
"""

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from configs.app_args import ApiKeyConfig, AuthConfig, Scope
from deployments.types import ForbiddenError, UnauthorizedError


@dataclass(frozen=True)
class Principal:
    """Who a request runs as."""

    #: The key's name; None with auth off.
    name: Optional[str]
    scopes: frozenset[str]
    #: The key's quotas (None: unlimited).
    key: Optional[ApiKeyConfig] = None

    @property
    def owner(self) -> Optional[str]:
        """Whose jobs and LoRAs this principal sees and makes: its name; None (everyone's) with
        auth off or for an admin key."""
        return None if self.name is None or "admin" in self.scopes else self.name

    def allows(self, scope: Scope) -> bool:
        return "admin" in self.scopes or scope in self.scopes


#: With auth off every request runs as this: every scope, everyone's resources.
ANONYMOUS = Principal(name=None, scopes=frozenset({"admin"}))


class ApiKeys:
    def __init__(self, config: AuthConfig, environ: Mapping[str, str] = os.environ):
        """Resolve every key's hash now (a `key_env` that is not set fails the start, naming it)."""
        self.enabled = config.enabled
        self._keys: list[tuple[bytes, ApiKeyConfig]] = []
        for key in config.keys if config.enabled else ():
            if key.key_env is not None:
                secret = environ.get(key.key_env)
                if not secret:
                    raise ValueError(f"auth key {key.name!r}: environment variable {key.key_env} is not set")
                digest = hashlib.sha256(secret.encode()).digest()
            else:
                digest = bytes.fromhex(key.key_sha256)
            self._keys.append((digest, key))

    def authenticate(self, authorization: Optional[str]) -> Principal:
        """The principal an `Authorization` header names; 401 without a known Bearer key."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("this server needs an API key: send Authorization: Bearer <key>", code="missing_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, key in self._keys:  # every comparison runs: no early exit to time
            if hmac.compare_digest(digest, known):
                found = key
        if found is None:
            raise UnauthorizedError("the API key is not valid", code="invalid_api_key")
        return Principal(name=found.name, scopes=frozenset(found.scopes), key=found)

    def check(self, authorization: Optional[str], scope: Optional[Scope] = None) -> Principal:
        """The principal of an `Authorization` header, which must hold `scope` (None: any key);
        401 or 403 otherwise."""
        principal = self.authenticate(authorization)
        if scope is not None and not principal.allows(scope):
            raise ForbiddenError(f"the API key {principal.name!r} lacks the {scope!r} scope", code="missing_scope")
        return principal
