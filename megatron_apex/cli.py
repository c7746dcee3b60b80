"""What every command-line entry point shares."""

import argparse
import sys


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse without the usage dump: a bad flag is one line naming it, exit code 2
    (argparse's convention). Abbreviated flags are refused: `--save-int` would otherwise mean
    `--save-interval` silently, and something else once a flag with that prefix is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_progress_option(parser: argparse.ArgumentParser, what: str = "per-tensor") -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help=f"no {what} progress bar (there is none anyway when stderr is not a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar on stderr: on a terminal, unless --no-progress."""
    return not args.no_progress and sys.stderr.isatty()
