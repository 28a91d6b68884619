"""From which transformers release each coverage row applies (issue 20).

``coverage_versions.json`` (next to this file, shipped with the package) is written by
``tools/coverage_versions.py``, which installs every minor release of transformers from
the lowest supported one (the newest patch of each) beside the main environment and
records, per release, what :func:`installed_facts` finds there:

* ``rules``: the patch rules whose patched class that release defines (a rule patches
  nothing in a release without its class: the family is skipped by name, never an
  import error);
* ``merged``: the model types the generic merge rule merges in that release (it reads
  each forward, so a release that changed a forward changes this).

:func:`supported_models` prints them as a column of the rules' table and of the generic
rule's table. The tests compare the file against the installed transformers whenever it
is one of the releases recorded (CI runs the newest and the lowest), so the file cannot
silently disagree with what a run finds.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Iterable, Sequence

from .engine import Rule

__all__ = ["DATA", "cell_for_merged", "cell_for_rule", "defined_classes", "defined_model_types", "installed_facts",
           "load", "rule_key", "since"]

DATA = pathlib.Path(__file__).with_name("coverage_versions.json")
_CLASS = re.compile(r"^class (\w+)\(", re.M)
_MODEL_TYPE = re.compile(r'^\s+model_type = "(\w+)"', re.M)
_IDENTIFIER = re.compile(r"^\w+$")


def rule_key(rule: Rule) -> str:
    """The row's identity across releases: family, model_type, class and method."""
    row = rule.coverage_row()
    return " | ".join(str(row[k]) for k in ("family", "model_type", "class", "method"))


def _read_all(pattern: str, regex: re.Pattern) -> frozenset[str]:
    import importlib.util

    spec = importlib.util.find_spec("transformers.models")
    if spec is None:
        return frozenset()
    root = pathlib.Path(spec.submodule_search_locations[0])
    found = set()
    for path in root.glob(pattern):
        found.update(regex.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(found)


@functools.lru_cache(maxsize=1)
def defined_classes() -> frozenset[str]:
    """Class names the installed transformers defines in its modeling files (read as
    text: nothing is imported)."""
    return _read_all("*/modeling_*.py", _CLASS)


@functools.lru_cache(maxsize=1)
def defined_model_types() -> frozenset[str]:
    """The ``model_type`` s its configuration classes declare (read as text)."""
    return _read_all("*/configuration_*.py", _MODEL_TYPE)


def _present(rule: Rule) -> bool:
    import torch

    if not _IDENTIFIER.match(rule.model_class):  # matches by structure (the generic rule)
        return True
    if isinstance(getattr(torch.nn, rule.model_class, None), type):  # a torch module inside a family's tower
        return rule.model_type in defined_model_types()
    return rule.model_class in defined_classes()


def installed_facts(rules: Sequence[Rule], merged_model_types: Iterable[str]) -> dict[str, list[str]]:
    """What the installed transformers gives: ``rules`` (keys of the rules whose class it
    defines, or for a torch module such as a bare ``Conv2d``, whose ``model_type``; a
    rule matching by structure, the generic one, always applies) and ``merged`` (the
    generic rule's merged model types, passed in)."""
    present = [rule_key(r) for r in rules if _present(r)]
    return {"rules": sorted(set(present)), "merged": sorted(set(merged_model_types))}


@functools.lru_cache(maxsize=1)
def load() -> dict | None:
    """``{"versions": [...], "facts": {version: installed_facts}}``, or None without the file."""
    if not DATA.is_file():
        return None
    return json.loads(DATA.read_text())


def since(present_in: Sequence[str], checked: Sequence[str]) -> str:
    """A table cell: ``5.17+`` when present from that release through the newest checked,
    else the releases it is present in; ``not in 5.17-5.25`` when none; ``not checked``
    without data."""
    if not checked:
        return "not checked"
    if not present_in:
        return f"not in {checked[0]}-{checked[-1]}"
    first = checked.index(present_in[0])
    if list(checked[first:]) == list(present_in):
        return f"{present_in[0]}+"
    return ", ".join(present_in)


def cell_for_rule(rule: Rule) -> str:
    data = load()
    if data is None:
        return "not checked"
    key = rule_key(rule)
    versions = data["versions"]
    return since([v for v in versions if key in data["facts"][v]["rules"]], versions)


def cell_for_merged(model_type: str) -> str:
    data = load()
    if data is None:
        return "not checked"
    versions = data["versions"]
    return since([v for v in versions if model_type in data["facts"][v]["merged"]], versions)
