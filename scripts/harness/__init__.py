"""The harness the tests and the benchmarks share: the kit's processes (gunicorn, Redis, NGINX rendered by its
role), free ports and waits, sample rows, the sandbox hosts and the playbook runs against them.

Nothing here is a test; tests/ and bench/ import it, it imports neither.
"""
