"""Markdown tables as the tests read them: the tables compare.py and benchmark.py print, and the docs' tables.
(Named md_tables, not markdown: tests/ is on sys.path and TensorBoard imports the `markdown` package.)"""


def cells(line: str) -> list[str]:
    """'| a | b |' -> ['a', 'b']."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def is_rule(line: str) -> bool:
    """The line under a header: '|---|:--:|'."""
    return set(line.strip()) <= set("|-: ") and "-" in line


def rows(text: str) -> list[list[str]]:
    """Every table line of text split into cells, header rules dropped (a header stays the first row)."""
    return [cells(line) for line in text.splitlines() if line.startswith("|") and not is_rule(line)]


def table(lines: list[str], header_start: str = "|") -> tuple[list[str], list[list[str]]]:
    """The first table whose header line starts with header_start: its header cells and its body rows."""
    start = next((i for i, line in enumerate(lines) if line.startswith(header_start)), None)
    assert start is not None, f"no table whose header starts with {header_start!r}"
    assert is_rule(lines[start + 1]), f"no header rule under {lines[start]!r}"
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(cells(line))
    return cells(lines[start]), body
