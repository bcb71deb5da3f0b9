"""``python -m snapfusion_min <command> [flags]``: the same commands as the top-level scripts and the installed
``snapfusion-<command>`` ones."""

import importlib
import sys

from .cli import COMMANDS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help"):
            sys.exit(f"python -m snapfusion_min: error: unknown command {sys.argv[1]!r}; choose from {known}")
        print(f"usage: python -m snapfusion_min {{{known}}} [flags]   (--help after a command shows its flags)")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command = sys.argv[1]
    sys.argv = [f"python -m snapfusion_min {command}", *sys.argv[2:]]
    importlib.import_module(f"snapfusion_min.cli.{command}_command").entry()


if __name__ == "__main__":
    main()
