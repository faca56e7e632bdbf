"""Peer for the bench: pyst2's AGI over socketserver.ThreadingTCPServer, one thread a call.

    python bench/peers/pyst2_threads.py --listen 127.0.0.1:4574 --redis redis://127.0.0.1:6379/0

The same work per session as fastagi-screen's `screen` route: read the environment,
ask Asterisk for the caller's address (GET VARIABLE CHANNEL(recvip)), INCR+EXPIRE the
address in Redis (one pipelined round trip), one EXEC MSet of SCREEN_RESULT,
SCREEN_COUNT, SCREEN_COUNTED and SCREEN_NOTICE (the shipped dialplan logs the NOTICE line
from it). What it takes to run pyst2 this way:
- `AGI.__init__` calls `signal.signal(SIGHUP, ...)`, which raises outside the main
  thread: the subclass does the rest of `__init__` without it;
- pyst2 reads and writes text files: the socket is wrapped with `makefile`;
- pyst2 does not know the asynchronous `HANGUP` line (it parses it as a result and
  fails on `int('')`): the reader drops such lines.
"""

from __future__ import annotations

import argparse
import contextlib
import socketserver
import sys

import redis
from asterisk.agi import AGI

THRESHOLD = 5
WINDOW = 600


class _Null:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _NoHangupLines:
    """A text reader that hides Asterisk's asynchronous `HANGUP` lines from pyst2."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def readline(self) -> str:
        for _ in range(16):
            line = self.stream.readline()
            if line != "HANGUP\n":
                return line
        return ""


class ThreadAGI(AGI):
    """pyst2's AGI without the SIGHUP handler (main thread only)."""

    def __init__(self, stdin, stdout) -> None:
        self.stdin = _NoHangupLines(stdin)
        self.stdout = stdout
        self.stderr = _Null()
        self._got_sighup = False
        self.env = {}
        self._get_agi_env()


class Handler(socketserver.StreamRequestHandler):
    redis: redis.Redis

    def handle(self) -> None:
        rfile = self.request.makefile("r", encoding="utf-8", newline="\n")
        wfile = self.request.makefile("w", encoding="utf-8", newline="\n")
        try:
            agi = ThreadAGI(rfile, wfile)
            ip = agi.get_variable("CHANNEL(recvip)")
            key = f"peer:count:{ip}"
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, WINDOW)
            count, _ = pipe.execute()
            result = "BANNED" if count >= THRESHOLD else "COUNTED"
            # one round trip, the dialplan logs the NOTICE from SCREEN_NOTICE: as ours does
            variables = f"SCREEN_RESULT={result},SCREEN_COUNT={count},SCREEN_COUNTED=yes"
            agi.execute("EXEC", "MSet", agi._quote(f"{variables},SCREEN_NOTICE={ip}"))
        except Exception as error:  # one call's failure must not stop the server
            print(f"pyst2 peer: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            for f in (wfile, rfile):
                with contextlib.suppress(OSError):
                    f.close()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:4574")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    # Like fastagi-screen's store: a bounded pool that waits for a free connection.
    pool = redis.BlockingConnectionPool.from_url(
        args.redis, max_connections=64, timeout=5, socket_timeout=1
    )
    Handler.redis = redis.Redis(connection_pool=pool)
    with Server((host, int(port)), Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
