"""Input policies: when a node steps and with which samples (`latest`, `all`, `aligned`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from cpcli.node import Sample

QUEUE_LIMIT = 8  # samples held per input under `all`/`aligned`; more wait in the socket (or shared memory)


class InputSet:
    """Holds a node's received samples and hands out the next set to step on.

    `latest`: step on every new sample with the newest of each input (older ones are skipped).
    `all`: every sample of every input, in order; one from each input per step.
    `aligned`: one sample per input whose capture times lie within `tolerance_ms` of each other;
    samples that can no longer be matched are skipped.
    """

    def __init__(self, keys: Sequence[str], policy: str = "latest", tolerance_ms: float = 20.0,
                 queue_limit: int = QUEUE_LIMIT, on_release: Callable[[str, Sample], None] | None = None) -> None:
        if policy not in ("latest", "all", "aligned"):
            raise ValueError(f"unknown input policy {policy!r}")
        self.keys = tuple(keys)
        self.policy = policy
        self._tolerance_ns = int(tolerance_ms * 1e6)
        self._limit = queue_limit
        self._release = on_release or (lambda key, sample: None)  # a sample left without being stepped on
        self._queues: dict[str, deque[Sample]] = {k: deque() for k in keys}
        self._latest: dict[str, Sample] = {}
        self._fresh: set[str] = set()
        self.skipped = dict.fromkeys(keys, 0)  # replaced (latest) or unmatched (aligned): by policy
        self.overflowed = dict.fromkeys(keys, 0)  # queue full: the node could not keep up

    def has_room(self, key: str) -> bool:
        """Whether to read more from this input now (otherwise it waits in the socket)."""
        return self.policy == "latest" or len(self._queues[key]) < self._limit

    def add(self, key: str, sample: Sample) -> None:
        if self.policy == "latest":
            if key in self._fresh:
                self.skipped[key] += 1
            if key in self._latest:
                self._release(key, self._latest[key])
            self._latest[key] = sample
            self._fresh.add(key)
            return
        queue = self._queues[key]
        if len(queue) >= self._limit:
            self._release(key, queue.popleft())
            self.overflowed[key] += 1
        queue.append(sample)

    def take(self) -> tuple[dict[str, Sample], frozenset[str]] | None:
        """The next inputs to step on, with the keys holding new samples; None if not ready."""
        if self.policy == "latest":
            if not self._fresh or len(self._latest) < len(self.keys):
                return None
            fresh = frozenset(self._fresh)
            self._fresh.clear()
            return dict(self._latest), fresh
        if self.policy == "aligned" and not self._align():
            return None
        if any(not q for q in self._queues.values()):
            return None
        return {k: q.popleft() for k, q in self._queues.items()}, frozenset(self.keys)

    def _align(self) -> bool:
        """Drop heads too old to match the newest head until all heads lie within tolerance."""
        while all(self._queues.values()):
            pivot = max(q[0].t_ns or 0 for q in self._queues.values())
            moved = False
            for key, queue in self._queues.items():
                while queue and (queue[0].t_ns or 0) < pivot - self._tolerance_ns:
                    self._release(key, queue.popleft())
                    self.skipped[key] += 1
                    moved = True
            if not moved:
                return True
        return False

    def ready(self) -> bool:
        """Whether `take()` would return inputs now (unmatchable `aligned` heads are skipped)."""
        if self.policy == "latest":
            return bool(self._fresh) and len(self._latest) == len(self.keys)
        if self.policy == "aligned":
            return self._align()
        return all(self._queues.values())

    @property
    def keeps_stepped_samples(self) -> bool:
        """Under `latest` a stepped sample stays (it is reused until replaced); else it is consumed."""
        return self.policy == "latest"

    def clear(self) -> None:
        """Release everything held (the node is finishing)."""
        for key, sample in self._latest.items():
            self._release(key, sample)
        for key, queue in self._queues.items():
            while queue:
                self._release(key, queue.popleft())
        self._latest.clear()
        self._fresh.clear()

    def pending(self) -> int:
        """Samples held and not yet stepped on."""
        if self.policy == "latest":
            return len(self._fresh)
        return sum(len(q) for q in self._queues.values())
