#!/usr/bin/env python
"""Module and function sizes in bertopt/ (the house limits: modules <= ~500 lines, functions <= ~80).
Prints every module over MODULE_LIMIT and every function over FUNCTION_LIMIT; exit 1 if any."""
import ast
import sys
from pathlib import Path

MODULE_LIMIT, FUNCTION_LIMIT = 500, 80
root = Path(__file__).resolve().parent.parent / "bertopt"
over = []
for path in sorted(root.rglob("*.py")):
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    rel = path.relative_to(root.parent)
    if lines > MODULE_LIMIT:
        over.append(f"module   {rel}: {lines} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > FUNCTION_LIMIT:
                over.append(f"function {rel}:{node.lineno} {node.name}: {n} lines")
biggest = max(((p.read_text(encoding="utf-8").count("\n"), str(p.relative_to(root.parent))) for p in root.rglob("*.py")))
print(f"largest module: {biggest[1]} ({biggest[0]} lines)")
print("\n".join(over) if over else f"no module over {MODULE_LIMIT} lines, no function over {FUNCTION_LIMIT} lines")
sys.exit(1 if over else 0)
