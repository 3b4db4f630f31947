"""Adding a model family needs a spec file and no Python: no family name may appear in the
code (identifiers, attributes, string literals), only in docstrings and --help examples."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FAMILIES = re.compile(r"llama|mistral|qwen|mixtral|deepseek|gpt.?2|gpt.?neox|pythia|falcon|gemma|phi",
                      re.IGNORECASE)
HELP_KWARGS = {"help", "description", "epilog"}
HELP_NAMES = {"EXAMPLES", "HELP"}


def code_words(tree: ast.AST):
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in HELP_KWARGS:
            skip.update(id(n) for n in ast.walk(node.value))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in HELP_NAMES
                                                for t in node.targets):
            skip.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in skip:
            yield node.lineno, node.value


SOURCES = sorted(p for d in ("mapc", "grammar", "compiler", "runtime")
                 for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_model_family_in_python(path):
    hits = [(line, word) for line, word in code_words(ast.parse(path.read_text()))
            if FAMILIES.search(word)]
    assert not hits, f"{path.relative_to(ROOT)} names a model family: {hits[:3]}"


def test_the_check_would_catch_one():
    tree = ast.parse('def f(cfg):\n    """llama is fine here"""\n'
                     '    return cfg["model_type"] == "llama"\n')
    assert [w for _, w in code_words(tree) if FAMILIES.search(w)] == ["llama"]
