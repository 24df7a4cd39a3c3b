"""The one logging setup of every roam process: the CLI, and the peer's workers, whose
stderr the peer keeps in the VM's worker.log (roam logs NAME).

One format everywhere; roam's loggers at the level asked for, everything else (asyncio,
qemu.qmp, uvicorn...) at WARNING unless that level is DEBUG.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["FORMAT", "configure"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time of the record, so that a progress
    display, which redirects stderr while it runs, shows log lines above itself."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure(level: int) -> None:
    """Log roam at `level` to stderr in the one format. Called again, it only changes the
    level."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    logging.getLogger("roam").setLevel(level)
