"""Client errors log one line, not a traceback. Logging only (no Ray import).

Ray Serve logs every exception a deployment method raises as "Request failed." with its full
traceback (~5 KB each). For `ServiceError`s below 500 (a request the caller got wrong, a job that
does not exist, a cancelled request) that is noise: 25 minutes of fuzzing wrote 59 MB of it. The
filter keeps the record and drops the traceback; server errors keep theirs.
"""

import logging

from deployments.types import ServiceError

#: The logger Ray Serve's replicas report failed requests on.
SERVE_LOGGER = "ray.serve"


class ClientErrorFilter(logging.Filter):
    """Rewrites a record carrying a client `ServiceError` (status < 500) to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        cause = getattr(error, "cause", None) or error  # Ray may wrap it
        if isinstance(cause, ServiceError) and cause.status_code < 500:
            record.msg = f"{record.getMessage()} {cause.status_code} {type(cause).__name__}: {cause.message}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_client_errors() -> None:
    """Install the filter on Ray Serve's logger in this process (idempotent)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
