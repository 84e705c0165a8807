"""The library (ops, backends, triton, cuda, nn, models, convert, patch_timm, flops ...) never imports the
experiments (vitkernels/experiments/: train, data, bench, sweep, plot, info); the experiments import the library.

Checked twice: statically, every import statement of every library file; and at run time, importing every
library module in a fresh interpreter leaves ``vitkernels.experiments`` out of sys.modules.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from vitkernels.backends import OPS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vitkernels"
EXPERIMENTS = "vitkernels.experiments"
# The command-line front door dispatches to the experiments by name; it is not part of the library.
FRONT_DOOR = {PACKAGE / "__main__.py"}
# Importing these loads the extension (a JIT build, minutes, where setup.py did not build it): the run-time
# check leaves them to the static one.
LOADS_EXTENSION = {f"vitkernels.cuda.{op}" for op in OPS}


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if (PACKAGE / "experiments") not in p.parents and p not in FRONT_DOOR)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``), relative imports
    resolved, plus string constants naming a vitkernels module (``importlib.import_module("vitkernels....")``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vitkernels."):
            found.append((node.lineno, node.value))
    return found


def test_library_files_import_nothing_from_the_experiments():
    files = library_files()
    assert len(files) > 10 and PACKAGE / "__init__.py" in files
    offending = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in files
                 for line, name in imported_names(path)
                 if name == EXPERIMENTS or name.startswith(EXPERIMENTS + ".")]
    assert not offending, "the library imports the experiments:\n" + "\n".join(offending)


def test_the_scan_sees_every_form_of_import(tmp_path):
    pkg = tmp_path / "vitkernels" / "nn"
    pkg.mkdir(parents=True)
    sample = pkg / "sample.py"
    sample.write_text("import vitkernels.experiments.env\nfrom vitkernels import experiments\n"
                      "from ..experiments import data\nfrom . import block\n"
                      "importlib.import_module('vitkernels.experiments.bench')\n")
    names = [name for _, name in imported_names(sample, root=tmp_path)]
    assert names == ["vitkernels.experiments.env", "vitkernels.experiments", "vitkernels.experiments.data",
                     "vitkernels.nn.block", "vitkernels.experiments.bench"]


def test_importing_the_library_loads_no_experiment():
    modules = [name for name in map(module_name, library_files()) if name not in LOADS_EXTENSION]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "import vitkernels\n"
            "vitkernels.create_model('vit_tiny_patch16_224', img_size=32, patch_size=16, depth=1)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({EXPERIMENTS!r})))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout[-3000:]
