"""The CpError family: every failure a user can act on."""

from __future__ import annotations


class CpError(Exception):
    """A failure the user can act on: one line saying what and where, and a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class RecipeError(CpError):
    """A recipe that cannot run; `problems` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems or [message]


class GraphError(CpError):
    """A node graph that is not a DAG or does not connect."""


class NodeConfigError(CpError):
    """A node parameter that its node type rejects."""


class NodeError(CpError):
    """A node that failed while it ran (setup, step or teardown)."""


class DeviceError(CpError):
    """A camera, microphone or other device that cannot be used."""


class TransportError(CpError):
    """A socket, address or message that the data or control plane cannot use."""


class PeerLostError(CpError):
    """A process or machine that stopped answering."""


class ClockError(CpError):
    """A clock estimate that cannot be trusted."""


class ArchiveError(CpError):
    """A recording or session folder that cannot be written or read."""


class AccessError(CpError):
    """This machine is not (or no longer) a member of the cluster: no token, a bad one, or one refused."""
