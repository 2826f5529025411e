"""docs/failures.md cannot drift: its messages are in the code and its named tests check them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "failures.md"


def table_rows() -> list[tuple[str, list[str]]]:
    """``(command, cells)`` for every body row of the doc's tables."""
    rows, command = [], ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `imlnet (\w+)", line)
        if heading:
            command = heading.group(1)
        elif line.startswith("|") and not line.startswith(("|---", "| Input")):
            rows.append((command, [c.strip() for c in line.strip("|").split("|")]))
    return rows


def test_every_row_names_a_message_in_the_code_and_an_existing_test() -> None:
    rows = table_rows()
    commands = {command for command, _ in rows}
    assert {"tile", "index", "localize", "fit", "evaluate", "visualize"} <= commands
    code = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src").rglob("*.py"))
    code = re.sub(r"\"\s*\n\s*f?\"", "", code)  # join strings continued on the next line
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py"))
    missing = []
    for command, cells in rows:
        assert len(cells) == 4, (command, cells)
        _, _, message, test = cells
        body = re.search(
            rf"^def {re.escape(test)}\(.*?(?=^(?:def |class |@)|\Z)", tests, re.M | re.S
        )
        assert body, f"{command}: no test named {test}"
        if message != "—":
            excerpt = re.fullmatch(r"`(.+)`", message)
            assert excerpt, (command, message)
            text = excerpt.group(1)
            assert text in code, f"{command}: {text!r} is not in src/"
            # the named test looks for the message (literally or as a regular expression)
            if text not in body.group(0).replace("\\", ""):  # literal or a regex's escapes
                missing.append((command, test, text))
    assert not missing, "\n".join(map(str, missing))
    assert len(rows) >= 30
