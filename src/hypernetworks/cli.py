"""The ``hypernetworks`` command line.

    hypernetworks fit|validate|test|predict --config configs/<recipe>.yaml [--key value ...]
    hypernetworks demo | sample | params | kernels | activity | serve | translate  [--help]

Training subcommands go to Lightning's CLI (hypernetworks.training); the others are small
argparse programs in hypernetworks.commands, imported only when called. This module imports
neither torch nor Lightning, so ``hypernetworks --help`` answers at once.
"""
from __future__ import annotations

import importlib
import sys

# name -> one-line help (also the description of that subcommand's --help, hypernetworks.training)
TRAINING_COMMANDS: dict[str, str] = {
    "fit": "train a recipe (--config configs/NAME.yaml); --ckpt_path last resumes",
    "validate": "score a checkpoint (--ckpt_path) on the recipe's validation split",
    "test": "score a checkpoint (--ckpt_path) on the recipe's test split",
    "predict": "Lightning's predict loop over a data module's predict split",
}
LIGHTNING_SUBCOMMANDS = tuple(TRAINING_COMMANDS)

# name -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hypernetworks.commands.demo", "train a small HyperLSTM and LSTM on pydoc text and compare"),
    "sample": ("hypernetworks.commands.sample", "sample from a trained checkpoint"),
    "params": ("hypernetworks.commands.params", "print parameter counts of registered models"),
    "kernels": ("hypernetworks.commands.kernels", "render a checkpoint's generated conv kernels as PNG"),
    "activity": ("hypernetworks.commands.activity", "weight-activity picture of a passage (HTML + PNG)"),
    "serve": ("hypernetworks.serve.server", "local demo page (127.0.0.1 by default)"),
    "translate": ("hypernetworks.commands.translate", "translate lines from standard input"),
    "handwriting": ("hypernetworks.commands.handwriting", "sample handwriting from a checkpoint to SVG/PNG"),
}


def _usage() -> str:
    width = max(map(len, [*TRAINING_COMMANDS, *COMMANDS])) + 2
    lines = ["usage: hypernetworks <command> [options]     (hypernetworks <command> --help: its options)",
             "", "training (Lightning CLI: --config RECIPE.yaml [--key VALUE ...]):"]
    lines += [f"  {name:<{width}}{help_}" for name, help_ in TRAINING_COMMANDS.items()]
    lines += ["", "other commands:"]
    lines += [f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Datasets are read from $HYPERNETWORKS_DATA, else ~/.local/share/hypernetworks (see README)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING_SUBCOMMANDS:
        from hypernetworks.training import run_cli

        run_cli([cmd, *rest])
        return 0
    if cmd not in COMMANDS:
        print(f"hypernetworks: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        return int(module.main(rest) or 0)
    except Exception as e:  # a damaged file, a full disk, bad settings: one paragraph, no traceback
        from hypernetworks._errors import debug, paragraph, user_message

        message = user_message(e)
        if message is None or debug():
            raise
        print(paragraph(f"hypernetworks {cmd}", message), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
