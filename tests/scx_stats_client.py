"""An scx_stats client written from the protocol's description, for the tests: one JSON object
a line each way on a UNIX socket, {"req": ..., "args": {...}} out, {"errno": ..., "args":
{"resp": ...}} back. Deliberately not tools/stats.StatsClient: the tests check the
server against the protocol, not against its own client."""

from __future__ import annotations

import json
import socket
from typing import Any

TIMEOUT_S = 120  # a broken server fails the test instead of hanging it; not a speed bound


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")

    def send(self, line: bytes) -> dict[str, Any]:
        """Send one line, return the answer (also when the server answered at connect and hung
        up, as it does past its client limit)."""
        try:
            self.sock.sendall(line + b"\n")
        except BrokenPipeError:
            pass
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.f.readline()
        assert line.endswith(b"\n"), f"no answer line: {line!r}"
        return json.loads(line)

    def request(self, req: str, **args: str) -> dict[str, Any]:
        return self.send(json.dumps({"req": req, "args": args}).encode())

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1 << 16) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.f.close()
        self.sock.close()
