"""A logger that imports :mod:`logging` on first use.

``import logging`` costs ~7 ms here (it pulls in traceback, string formatting, threading); the
library path (``import dsproxy`` + a Registry) logs only on rare events, and the whole-process rows
of ``scripts/bench-lookup`` count every millisecond of start-up.  The daemons import logging anyway.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return getattr(self._logger, attr)
