"""Errors a library logs and swallows, raised instead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def raising_logged_errors(logger_name: str) -> Iterator[None]:
    """Raise the first error that logger `logger_name` logs at ERROR level with its exception, after the block.

    mergekit logs a failed tokenizer copy and calls the merge successful; an export without its
    tokenizer (say, on a full disk) is not one.
    """
    logger = logging.getLogger(logger_name)
    swallowed: list[BaseException] = []

    def keep_error(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and record.exc_info[1] is not None:
            swallowed.append(record.exc_info[1])
            return False
        return True

    logger.addFilter(keep_error)
    try:
        yield
    finally:
        logger.removeFilter(keep_error)
    if swallowed:
        raise swallowed[0]
