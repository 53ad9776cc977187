"""The aggregator service, driven over a Flower Grid (Bedside's ServerApp is
:mod:`bedside.aggregator.flower_app`).

Over Flower, the ServerApp runs the same :class:`~bedside.aggregator.service.Aggregator` as
``bedside aggregator serve``, with a :class:`~bedside.transport.flower.Mailbox` for a transport,
so rounds, validation (:func:`~bedside.federation.validate.validate_update`), aggregation
(:func:`~bedside.federation.aggregate.aggregate_round`), the registry, signed releases, receipts,
``state.db`` and the privacy report are the MQTT service's, unchanged. :class:`FlowerDriver` does
what the MQTT broker does there:

* while a round is open, every SuperNode that has not been asked yet gets one Flower message
  (``train``) with the round's signed announcement, the signed model release it lacks (the
  release's version against the version the node's last status reported) and the receipts
  waiting for its device;
* what comes back (the device's signed update or decline, and its status) is handed to the
  aggregator as it would arrive on the device's MQTT topic. A SuperNode is bound to the device
  whose fresh update or decline of the open round the aggregator recorded; a later envelope it
  sends under another device's name is rejected as a topic mismatch, as Mosquitto's ACL would
  refuse it, and an unbound node's update that no enrolled device signed is dropped;
* when the federation is done, every SuperNode gets a last message (``query``) with the final
  model and the end of the federation.

Statuses (the aggregator's and each device's last) are written as JSON files in
``<data_dir>/flower/status/``, where ``bedside flower run``, ``bedside demo`` and operators read
them. This module imports Flower only inside the functions that build Flower messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.constants import (
    AGGREGATOR_ID,
    KIND_UPDATE,
    topic_model,
    topic_receipt,
    topic_receipts_all,
    topic_release,
    topic_report,
    topic_reports_all,
    topic_round,
    topic_status,
    topic_status_all,
    topic_update,
    topic_updates_all,
)
from bedside.errors import BedsideError, ConfigError, WireError
from bedside.federation.validate import digest
from bedside.files import atomic_write_bytes
from bedside.transport import topic_matches
from bedside.transport.flower import Mailbox, pack, unpack
from bedside.wire.envelope import decode, peek

log = logging.getLogger("bedside.aggregator.flower")

#: How long the last message of a federation (final model, end) may take to be answered.
FINAL_SYNC_SECONDS = 60.0
#: A device's status larger than this is not read (it is a few hundred bytes).
MAX_STATUS_BYTES = 64 * 1024
#: A SuperNode is asked at most this many times in one round (its ClientApp failed, its message
#: expired or could not be stored), this long apart.
MAX_ASKS_PER_ROUND = 3
RETRY_SECONDS = 2.0
#: Receipts kept for a device until its next message (older ones are dropped first).
MAX_RECEIPTS = 32


@dataclass
class _Node:
    device: str | None = None  # bound by a fresh, accepted update or decline it carried
    model_version: int = 0  # what its last status said it holds
    round: int = 0  # the round it was last asked in
    asks: int = 0  # how many times in that round
    retry_at: float = 0.0
    release_sent: str = ""  # digest of the per-device release last sent to it


@dataclass
class _Flight:
    """A message on its way to a SuperNode, and what it carries that must not be lost."""

    node: int
    round: int
    receipts: list[bytes]
    expires: float


class FlowerDriver:
    """Drives an :class:`~bedside.aggregator.service.Aggregator` whose transport is ``link``
    over a Flower ``grid`` (``get_node_ids``, ``push_messages``, ``pull_messages``).

    The loop never waits on one SuperNode: it asks every node that has not been asked in the
    open round, pulls whatever replies have arrived, lets the aggregator close the round when it
    is due, and asks again at once when the next round opens. A message lives as long as its
    round (Flower's TTL); a node whose ClientApp failed, or whose message expired, is asked
    again (at most ``MAX_ASKS_PER_ROUND`` times a round).
    """

    def __init__(self, aggregator: Any, link: Mailbox, grid: Any, *,
                 clock: Callable[[], float] = time.time, poll: float = 0.2,
                 status_dir: Path | None = None,
                 final_seconds: float = FINAL_SYNC_SECONDS) -> None:
        self.agg, self.link, self.grid = aggregator, link, grid
        self.fleet = aggregator.cfg.fleet
        self.clock, self.poll = clock, poll
        self.status_dir = status_dir
        self.final_seconds = final_seconds
        self.nodes: dict[int, _Node] = {}
        self.flights: dict[str, _Flight] = {}
        self.receipts: dict[str, list[bytes]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.messages = 0  # Flower messages sent (benchmarks)

    # -- the federation ----------------------------------------------------------------------------
    def run(self) -> None:
        from flwr.app import MessageType

        self.agg.start()
        self._collect()
        while not self.agg.finished:
            cur = self.agg.rounds.current_round()
            assert cur is not None
            now = self.clock()
            asked = self._ask(cur.round, cur.deadline, now)
            answered = self._pull(now)
            self.agg.step(0.0)
            self._collect()
            if not (asked or answered):
                time.sleep(max(0.0, min(self.poll, cur.deadline - self.clock())))
        self._final_sync(MessageType.QUERY)
        log.info("federation done over Flower: %d message(s) to %d SuperNode(s)", self.messages,
                 len(self.nodes))

    def _ask(self, round_id: int, deadline: float, now: float) -> int:
        """Send the open round to every node that has not had it (or must have it again)."""
        from flwr.app import MessageType

        busy = {f.node for f in self.flights.values() if f.round == round_id}
        ask = []
        for n in self.grid.get_node_ids():
            node = self.nodes.setdefault(n, _Node())
            if node.round != round_id:
                node.round, node.asks, node.retry_at = round_id, 0, 0.0
            if n in busy or node.asks == -1 or node.asks >= MAX_ASKS_PER_ROUND or \
                    now < node.retry_at:
                continue
            ask.append(n)
        if ask:
            self._push(ask, MessageType.TRAIN, round_id, max(deadline - now, 1.0))
        return len(ask)

    def _final_sync(self, message_type: str) -> None:
        """The end of the federation and the final model, to every SuperNode."""
        nodes = list(self.grid.get_node_ids())
        if not nodes:
            return
        self._push(nodes, message_type, 0, self.final_seconds)
        end = time.monotonic() + self.final_seconds
        while self.flights and time.monotonic() < end:
            if not self._pull(self.clock()):
                time.sleep(self.poll)

    # -- messages ----------------------------------------------------------------------------------
    def outgoing(self, node: _Node, receipts: list[bytes]) -> list[tuple[str, bytes]]:
        """What one SuperNode is sent: the model release it lacks, the round's (or the end's)
        announcement, its device's receipts."""
        items: list[tuple[str, bytes]] = []
        release = self.link.retained.get(topic_model(self.fleet))
        if release is not None and peek(release).model_version > node.model_version:
            items.append((topic_model(self.fleet), release))
        announce = self.link.retained.get(topic_round(self.fleet))
        if announce is not None:
            items.append((topic_round(self.fleet), announce))
        if node.device is not None:
            # a release targeted at this device (a group push, a canary wave), sent once
            targeted = self.link.retained.get(topic_release(self.fleet, node.device))
            if targeted and digest(targeted) != node.release_sent:
                items.append((topic_release(self.fleet, node.device), targeted))
                node.release_sent = digest(targeted)
            items += [(topic_receipt(self.fleet, node.device), r) for r in receipts]
        return items

    def _push(self, node_ids: list[int], message_type: str, round_id: int, ttl: float) -> None:
        from flwr.app import Message

        messages, flights = [], []
        for n in node_ids:
            node = self.nodes.setdefault(n, _Node())
            receipts = self.receipts.pop(node.device, []) if node.device else []
            messages.append(Message(content=pack(self.outgoing(node, receipts)),
                                    message_type=message_type, dst_node_id=n,
                                    group_id=str(round_id or "final"), ttl=ttl))
            flights.append(_Flight(n, round_id, receipts, self.clock() + ttl))
            node.asks += 1
        self.messages += len(messages)
        for mid, flight in zip(self.grid.push_messages(messages), flights, strict=True):
            if mid:
                self.flights[mid] = flight
            else:  # not stored (the node went away): its receipts wait, it is asked again
                self._failed(flight, "the SuperLink did not accept the message")

    def _failed(self, flight: _Flight, why: str) -> None:
        node = self.nodes[flight.node]
        if node.device is not None and flight.receipts:
            self._keep_receipts(node.device, flight.receipts)
        node.retry_at = self.clock() + RETRY_SECONDS
        log.warning("SuperNode %s, round %s: %s", flight.node, flight.round or "final", why)

    def _pull(self, now: float) -> int:
        """Handle the replies that have arrived; give up on expired messages."""
        if not self.flights:
            return 0
        replies = list(self.grid.pull_messages(set(self.flights)))
        for reply in replies:
            flight = self.flights.pop(reply.metadata.reply_to_message_id, None)
            if flight is None:
                continue
            try:
                self._reply(flight, reply)
            except Exception:  # nothing a SuperNode sends may stop the federation
                log.exception("SuperNode %s: reply dropped", flight.node)
        for mid, flight in list(self.flights.items()):
            if now > flight.expires:
                del self.flights[mid]
                self._failed(flight, "no reply before the round's deadline")
        return len(replies)

    def _reply(self, flight: _Flight, reply: Any) -> None:
        node = self.nodes[flight.node]
        if reply.has_error():
            # the ClientApp failed on the device; its reason stays there (its log)
            self._failed(flight, f"the ClientApp failed (Flower error code {reply.error.code})")
            return
        try:
            items = unpack(reply.content)
        except WireError as exc:
            self._failed(flight, f"reply ignored: {exc.reason} ({exc})")
            return
        node.asks = -1 if flight.round == node.round else node.asks  # answered: not asked again
        self.receive(node, items)

    def receive(self, node: _Node, items: list[tuple[str, bytes]]) -> None:
        """Hand a SuperNode's reply to the aggregator, as its messages would arrive on its
        device's MQTT topic."""
        for topic, payload in items:
            if topic_matches(topic_updates_all(self.fleet), topic):
                self._update(node, payload)
            elif topic_matches(topic_status_all(self.fleet), topic):
                self._node_status(node, payload)
            elif topic_matches(topic_reports_all(self.fleet), topic) and node.device is not None:
                # release reports, under the bound device's topic (its signer is checked there)
                self.link.deliver(topic_report(self.fleet, node.device), payload)
        self.agg.step(0.0)
        self._collect()

    def _update(self, node: _Node, payload: bytes) -> None:
        """A bound node's update goes to the aggregator under its device's topic (a mismatch
        with the signer is rejected there, as Mosquitto's ACL would refuse it). An unbound
        node's must carry a valid device signature first (a stranger's bytes never reach the
        aggregator's records); a fresh update or decline for the open round that the aggregator
        records binds the node to that device."""
        if node.device is not None:
            self.link.deliver(topic_update(self.fleet, node.device), payload)
            return
        try:
            env = decode(payload, self.agg.devices, kinds={KIND_UPDATE})
        except BedsideError as exc:
            log.warning("an unbound SuperNode sent an update that is not authentic: %s", exc)
            return
        h, state = env.header, self.agg.state
        cur = state.current_round()

        def recorded() -> bool:
            assert cur is not None
            if env.tensors:
                return state.nonce_seen(h.sender, h.nonce) == (cur.round, env.digest)
            return h.sender in state.declines(cur.round)

        fresh = cur is not None and h.round == cur.round and not recorded()
        self.link.deliver(topic_update(self.fleet, h.sender), payload)
        self.agg.step(0.0)
        if not (fresh and recorded()):
            return  # another round's, a copy of what was recorded already, or rejected
        for other in self.nodes.values():  # the device's SuperNode restarted: a new node id
            if other is not node and other.device == h.sender:
                other.device = None
        node.device = h.sender
        log.info("SuperNode bound to device %s (its signed %s for round %d)", h.sender,
                 "update" if env.tensors else "decline", cur.round)

    def _node_status(self, node: _Node, payload: bytes) -> None:
        """A device's status: which model version its SuperNode holds (so a release is sent
        once), and, once the node is bound, the device's last status for operators."""
        body = _status_body(payload)
        if body is None:
            return
        version = body.get("model_version")
        if isinstance(version, int) and not isinstance(version, bool):
            node.model_version = version
        if node.device is not None:
            self.statuses[node.device] = body
            self._write_status(node.device, body)

    def _keep_receipts(self, device: str, receipts: list[bytes]) -> None:
        kept = self.receipts.setdefault(device, [])
        kept[:0] = receipts
        del kept[:-MAX_RECEIPTS]

    def _collect(self) -> None:
        """What the aggregator published: receipts wait for their device's next message; its
        status is written out. Announcements and releases stay in ``link.retained``."""
        for topic, payload in self.link.take():
            if topic_matches(topic_receipts_all(self.fleet), topic):
                device = topic.rsplit("/", 1)[-1]
                self.receipts.setdefault(device, []).append(payload)
                del self.receipts[device][:-MAX_RECEIPTS]
            elif topic == topic_status(self.fleet, AGGREGATOR_ID):
                body = _status_body(payload)
                if body is not None:
                    self._write_status(AGGREGATOR_ID, body)

    def _write_status(self, who: str, body: dict[str, Any]) -> None:
        """``<who>.json``: the last status (what MQTT would retain); the aggregator's are also
        appended to ``aggregator.jsonl``, one line each (every round's result, in order)."""
        if self.status_dir is None:
            return
        data = json.dumps(body, default=float).encode()
        atomic_write_bytes(self.status_dir / f"{who}.json", data)
        if who == AGGREGATOR_ID:
            with (self.status_dir / f"{AGGREGATOR_ID}.jsonl").open("ab") as f:
                f.write(data + b"\n")


