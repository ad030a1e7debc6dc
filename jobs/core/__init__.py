"""The contracts both sides of a job share: the spec, the plan, the shard task
and result, the output layout, row identity and schemas, prompts, storage I/O
and fault-injection points.

Imports neither the driver (the rest of `jobs`) nor the replica side
(`workers`), nor Ray nor torch; tests/test_imports.py keeps it so.
"""
