"""Write docs/config.md, the recipe reference, from the schema's field descriptions (engine/config.py).

    python launch/gen_docs.py            # regenerate docs/config.md
    python launch/gen_docs.py --check    # exit 1 if docs/config.md is stale (tests/recipes/test_docs.py)

Every section of `Recipe` becomes a table (key, type, default, description), nested sections in
their own tables under their dotted path, in schema order.
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlhf_engine.config import Recipe

OUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = """# Recipe reference

Generated from the schema (`engine/config.py`) by `python launch/gen_docs.py`; do not edit by hand.
A recipe is YAML with these sections; unknown keys are errors. Override any key on the command line
with `--set section.key=value` (values are parsed as YAML). `rlhf-engine validate RECIPE` prints a
recipe with every default filled in.
"""


def _sections(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes inside a field's type (Optional[X], list[X], Union[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _sections(arg)]


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "rlhf_engine.config.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    return text.replace("Optional[", "optional[").replace("Literal", "one of ")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(section defaults)" \
            if _sections(field.annotation) else repr(field.default_factory())
    return "`" + ("null" if field.default is None else str(field.default).lower()
                  if isinstance(field.default, bool) else repr(field.default)) + "`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    parts, queue = [HEADER], [("", Recipe)]
    while queue:
        prefix, model = queue.pop(0)
        title = prefix or "top level"
        parts += [f"\n## {title}\n", (model.__doc__ or "").strip().splitlines()[0] + "\n" if model.__doc__ and
                  model is Recipe else "", "| key | type | default | description |", "|---|---|---|---|"]
        nested = []
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            subs = _sections(field.annotation)
            shown = f"[`{key}`](#{key.replace('.', '')})" if subs else f"`{key}`"
            parts.append(f"| {shown} | {_escape(_type_name(field.annotation))} | {_escape(_default(field))} | "
                         f"{_escape(field.description or '')} |")
            nested += [(key, sub) for sub in subs[:1]]
        queue = nested + queue  # depth first: a section's subsections right after it
    return "\n".join(p for p in parts if p is not None) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from the schema")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run `python launch/gen_docs.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
