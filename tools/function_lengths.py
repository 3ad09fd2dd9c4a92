#!/usr/bin/env python3
"""The longest functions of a package, in code lines (blank lines, comments and docstrings left out).

    python tools/function_lengths.py [PKG_DIR] [--top N] [--max LINES]

Prints ``lines  file:line  name`` for the ``N`` longest functions (default 15).  With ``--max``, exits
1 when a function is longer than ``LINES`` without a ``# long:`` comment (on its ``def`` line or the
line above it) saying why it stays in one piece.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

LONG_MARK = "# long:"


@dataclass(frozen=True)
class FunctionLength:
    lines: int
    path: Path
    lineno: int
    name: str
    justified: bool

    def __str__(self) -> str:
        why = "  (justified)" if self.justified else ""
        return f"{self.lines:5d}  {self.path}:{self.lineno}  {self.name}{why}"


def code_lines(fn: ast.AST, source: list[str]) -> int:
    """Lines of ``fn`` that hold code: not blank, not a comment, not part of its docstring."""
    body = fn.body
    skip: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    first = min([fn.lineno] + [d.lineno for d in getattr(fn, "decorator_list", [])])
    count = 0
    for no in range(first, fn.end_lineno + 1):
        text = source[no - 1].strip()
        if text and not text.startswith("#") and no not in skip:
            count += 1
    return count


def function_lengths(root: Path) -> list[FunctionLength]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        source = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                around = source[node.lineno - 2: node.lineno] if node.lineno > 1 else source[:1]
                justified = any(LONG_MARK in line for line in around)
                out.append(FunctionLength(code_lines(node, source), path, node.lineno, node.name, justified))
    return sorted(out, key=lambda f: (-f.lines, str(f.path), f.lineno))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1] / "smcp_core"))
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--max", type=int, default=None)
    args = ap.parse_args(argv)
    root = Path(args.root)
    lengths = function_lengths(root)
    for f in lengths[: args.top]:
        print(f)
    if args.max is not None:
        bad = [f for f in lengths if f.lines > args.max and not f.justified]
        for f in bad:
            print(f"too long (> {args.max} code lines, no '{LONG_MARK}' comment): {f.path}:{f.lineno} {f.name}",
                  file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
