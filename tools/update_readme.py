"""Regenerate the generated sections of README.md (and docs/kernel_report.md).

    python tools/update_readme.py            # rewrite README.md's coverage table
    python tools/update_readme.py --check    # exit 1 if README.md is out of date
    python tools/update_readme.py --kernel-report   # also rewrite docs/kernel_report.md (AOT compiles, ~1 min)

The coverage table comes from ``mmkernels.supported_models()``, i.e. from the patch
specs themselves, so it cannot drift from what ``mmkernels.patch`` does. The generic merge
rule's tables after it are read from the installed transformers and name its version;
``--check`` under another version checks the rules' table only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"(<!-- coverage:start -->\n)(.*?)(<!-- coverage:end -->)", re.S)


def coverage_table() -> str:
    sys.path.insert(0, str(ROOT))
    import mmkernels

    return mmkernels.supported_models().strip() + "\n"


_GENERIC = re.compile(r"Merged by the generic rule on transformers (\S+) ")


def _generic_version(text: str) -> str | None:
    found = _GENERIC.search(text)
    return found.group(1) if found else None


def _rules_part(text: str) -> str:
    """The README without the generic rule's tables (up to the coverage end marker)."""
    found = _GENERIC.search(text)
    if not found:
        return text
    end = text.index("<!-- coverage:end -->")
    return text[: found.start()] + text[end:]


def render(text: str, table: str) -> str:
    if not MARKER.search(text):
        raise SystemExit("README.md: the <!-- coverage:start --> / <!-- coverage:end --> markers are missing")
    return MARKER.sub(lambda m: m.group(1) + table + m.group(3), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    parser.add_argument("--kernel-report", action="store_true", help="also regenerate docs/kernel_report.md")
    args = parser.parse_args(argv)

    text = README.read_text()
    new = render(text, coverage_table())
    if args.check:
        if new != text and _generic_version(text) != _generic_version(new):
            # The generic rule's tables are read from the installed transformers: under
            # another version only the rules' table must match (a new transformers release
            # is no stale README; regenerating there would record that version).
            print(f"README.md's generic-rule tables are for transformers {_generic_version(text)}, "
                  f"this is {_generic_version(new)}: checking the rules' table only", file=sys.stderr)
            text, new = _rules_part(text), _rules_part(new)
        if new != text:
            print("README.md is out of date: run `python tools/update_readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    if args.kernel_report:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "kernel_report.py"), "--markdown", str(ROOT / "docs" / "kernel_report.md")],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
