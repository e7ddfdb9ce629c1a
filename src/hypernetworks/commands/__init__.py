"""Subcommands of the ``hypernetworks`` command line; each module has ``main(argv) -> int``."""
from __future__ import annotations

import re


def plain(text: str) -> str:
    """Help text without reST markup: ````x```` and :class:`x` become x (argparse prints text as is)."""
    text = re.sub(r":(?:class|func|meth|attr|mod|obj):`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def description(doc: str) -> str:
    """A command's --help description: the first paragraph of its module docstring, as plain text."""
    return plain(doc.strip().split("\n\n")[0])