def _status_body(payload: bytes) -> dict[str, Any] | None:
    """A status as a flat JSON object, or None (too large, not JSON, nested too deeply)."""
    if len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        body = json.loads(payload)
        json.dumps(body)  # what is written out again must survive the round trip
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def status_dir(cfg: Any) -> Path:
    """Where the ServerApp writes statuses for an aggregator configured by ``cfg``."""
    return Path(cfg.data_dir) / "flower" / "status"


def federation_done(cfg: Any, since: float) -> bool:
    """Whether the aggregator's last status, written after ``since``, says the federation is
    done."""
    try:
        body = _status_body((status_dir(cfg) / f"{AGGREGATOR_ID}.json").read_bytes())
    except OSError:
        return False
    if body is None:
        return False
    at = body.get("time")
    return body.get("state") == "done" and isinstance(at, int | float) and at >= since


def serve(grid: Any, config: str | Path) -> None:
    """Run the federation of ``aggregator.toml`` at ``config`` over ``grid``."""
    from bedside.aggregator.config import load
    from bedside.aggregator.service import Aggregator

    cfg = load(config)
    out = status_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with _only_one(out.parent / "serverapp.lock", cfg.source):
        link = Mailbox()
        agg = Aggregator(cfg, link)
        try:
            poll = cfg.flower.poll_seconds if cfg.flower is not None else 0.2
            FlowerDriver(agg, link, grid, poll=poll, status_dir=out).run()
        finally:
            agg.state.close()


