"""The broker refuses the gateway's account: the gateway keeps trying.

An operator who rotates the gateway's broker password (``irm-tool accounts
rotate --service _gateway``) reloads the broker, which drops the connected
gateway at once and refuses it (CONNACK 0x87) until the gateway has the new
password. The gateway must neither give up nor exit: it retries with its
backoff, says why and as which account, and is back by itself once the
account works again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, sim_router, started_gateway
from tests.seeding import seed_tenant
from tests.test_e2e_operations import get, until_status
from tools.accounts import (
    CONNACK_ACCEPTED,
    CONNACK_REFUSED,
    PasswordFile,
    new_password,
    reload_broker,
    wait_for_reload,
)
from tools.broker import Broker, free_port

pytestmark = pytest.mark.broker


def set_password(broker: Broker, user: str, password: str, expected: int) -> None:
    """Change ``user``'s password in the broker's file and reload, as the tool
    does; return once the broker answers the given password with ``expected``."""
    passwords = PasswordFile(broker.password_file)
    passwords.set(user, password)
    passwords.save()
    reload_broker(broker.pid_file)
    # The old password of the gateway's account shows that the reload took.
    wait_for_reload("127.0.0.1", broker.port, broker.gateway, expected)


async def test_a_refused_gateway_retries_until_its_account_works_again(
    broker: Broker, tmp_path: Path
) -> None:
    port = free_port()
    _, gateway = await started_gateway(broker, tmp_path, options={"http-port": port})
    url = f"http://127.0.0.1:{port}"
    await until_status(f"{url}/readyz", 200)
    user, password = broker.gateway
    connects = len(await gateway.until_logged("broker connected"))

    set_password(broker, user, new_password(), CONNACK_REFUSED)

    refused = await gateway.until_logged(
        "broker unreachable", count=3, timeout=30, account=user
    )
    assert any("not authori" in line.get("reason", "").lower() for line in refused)
    assert all(0 < line["retry_in"] <= 10 for line in refused)
    assert gateway.alive()
    status, _ = await get(f"{url}/readyz")
    assert status == 503

    set_password(broker, user, password, CONNACK_ACCEPTED)

    await gateway.until_logged("broker connected", count=connects + 1, timeout=30)
    await until_status(f"{url}/readyz", 200)
    router = sim_router(broker, "T8", "R01")
    await router.connect()
    decision, _ = await router.ask()
    assert (decision.decision, decision.reason) == ("accept", "licensed")
    await router.disconnect()
    assert password not in gateway.log.read_text()
    assert gateway.stop() == 0


async def test_a_gateway_refused_from_the_start_names_its_account_and_retries(
    broker: Broker, tmp_path: Path
) -> None:
    user, password = broker.gateway
    set_password(broker, user, new_password(), CONNACK_REFUSED)
    await seed_tenant(tmp_path / "irm.db", "T8", basic1=8)
    gateway = GatewayProcess(broker, tmp_path / "irm.db", tmp_path / "gw.log")
    gateway.spawn()

    refused = await gateway.until_logged(
        "broker unreachable", count=2, timeout=30, account=user
    )
    assert any("not authori" in line.get("reason", "").lower() for line in refused)
    set_password(broker, user, password, CONNACK_ACCEPTED)

    await gateway.until_logged("broker connected", timeout=30)
    router = sim_router(broker, "T8", "R01")
    await router.connect()
    decision, _ = await router.ask()
    assert decision.decision == "accept"
    await router.disconnect()
    assert password not in gateway.log.read_text()
    assert gateway.stop() == 0
