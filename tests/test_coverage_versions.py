"""integrations/coverage_versions.json (from which transformers release each coverage
row applies; written by tools/coverage_versions.py) against the installed transformers:
the lanes run the newest and the lowest supported release, so the recorded facts of both
are checked on every CI run."""

from __future__ import annotations

import pytest
import transformers

from mmkernels.integrations import hf, hf_versions


def test_recorded_facts_match_the_installed_transformers():
    data = hf_versions.load()
    assert data is not None, f"{hf_versions.DATA} is missing: run tools/coverage_versions.py"
    version = transformers.__version__
    if version not in data["facts"]:
        pytest.skip(f"transformers {version} is not among the recorded releases {data['versions']} "
                    f"(run tools/coverage_versions.py {version})")  # fmt: skip
    recorded, found = data["facts"][version], hf.coverage_facts()
    assert found["rules"] == recorded["rules"], "rules: run tools/coverage_versions.py"
    assert found["merged"] == recorded["merged"], "merged model types: run tools/coverage_versions.py"
    # Every rule is in the file (a new rule without a run would read "not in ...").
    assert {hf_versions.rule_key(r) for r in hf.rules()} <= {k for v in data["versions"] for k in data["facts"][v]["rules"]}


def test_the_table_cells():
    checked = ["5.17.0", "5.18.0", "5.19.0"]
    assert hf_versions.since(checked, checked) == "5.17.0+"
    assert hf_versions.since(["5.18.0", "5.19.0"], checked) == "5.18.0+"
    assert hf_versions.since(["5.17.0"], checked) == "5.17.0"
    assert hf_versions.since(["5.17.0", "5.19.0"], checked) == "5.17.0, 5.19.0"
    assert hf_versions.since([], checked) == "not in 5.17.0-5.19.0"
    assert hf_versions.since([], []) == "not checked"
    table = hf.supported_models()
    assert "| transformers (class defined) |" in table and "| merged on transformers |" in table