@contextlib.contextmanager
def _only_one(lock: Path, source: str) -> Iterator[None]:
    """One ServerApp per federation: a second run submitted to the SuperLink (by mistake, or by
    someone who can reach its Control API) fails instead of sharing the state."""
    import fcntl

    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{source}: another ServerApp is running this federation; stop "
                              "its run ('flwr stop') before submitting another") from None
        yield


# -- processes (``bedside flower superlink|run``) -----------------------------------------------
def _flower(cfg: Any) -> Any:
    if cfg.flower is None:
        raise ConfigError(f"{cfg.source}: no [flower] table; add one to run the federation over "
                          "Flower (docs/flower.md), e.g. [flower] with insecure = true on "
                          "127.0.0.1 for a test, or TLS files for production")
    return cfg.flower


def flower_home(cfg: Any) -> Path:
    fl = _flower(cfg)
    return Path(fl.home) if fl.home is not None else Path(cfg.data_dir) / "flower" / "home"


def superlink_command(cfg: Any) -> tuple[list[str], dict[str, str]]:
    """The SuperLink of the federation configured by ``cfg`` (argv, environment)."""
    from bedside.transport.flower import CONFIG_ENV, flower_env, superlink_argv, write_runtime

    fl = _flower(cfg)
    database = (Path(fl.database) if fl.database is not None
                else Path(cfg.data_dir) / "flower" / "superlink.db")
    database.parent.mkdir(parents=True, exist_ok=True)
    bin_dir = write_runtime(Path(cfg.data_dir) / "flower" / "bin", "flwr-serverapp",
                            "bedside.aggregator.flower_app", "serverapp_main")
    env = flower_env(flower_home(cfg), bin_dir)
    env[CONFIG_ENV] = str(Path(cfg.source).resolve())
    return superlink_argv(fl, database), env


def run_command(cfg: Any, *, stream: bool = True) -> tuple[list[str], dict[str, str]]:
    """``flwr run`` of Bedside's app (argv, environment): writes the app and the connection.
    Which federation runs is the SuperLink's (``bedside flower superlink --config``), not the
    submitted app's."""
    from bedside.transport.flower import flower_env, run_argv, write_app, write_connection

    fl = _flower(cfg)
    home = flower_home(cfg)
    write_connection(home, fl)
    app_dir = write_app(Path(cfg.data_dir) / "flower" / "app")
    return run_argv(app_dir, stream=stream), flower_env(home)
