"""The library packages stand on their own: importing any module of generator, knowledge, rlhf or agents
imports nothing from pipelines (the command line and its jobs sit on top of them, never below)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = r"""
import importlib, pkgutil, sys
failed = []
for name in {packages!r}:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m == "pipelines" or m.startswith("pipelines.")))
"""


@pytest.mark.parametrize("packages", [("generator",), ("knowledge",), ("rlhf",), ("agents",)])
def test_library_packages_import_nothing_from_pipelines(packages):
    out = subprocess.run([sys.executable, "-c", CHECK.format(packages=packages)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"importing {packages[0]} pulled in {out.stdout.strip().splitlines()[-1]}"
