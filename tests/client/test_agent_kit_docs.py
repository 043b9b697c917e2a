"""docs/agent-kit.md's examples are what people copy: every Python block must
compile, and every name it imports from badgeclient (and the libraries the
kit plugs into) must exist, so a renamed class breaks this test, not a user."""

from __future__ import annotations

import ast
import importlib
import re

from tests.conftest import ROOT

DOC = ROOT / "docs" / "agent-kit.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_python_examples_compile_and_their_imports_exist() -> None:
    blocks = _blocks()
    assert len(blocks) >= 7
    checked = 0
    for i, code in enumerate(blocks):
        tree = ast.parse(code, filename=f"agent-kit.md block {i}")
        compile(tree, f"agent-kit.md block {i}", "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(mod, alias.name), f"{node.module}.{alias.name} (block {i})"
                    checked += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
    assert checked >= 15
