"""What the command-line programs print: progress bars only on a terminal, no advertising."""
from __future__ import annotations

import logging
import sys

__all__ = ["interactive", "quiet_lightning_tips"]


def interactive() -> bool:
    """True when both stdout and stderr are terminals. Progress bars redraw themselves many times a
    second; written to a file or a pipe every frame stays (hundreds of KB per run), so the programs
    show them only when a person is watching."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger/litmodels" messages (advertising for
    Lightning's cloud services, printed on every Trainer); every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)[:16]


_FILTER = _DropTips()
# rank_zero_info logs through these loggers (lightning.pytorch.utilities.rank_zero sets the first
# one on import; the other is lightning_utilities' own)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning_utilities.core.rank_zero")


def quiet_lightning_tips() -> None:
    """Install the filter (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
