"""Webhook delivery: POST a job's final state, retrying with exponential backoff; never fatal."""

import asyncio
import logging
from typing import Any

import httpx

logger = logging.getLogger("ray.serve")


async def deliver(url: str, payload: dict[str, Any], attempts: int, backoff_s: float, timeout_s: float) -> bool:
    """True once the receiver answers 2xx; False (logged) after `attempts` failures."""
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(attempts):
            try:
                response = await client.post(url, json=payload)
                if 200 <= response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            logger.warning("webhook %s for job %s failed (try %d/%d): %s", url, payload.get("id"), attempt + 1, attempts, problem)
            if attempt + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**attempt)
    logger.error("webhook %s for job %s gave up after %d tries", url, payload.get("id"), attempts)
    return False
