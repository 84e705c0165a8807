"""``python -m vitkernels <command>``: info | train | bench | sweep | plot (also the ``vitkernels`` script).

Every command's errors that a user can fix (bad arguments or values, missing data, a missing optional package,
an unavailable backend) end as one line on stderr and exit code 2, never a traceback; VITKERNELS_DEBUG=1 shows
the traceback too.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from vitkernels.experiments.cli import error_line

# command -> module with a main(argv) function
COMMANDS = {
    "info": "vitkernels.experiments.info",
    "train": "vitkernels.experiments.train",
    "bench": "vitkernels.experiments.bench",
    "sweep": "vitkernels.experiments.sweep",
    "plot": "vitkernels.experiments.plot",
    "audit": "vitkernels.experiments.audit",
}

def run_command(cmd: str, argv: list[str]) -> int:
    """Run ``cmd``'s main(argv); user-fixable errors become one line on stderr and exit code 2."""
    from vitkernels.backends import BackendError

    try:
        return int(importlib.import_module(COMMANDS[cmd]).main(argv) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, BackendError) as exc:
        if os.environ.get("VITKERNELS_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        print(f"vitkernels {cmd}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vitkernels {" + ",".join(COMMANDS) + "} [options]")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"vitkernels: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(cmd, rest)


if __name__ == "__main__":
    sys.exit(main())
