"""``python -m vitkernels <command>``: info | train | bench | sweep | plot (also the ``vitkernels`` script)."""

from __future__ import annotations

import importlib
import sys

# command -> module with a main(argv) function
COMMANDS = {
    "info": "vitkernels.info",
    "train": "vitkernels.train",
    "bench": "vitkernels.bench",
    "sweep": "vitkernels.sweep",
    "plot": "vitkernels.plot",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vitkernels {" + ",".join(COMMANDS) + "} [options]")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"vitkernels: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[cmd]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
