"""Slow or stalled clients cannot hold a connection for ever: a pause in the body or a body that takes
too long is a 408 and the connection closes; oversized headers are refused by the parser."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from svc_helpers import Proc, base_env, free_port, wait_http


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("timeouts")
    port = free_port()
    env = base_env(tmp / "data", tiny_checkpoint, UPT_PORT=port, UPT_BODY_IDLE_TIMEOUT_S=2, UPT_BODY_TIMEOUT_S=5,
                   UPT_MAX_HEADER_BYTES=8192, UPT_PRELOAD_BACKBONE="false")
    proc = Proc([sys.executable, "-m", "service", "serve", "--no-worker"], env, tmp / "api.log")
    wait_http(f"http://127.0.0.1:{port}", proc)
    yield port
    proc.stop()


def send(port: int, head: bytes, body_chunks=(), pause_s: float = 0.0, read_timeout: float = 20) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed
                break
            time.sleep(pause_s)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except socket.timeout:
            pass
    return answer, time.monotonic() - start


HEAD = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n")


def test_a_stalled_body_is_a_408_and_the_connection_closes(server):
    answer, took = send(server, HEAD + b"--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"UPT_BODY_IDLE_TIMEOUT_S" in answer and took < 10


def test_a_body_dribbled_for_too_long_is_a_408(server):
    chunks = [b"--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n"] + [b"1"] * 40
    answer, took = send(server, HEAD, chunks, pause_s=0.5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"UPT_BODY_TIMEOUT_S" in answer and took < 15


def test_oversized_headers_are_refused(server):
    answer, _ = send(server, b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"UPT_MAX_HEADER_BYTES" in answer
    small, _ = send(server, b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert small.startswith(b"HTTP/1.1 200")
