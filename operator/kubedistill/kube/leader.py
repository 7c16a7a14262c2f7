"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's rules.

    kubedistill operator --leader-elect --lease-namespace kubedistill-system

Two or more operator replicas run; one holds the Lease and reconciles, the others wait. kopf's
own "peering" is not leader election (replicas of equal priority all pause), and the
kubernetes client ships a ConfigMap lock only, hence this small elector:

* a candidate takes the Lease when nobody holds it, or when its holder has not renewed it for
  ``leaseDurationSeconds``, judged by this candidate's own clock from the moment it last saw
  the record change (client-go's rule: no trust in other machines' clocks);
* every write carries the record's resourceVersion, so two candidates racing for an expired
  Lease cannot both win (the API server refuses the second with 409);
* the leader renews every ``retry`` seconds; if it cannot renew for ``renew_deadline`` seconds
  it has lost the Lease and the process exits (controller-runtime does the same): a leader
  that might be superseded must stop acting at once, and the restarted pod becomes a standby;
* on a clean shutdown the leader releases the Lease, so a standby takes over in ``retry``
  seconds instead of ``leaseDurationSeconds``.

A failover after a crash therefore takes at most ``lease_seconds + retry`` seconds, then kopf's
resume handlers reconcile everything; deterministic child names make that safe (a second
create of a stage Job is a 409, never a duplicate).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubedistill.leader")


@dataclass(frozen=True)
class LeaseTiming:
    lease_seconds: float = 15.0  # how long a Lease holds without renewal
    renew_deadline: float = 10.0  # a leader that cannot renew for this long steps down
    retry: float = 2.0  # between attempts to take or renew


def default_identity() -> str:
    """The pod's name (POD_NAME, from the downward API) or host, plus a random suffix per process."""
    base = os.environ.get("POD_NAME") or os.uname().nodename
    return f"{base}_{secrets.token_hex(4)}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaseElector:
    """Take, hold and release one Lease. ``acquire`` blocks; ``hold`` renews in a thread."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        namespace: str,
        name: str,
        identity: str | None = None,
        timing: LeaseTiming = LeaseTiming(),
    ) -> None:
        self.api = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timing = timing
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0  # time.monotonic() when it changed
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.leading = False

    # ------------------------------------------------------------------ the protocol

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        now = _now()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                log.warning("reading Lease %s/%s: HTTP %s", self.namespace, self.name, err.status)
                return False
            return self._create(now)
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.timing.lease_seconds
        if holder and holder != self.identity and time.monotonic() - self._observed_at < duration:
            return False  # held, and renewed within its duration as far as we have seen
        ours = holder == self.identity
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = int(self.timing.lease_seconds)
        spec.renew_time = now
        if not ours:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        try:
            # The body carries the resourceVersion we read: a concurrent writer makes this a 409.
            updated = self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as err:
            if err.status != 409:
                log.warning("updating Lease %s/%s: HTTP %s", self.namespace, self.name, err.status)
            return False
        self._observed = (updated.spec.holder_identity, updated.spec.renew_time, updated.spec.lease_transitions)
        self._observed_at = time.monotonic()
        if not ours:
            previous = f"from {holder}" if holder else "(it was free)"
            log.info("took Lease %s/%s %s as %s", self.namespace, self.name, previous, self.identity)
        return True

    def _create(self, now: dt.datetime) -> bool:
        body = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=k8s.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=int(self.timing.lease_seconds),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as err:
            if err.status != 409:
                log.warning("creating Lease %s/%s: HTTP %s", self.namespace, self.name, err.status)
            return False
        log.info("created Lease %s/%s as %s", self.namespace, self.name, self.identity)
        return True

    # ------------------------------------------------------------------ the life of a replica

    def acquire(self) -> None:
        """Block until this process holds the Lease."""
        logged = False
        while not self.try_acquire_or_renew():
            if not logged:
                holder = self._observed[0] if self._observed else None
                log.info("standby: Lease %s/%s is held by %s; waiting", self.namespace, self.name, holder)
                logged = True
            time.sleep(self.timing.retry)
        self.leading = True

    def hold(self, on_lost: Callable[[], None]) -> None:
        """Renew in a daemon thread; ``on_lost`` runs (and should end the process) if renewal fails too long."""
        self._renewer = threading.Thread(target=self._renew_loop, args=(on_lost,), name="lease-renewer", daemon=True)
        self._renewer.start()

    def _renew_loop(self, on_lost: Callable[[], None]) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.timing.retry):
            try:
                renewed = self.try_acquire_or_renew()
            except Exception as err:  # a connection error is a failed renewal, not a crash
                log.warning("renewing Lease %s/%s: %s", self.namespace, self.name, err)
                renewed = False
            if renewed:
                last_renewed = time.monotonic()
            elif time.monotonic() - last_renewed > self.timing.renew_deadline:
                self.leading = False
                log.error(
                    "lost Lease %s/%s (not renewed for %.0fs): stopping so that only one replica reconciles",
                    self.namespace, self.name, self.timing.renew_deadline,
                )  # fmt: skip
                on_lost()
                return

    def release(self) -> None:
        """Stop renewing and hand the Lease back (holder cleared), so a standby takes it at once."""
        self._stop.set()
        if not self.leading:
            return
        self.leading = False
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except ApiException as err:
            log.warning("releasing Lease %s/%s: HTTP %s (it expires on its own)", self.namespace, self.name, err.status)
