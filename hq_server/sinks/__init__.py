"""Sinks: where routed changes go (webhook, REST API, PostgreSQL, RabbitMQ, files).

Every sink implements `hq_server.sinks.base.Sink` and registers itself with `register_sink`; the
router knows nothing else about them. Built-in sinks register exactly like third-party ones.
"""
