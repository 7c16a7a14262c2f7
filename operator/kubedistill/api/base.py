"""Base model shared by every API and worker-contract model.

Kubernetes speaks camelCase; Python reads better in snake_case. Every model
accepts both (``populate_by_name``), serialises camelCase (``by_alias``) and
refuses unknown fields, so that a typo in a manifest or a worker config is an
error, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict a manifest or config file holds (unset optionals dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def describe_validation_error(err: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: 'spec.student.lora.rank: Input should be ...; ...'."""
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
