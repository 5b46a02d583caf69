"""Copy generated tables into README.md: every block between ``<!-- from: PATH -->`` and ``<!-- end -->`` is
replaced by the current contents of PATH (a file under results/), so the README's figures are the files'.

    python scripts/evidence/readme_tables.py            (rewrites README.md in place, atomically)
    python scripts/evidence/readme_tables.py --check    (exit 1 if a block differs from its file)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from tdlrt_cli.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- from: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end -->)", re.S)


def refreshed(text: str) -> str:
    def body(m: re.Match) -> str:
        path = ROOT / m.group("path")
        if not path.is_file():
            sys.exit(f"readme_tables: {path} does not exist (generate it first; README.md left as it was)")
        content = path.read_text()
        return m.group(1) + content + ("" if content.endswith("\n") else "\n") + m.group(4)
    return BLOCK.sub(body, text)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = refreshed(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else "README.md: a generated table differs from its file (run this script)")
    atomic_write_text(readme, new)


if __name__ == "__main__":
    main()
