"""Tests that need an optional package skip, naming it, when it is absent; the rest of the suite still runs.

Proven by running pytest in a subprocess where timm, transformers, torchvision, scikit-learn, matplotlib,
pillow and hypothesis cannot be imported."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from optional import hypothesis_api, missing, need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("timm", "transformers", "torchvision", "sklearn", "matplotlib", "PIL", "hypothesis")


def test_reasons_name_the_pip_package():
    assert missing("torch") is None
    assert missing("sklearn_is_not_here") == ("needs the optional package 'sklearn_is_not_here' "
                                               "(pip install sklearn_is_not_here)")
    with pytest.raises(pytest.skip.Exception, match="pip install no_such_pkg_xyz"):
        need("no_such_pkg_xyz.sub")


def _pytest_without_optional_packages(tmp_path, *args):
    (tmp_path / "block_optional.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # hypothesis's plugin would import hypothesis
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "block_optional", "-p", "no:cacheprovider",
                           "-q", "-rs", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_suite_collects_without_optional_packages(tmp_path):
    p = _pytest_without_optional_packages(tmp_path, "--collect-only", "tests")
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "ERROR" not in out and not re.search(r"\d+ errors?\b", out), out[-3000:]
    # the modules that compare against timm, and the figure tests, are skipped whole, with the reason
    assert re.search(r"SKIPPED \[\d+\] \S+: needs the optional package 'timm'", out), out[-3000:]
    assert "could not import" not in out, out[-3000:]  # every skip names the package (tests/optional.py)
    assert "needs the optional package 'matplotlib'" in out, out[-3000:]


def test_tests_skip_with_the_package_named(tmp_path):
    p = _pytest_without_optional_packages(tmp_path, "tests/test_data.py", "tests/test_vit.py",
                                          "tests/test_layer_norm.py", "-k", "not cuda and not triton")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for pip in ("scikit-learn", "pillow", "timm", "hypothesis"):
        assert f"needs the optional package '{pip}'" in out, (pip, out[-3000:])
    assert " passed" in out  # the tests that need none of them still ran


def test_hypothesis_stand_in_skips(monkeypatch):
    import optional

    monkeypatch.setattr(optional, "missing", lambda m: "absent" if m == "hypothesis" else None)
    given, settings, st = hypothesis_api()

    @settings(max_examples=3)
    @given(n=st.integers(1, 4))
    def test_prop(n):
        raise AssertionError("must not run")

    with pytest.raises(pytest.skip.Exception, match="hypothesis"):
        test_prop()
