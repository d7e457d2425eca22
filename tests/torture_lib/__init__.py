"""The torture suite's parts (tests/torture.py runs them; tests/test_torture.py tests them).

history   what the workload asked for and what each agent answered (acknowledged, refused,
          indeterminate), with every write's unique id
checker   pure: history + HQ's change log and records + sink deliveries -> a verdict table
proxy     an asyncio TCP fault proxy between an agent and HQ
cluster   HQ and agents as real processes (CLIs, configs, tmpfs data folders, faketime)
receiver  a webhook receiver that records every delivery, repeats included
workload  writers that PUT, DELETE and bulk-post through the agents' local API
nemesis   the seeded per-cycle plan of faults, and the code that applies and heals them
hqstate   reads what HQ holds (SQLite, read-only) and what the files sink wrote
run       the command line: setup, cycles, heal, drain, check, figures
"""
