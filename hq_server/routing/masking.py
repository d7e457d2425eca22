"""The router's own mask of a route's secrets: what it applies to every error text it keeps.

Sinks mask what they produce (`hq_server.sinks.secrets.SecretMask`); the router masks again with
the secrets the route's configuration names, so one sink forgetting a form cannot leak it into the
log, `last_error` or the dead-letter queue.
"""

from __future__ import annotations

import dataclasses

from hq_server.routing.config import Route
from hq_server.sinks.secrets import SecretError, SecretMask, resolve_secret


def configured_mask(route: Route) -> SecretMask:
    """A mask of every secret the route's sink settings name (each `X_env`/`X_file` pair that
    resolves), with its HTTP Basic form for the settings' `client_id` or `user`. Independent of
    what the sink itself masks, so a sink that forgets one does not leak it through the router."""
    mask = SecretMask()
    settings = route.sink_settings
    if not dataclasses.is_dataclass(settings):
        return mask
    names = {f.name for f in dataclasses.fields(settings)}
    user = getattr(settings, "client_id", None) or getattr(settings, "user", None)
    for name in sorted(names):
        base = name.removesuffix("_env")
        if base == name or f"{base}_file" not in names:
            continue
        try:
            secret = resolve_secret(
                name, getattr(settings, name), getattr(settings, f"{base}_file")
            )
        except SecretError:
            continue  # the sink reports it; nothing to mask
        mask.add(secret, user=user if isinstance(user, str) else None)
    return mask
