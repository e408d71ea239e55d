"""The JSON Schemas `cloudops-exec schema` prints."""

from __future__ import annotations

from typing import Any

__all__ = ["json_schema"]


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a `request`, `plan`, `result` or `event`."""
    import pydantic

    from .events import ExecutionEvent
    from .requests import ExecutionPlan, ExecutionRequest
    from .results import ExecutionResult

    if kind == "event":
        return pydantic.TypeAdapter(ExecutionEvent).json_schema()
    models: dict[str, type[pydantic.BaseModel]] = {
        "request": ExecutionRequest,
        "plan": ExecutionPlan,
        "result": ExecutionResult,
    }
    return models[kind].model_json_schema()
