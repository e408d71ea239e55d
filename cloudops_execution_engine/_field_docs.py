"""Field descriptions for the JSON Schema, read from the models' attribute docstrings.

A field is documented where it is declared, by the string literal under it.
Pydantic can read those when each model class is built
(`use_attribute_docstrings`), but that parses every model's source at import;
here they are read only when a schema is asked for, and remembered.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache
from itertools import pairwise
from typing import Any

__all__ = ["add_field_descriptions", "field_docstrings"]


def _unwrapped(doc: str) -> str:
    """Lines wrapped for the source's width joined again; paragraphs stay apart."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


@cache
def field_docstrings(cls: type) -> dict[str, str]:
    """`{field: docstring}` for the attribute docstrings in `cls`'s own body, and its bases'."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass.__module__.startswith("pydantic"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source: a frozen or built-in class
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for statement, after in pairwise(body):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[statement.target.id] = _unwrapped(inspect.cleandoc(after.value.value))
    return found


def add_field_descriptions(cls: type, schema: dict[str, Any]) -> None:
    """Give each property of `schema` (the JSON Schema of model `cls`) its docstring, unless it has one."""
    docs = field_docstrings(cls)
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop and name in docs:
            prop["description"] = docs[name]
