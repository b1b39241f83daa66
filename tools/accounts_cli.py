"""``irm-tool accounts``: the broker's accounts of routers, tenants and services.

Each command changes a password file the broker reads and then sends the
broker SIGHUP (to the pid in ``--pid-file``) so that the change holds at
once: a new account can connect, a revoked one cannot reconnect. Every
account, routers', consumers' and the service accounts alike, is in the
one ``--password-file`` (mosquitto.conf's ``password_file``). A new
password is shown once, here; only its hash is stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from policy.errors import BadInput
from tools import accounts, tls


@dataclass(frozen=True, slots=True)
class Files:
    given_password_file: Path | None
    pid_file: Path | None
    as_json: bool

    # Checked here, not by click, so that every command's --help works.
    @property
    def password_file(self) -> Path:
        if self.given_password_file is None:
            raise click.UsageError(
                "give --password-file (or IRM_BROKER_PASSWORD_FILE): the "
                "broker's password_file"
            )
        return self.given_password_file


pass_files = click.make_pass_decorator(Files)


@click.group("accounts")
@click.option(
    "--password-file", envvar="IRM_BROKER_PASSWORD_FILE",
    type=click.Path(dir_okay=False, path_type=Path), show_envvar=True,
    help="Every account (routers, tenants' consumers, the gateway, operators): "
    "the broker's password_file (mosquitto.conf).",
)  # fmt: skip
@click.option(
    "--pid-file", envvar="IRM_BROKER_PID_FILE", show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The broker's pid_file; without it the broker is not told to reload.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def accounts_group(
    ctx: click.Context, password_file: Path | None, pid_file: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Broker accounts: routers, tenants' consumers, the gateway, operators.

    A router is {tenant}/{router}; a tenant's consumers are {tenant}; the
    gateway is _gateway and operators are _admin. All are in one password
    file (docs/security.md).
    """
    ctx.obj = Files(password_file, pid_file, as_json)


def _names(
    tenant: str | None, routers: tuple[str, ...], service: str | None
) -> list[str]:
    if service is not None:
        if tenant is not None or routers:
            raise click.UsageError("give --service or --tenant, not both")
        return [service]
    if tenant is None:
        raise click.UsageError(
            "give --tenant (with routers, or alone for its consumers)"
        )
    if not routers:
        return [accounts.tenant_account(tenant)]
    return [accounts.router_account(tenant, router) for router in routers]


def _who(command: Callable[..., None]) -> Callable[..., None]:
    """The options that name accounts, shared by add, rotate and revoke."""
    command = click.argument("routers", nargs=-1)(command)
    command = click.option(
        "--service", type=click.Choice(accounts.SERVICE_ACCOUNTS),
        help="A service account instead of a tenant's.",
    )(command)  # fmt: skip
    return click.option("--tenant", help="The tenant; alone: its consumers.")(command)


@accounts_group.command("add")
@_who
@pass_files
def add(
    files: Files, tenant: str | None, routers: tuple[str, ...], service: str | None
) -> None:
    """Make accounts (refused if one exists: rotate it instead)."""
    names = _names(tenant, routers, service)
    _set(files, files.password_file, names, must_exist=False)


@accounts_group.command("rotate")
@_who
@pass_files
def rotate(
    files: Files, tenant: str | None, routers: tuple[str, ...], service: str | None
) -> None:
    """Give accounts new passwords; the old ones stop working."""
    names = _names(tenant, routers, service)
    _set(files, files.password_file, names, must_exist=True)


@accounts_group.command("revoke")
@_who
@pass_files
def revoke(
    files: Files, tenant: str | None, routers: tuple[str, ...], service: str | None
) -> None:
    """Remove accounts: they can no longer connect."""
    names = _names(tenant, routers, service)
    passwords = accounts.PasswordFile(files.password_file)
    missing = passwords.remove(names)
    if missing:
        raise BadInput(f"no such account: {', '.join(missing)}; nothing revoked")
    _can_reload(files)
    passwords.save()
    _show(files, dict.fromkeys(names), "revoked")
    _reload(files, f"the accounts above were revoked in {passwords.path}")


@accounts_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_files
def list_accounts(files: Files, as_json: bool) -> None:
    """The accounts in the password file (names only)."""
    path = files.password_file
    if not path.exists():
        raise BadInput(f"no such password file: {path}")
    names = sorted(accounts.PasswordFile(path).entries)
    if as_json or files.as_json:
        click.echo(json.dumps({"accounts": names}, indent=2))
    else:
        click.echo("\n".join(names))


def _set(files: Files, path: Path, names: list[str], *, must_exist: bool) -> None:
    passwords = accounts.PasswordFile(path)
    wrong = [n for n in names if (n in passwords.entries) != must_exist]
    if wrong:
        rule = "has none: add it" if must_exist else "exists: rotate it"
        raise BadInput(f"account {', '.join(wrong)} {rule}; nothing changed")
    _can_reload(files)
    made = {name: accounts.new_password() for name in names}
    passwords.set_many(made)
    passwords.save()
    # Shown before the reload: a password made and not shown would be lost.
    what = "rotated" if must_exist else "added"
    _show(files, dict(made), what)
    _reload(files, f"the accounts above were {what} in {path}")


