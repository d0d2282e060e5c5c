"""How a node process learns its session's data security: one environment variable set by its supervisor.

Not the command line (`ps` shows it to every user of the machine) and not the CONFIG message (the
supervisor's control socket listens on loopback without keys, so another local program could ask
for it). The driver removes the variable as it reads it, so programs a node starts never inherit it.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from cpcli.errors import TransportError
from cpcli.transport.curve import DataSecurity

DATA_SECURITY_ENV = "CP_DATA_SECURITY"


def give(env: MutableMapping[str, str], security: DataSecurity | None) -> None:
    """Put `security` into a child's environment; None removes any inherited one (an unsecured session)."""
    if security is None:
        env.pop(DATA_SECURITY_ENV, None)
    else:
        env[DATA_SECURITY_ENV] = security.to_env()


def take(env: MutableMapping[str, str]) -> DataSecurity | None:
    """The security our supervisor gave us (None: none), removed from `env`.

    Raises:
        TransportError: the variable is not what a supervisor writes.
    """
    text = env.pop(DATA_SECURITY_ENV, None)
    if not text:
        return None
    try:
        security = DataSecurity.from_env(text)
    except ValueError as err:  # the message names no part of the value: it holds the cluster secret
        raise TransportError(f"{DATA_SECURITY_ENV} is malformed ({type(err).__name__})",
                             hint="it is set by the worker for its node processes; do not set it by hand") from err
    if not security.credentials.insecure and len(security.credentials.manager_public) != 40:
        raise TransportError(f"{DATA_SECURITY_ENV} is malformed (not a Curve key)",
                             hint="it is set by the worker for its node processes; do not set it by hand")
    return security

