"""Status plumbing shared by both resources: conditions, merge patches, events to post."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubedistill.api.conditions import ConditionStatus
from kubedistill.api.v1alpha1 import Condition

NORMAL = "Normal"
WARNING = "Warning"
MESSAGE_LIMIT = 1024  # event and condition messages people read in `kubectl describe`


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the reconciled resource."""

    type: str  # Normal or Warning
    reason: str
    message: str


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """One line, at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def condition(type_: str, status: bool, reason: str, message: str, now: str, generation: int | None) -> Condition:
    return Condition(
        type=type_,
        status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
        reason=reason,
        message=clip(message),
        last_transition_time=now,
        observed_generation=generation,
    )


def apply_conditions(old: list[Condition], new: list[Condition]) -> list[Condition]:
    """``old`` with each of ``new`` set (lastTransitionTime kept where status did not flip)."""
    result = list(old)
    for item in new:
        result = set_condition(result, item)
    return result


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (None when they are equal).

    Keys gone from ``new`` become ``null``; lists are replaced whole, as merge patches do.
    """
    old = old or {}
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub is not None:
                patch[key] = sub
        elif before != value or key not in old:
            patch[key] = value
    return patch or None


# --------------------------------------------------------------------------- conditions


def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    """True when the condition exists with status True."""
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == ConditionStatus.TRUE


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """A new list with ``new`` in place of the condition of its type.

    ``lastTransitionTime`` is kept from the old condition unless ``status``
    flips, so that writing the same condition twice changes nothing. Order is
    kept; a new type is appended.
    """
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result
