"""Example mapping hooks: Python for what a declarative mapping cannot say.

A hook is named in a mapping as `hook = "hq_server.routing.hooks_example:age_at_registration"`,
imported when the mapping is compiled, and called once per output scope as
`function(record, context)`:

- `record` is a private copy of the source record (changing it affects nothing else);
- `context` holds the scope's variables (`_key`, `_index`, fan-out variables), `_mapping` (the
  mapping's name) and `_payload` (the declarative fields already computed for this output).

It returns a dict, laid over the declarative payload (same-named fields replaced in place, new
fields appended), or a list of dicts, one output each (an empty list drops the record). Anything it
raises turns into a MappingError and the record goes to the dead-letter queue, so raise with a
message an operator can act on, and never put personal data in it.

Hooks must be pure functions of their arguments: the router may map the same change again (on retry
or resubmission from the dead-letter queue) and relies on getting the same outputs.
"""

from __future__ import annotations

from datetime import date
from typing import Any

AGE_BANDS: tuple[tuple[int, str], ...] = ((5, "0-4"), (18, "5-17"), (60, "18-59"))
OLDEST_BAND = "60+"


def _date(record: dict[str, Any], field: str) -> date | None:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be an ISO date (YYYY-MM-DD), got a {type(value).__name__}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{field} is not an ISO date (YYYY-MM-DD)") from None


def age_at_registration(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Age in whole years on the registration date, and the reporting age band.

    Date arithmetic is beyond the declarative form. The age is taken at registration, not today,
    so mapping the same record again next year gives the same output (the router relies on that).
    Either date missing gives nulls; a malformed date or a birth after registration is an error.
    """
    born = _date(record, "birth_date")
    registered = _date(record, "registration_date")
    if born is None or registered is None:
        return {"age_at_registration": None, "age_band": None}
    if born > registered:
        raise ValueError("birth_date is after registration_date")
    years = (
        registered.year - born.year - ((registered.month, registered.day) < (born.month, born.day))
    )
    band = next((label for limit, label in AGE_BANDS if years < limit), OLDEST_BAND)
    return {"age_at_registration": years, "age_band": band}


def household_members(record: dict[str, Any], context: dict[str, Any]) -> list[dict[str, Any]]:
    """One CRM contact per household member (the list form: one output per dict).

    Use with a target key that tells the outputs apart, e.g. `target_key = "{_key}-{_part}"`.
    Members without a name are skipped: the CRM refuses nameless contacts.
    """
    members = record.get("members") or []
    if not isinstance(members, list):
        raise ValueError(f"members must be a list, got a {type(members).__name__}")
    household = context.get("_key")
    out: list[dict[str, Any]] = []
    for member in members:
        if isinstance(member, dict) and isinstance(member.get("name"), str) and member["name"]:
            out.append(
                {
                    "household_id": household,
                    "full_name": member["name"],
                    "relation": member.get("relation"),
                }
            )
    return out
