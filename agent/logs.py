"""Logging to stdout in a form journald keeps well.

Under systemd (JOURNAL_STREAM set) each line starts with a '<N>' syslog priority, which
journald turns into the entry's level, and carries no timestamp (journald adds its own).
At a terminal, lines get a timestamp; colour codes are never written.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record):
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def setup_logging(level: str = "INFO", stream=None) -> None:
    stream = stream or sys.stdout
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
