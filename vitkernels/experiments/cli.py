"""What every ``python -m vitkernels`` command shares: one-line errors.

A user-fixable error (bad arguments, missing data, a missing optional package, an unavailable backend) is one
line on stderr and exit code 2, never a traceback or a usage dump.
"""

from __future__ import annotations

import argparse

# import name -> pip name, for the one-line "needs the optional package" message
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


def error_line(exc: BaseException) -> str:
    """The one line a CLI prints for an error the user can fix."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        pip = PIP_NAMES.get(top, top)
        return f"needs the package {pip!r}, which is not installed (pip install {pip})"
    return " ".join(str(exc).split()) or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``<prog>: error: <message> (see --help)``, exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
