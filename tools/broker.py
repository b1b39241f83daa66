"""Start Mosquitto from the repository's ``mosquitto.conf`` for tests and demos.

Only what must differ per run is replaced: the listener's port, the
persistence directory, and the user Mosquitto runs as (it drops to user
``mosquitto`` when started as root, which could not write a run's
directory). Everything else is the configuration that ships.
"""

from __future__ import annotations

import getpass
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parent.parent / "mosquitto.conf"
OPEN_FILES = 65536
"""Mosquitto stops near 1,000 clients with the default open-file limit."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def render(port: int, data_dir: Path, source: Path = REPO_CONFIG) -> str:
    """The repository's configuration with this run's port and directory."""
    text = source.read_text()
    text, listeners = re.subn(
        r"^listener\s+\d+(.*)$", rf"listener {port}\1", text, count=1, flags=re.M
    )
    if not listeners:
        raise ValueError(f"{source} has no 'listener PORT' line to replace")
    text = re.sub(
        r"^persistence_location\s+.*$",
        f"persistence_location {data_dir}/",
        text,
        flags=re.M,
    )
    text += f"\nuser {getpass.getuser()}\n"
    return text


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise FileNotFoundError(
            "mosquitto is not installed (apt-get install mosquitto)"
        )
    return found


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Broker:
    """A Mosquitto process on loopback, restartable with the same state."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.config = data_dir / "mosquitto.conf"
        self.log = data_dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the port accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.port, self.data_dir))
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_open_files,  # noqa: PLW1509 - no threads yet
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                time.sleep(0.02)
            else:
                return
        raise TimeoutError(f"mosquitto did not listen on {self.port} in {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM saves the persistent state; ``kill`` does not)."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def main() -> None:
    """``python -m tools.broker DIR [PORT]``: run a broker in the foreground.

    SIGTERM and SIGINT stop Mosquitto too, so a script's cleanup leaves no
    broker behind.
    """
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("run/broker")
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    broker = Broker(data_dir.resolve(), port)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    broker.start()
    print(f"mosquitto listening on 127.0.0.1:{broker.port}", flush=True)
    try:
        assert broker.process is not None
        broker.process.wait()
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
