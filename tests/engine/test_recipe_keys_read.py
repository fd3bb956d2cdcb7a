"""Every recipe key is read by the engine: a field defined in the schema (engine/config.py) that no code
under engine/ reads as an attribute (`.field`) is a key that validates and then does nothing.

A field read only by a tool outside engine/ (e.g. a planner in launch/) says so where it is defined:
`Field(..., json_schema_extra={"read_by": "launch/plan.py"})`; the test then looks for the read there.
"""
import re
import typing

from pydantic import BaseModel

from rlhf_engine.config import Recipe
from helpers import REPO

ENGINE = REPO / "engine"


def _sections(cls: type[BaseModel], seen: dict) -> dict:
    """{section class: None} for the Recipe and every section class reachable from its fields."""
    if cls in seen:
        return seen
    seen[cls] = None
    for field in cls.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                _sections(ann, seen)
            stack.extend(typing.get_args(ann))
    return seen


def _source(paths) -> str:
    return "\n".join(p.read_text() for p in paths)


def test_every_recipe_field_is_read():
    engine_code = _source(p for p in ENGINE.rglob("*.py") if p.name != "config.py")
    # config.py's validators only check values; its derived batch sizes use them
    config = (ENGINE / "config.py").read_text()
    engine_code += config[config.index("def derive_batch_sizes"):config.index("class RecipeError")]
    unread = []
    for section in _sections(Recipe, {}):
        for name, field in section.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            code = _source([REPO / extra["read_by"]]) if "read_by" in extra else engine_code
            if not re.search(rf"\.{name}\b(?!\s*\()", code):  # an attribute read, not a method call
                unread.append(f"{section.__name__}.{name}")
    assert not unread, f"recipe fields never read by the engine: {unread}"
