#!/usr/bin/env python3
"""TCP relay between network namespaces.

Each rule listens on an address in one network namespace and forwards every
connection to an address in another. A socket keeps the namespace it was created
in, so the relay creates each socket after setns() into the namespace it belongs
to and returns to its own namespace at once: one process joins the host's
loopback and the sandbox's lab bridge without any interface crossing between them.

Rule syntax: LISTEN_NS,LISTEN_ADDR,LISTEN_PORT,CONNECT_NS,CONNECT_ADDR,CONNECT_PORT
where a namespace is "self" (the relay's own) or the path of a namespace file
(for example /run/netns/mlapi-lab).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
# The relay sits in every benchmark request's path: no Nagle delay, and room for a few reads in flight
# before back-pressure stops reading from the other side (the kernel sizes the socket buffers itself).
HIGH_WATER = 4 << 20

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Rule:
    listen_ns: str
    listen_addr: str
    listen_port: int
    connect_ns: str
    connect_addr: str
    connect_port: int

    @classmethod
    def parse(cls, text: str) -> Rule:
        parts = text.split(",")
        if len(parts) != 6:
            raise argparse.ArgumentTypeError(
                f"rule {text!r}: expected LISTEN_NS,LISTEN_ADDR,LISTEN_PORT,CONNECT_NS,CONNECT_ADDR,CONNECT_PORT"
            )
        try:
            return cls(parts[0], parts[1], int(parts[2]), parts[3], parts[4], int(parts[5]))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"rule {text!r}: ports must be integers") from exc


class Namespaces:
    """Open namespace files, so that switching costs two syscalls and no path lookup."""

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._fds: dict[str, int] = {}

    def fd(self, ns: str) -> int:
        if ns == "self":
            return self._own
        if ns not in self._fds:
            self._fds[ns] = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
        return self._fds[ns]

    def socket_in(self, ns: str) -> socket.socket:
        """A TCP socket created inside namespace ns (the caller's thread returns to its own)."""
        if ns == "self":
            return _tcp_socket()
        _setns(self.fd(ns))
        try:
            return _tcp_socket()
        finally:
            _setns(self._own)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _tcp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to its peer, with back-pressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.eof = False
        self._pending: list[bytes] = []
        self._pending_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def attach(self, peer: Half) -> None:
        self.peer = peer
        for chunk in self._pending:
            peer.transport.write(chunk)
        self._pending.clear()
        if self._pending_eof:
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self._pending.append(data)
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is None or self.peer.transport is None:
            self._pending_eof = True
            return True
        self.eof = True
        if self.peer.transport.can_write_eof() and not self.peer.transport.is_closing():
            self.peer.transport.write_eof()
        if self.peer.eof:
            self.transport.close()
            self.peer.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # The peer's transport calls these on our protocol when its buffer fills or drains.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Listener:
    def __init__(self, rule: Rule, namespaces: Namespaces) -> None:
        self.rule = rule
        self.namespaces = namespaces

    def bind(self) -> socket.socket:
        sock = self.namespaces.socket_in(self.rule.listen_ns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.rule.listen_addr, self.rule.listen_port))
        except OSError as exc:
            sock.close()
            address = f"{self.rule.listen_addr}:{self.rule.listen_port}"
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def protocol(self) -> Half:
        client = Half()
        asyncio.get_running_loop().create_task(self._connect(client))
        return client

    async def _connect(self, client: Half) -> None:
        loop = asyncio.get_running_loop()
        sock = self.namespaces.socket_in(self.rule.connect_ns)
        sock.setblocking(False)
        # Give up on an unanswered SYN after about 7 s (1 + 2 + 4), as a client would on a dead host;
        # cheaper per connection than a timeout task.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 2)
        try:
            await loop.sock_connect(sock, (self.rule.connect_addr, self.rule.connect_port))
            _, upstream = await loop.create_connection(Half, sock=sock)
        except OSError:
            sock.close()
            if client.transport is not None:
                client.transport.abort()
            return
        if client.transport is None or client.transport.is_closing():
            upstream.transport.close()
            return
        upstream.attach(client)
        client.attach(upstream)


async def serve(rules: list[Rule], ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    namespaces = Namespaces()
    listeners = [Listener(rule, namespaces) for rule in rules]
    sockets = [listener.bind() for listener in listeners]
    servers = [
        await loop.create_server(listener.protocol, sock=sock)
        for listener, sock in zip(listeners, sockets, strict=True)
    ]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready_file:
        # Written only once every listener is bound, so the caller can wait on it.
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, ready_file)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready-file", help="write the PID here once every rule listens")
    parser.add_argument("rules", nargs="+", type=Rule.parse, metavar="RULE")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.rules, args.ready_file))
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