def _can_reload(files: Files) -> None:
    """Refuse a change the broker could not be told of, before making it."""
    if files.pid_file is not None:
        try:
            accounts.broker_pid(files.pid_file)
        except accounts.BrokerError as exc:
            raise accounts.BrokerError(f"{exc}; nothing changed") from exc


def _reload(files: Files, done: str) -> None:
    """Tell the broker, once the change (``done``) is written and shown."""
    if files.pid_file is None:
        click.echo(
            "irm-tool: no --pid-file: reload the broker yourself (SIGHUP)", err=True
        )
        return
    try:
        accounts.reload_broker(files.pid_file)
    except accounts.BrokerError as exc:
        raise accounts.BrokerError(
            f"{exc}; {done}: reload the broker (SIGHUP) for the change to hold"
        ) from exc


def _show(files: Files, changed: dict[str, str | None], what: str) -> None:
    if files.as_json:
        rows = [{"account": n, "password": p} for n, p in changed.items()]
        click.echo(json.dumps({what: rows}, indent=2))
        return
    for name, password in changed.items():
        click.echo(f"{what} {name}" + (f" password {password}" if password else ""))


@accounts_group.group("cert")
@click.option(
    "--ca-dir", envvar="IRM_ROUTER_CA_DIR", show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The routers' CA: ca.pem, ca-key.pem, crl.pem (the broker's crlfile).",
)  # fmt: skip
@click.pass_context
def cert_group(ctx: click.Context, ca_dir: Path | None) -> None:
    """Routers' client certificates for the broker's TLS listener."""
    files = ctx.find_object(Files)
    assert files is not None
    ctx.obj = Certs(files, ca_dir)


@dataclass(frozen=True, slots=True)
class Certs:
    files: Files
    given_ca_dir: Path | None

    @property
    def ca_dir(self) -> Path:
        # Checked here, not by click, so that every command's --help works.
        if self.given_ca_dir is None:
            raise click.UsageError("give --ca-dir (or IRM_ROUTER_CA_DIR)")
        return self.given_ca_dir


@cert_group.command("init")
@click.option(
    "--server-name", required=True,
    help="The broker's host name, as routers connect to it.",
)  # fmt: skip
@click.pass_obj
def cert_init(certs: Certs, server_name: str) -> None:
    """Make the routers' CA and the broker's server certificate (once)."""
    name, ca_dir = tls.server_name(server_name), certs.ca_dir
    made = [ca_dir / f for f in ("ca.pem", "ca-key.pem", "crl.pem")]
    made += [ca_dir / f for f in ("server.pem", "server-key.pem")]
    if made[0].exists():
        raise BadInput(f"{made[0]} exists: a new CA would orphan every router")
    before = {path for path in made if path.exists()}
    try:
        ca = tls.make_ca(ca_dir)
        server = tls.issue(ca, ca_dir, "server", name, server=True)
    except BadInput:
        for path in set(made) - before:
            path.unlink(missing_ok=True)
        raise
    click.echo(
        f"CA {ca.cert} (keep {ca.key} off the broker host), server {server.cert}"
    )


@cert_group.command("issue")
@click.option("--tenant", required=True, help="The routers' tenant.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Where each router's certificate and key go (the key: owner only).",
)  # fmt: skip
@click.argument("routers", nargs=-1, required=True)
@click.pass_obj
def cert_issue(certs: Certs, tenant: str, out: Path, routers: tuple[str, ...]) -> None:
    """Issue certificates whose Common Name is {tenant}/{router}."""
    ca_dir = certs.ca_dir
    for router in routers:
        accounts.router_account(tenant, router)
    tls.check_ca(ca_dir)
    tls.make_directory(out)
    for router in routers:
        issued = tls.issue_router(ca_dir, out, tenant, router)
        click.echo(f"issued {tenant}/{router}: {issued.cert} {issued.key}")


@cert_group.command("revoke")
@click.option("--tenant", required=True, help="The routers' tenant.")
@click.argument("routers", nargs=-1, required=True)
@click.pass_obj
def cert_revoke(certs: Certs, tenant: str, routers: tuple[str, ...]) -> None:
    """Revoke every certificate of these routers, and reload the broker."""
    files, ca_dir = certs.files, certs.ca_dir
    names = [accounts.router_account(tenant, router) for router in routers]
    tls.check_ca(ca_dir)
    serials = {name: tls.issued_to(ca_dir, name) for name in names}
    unknown = [name for name, found in serials.items() if not found]
    if unknown:
        raise BadInput(
            f"no certificate was issued to {', '.join(unknown)} by the CA in "
            f"{ca_dir}; nothing revoked"
        )
    _can_reload(files)
    tls.revoke_serials(ca_dir, [s for found in serials.values() for s in found])
    for name, found in serials.items():
        click.echo(f"revoked {len(found)} certificate(s) of {name}")
    _reload(files, f"the certificates above were revoked in {ca_dir / 'crl.pem'}")
