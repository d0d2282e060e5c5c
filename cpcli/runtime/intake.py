"""A node's inputs: one subscriber per input, its input policy, and what happened to every sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import zmq

from cpcli.node import Sample
from cpcli.runtime.inputs import InputSet
from cpcli.transport.curve import DataSecurity
from cpcli.transport.subscriber import Subscriber


class Intake:
    """Reads a node's subscriptions into its input policy and releases samples when done.

    Args:
        edges: the supervisor's wiring, one mapping per input: key, endpoint, topic, shm.
        security: the session's data security (the upstream publishers serve with the same).
    """

    def __init__(self, context: zmq.Context[Any], edges: Sequence[dict[str, Any]], sync: str,
                 tolerance_ms: float, logger: logging.Logger, security: DataSecurity | None = None) -> None:
        self._log = logger
        self.subscribers = [
            Subscriber(context, e["key"], e["endpoint"], e["topic"].encode(), logger,
                       None if not e.get("shm") else (e["shm"]["prefix"], e["shm"].get("reader")), security)
            for e in edges
        ]
        self._by_key = {s.key: s for s in self.subscribers}
        self.policy = InputSet(list(self._by_key), sync, tolerance_ms, on_release=self._release)
        self.received_any = False

    def _release(self, key: str, sample: Sample) -> None:
        self._by_key[key].release(sample)

    def receive(self) -> None:
        """Read every waiting sample the policy has room for (the rest waits in its socket)."""
        for sub in self.subscribers:
            while self.policy.has_room(sub.key) and (sample := sub.receive()) is not None:
                self.received_any = True
                self.policy.add(sub.key, sample)

    def take(self) -> tuple[dict[str, Sample], frozenset[str]] | None:
        return self.policy.take()

    def done_with(self, inputs: dict[str, Sample]) -> None:
        """After a step: consumed samples go back (under `latest` they stay until replaced)."""
        if not self.policy.keeps_stepped_samples:
            for key, sample in inputs.items():
                self._release(key, sample)

    def expect_end(self, source: str, sent: dict[str, Any]) -> None:
        """An upstream node finished, having sent `sent[port]` samples per port."""
        for sub in self.subscribers:
            if sub.source == source and sub.port in sent:
                sub.expect_end(int(sent[sub.port]))

    def finished(self) -> bool:
        """Every upstream ended and nothing is left to step on."""
        if self.policy.ready():
            return False
        for sub in self.subscribers:
            if self.policy.has_room(sub.key):  # we read all we could, so an empty socket is the end
                sub.settle()
        return all(s.ended for s in self.subscribers)

    def counts(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Per input: samples received, lost, and skipped by policy.

        Under `latest` a shared-memory slot reused before it was read is a skip (the node wanted
        only the newest sample anyway); under `all` and `aligned` it is a loss.
        """
        latest = self.policy.policy == "latest"
        received = {s.key: s.received for s in self.subscribers}
        lost = {s.key: s.dropped + self.policy.overflowed[s.key] + (0 if latest else s.stale)
                for s in self.subscribers}
        skipped = {s.key: self.policy.skipped[s.key] + (s.stale if latest else 0) for s in self.subscribers}
        return received, lost, skipped

    def account_for_the_end(self) -> None:
        """Count what upstream sent but never arrived, and log each input's balance."""
        for sub in self.subscribers:
            tail = sub.count_unreceived()
            self._log.info("input %s: received %d, lost on the way %d (%d at the end), stale %d",
                           sub.key, sub.received, sub.dropped, tail, sub.stale)

    def close(self) -> None:
        self.policy.clear()
        for sub in self.subscribers:
            sub.close()
