"""What every ``python -m vitkernels`` command shares: one-line errors, and options derived from a config.

A user-fixable error (bad arguments, missing data, a missing optional package, an unavailable backend) is one
line on stderr and exit code 2, never a traceback or a usage dump.

A config dataclass declares its command-line options once, on its fields (``option(...)``: group, help, flag,
choices); ``add_options`` builds the argparse options from them and ``options`` lists them for anything else
that needs them (the sweep validates its grid against train's options this way).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

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


# -- options declared on a config dataclass -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field is set on the command line (the field's type and default give the rest)."""

    group: str  # the --help section
    help: str | None = None
    flag: str | None = None  # default: --<field name, dashes for underscores>
    choices: tuple | None = None
    exclusive: str | None = None  # options with the same name here are mutually exclusive
    nargs: str | None = None  # "?": the flag alone means ``const``
    const: object = None
    hidden: bool = False  # accepted, but not in --help nor offered to sweeps


def option(group: str, help: str | None = None, *, default=None, **how) -> typing.Any:
    """A dataclass field that is also a command-line option (see ``Option`` for ``how``)."""
    return dataclasses.field(default=default, metadata={"option": Option(group, help, **how)})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One option of a config dataclass, resolved: a bool field is a switch (``--x`` sets the opposite of its
    default), any other field takes a value of its type."""

    name: str  # the field
    flag: str  # e.g. "--embed-dim"
    kind: type  # bool, int, float or str
    default: object
    option: Option

    @property
    def key(self) -> str:
        """The flag as a Python name ("--drop-path" -> "drop_path"): how a sweep's grid names the option."""
        return self.flag[2:].replace("-", "_")


def options(cls) -> list[Flag]:
    """The options declared on dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            found.append(Flag(f.name, opt.flag or "--" + f.name.replace("_", "-"), _value_type(hints[f.name]),
                              f.default, opt))
    return found


def _value_type(hint) -> type:
    """``int | None`` -> int; ``bool`` -> bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def add_options(parser: argparse.ArgumentParser, cls, titles: dict[str, str]) -> argparse.ArgumentParser:
    """Add the options of dataclass ``cls`` to ``parser``, one argument group per ``Option.group`` (titled from
    ``titles``); the parsed namespace then holds exactly ``cls``'s keyword arguments."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in options(cls):
        opt = f.option
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(titles.get(opt.group, opt.group))
        target = groups[opt.group]
        if opt.exclusive:
            if opt.exclusive not in exclusive:
                exclusive[opt.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[opt.exclusive]
        kw: dict = dict(dest=f.name, default=f.default,
                        help=argparse.SUPPRESS if opt.hidden else opt.help and opt.help.replace("%", "%%"))
        if f.kind is bool:
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            if f.kind is not str:
                kw["type"] = f.kind
            kw.update({k: getattr(opt, k) for k in ("choices", "nargs", "const") if getattr(opt, k) is not None})
        target.add_argument(f.flag, **kw)
    return parser
