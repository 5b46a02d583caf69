"""Copy generated tables into README.md and docs/*.md: in each of these pages every block between
``<!-- from: PATH -->`` and ``<!-- end -->`` is replaced by the current contents of PATH (a file under results/,
relative to the repository root whichever page holds the block), so the pages' figures are the files'.

    python scripts/evidence/readme_tables.py            (rewrites each page whose blocks changed, atomically)
    python scripts/evidence/readme_tables.py --check    (exit 1, naming the page, if a block differs from its file)

A missing PATH stops the script before any page is written.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from tdlrt_cli.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- from: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end -->)", re.S)


def pages() -> list[Path]:
    """README.md, then every docs/*.md in name order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def refreshed(text: str, page: str = "README.md") -> str:
    def body(m: re.Match) -> str:
        path = ROOT / m.group("path")
        if not path.is_file():
            sys.exit(f"readme_tables: {path} does not exist (generate it first; {page} and the other pages "
                     f"left as they were)")
        content = path.read_text()
        return m.group(1) + content + ("" if content.endswith("\n") else "\n") + m.group(4)
    return BLOCK.sub(body, text)


def main() -> None:
    changed = []
    for page in pages():
        name = page.relative_to(ROOT).as_posix()
        text = page.read_text()
        new = refreshed(text, name)
        if new != text:
            changed.append((page, name, new))
    if "--check" in sys.argv:
        sys.exit(0 if not changed else "; ".join(f"{name}: a generated table differs from its file"
                                                 for _, name, _ in changed) + " (run this script)")
    for page, _, new in changed:
        atomic_write_text(page, new)


if __name__ == "__main__":
    main()
