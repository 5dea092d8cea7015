"""Client errors crossing a handle log one line; server errors keep their traceback."""

import logging

from deployments.logs import ClientErrorFilter
from deployments.types import EngineError, NotFoundError


def _logged(error: Exception) -> tuple[logging.LogRecord, str]:
    logger = logging.getLogger("tests.client-errors")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.addFilter(ClientErrorFilter())
    try:
        try:
            raise error
        except Exception:
            logger.exception("Request failed.")  # what Ray Serve's replica does
    finally:
        logger.removeHandler(handler)
    (record,) = records
    return record, logging.Formatter().format(record)


def test_a_client_error_is_one_line():
    record, text = _logged(NotFoundError("job job-x does not exist", code="job_not_found"))
    assert text == "Request failed. 404 NotFoundError: job job-x does not exist"
    assert record.levelno == logging.INFO and "Traceback" not in text


def test_a_server_error_keeps_its_traceback():
    record, text = _logged(EngineError("boom"))
    assert record.levelno == logging.ERROR and "Traceback" in text
