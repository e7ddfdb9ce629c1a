"""Subcommands of the ``hypernetworks`` command line; each module has ``main(argv) -> int``."""
