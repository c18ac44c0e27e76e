"""`--backend ray`: whether what listens at launcher.ray_address speaks gRPC (as a Ray GCS does), checked with a
bounded wait before ray.init.

ray_cluster.py's TCP probe (gcs_probe) only sees that something accepts connections. A port whose listener never
answers (a stuck head, a firewall or proxy that accepts and holds connections, another service's port that
waits for the client to speak first) passes it, and ray.init then retries its GCS client for many minutes
(each try waits ~40 s for a cluster id, 20 tries), deaf to Ctrl-C while inside Ray's C++ wait. A GCS is a gRPC
server: given the HTTP/2 client preface it answers with its SETTINGS frame at once. No answer within
ANSWER_TIMEOUT_S, or another answer, is an error naming the address and the field.
"""

from __future__ import annotations

import os
import socket
import time

from pdlaunch.errors import PdlaunchError

FIELD = "launcher.ray_address"  # the setting every Ray connection error names

ANSWER_TIMEOUT_S = 10.0  # a live GCS answers within milliseconds; a loaded head within seconds
# RFC 9113 3.4: the client preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
FRAME_HEADER = 9
SETTINGS = 4


def _tls() -> bool:
    """Ray's GCS speaks TLS under RAY_USE_TLS: the plain preface would not be answered; left to Ray then."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true")


def _first_frame(sock: socket.socket, deadline: float) -> bytes:
    """Up to FRAME_HEADER bytes of the server's answer; fewer when it closed the connection first."""
    got = b""
    while len(got) < FRAME_HEADER:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(FRAME_HEADER - len(got))
        if not chunk:
            break
        got += chunk
    return got


def check_gcs_answers(address: str, host: str, port: int) -> None:
    """PdlaunchError (field launcher.ray_address) unless the server at `address` (its HOST and PORT already checked)
    answers the HTTP/2 preface with a SETTINGS frame within ANSWER_TIMEOUT_S."""
    if _tls():
        return
    timeout_s = ANSWER_TIMEOUT_S
    hint = ("give the head's GCS port (`ray start --head` prints it, 6379 unless --port changed it), not another "
            "service's; if it is the GCS, the head is stuck or overloaded: `ray status --address "
            f"{address}` there, or restart it with `ray stop; ray start --head`")
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(PREFACE)
            answer = _first_frame(sock, deadline)
    except TimeoutError:
        raise PdlaunchError(f"something accepts TCP connections at {address} but did not answer as a Ray GCS "
                            f"(gRPC) within {timeout_s:.0f}s", field=FIELD, hint=hint) from None
    except OSError as exc:
        raise PdlaunchError(f"the connection to {address} failed before it answered as a Ray GCS "
                            f"({exc.strerror or type(exc).__name__})", field=FIELD, hint=hint) from None
    if len(answer) < FRAME_HEADER or answer[3] != SETTINGS:
        raise PdlaunchError(f"what listens at {address} is not a Ray GCS: it answered the gRPC greeting with "
                            f"{answer[:FRAME_HEADER]!r}", field=FIELD, hint=hint)
