"""The decode load strategies are siblings: none imports another (what they share is decode/context.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pdlaunch.kv_transfer.decode.load as load

STRATEGIES = {"pull", "push", "staged", "reshard_load"}


def test_no_decode_strategy_imports_another() -> None:
    folder = Path(load.__file__).parent
    found = []
    for name in sorted(STRATEGIES):
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                other = module.removeprefix("pdlaunch.kv_transfer.decode.")
                if other in STRATEGIES - {name}:
                    found.append(f"{name} imports {other}")
    assert found == []
