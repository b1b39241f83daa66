"""Broker accounts: the password file Mosquitto reads, and telling it to reload.

Account names follow the broker's access rules (mosquitto.acl):

- a router is ``{tenant}/{router}``. Mosquitto 2 substitutes a user name
  containing ``/`` into an ACL ``pattern`` as it is (checked with the
  broker), so ``pattern write irm/v1/%u/hello`` names exactly that
  router's hello topic, and no other router's;
- a tenant's consumer (a dashboard reading presence) is ``{tenant}``;
- the service accounts start with ``_`` (``_gateway``, ``_admin``), which
  no tenant or router id can, so they never collide with a customer's.

Every account, the service accounts included, is in one password file,
read by both of the broker's password listeners (mosquitto.conf says why
the broker has no accounts of their own per listener). On the routers'
listeners the account name is the client id; on the service listener a
client chooses its client id, so only the gateway's and operators' hosts
may reach it.

Passwords are stored as Mosquitto's ``$7$`` entries (PBKDF2-HMAC-SHA512,
as ``mosquitto_passwd`` writes them); the plain password is shown once,
when it is made, and never stored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import socket
import ssl
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from gateway.protocol import NAME, refuse_reserved
from policy.errors import BadInput, IrmError

ITERATIONS = 101
"""mosquitto_passwd's own count: the broker checks a password at every
connect, so a reconnect storm of thousands of routers must stay cheap."""
SALT_BYTES = 12
GATEWAY = "_gateway"
ADMIN = "_admin"
SERVICE_ACCOUNTS = (GATEWAY, ADMIN)
GATEWAY_CLIENT_IDS = "irm-gateway-"
"""The gateways' client ids begin so; a consumer account of that name would
be given such a client id on the routers' listener, and take over a gateway's
session."""
CONNACK_ACCEPTED = 0
CONNACK_REFUSED = 5
"""MQTT 3.1.1 CONNACK return codes: accepted, and not authorised."""


class BrokerError(IrmError):
    """The broker could not be told to reload (our side or the operator's)."""


def router_account(tenant: str, router: str) -> str:
    """The broker user name of one router: ``{tenant}/{router}``."""
    refuse_reserved(router)
    return f"{_checked(tenant, 'tenant')}/{_checked(router, 'router')}"


def tenant_account(tenant: str) -> str:
    """The broker user name of a tenant's consumers: the tenant id."""
    if tenant.startswith(GATEWAY_CLIENT_IDS):
        raise BadInput(
            f"tenant {tenant!r}: a consumer account may not begin with "
            f"{GATEWAY_CLIENT_IDS!r}, the gateways' client ids"
        )
    return _checked(tenant, "tenant")


def _checked(name: str, what: str) -> str:
    if not NAME.match(name):
        raise BadInput(
            f"{what} {name!r}: must be 1 to 64 of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def new_password() -> str:
    """A random password of 128 bits, safe to type and to quote."""
    return secrets.token_urlsafe(16)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` entry: PBKDF2-HMAC-SHA512, base64 salt and hash."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"$7${ITERATIONS}${'$'.join(encoded)}"


def check_password(password: str, entry: str) -> bool:
    """Whether ``password`` matches a ``$7$`` entry."""
    try:
        _, kind, rounds, salt, digest = entry.split("$")
        wanted = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(rounds)
        )
    except ValueError:
        return False
    return kind == "7" and hmac.compare_digest(got, wanted)


class PasswordFile:
    """The broker's password file: one ``user:$7$...`` line per account."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    self._read(number, line)

    def _read(self, number: int, line: str) -> None:
        user, sep, entry = line.partition(":")
        if not sep or not entry.startswith("$7$"):
            raise BadInput(
                f"{self.path} line {number}: not a 'user:$7$...' entry "
                "(write it with irm-tool accounts or mosquitto_passwd)"
            )
        self.entries[user] = entry

    def set(self, user: str, password: str) -> None:
        self.entries[user] = hash_password(password)

    def set_many(self, accounts: Mapping[str, str]) -> None:
        for user, password in accounts.items():
            self.set(user, password)

    def remove(self, users: Iterable[str]) -> list[str]:
        """Drop accounts; returns the names that had none."""
        return [u for u in users if self.entries.pop(u, None) is None]

    def save(self) -> None:
        """Replace the file at once, so the broker never reads half of it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        spare = self.path.with_name(f".{self.path.name}.new")
        lines = "".join(f"{u}:{e}\n" for u, e in sorted(self.entries.items()))
        spare.unlink(missing_ok=True)
        descriptor = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(lines)
        # The broker runs as its own user and reads the file through its
        # group: the new file keeps the old one's owner, group and mode,
        # or is 0640 when it is the first.
        try:
            old = self.path.stat()
        except FileNotFoundError:
            spare.chmod(0o640)
        else:
            if os.geteuid() == 0:
                os.chown(spare, old.st_uid, old.st_gid)
            spare.chmod(stat.S_IMODE(old.st_mode))
        spare.replace(self.path)


def broker_pid(pid_file: Path) -> int:
    """The pid in ``pid_file``, of a process this user may signal.

    Checked before a change is written, so that a change the broker could
    not be told of is not made at all.
    """
    return _signal(pid_file, 0)


def reload_broker(pid_file: Path, starting: float = 10.0) -> int:
    """Send SIGHUP to the broker whose pid ``pid_file`` holds; returns the pid.

    Mosquitto rereads its password and ACL files on SIGHUP and
    disconnects every connected client whose password no longer matches
    (checked with mosquitto 2.0.11); certificates are checked at connect.

    Mosquitto writes its pid file before it sets up its signal handlers,
    and a SIGHUP in between ends it (the default action). So the signal
    waits, up to ``starting`` seconds, until the process handles SIGHUP;
    a process that never does (a broker stuck in its start, or another
    program that took over a stale pid) is not signalled at all.
    """
    pid = broker_pid(pid_file)
    deadline = time.monotonic() + starting
    while not _handles(pid, signal.SIGHUP):
        if time.monotonic() > deadline:
            raise BrokerError(
                f"cannot reload the broker from pid file {pid_file}: process "
                f"{pid} ({_name(pid)}) does not handle SIGHUP after {starting} s, "
                "and the signal would end it; is the broker still starting, or "
                "is the pid file stale?"
            )
        time.sleep(0.01)
    return _signal(pid_file, signal.SIGHUP)


def _handles(pid: int, number: int) -> bool:
    """Whether process ``pid`` has a handler for signal ``number``.

    Read from ``/proc/PID/status`` (its ``SigCgt`` mask); where there is
    no such file to read (not Linux), assumed.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    return True


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "unnamed"
    except OSError:
        return "name unknown"


def _signal(pid_file: Path, number: int) -> int:
    what = f"cannot reload the broker from pid file {pid_file}"
    try:
        words = pid_file.read_text().split()
        if not words or not words[0].isdigit():
            raise BrokerError(f"{what}: it holds no pid")
        pid = int(words[0])
        os.kill(pid, number)
    except OSError as exc:
        raise BrokerError(f"{what}: {exc.strerror or exc}") from exc
    return pid


def connack(
    host: str, port: int, username: str, password: str, timeout: float = 2.0,
    tls: ssl.SSLContext | None = None,
) -> int:  # fmt: skip
    """The CONNACK return code the broker gives these credentials (MQTT 3.1.1).

    A bare CONNECT on a socket, so that the tool and the test harness can
    poll the broker until a reload has taken effect. Over ``tls``, a
    handshake the broker refuses counts as not authorised.
    """
    fields = [b"MQTT", f"probe-{secrets.token_hex(4)}".encode()]
    fields += [username.encode(), password.encode()]
    strings = [len(f).to_bytes(2, "big") + f for f in fields]
    header = strings[0] + bytes([4, 0xC2]) + (10).to_bytes(2, "big")
    body = header + b"".join(strings[1:])
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((host, port), timeout))
            if tls is not None:
                sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
            sock.sendall(bytes([0x10]) + _length(len(body)) + body)
            reply = sock.recv(4)
    except (ssl.SSLError, ConnectionResetError):
        if tls is None:
            raise
        return CONNACK_REFUSED
    if len(reply) < 4 or reply[0] != 0x20:
        return CONNACK_REFUSED
    code: int = reply[3]
    return code


def _length(value: int) -> bytes:
    """MQTT's variable-length remaining length."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wait_for_reload(
    host: str, port: int, login: tuple[str, str], wanted: int, timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> None:  # fmt: skip
    """Poll until the broker answers ``login`` with ``wanted`` (a CONNACK code).

    A reload takes effect a moment after the signal; a new account's first
    connect, or a revoked one's refusal, says that it has.
    """
    deadline = time.monotonic() + timeout
    while _answer(host, port, login, tls) != wanted:
        if time.monotonic() > deadline:
            raise BrokerError(
                f"the broker on {host}:{port} did not take the change of "
                f"{login[0]!r} within {timeout} s: is that a password listener "
                "of the broker that reads this password file (routers log in "
                "on the routers' port, IRM_ROUTER_PORT)?"
            )
        time.sleep(0.02)


def _answer(
    host: str, port: int, login: tuple[str, str], tls: ssl.SSLContext | None
) -> int | None:
    """:func:`connack`, or None when the broker dropped the probe unanswered
    (it may, while it rereads its files): ask again."""
    try:
        return connack(host, port, *login, tls=tls)
    except ConnectionError:
        return None


def provision(
    password_file: Path, pid_file: Path, wanted: Mapping[str, str],
    probe: tuple[str, int],
) -> None:  # fmt: skip
    """Write many accounts at once, reload once, and wait until they work."""
    passwords = PasswordFile(password_file)
    passwords.set_many(wanted)
    passwords.save()
    reload_broker(pid_file)
    last = list(wanted.items())[-1]
    wait_for_reload(*probe, last, CONNACK_ACCEPTED)
