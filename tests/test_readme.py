"""The README stays true: its Python example runs, and its commands name real files."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_name_existing_files():
    text = README.read_text()
    root = README.parent
    for path in re.findall(r"(?<![\w./])((?:examples|scripts|docs|benchmarks)/[\w./-]+\.(?:py|md))", text):
        assert (root / path).exists(), f"README names {path}, which does not exist"
    assert "make lab" in text and "make test" in text
