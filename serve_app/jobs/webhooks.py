"""Webhook delivery: POST a job's final state, retrying with exponential backoff; never fatal.

URLs are logged redacted (`redact_url`): a webhook URL often carries a token in its query.
URLs with a `user:password@` part are refused at submit (`serve_app.protocol.WebhookUrl`).
"""

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

logger = logging.getLogger("ray.serve")


def redact_url(url: str) -> str:
    """The URL with any user info dropped and every query value replaced by `***`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urlencode([(key, "***") for key, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


async def deliver(url: str, payload: dict[str, Any], attempts: int, backoff_s: float, timeout_s: float) -> bool:
    """True once the receiver answers 2xx; False (logged) after `attempts` failures."""
    shown = redact_url(url)
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(attempts):
            try:
                response = await client.post(url, json=payload)
                if 200 <= response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__  # its text may quote the URL
            logger.warning("webhook %s for job %s failed (try %d/%d): %s", shown, payload.get("id"), attempt + 1, attempts, problem)
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
    logger.error("webhook %s for job %s gave up after %d tries", shown, payload.get("id"), attempts)
    return False
