"""Collect ``bench_*.py`` as test modules under ``pytest benchmarks/`` (pytest's default
``python_files`` only matches ``test_*.py``), unless the project's ``python_files``
already matches them or the file was named on the command line (pytest collects those
itself)."""

from __future__ import annotations

from fnmatch import fnmatch

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
