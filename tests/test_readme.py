"""The README's Python examples run as written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_make_run_and_make_test():
    first_block = re.search(r"```\n(.*?)```", README.read_text(), re.S).group(1)
    assert first_block.split("\n")[:2] == ["make run", "make test"]


def test_readme_python_examples_run(capsys):
    shutil.rmtree("/tmp/jaxagent-readme", ignore_errors=True)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}  # one session, as a reader pasting the blocks in order would have
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(2, 5, 256)" in printed
    assert "apis.messages.send(to='Alice')" in printed
    assert Path("/tmp/jaxagent-readme/export/model.safetensors").is_file()
