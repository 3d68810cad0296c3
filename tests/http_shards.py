"""A static file server on 127.0.0.1 for the streaming tests, run as its own process
(``Server(folder)`` starts one and reads its port):

    python tests/http_shards.py FOLDER [--drop once|always]

It binds a free port, prints it on the first line of stdout, and serves FOLDER. With ``--drop``,
a ``.tar`` request gets its headers and full Content-Length but only the first half of the bytes,
then the socket is shut down: a connection dropped mid-shard (``once``: the first request of each
file only; ``always``: every request). Every request is appended to FOLDER/../requests.log.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import subprocess
import sys
from pathlib import Path


class Handler(http.server.SimpleHTTPRequestHandler):
    drop = "none"
    served: set[str] = set()
    log_file: Path | None = None

    def copyfile(self, source, outputfile):
        first = self.path not in self.served
        self.served.add(self.path)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(f"{self.path}\n")
        if self.path.endswith(".tar") and (self.drop == "always" or (self.drop == "once" and first)):
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().copyfile(source, outputfile)

    def log_message(self, *args):  # quiet
        pass


class Server:
    """tests/http_shards.py in a background process; stopped (by its pid) at the end."""

    def __init__(self, folder: Path, drop: str = "none"):
        self.folder = folder
        self.log = folder.parent / "requests.log"
        self.log.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(folder), "--drop", drop],
            stdout=subprocess.PIPE, text=True,
        )
        self.port = int(self.process.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}/{{name}}"

    def requests(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--drop", choices=["none", "once", "always"], default="none")
    args = parser.parse_args()
    Handler.drop = args.drop
    Handler.log_file = args.folder.resolve().parent / "requests.log"
    handler = functools.partial(Handler, directory=str(args.folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        print(server.server_address[1], flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
