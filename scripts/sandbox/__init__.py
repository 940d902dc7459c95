"""The sandbox: real Ubuntu and Debian systemd hosts under systemd-nspawn (docs/sandbox.md).

lab: everything the `scripts/sandbox/sandbox` command does (root filesystems, namespaces, the ACME CA, the
egress proxy, the relay) and the names it gives them; relay.py: the loopback relay, run as its own process.
"""
