"""What every command-line entry point shares."""

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse without the usage dump: a bad flag is one line naming it, exit code 2
    (argparse's convention)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
