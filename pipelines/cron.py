"""Cron schedules in the form Kubeflow Pipelines runs them (``e3prune schedule``).

KFP validates and runs cron schedules with github.com/robfig/cron v1.2 (``cron.Parse``): six
fields, seconds first; a five-field spec is *also* accepted there, but read as seconds-first
with the day of week left out, so the usual "0 3 * * *" would run at minute 3 of every hour.
Hence the conversion here. Its descriptors are @yearly, @annually, @monthly, @weekly, @daily,
@midnight, @hourly and "@every <Go duration>". Times are the scheduled-workflow controller's
(UTC unless the cluster set CRON_SCHEDULE_TIMEZONE). docs/operations.md ("Submitting and
scheduling") documents the accepted forms for operators.

:func:`cron_six_fields` is the public entry point; :func:`kfp_cron` is the same conversion
raising :class:`ValueError`, for pydantic validators.
"""

from __future__ import annotations

import re

from e3prune.errors import E3PruneError

__all__ = ["MACROS", "cron_six_fields", "kfp_cron"]

_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names) in KFP's order.
_CRON_FIELDS = (
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CRON_FORMS = (
    "give five fields 'minute hour day-of-month month day-of-week' (e.g. '0 3 * * *'), six with "
    "seconds first as KFP takes them (e.g. '0 0 3 * * *'), or a macro: " + ", ".join(MACROS) + ", '@every 6h'"
)


def cron_six_fields(expr: str) -> str:
    """KFP's six-field cron (seconds first) for ``expr``; raises :class:`E3PruneError` on ``cron``.

    Five fields ``m h dom mon dow`` get a leading ``0`` second; six fields are kept; the macros of
    robfig/cron (``@daily``, ``@every 1h30m``, …) are kept. Each field may hold numbers in its range,
    names (``JAN``–``DEC``, ``SUN``–``SAT``), ``*``, ``?`` (day of month / week), ranges ``a-b``,
    lists ``a,b`` and steps ``*/n``, ``a/n``, ``a-b/n``. Day of week is 0–6, 0 = Sunday (no 7).
    """
    try:
        return kfp_cron(expr)
    except ValueError as exc:
        raise E3PruneError(str(exc), field="cron") from None


def kfp_cron(expr: str) -> str:
    """:func:`cron_six_fields`, raising :class:`ValueError` whose message names the bad field."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"empty; {_CRON_FORMS}")
    fields = expr.split()
    if fields[0].startswith("@"):
        return _macro(fields)
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ValueError(f"{len(fields)} fields in {expr.strip()!r}; {_CRON_FORMS}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        _check_field(text, name, lo, hi, names)
    return " ".join(fields)


def _macro(fields: list[str]) -> str:
    if len(fields) == 1 and fields[0].lower() in MACROS:
        return fields[0].lower()
    if fields[0].lower() == "@every" and len(fields) == 2:
        text = fields[1]
        parts = _GO_DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"'@every' takes a Go duration such as 30m, 6h or 1h30m, got {text!r}")
        seconds = sum(float(n) * _GO_UNIT_SECONDS[u] for n, u in parts)
        if seconds < 1:
            raise ValueError(f"'@every {text}' is under KFP's 1-second resolution; give at least 1s")
        return f"@every {text}"
    raise ValueError(f"unknown macro {' '.join(fields)!r}; {_CRON_FORMS}")


def _allowed(name: str, lo: int, hi: int, names: dict[str, int] | None) -> str:
    """The values a field takes, as its error messages state them."""
    allowed = f"{lo}-{hi}"
    if names:
        allowed += f" or {min(names, key=names.get).upper()}-{max(names, key=names.get).upper()}"
    if name == "day of week":
        allowed += ", 0 = Sunday (no 7)"
    return allowed


def _value(token: str, text: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> int:
    """The number of one token (a number or a name) of the field ``text``, checked against its range."""
    where = "" if token == text else f" in {text!r}"
    if names and token.lower() in names:
        return names[token.lower()]
    if not token.isdigit():
        raise ValueError(f"{name}: {token!r}{where} is not a number {_allowed(name, lo, hi, names)}")
    number = int(token)
    if not lo <= number <= hi:
        raise ValueError(f"{name}: {number}{where} is out of range {_allowed(name, lo, hi, names)}")
    return number


def _check_field(text: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> None:
    """Raise a ValueError naming the field ``name`` when ``text`` is not a robfig/cron item list."""
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{name}: step {step!r} in {text!r} must be a positive whole number")
        if span in ("*", "?"):
            if span == "?" and name not in ("day of month", "day of week"):
                raise ValueError(f"{name}: '?' is only for day of month / day of week; use '*'")
            continue
        if not span:
            raise ValueError(
                f"{name}: empty item in {text!r}; items are *, ?, a number {_allowed(name, lo, hi, names)}, "
                "a range a-b, with an optional /step"
            )
        low, dash, high = span.partition("-")
        start = _value(low, text, name, lo, hi, names)
        if dash and _value(high, text, name, lo, hi, names) < start:
            raise ValueError(f"{name}: range {span!r} runs backwards; give low-high")
