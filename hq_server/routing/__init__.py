"""Routing HQ's change log onward: routes, mappings, the router and its dead-letter queue."""
