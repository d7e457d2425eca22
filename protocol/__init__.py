"""Wire protocol v1 shared by agents and HQ: clocks, changes, sealed batches, identities, merge rules.

This package imports neither `agent` nor `hq_server`; both import it. See docs/protocol.md.
"""
