"""The README's recipes, run by the tests: a recipe is the ```python block that follows a line
``<!-- recipe: NAME -->`` in README.md."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def recipe(name: str) -> str:
    text = README.read_text()
    marker = f"<!-- recipe: {name} -->\n```python\n"
    if marker not in text:
        raise LookupError(f"README.md has no block marked '<!-- recipe: {name} -->'")
    start = text.index(marker) + len(marker)
    return text[start:text.index("```", start)]


def run_recipe(name: str, namespace: dict) -> dict:
    """Execute the recipe in ``namespace`` (the names it uses but does not define, such as the
    user's ``model``); returns the namespace with what the recipe defined."""
    exec(compile(recipe(name), f"README.md <{name}>", "exec"), namespace)
    return namespace
