"""The direct connection that carries frames between the host and a worker actor, past Ray.

Ray places the worker actors, supervises them and serves their logs; the
frames themselves go over one TCP connection per actor, opened on the node's
address, so that a batch of frames costs a socket write instead of a Ray task.
Each end proves it holds the key the host made for that actor, with the
standard library's HMAC challenge (`multiprocessing.connection`), before a
frame passes. The key travels to the actor as an argument of its constructor,
so over Ray's own channel. After the handshake the socket is a plain,
non-blocking byte stream of the same length-prefixed frames a pipe carries,
read and written with the same code.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

__all__ = ["HANDSHAKE_TIMEOUT", "accept", "connect", "listen"]

HANDSHAKE_TIMEOUT = 10.0


def listen(address: str) -> socket.socket:
    """A listening socket on `address`, on a port the kernel picks."""
    listener = socket.create_server((address, 0))
    listener.setblocking(False)
    return listener


async def accept(listener: socket.socket, authkey: bytes) -> int:
    """The fd of the first connection that proves it holds `authkey`; others are closed and ignored."""
    loop = asyncio.get_running_loop()
    while True:
        sock, _ = await loop.sock_accept(listener)
        try:
            return await asyncio.to_thread(_authenticate, sock, authkey, True)
        except Exception:
            sock.close()


def connect(address: str, port: int, authkey: bytes) -> int:
    """Connect and authenticate (blocking: run it in a thread); the fd, non-blocking, or an error."""
    sock = socket.create_connection((address, port), timeout=HANDSHAKE_TIMEOUT)
    try:
        return _authenticate(sock, authkey, False)
    except BaseException:
        sock.close()
        raise


def _authenticate(sock: socket.socket, authkey: bytes, server: bool) -> int:
    # Blocking reads and writes with a time limit, which `Connection` (plain
    # os.read and os.write on the fd) honours as an error.
    sock.setblocking(True)
    limit = struct.pack("ll", int(HANDSHAKE_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    # Frames are small and each batch is written at once: waiting to fill a segment only adds latency.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn: Connection[bytes, bytes] = Connection(os.dup(sock.fileno()))
    try:
        if server:
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
        else:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
    finally:
        conn.close()
    none = struct.pack("ll", 0, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, none)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, none)
    sock.setblocking(False)
    return sock.detach()
