"""The README's coverage table is generated from the patch rules; it must not go stale."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_coverage_table_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "update_readme.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_names_the_two_commands_that_exist():
    text = (ROOT / "README.md").read_text()
    for command in ("bash tools/demo.sh", "bash tools/test.sh"):
        assert command in text
        assert (ROOT / command.split()[1]).is_file()
