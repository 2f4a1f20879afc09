"""Configuration models: one frozen pydantic model per step (docs/architecture.md).

Every model here is validated before any heavy work starts. ``parse`` turns pydantic's
errors into one :class:`E3PruneError` whose message names each bad field and what is allowed.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from e3prune.errors import E3PruneError

C = TypeVar("C", bound="StepConfig")


class StepConfig(BaseModel):
    """Base of every step's configuration: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def parse(cls: type[C], data: dict[str, Any] | None = None, /, **kwargs: Any) -> C:
        """Validate ``data`` (and keyword overrides), raising :class:`E3PruneError` on bad input."""
        merged = {**(data or {}), **kwargs}
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise config_error(exc) from None


def config_error(exc: ValidationError) -> E3PruneError:
    """One error whose message lists every bad field with what was wrong and what is allowed."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting; check the spelling against the configuration table in the README"
        problems.append((field, f"{msg} (got {err.get('input')!r})"))
    if len(problems) == 1:
        field, msg = problems[0]
        return E3PruneError(msg, field=field)
    lines = "; ".join(f"{f}: {m}" for f, m in problems)
    return E3PruneError(f"{len(problems)} invalid settings: {lines}", field=problems[0][0])
