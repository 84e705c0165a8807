"""Optional packages in tests: a test that needs one is skipped, naming the package, when it is absent.

Nothing else skips for a missing package. ``need("timm.models.vision_transformer")`` at a test module's top
skips that module (it is about timm); ``requires("sklearn")`` marks one test; ``hypothesis_api()`` gives
``given, settings, st`` that turn each property test into a skip when hypothesis is absent, so the module's
other tests still run.
"""

from __future__ import annotations

import importlib.util

import pytest

# import name -> pip name, where they differ
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow"}


def _reason(module: str) -> str:
    top = module.split(".")[0]
    pip = PIP_NAMES.get(top, top)
    return f"needs the optional package {pip!r} (pip install {pip})"


def missing(module: str) -> str | None:
    """None when ``module``'s top-level package is importable, else the skip reason."""
    return None if importlib.util.find_spec(module.split(".")[0]) is not None else _reason(module)


def need(module: str):
    """Import ``module``, or skip the calling test module (or test) with the reason."""
    return pytest.importorskip(module, reason=_reason(module))


def requires(*modules: str):
    """A skipif mark for a test that needs every one of ``modules``."""
    why = next((w for w in map(missing, modules) if w is not None), None)
    return pytest.mark.skipif(why is not None, reason=str(why))


class _Anything:
    """Stands in for ``hypothesis.strategies`` when hypothesis is absent: every attribute and call is inert."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def hypothesis_api():
    """(given, settings, strategies): hypothesis's own, or stand-ins that skip each ``@given`` test."""
    if missing("hypothesis") is None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        return given, settings, st

    def given(*args, **kwargs):
        def mark(fn):
            def skipped():
                pytest.skip(_reason("hypothesis"))

            skipped.__name__, skipped.__doc__ = fn.__name__, fn.__doc__
            return skipped

        return mark

    def settings(*args, **kwargs):
        return lambda fn: fn

    return given, settings, _Anything()
