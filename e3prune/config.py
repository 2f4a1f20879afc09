"""Configuration models: one frozen pydantic model per step (docs/architecture.md).

Every model here is validated before any heavy work starts. ``parse`` turns pydantic's
errors into one :class:`E3PruneError` whose message names each bad field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from e3prune.errors import E3PruneError

C = TypeVar("C", bound="StepConfig")


@dataclass(frozen=True)
class PipelineParameter:
    """Marks a step-config field as a parameter of the Kubeflow pipeline (``Annotated[int, PipelineParameter()]``).

    The field's type, default, range and description are the parameter's: ``RunConfig``, the
    pipeline's signature, ``e3prune run``'s flags and the docs are derived from the field, so a
    parameter is declared once (docs/architecture.md). ``name`` is the pipeline's name for it when
    the field's own name is ambiguous across steps (``batch_size`` → ``search_batch_size``).
    """

    name: str | None = None


def open_unit_interval(value: float) -> float:
    """A fraction strictly between 0 and 1 (``Annotated[float, AfterValidator(open_unit_interval)]``)."""
    if not 0 < value < 1:
        raise ValueError(f"must be in (0, 1), got {value}")
    return value


def pipeline_parameters(cls: type[BaseModel]) -> dict[str, tuple[str, FieldInfo]]:
    """The pipeline parameters a config class declares: pipeline name → (field name, field)."""
    out: dict[str, tuple[str, FieldInfo]] = {}
    for field_name, info in cls.model_fields.items():
        for marker in info.metadata:
            if isinstance(marker, PipelineParameter):
                out[marker.name or field_name] = (field_name, info)
    return out


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
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting; check the spelling against the configuration table in the README"
        if "got " not in msg:  # a validator that says what it got is not repeated
            msg = f"{msg} (got {err.get('input')!r})"
        problems.append((field, msg))
    if len(problems) == 1:
        field, msg = problems[0]
        return E3PruneError(msg, field=field)
    lines = "; ".join(f"{f}: {m}" for f, m in problems)
    return E3PruneError(f"{len(problems)} invalid settings: {lines}", field=problems[0][0])
