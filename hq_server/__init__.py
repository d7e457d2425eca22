"""fieldsync HQ server.

Data flow, one module per step::

    app.py      HTTP routes (protocol.transport), error mapping, request logs, runner (serve)
    ingest.py   sealed batch -> verify -> decode -> validate -> store.ingest -> signed ack
    feed.py     signed GET -> change-log page -> sealed FEED
    store.py    HQStore interface + SQLiteHQStore (nodes, tokens, records, change log, audit)
    config.py   [hq] settings;  keys.py  HQ's signing key;  logs.py  structured log events
    cli.py      `fieldsync-hq` (serve, nodes, token create, node revoke, records, audit)
"""
