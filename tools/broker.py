"""Start Mosquitto from the repository's ``mosquitto.conf`` for tests and demos.

Only what must differ per run is replaced: the listeners' ports (on
loopback), the paths of the password file, pid file, TLS files and
persistence directory (each keeps its name, in the run's directory), and
the user Mosquitto runs as (it drops to user ``mosquitto`` when started as
root, which could not write a run's directory). Everything else, the
access rules included, is what ships.

The harness is where a run's credentials come from: at start it writes
the gateway's and an operator's accounts into the password file (keeping
the routers' and consumers' accounts already there), makes a routers' CA
and the server's certificate, and it provisions routers through
tools/accounts.py, the code ``irm-tool accounts`` runs.
"""

from __future__ import annotations

import getpass
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tools import accounts, tls

REPO_CONFIG = Path(__file__).resolve().parent.parent / "mosquitto.conf"
REPO_ACL = REPO_CONFIG.with_name("mosquitto.acl")
OPEN_FILES = 65536
"""Mosquitto stops near 1,000 clients with the default open-file limit."""


class PortTaken(RuntimeError):
    """Another process bound one of the broker's ports first."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def render(ports: tuple[int, ...], data_dir: Path, source: Path = REPO_CONFIG) -> str:
    """The repository's configuration with this run's ports and files.

    ``ports`` replace the listeners' in order (service, routers with a
    password, routers with TLS), each bound to loopback.
    """
    text = source.read_text()
    found = re.findall(r"^listener\s+\d+.*$", text, flags=re.M)
    if len(found) != len(ports):
        raise ValueError(f"{source} has {len(found)} listeners, not {len(ports)}")
    for line, port in zip(found, ports, strict=True):
        text = text.replace(line, f"listener {port} 127.0.0.1", 1)
    for key in FILES:
        text = re.sub(
            rf"^({key})\s+(.*)$",
            lambda found: f"{found[1]} {_run_path(found[1], found[2], data_dir)}",
            text,
            flags=re.M,
        )
    text += f"\nuser {getpass.getuser()}\n"
    return text


FILES = (
    "persistence_location", "password_file", "acl_file", "pid_file",
    "cafile", "certfile", "keyfile", "crlfile",
)  # fmt: skip
"""The directives that name files; each keeps its file's name in the run."""


