"""Webhook delivery: POST a job's final state, signed, to a checked destination, retrying with
exponential backoff; never fatal.

URLs are logged redacted (`redact_url`): a webhook URL often carries a token in its query.
URLs with a `user:password@` part are refused at submit (`serve_app.protocol.WebhookUrl`), and so
are IP-literal and `localhost` hosts that `address_refusal` refuses (`check_submitted`).

The server makes the POST itself, so it must not be turned against its own network: right before
each try the host is resolved and the POST refused when any address is refused
(`address_refusal`: loopback, private, link-local and cloud metadata, ...) unless the operator
allow-listed it (`jobs.webhook_allow`); the POST then connects to the checked address itself.

Signing: with a secret (`SDXL_WEBHOOK_SECRET`, else `jobs.webhook_secret`: `resolve_secret`) each
POST carries `X-Webhook-Timestamp` (unix seconds) and `X-Webhook-Signature: v1=<hex HMAC-SHA256 of
"{timestamp}.{body}">` over the exact body bytes sent; receivers check it with `verify_signature`.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from typing import Any, Iterable, Mapping, Optional, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from deployments.types import InvalidRequestError

logger = logging.getLogger("ray.serve")

#: Environment variable holding the signing secret (wins over `jobs.webhook_secret`).
SECRET_ENV = "SDXL_WEBHOOK_SECRET"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Webhook-Signature"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedDestination(Exception):
    """The webhook's destination may not be called (`reason` says why; it never holds the URL)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def address_refusal(address: IPAddress) -> Optional[str]:
    """Why a webhook may not go to `address` (e.g. "loopback"), or None when it may. Refused:

    - loopback: 127.0.0.0/8, ::1
    - unspecified: 0.0.0.0, ::
    - link-local: 169.254.0.0/16 (the cloud metadata address 169.254.169.254 among them), fe80::/10
    - multicast: 224.0.0.0/4, ff00::/8
    - shared (carrier-grade NAT): 100.64.0.0/10
    - reserved: 240.0.0.0/4, IPv6's reserved blocks (::/8 with the IPv4-compatible ::a.b.c.d, ...)
    - private: RFC 1918 (10/8, 172.16/12, 192.168/16), fc00::/7, and the other special-purpose
      blocks `ipaddress` counts as private (0/8, 192.0.0/24, the documentation ranges, ...)
    - site-local: fec0::/10 (deprecated)
    - anything else not globally routable (`ipaddress`'s `is_global` false)
    - an IPv6 address carrying a refused IPv4 one: IPv4-mapped ::ffff:a.b.c.d, NAT64
      64:ff9b::a.b.c.d, 6to4 2002:AABB:CCDD::/48
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded)
            if reason is not None:
                return f"{reason} ({embedded} inside {address})"
            if address.ipv4_mapped is not None:  # ::ffff:8.8.8.8 is 8.8.8.8
                return None
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if getattr(address, "is_site_local", False):
        return "site-local"
    if not address.is_global:
        return "not globally routable"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


class AllowList:
    """`jobs.webhook_allow`: host names (exact, case-insensitive; such a host is neither resolved
    nor checked) and IP addresses or CIDRs (an address inside one is not refused)."""

    def __init__(self, entries: Iterable[str] = ()):
        self.hosts: set[str] = set()
        self.networks: list[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(_host_key(entry))

    def allows_host(self, host: str) -> bool:
        return _host_key(host) in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)
        return any(address in network or (mapped is not None and mapped in network) for network in self.networks)

    def refusal(self, address: IPAddress) -> Optional[str]:
        """`address_refusal`, unless the address is allow-listed."""
        return None if self.allows_address(address) else address_refusal(address)


def _host_key(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _literal_address(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def literal_refusal(url: str, allow: Iterable[str] = ()) -> Optional[str]:
    """Why `url` is refused without a DNS lookup, or None (its resolution is checked at delivery):
    its host is an IP address that `address_refusal` refuses, or a `localhost` name (RFC 6761:
    always loopback); allow-listed hosts and addresses pass."""
    allowed = allow if isinstance(allow, AllowList) else AllowList(allow)
    host = urlsplit(url).hostname or ""
    if not host or allowed.allows_host(host):
        return None
    address = _literal_address(host)
    if address is not None:
        reason = allowed.refusal(address)
        return None if reason is None else f"{address}: {reason}"
    if _host_key(host) == "localhost" or _host_key(host).endswith(".localhost"):
        for loopback in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
            if allowed.refusal(loopback) is not None:
                return f"{_host_key(host)}: loopback"
    return None


def check_submitted(url: Optional[str], allow: Iterable[str] = ()) -> Optional[str]:
    """`url` as given at submit, or a 400 naming `webhook_url` when `literal_refusal` refuses it."""
    if url is not None:
        reason = literal_refusal(url, allow)
        if reason is not None:
            raise InvalidRequestError(
                f"webhook_url may not point at a loopback, private or otherwise internal address ({reason}); "
                "an operator can allow one with jobs.webhook_allow",
                param="webhook_url",
                code="webhook_url_refused",
            )
    return url


# -- signing ---------------------------------------------------------------------------------------


def resolve_secret(configured: Optional[str], environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The signing secret: `SDXL_WEBHOOK_SECRET` when set and not empty, else `jobs.webhook_secret`;
    None: deliveries go unsigned (receivers cannot tell them from forgeries)."""
    return environ.get(SECRET_ENV) or configured or None


