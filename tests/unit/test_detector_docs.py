"""The first example of docs/ddos-detector.md runs and prints what the page says it prints."""

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "ddos-detector.md"


def test_first_example_prints_what_the_page_shows():
    text = DOC.read_text()
    code, shown = re.search(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", text, re.S).groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    assert out.getvalue() == shown
