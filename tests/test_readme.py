"""The README's table reference is generated from schema.py; keep them in sync."""

from __future__ import annotations

import re
from pathlib import Path

from nat4etl import schema

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_schema_block_matches_code():
    text = README.read_text()
    m = re.search(r"<!-- schema:begin[^\n]*-->\n(.*?)<!-- schema:end -->", text, re.S)
    assert m, "README lacks the schema block"
    assert m.group(1) == schema.markdown(), (
        "README table reference is stale: run `python -m nat4etl.schema` and paste it "
        "between the schema markers (or `make readme`)"
    )


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make run" in text
    assert "nat4etl build --area A1 --out ./nat4" in text


def test_every_module_is_on_the_readme_code_map():
    """A newcomer finds each module under "Where things are" (a new one must be added)."""
    text = README.read_text()
    section = text.split("### Where things are", 1)[1].split("### Commands", 1)[0]
    package = README.parent / "nat4etl"
    modules = {p.stem for p in package.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    missing = sorted(m for m in modules if f"`{m}`" not in section and f"`{m}.py`" not in section)
    assert not missing, f"README's code map lacks {missing}"