def _run_path(key: str, shipped: str, data_dir: Path) -> str:
    """Where a run keeps the file the shipped configuration names."""
    name = Path(shipped).name
    if key == "acl_file":
        return str(REPO_ACL)
    if key == "persistence_location":
        return f"{data_dir}/"
    if key in ("cafile", "certfile", "keyfile", "crlfile"):
        return str(data_dir / "tls" / name)
    return str(data_dir / name)


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
    """A Mosquitto process on loopback, restartable with the same state.

    ``port`` is the service listener (the gateway and operators), and
    ``router_port`` the password listener of routers and tenants'
    consumers; every account is in ``password_file``, which both read.
    ``tls_port`` is the routers' TLS listener. ``gateway`` and ``admin``
    are the service accounts' (user, password), new for each ``Broker``.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self._fixed_port = port is not None
        self._started = False
        self.starts = 0
        """Starts so far: after the first, the broker restores the sessions
        it kept (persistence)."""
        self.started_at: datetime | None = None
        """When the running broker was started (UTC)."""
        self.port = port or free_port()
        self.router_port = free_port()
        self.tls_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.config = data_dir / "mosquitto.conf"
        self.log = data_dir / "mosquitto.log"
        self.pid_file = data_dir / "mosquitto.pid"
        self.password_file = data_dir / "passwd"
        self.tls_dir = data_dir / "tls"
        self.gateway = (accounts.GATEWAY, accounts.new_password())
        self.admin = (accounts.ADMIN, accounts.new_password())
        self.passwords: dict[str, str] = dict([self.gateway, self.admin])
        self._pending: list[str] = []

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the port accepts connections.

        A free port can be taken by another process before Mosquitto binds
        it (tests run in parallel on one machine): the first start then
        tries new ports, a few times. A restart keeps its ports, which its
        clients reconnect to.
        """
        for _ in range(3 if not self._started else 0):
            try:
                self._start(timeout)
            except PortTaken:
                self.router_port, self.tls_port = free_port(), free_port()
                if not self._fixed_port:
                    self.port = free_port()
            else:
                self._started = True
                self.starts += 1
                return
        self._start(timeout)
        self._started = True
        self.starts += 1

    def _start(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._first_files()
        ports = (self.port, self.router_port, self.tls_port)
        self.config.write_text(render(ports, self.data_dir))
        self.started_at = datetime.now(UTC)
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
                said = self.log.read_text()[-2000:]
                error = PortTaken if "Address already in use" in said else RuntimeError
                raise error(f"mosquitto exited: {said}")
            if self._answers():
                return
            time.sleep(0.02)
        raise TimeoutError(f"mosquitto did not answer on {self.port} in {timeout}s")

    def _answers(self) -> bool:
        """Whether the broker answers the gateway's login.

        An open port is not enough: Mosquitto listens, then sets up its
        signal handlers, then serves; a reload (SIGHUP) before that would
        end it. A CONNACK comes from the serving loop.
        """
        try:
            code = accounts.connack("127.0.0.1", self.port, *self.gateway, timeout=0.5)
        except OSError:
            return False
        return code == accounts.CONNACK_ACCEPTED

    def _first_files(self) -> None:
        """The service accounts in the password file, the routers' CA and
        the server's certificate."""
        # The service accounts are written at every start: a broker started
        # again on a directory of an earlier run has this run's passwords
        # (which broker.env gives), and keeps the routers' and consumers'
        # accounts already in the file.
        passwords = accounts.PasswordFile(self.password_file)
        passwords.set_many(dict([self.gateway, self.admin]))
        passwords.save()
        if not (self.tls_dir / "ca.pem").exists():
            ca = tls.make_ca(self.tls_dir)
            tls.issue(ca, self.tls_dir, "server", "localhost", server=True)

    def router_password(self, tenant: str, router: str) -> str:
        """The router's password, made on first use; :meth:`flush` tells the
        broker, so that a whole fleet made at once costs one reload."""
        return self.account(accounts.router_account(tenant, router))

    def account(self, user: str) -> str:
        """A router's or a tenant's consumers' password (their account: the
        tenant id), made on first use and known to the broker after
        :meth:`flush`; they log in on ``router_port``."""
        if user not in self.passwords:
            self.passwords[user] = accounts.new_password()
            self._pending.append(user)
        return self.passwords[user]

    def provision(self, tenant: str, routers: list[str]) -> dict[str, str]:
        """Passwords of many routers, known to the broker on return."""
        made = {name: self.router_password(tenant, name) for name in routers}
        self.flush()
        return made

    def flush(self) -> None:
        """Write the accounts made since the last call, reload, wait for them."""
        if not self._pending:
            return
        made = {user: self.passwords[user] for user in self._pending}
        self._pending.clear()
        accounts.provision(
            self.password_file, self.pid_file, made, ("127.0.0.1", self.router_port)
        )

    def write_env(self, path: Path) -> None:
        """Shell variables for a demo: ports, the password and pid files, the
        service accounts."""
        values = {
            "IRM_BROKER_PORT": self.port,
            "IRM_ROUTER_PORT": self.router_port,
            "IRM_TLS_PORT": self.tls_port,
            "IRM_BROKER_PASSWORD_FILE": self.password_file,
            "IRM_BROKER_PID_FILE": self.pid_file,
            "IRM_BROKER_USERNAME": self.gateway[0],
            "IRM_BROKER_PASSWORD": self.gateway[1],
            "IRM_ADMIN_USERNAME": self.admin[0],
            "IRM_ADMIN_PASSWORD": self.admin[1],
        }
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def router_cert(self, tenant: str, router: str) -> tls.Issued:
        """A client certificate for one router, signed by the routers' CA."""
        return tls.issue_router(self.tls_dir, self.tls_dir / "routers", tenant, router)

    def tls_context(self, cert: tls.Issued | None) -> ssl.SSLContext:
        """A client's TLS context trusting the routers' CA, with ``cert`` if any."""
        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        if cert is not None:
            context.load_cert_chain(cert.cert, cert.key)
        return context

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
    broker behind. The run's files are in DIR: ``broker.env`` holds the
    listeners' ports, the password file and the pid file, and the gateway's
    and operator's accounts, for a demo script to source (readable by its
    owner only; a demo's throwaway accounts).
    """
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("run/broker")
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    broker = Broker(data_dir.resolve(), port)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    broker.start()
    broker.write_env(data_dir / "broker.env")
    print(f"mosquitto listening on 127.0.0.1:{broker.port}", flush=True)
    try:
        assert broker.process is not None
        broker.process.wait()
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