def sign(secret: str, timestamp: Union[int, str], body: bytes) -> str:
    """The `X-Webhook-Signature` value: `v1=` and the hex HMAC-SHA256 of `{timestamp}.{body}`."""
    return "v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: Union[int, str],
    body: Union[bytes, str],
    header: str,
    tolerance_s: float = 300,
    now: Optional[float] = None,
) -> bool:
    """What a receiver runs (it needs only `hashlib`, `hmac`, `time`: copy it): True when
    `header` (the `X-Webhook-Signature` value) holds a `v1=` signature, made with `secret`, of
    `timestamp` (the `X-Webhook-Timestamp` value) and `body` (the raw request body, before any
    JSON parsing), and the timestamp is within `tolerance_s` seconds of now (an older delivery is
    refused as a replay). Several comma-separated signatures pass when any one matches."""
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        return False
    raw = body.encode() if isinstance(body, str) else body
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest().encode()
    for part in (header or "").split(","):
        scheme, _, value = part.strip().partition("=")
        if scheme == "v1" and hmac.compare_digest(value.strip().encode(), expected):
            return True
    return False


def redact_url(url: str) -> str:
    """The URL with any user info dropped and every query value replaced by `***`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urlencode([(key, "***") for key, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


async def deliver(
    url: str,
    payload: dict[str, Any],
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    secret: Optional[str] = None,
    allow: Iterable[str] = (),
    transport: Optional[httpx.AsyncBaseTransport] = None,
) -> bool:
    """True once the receiver answers 2xx; False (logged) after `attempts` failures, or at once
    when the destination is refused (`address_refusal`; `allow`: `jobs.webhook_allow`), which is
    not retried. Signed when `secret` is given (`resolve_secret`; later maybe one per API key).
    Each try (resolving, connecting, sending, the answer's status) is bounded by `timeout_s`;
    redirects are not followed and the answer's body is never read. `transport`: for tests."""
    shown = redact_url(url)
    allowed = AllowList(allow)
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    # trust_env=False: no proxy from the environment (the connection must go to the address
    # checked here) and no ~/.netrc credentials.
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport) as client:
        for attempt in range(attempts):
            try:
                status = await asyncio.wait_for(_post(client, url, body, secret, allowed), timeout_s)
                if 200 <= status < 300:
                    return True
                problem = f"HTTP {status}"
            except RefusedDestination as exc:
                logger.error("webhook %s for job %s refused, not delivered: %s", shown, payload.get("id"), exc.reason)
                return False
            except socket.gaierror:
                problem = "DNS lookup failed"
            except asyncio.TimeoutError:
                problem = f"no answer within {timeout_s:g} s"
            except (httpx.HTTPError, OSError) as exc:
                problem = type(exc).__name__  # its text may quote the URL
            logger.warning("webhook %s for job %s failed (try %d/%d): %s", shown, payload.get("id"), attempt + 1, attempts, problem)
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
    logger.error("webhook %s for job %s gave up after %d tries", shown, payload.get("id"), attempts)
    return False


async def _post(client: httpx.AsyncClient, url: str, body: bytes, secret: Optional[str], allowed: AllowList) -> int:
    """One try: the answer's status. The POST connects to an address `_checked_addresses`
    accepted, not to a second lookup of the name (which could answer differently: DNS
    rebinding): the URL's host becomes that address while `Host` keeps the name and, for https,
    so do the TLS server name (SNI) and the certificate check (httpcore's `sni_hostname`). A
    host allow-listed by name is connected to as usual."""
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise RefusedDestination("not a valid URL") from None
    if target.scheme not in _DEFAULT_PORTS or not target.raw_host:
        raise RefusedDestination("not an http(s) URL with a host")
    host = target.raw_host.decode("ascii")  # IDNA-encoded; an IPv6 address without brackets
    headers = {"Content-Type": "application/json"}
    if secret:
        timestamp = str(int(time.time()))  # per try: a retry is not refused as a replay
        headers.update({TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, body)})
    if allowed.allows_host(host):
        return await _status(client, target, body, headers, {})
    addresses = await _checked_addresses(host, target.port or _DEFAULT_PORTS[target.scheme], allowed)
    pinned_headers = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if target.scheme == "https" and _literal_address(host) is None else {}
    for i, address in enumerate(addresses):
        try:
            return await _status(client, target.copy_with(host=str(address)), body, pinned_headers, extensions)
        except httpx.ConnectError:
            if i + 1 == len(addresses):
                raise
    raise AssertionError("unreachable")


async def _status(client: httpx.AsyncClient, target: httpx.URL, body: bytes, headers: dict, extensions: dict) -> int:
    async with client.stream("POST", target, content=body, headers=headers, extensions=extensions) as response:
        return response.status_code  # the body is left unread: a receiver cannot make us read much


async def _checked_addresses(host: str, port: int, allowed: AllowList) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order; `RefusedDestination` when any one
    is refused (a name resolving to a public and a private address is refused)."""
    infos = await _resolve(host, port)
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise socket.gaierror(f"no address for {host}")
    for address in addresses:
        reason = allowed.refusal(address)
        if reason is not None:
            where = str(address) if _literal_address(host) is not None else f"{host} resolves to {address}"
            raise RefusedDestination(f"{where}: {reason} (jobs.webhook_allow can allow it)")
    return addresses


async def _resolve(host: str, port: int) -> list:
    """`getaddrinfo` off the event loop (tests replace this)."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
