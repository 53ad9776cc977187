"""The aggregator's metrics and status page data, kept by its own loop thread.

The service calls :class:`ServiceMonitor` where things happen (a message judged, a round
closed, an error) and once per turn of its loop (:meth:`ServiceMonitor.refresh`, at most every
``REFRESH_S``); the monitor's HTTP threads (:class:`bedside.monitoring.MonitorServer`) only
read the metrics and the latest snapshot. ``docs/monitoring.md`` lists what is exported.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from bedside.monitoring import AggregatorMetrics, MonitorServer

if TYPE_CHECKING:
    from bedside.aggregator.service import Aggregator

log = logging.getLogger("bedside.aggregator.monitor")

#: The snapshot behind /api/status is rebuilt at most this often (it reads state.db).
REFRESH_S = 1.0
#: Decline reasons a device may send (anything else is counted as "other": the label set of a
#: metric must not be chosen by devices).
DECLINE_REASONS = frozenset({
    "policy", "budget", "ledger_unavailable", "not_sampled", "no_records", "model_mismatch",
    "bad_announcement", "cannot_train", "training_failed", "model_unavailable",
    "statistics_unavailable", "statistics_released"})
#: Rounds the status page lists.
RECENT_ROUNDS = 8
#: Rejections that are part of normal operation (a re-send, a late or early message): counted,
#: but not the page's "last error".
ROUTINE = frozenset({"duplicate", "wrong_round", "no_open_round", "already_contributed"})


class ServiceMonitor:
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        # prometheus-client is imported only when [monitor] asks for the endpoint
        self.metrics: AggregatorMetrics | None = (AggregatorMetrics() if agg.cfg.monitor.port
                                                  else None)
        self.server: MonitorServer | None = None
        self.last_error: str | None = None
        self._snapshot: dict[str, Any] = {}
        self._refreshed = 0.0
        self._privacy: dict[str, Any] = {}
        self._planned: float | None = None

    def start(self) -> None:
        cfg = self.agg.cfg.monitor
        if self.metrics is not None and self.server is None:
            self.refresh(force=True)
            self.server = MonitorServer(cfg, self.metrics.registry, "aggregator",
                                        status=lambda: self._snapshot)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- events ------------------------------------------------------------------------------------
    def judged(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.received.inc()
            self.metrics.validation.observe(seconds)

    def accepted(self) -> None:
        if self.metrics is not None:
            self.metrics.accepted.inc()

    def declined(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.declined.labels(reason if reason in DECLINE_REASONS else "other").inc()

    def rejected(self, reason: str, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
        if reason not in ROUTINE:
            self.error(f"rejected a message: {reason}: {detail[:200]}")

    def error(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.agg.clock()))
        self.last_error = f"{stamp} UTC: {text}"

    def round_closed(self, round_id: int, result: dict[str, Any]) -> None:
        self._planned = None  # recomputed with the rounds as they ran
        row = self.agg.rounds.get_round(round_id)
        if self.metrics is not None and row is not None and row.closed_at is not None:
            self.metrics.round_duration.observe(max(0.0, row.closed_at - row.opened_at))
        if result.get("privacy"):
            self._privacy = result["privacy"]
        if result.get("reason"):
            self.error(f"round {round_id} failed: {result['reason']}")
        if self.server is not None:
            self.refresh(force=True)

    # -- the loop's turn -------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Update the gauges and the status snapshot (rate-limited; the loop thread only)."""
        now = time.monotonic()
        if self.metrics is None or (not force and now - self._refreshed < REFRESH_S):
            return
        self._refreshed = now
        agg, m = self.agg, self.metrics
        cur = agg.rounds.current_round()
        open_ = cur is not None and cur.status == "open"
        answered = len(agg.rounds.answered(cur.round)) if cur is not None else 0
        accepted = agg.rounds.accepted(cur.round) if cur is not None else []
        declined = len(agg.rounds.declines(cur.round)) if cur is not None else 0
        version = agg.registry.latest()
        manifest = agg.registry.manifest(version) if version else None
        holdout = (manifest.metrics.get("holdout", {}) if manifest else {}) or {}
        record = [u["info"]["record_epsilon"] for u in accepted if "record_epsilon" in u["info"]]
        m.round.set(cur.round if cur else 0)
        m.round_open.set(1 if open_ else 0)
        m.participants.set(answered)
        m.round_accepted.set(len(accepted))
        m.model_version.set(version or 0)
        m.devices.set(len(agg.devices))
        depth = getattr(agg.transport, "queue_depth", None)
        if depth is not None:
            m.queue.set(depth)
        m.connected.set(1 if agg.transport.connected else 0)
        device_eps = self._privacy.get("epsilon") if self._privacy else (
            manifest.privacy.get("epsilon") if manifest and manifest.privacy else None)
        if device_eps is not None:
            m.epsilon.labels("device").set(device_eps)
        if record:
            m.epsilon.labels("record").set(max(record))
        else:  # nothing reported in this round yet: no figure rather than the last round's
            with contextlib.suppress(KeyError):
                m.epsilon.remove("record")
        planned = self._planned_epsilon()
        if planned is not None:
            m.epsilon_planned.set(planned)
        rounds = agg.rounds.rounds()[-RECENT_ROUNDS:]
        self._snapshot = {
            "fleet": agg.cfg.fleet,
            "state": ("done" if agg.finished else "open" if open_
                      else "waiting for devices" if agg._waiting_for_devices else "between rounds"),
            "round": cur.round if cur else None,
            "task": cur.settings.task if cur else None,
            "deadline_in_s": max(0.0, cur.deadline - agg.clock()) if open_ and cur else None,
            "model_version": version,
            "participants": answered, "enrolled": len(agg.devices),
            "accepted": len(accepted), "declined": declined,
            "rejections": agg.rounds.rejections(cur.round) if cur else {},
            "accuracy": holdout.get("accuracy"), "auc": holdout.get("auc"),
            "epsilon": {"device": device_eps, "device_planned": planned,
                        "record_max": max(record) if record else None,
                        "delta": agg.cfg.privacy.delta},
            "recent_rounds": [
                {"round": r.round, "task": r.settings.task, "status": r.status,
                 "accepted": ((r.result or {}).get("accepted") if r.result
                              else len(agg.rounds.accepted(r.round))),
                 "seconds": (round(r.closed_at - r.opened_at, 3)
                             if r.closed_at is not None else None)}
                for r in reversed(rounds)],
            "broker_connected": bool(agg.transport.connected),
            "last_error": self.last_error,
            "time": agg.clock(),
        }

    def _planned_epsilon(self) -> float | None:
        """Device-level epsilon once every planned training round has run: the rounds that ran
        (statistics rounds included, as the spent figure counts them) and the training rounds
        still planned, with the latest round's settings (recomputed after every round)."""
        if self._planned is not None:
            return self._planned
        agg = self.agg
        planned = agg.cfg.rounds.rounds
        start = agg.rollouts.store.federation_start()  # this federation's rounds only
        rows = [r for r in agg.rounds.rounds() if r.round > start]
        trained = [r for r in rows if r.settings.task == "train"]
        if not planned or not trained:
            return None
        from bedside.federation.report import device_privacy

        ran = [r.settings for r in rows if r.status == "closed" or r.status == "open"]
        settings = ran + [trained[-1].settings] * max(0, planned - len(trained))
        try:
            eps = device_privacy(settings, agg.cfg.privacy.delta)
        except Exception:  # a figure for a page: never stop the service for it
            log.exception("could not compute the planned device-level epsilon")
            return None
        self._planned = eps.get("epsilon")
        return self._planned
