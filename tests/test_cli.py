"""Every ``python -m vitkernels`` command ends a user-fixable error with one line on stderr and exit code 2:
bad arguments, missing data, a missing optional package, an unavailable backend; never a traceback."""

from __future__ import annotations

import sys

import pytest

from vitkernels.__main__ import main
from vitkernels.backends import BackendError
from vitkernels.experiments.cli import error_line

TINY = ["--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--steps", "1", "--no-progress",
        "--device", "cpu"]


def _one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cmd", ["info", "train", "bench", "sweep", "plot"])
def test_bad_argument_is_one_line(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "somewhere", "--no-such-option"] if cmd == "plot" else [cmd, "--no-such-option"])
    assert exc.value.code == 2
    line = _one_line_error(capsys, f"vitkernels {cmd}: error:")
    assert "--no-such-option" in line and "--help" in line


def test_missing_data_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--dataset", f"cifar10:{tmp_path / 'absent'}", "--out", str(tmp_path)]) == 2
    assert "does not exist" in _one_line_error(capsys, "vitkernels train: error:")
    assert main(["train", *TINY, "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "vitkernels train: error:")


def test_missing_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    assert main(["train", *TINY, "--dataset", "digits", "--out", str(tmp_path)]) == 2
    line = _one_line_error(capsys, "vitkernels train: error:")
    assert "'scikit-learn'" in line and "pip install scikit-learn" in line


def test_unavailable_backend_is_one_line(tmp_path, capsys, monkeypatch):
    import vitkernels.experiments.train

    def unavailable(cfg):
        raise BackendError("backend 'triton' is unavailable: triton is not installed")

    monkeypatch.setattr(vitkernels.experiments.train, "train", unavailable)
    assert main(["train", *TINY, "--backend", "triton", "--out", str(tmp_path)]) == 2
    assert "backend 'triton' is unavailable" in _one_line_error(capsys, "vitkernels train: error:")


def test_error_line_folds_whitespace_and_names_pip_packages():
    assert error_line(ValueError("a\n  b")) == "a b"
    exc = ModuleNotFoundError("No module named 'PIL'", name="PIL")
    assert error_line(exc) == "needs the package 'pillow', which is not installed (pip install pillow)"
