"""Server-sent events for one job: its state whenever it changes, then `done`."""

import asyncio
import json
from typing import Any, AsyncIterator

from serve_app.jobs.store import TERMINAL

#: How often the job's state is read while streaming, and how often an idle stream says it lives.
POLL_S = 0.2
KEEPALIVE_S = 15.0


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def job_event_stream(jobs: Any, job: dict[str, Any]) -> AsyncIterator[str]:
    last = None
    quiet = 0.0
    while True:
        state = (job["status"], job["progress"]["percent"])
        if job["status"] in TERMINAL:
            yield _event("done", job)
            return
        if state != last:
            yield _event("progress", job)
            last, quiet = state, 0.0
        elif quiet >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(POLL_S)
        quiet += POLL_S
        job = await jobs.get.remote(job["id"])
