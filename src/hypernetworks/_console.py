"""What the command-line programs print: progress bars only on a terminal, no advertising, no
banner, no warnings that only concern Lightning's own code."""
from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["interactive", "quiet_lightning", "quiet_lightning_tips"]


def interactive() -> bool:
    """True when both stdout and stderr are terminals. Progress bars redraw themselves many times a
    second; written to a file or a pipe every frame stays (hundreds of KB per run), so the programs
    show them only when a person is watching (and print a progress line now and then otherwise:
    :class:`hypernetworks.callbacks.ProgressLines`)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


# Lightning's informational lines that say nothing about the run: the advertising for its cloud
# services ("💡 Tip: ... try installing litlogger/litmodels", printed on every Trainer), the
# accelerator banner ("GPU available: False, used: False", "TPU available: ...", "HPU ...") and the
# seed line (the seed is in the recipe and in the run's config.yaml). Matched by the start of the
# message; "GPU available but not used" is a warning, not one of these, and stays.
_DROPPED = ("💡 Tip:", "Tip:", "GPU available: ", "TPU available: ", "HPU available: ", "IPU available: ",
            "Seed set to ")


class _DropBanner(logging.Filter):
    """Drops the messages of ``_DROPPED``; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg).lstrip()
        return not msg.startswith(_DROPPED)


_DropTips = _DropBanner  # the earlier name
_FILTER = _DropBanner()
# rank_zero_info logs through these loggers (lightning.pytorch.utilities.rank_zero sets the first
# one on import; the other is lightning_utilities' own); seed_everything through the last one
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning_utilities.core.rank_zero", "lightning.fabric.utilities.seed")

# Warnings raised inside Lightning about Lightning's own use of torch, on every fit and test
# (nothing a user can change): matched by exact message, category and module, so a warning of the
# same kind from anywhere else, and every other warning of these modules, still shows.
_IGNORED_WARNINGS = (
    # lightning/pytorch/utilities/_pytree.py builds torch's deprecated LeafSpec (torch >= 2.10)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree$"),
)


def quiet_lightning() -> None:
    """Install the log filter and the warning filters (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for message, category, module in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


quiet_lightning_tips = quiet_lightning  # the earlier name
