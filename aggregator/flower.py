"""The aggregator's Flower ServerApp: the aggregator service, driven over a Flower Grid.

``bedside flower run --config aggregator.toml`` submits this ServerApp to the SuperLink. It runs
the same :class:`~bedside.aggregator.service.Aggregator` as ``bedside aggregator serve``, with a
:class:`~bedside.transport.flower.Mailbox` for a transport, so rounds, validation
(:func:`~bedside.federation.validate.validate_update`), aggregation
(:func:`~bedside.federation.aggregate.aggregate_round`), the registry, signed releases, receipts,
``state.db`` and the privacy report are the MQTT service's, unchanged. :class:`FlowerDriver` does
what the MQTT broker does there:

* while a round is open, every SuperNode that has not been asked yet gets one Flower message
  (``train``) with the round's signed announcement, the signed model release it lacks (the
  release's version against the version the node's last status reported) and the receipts
  waiting for its device;
* what comes back (the device's signed update or decline, and its status) is handed to the
  aggregator as it would arrive on the device's MQTT topic. A SuperNode is bound to the device
  whose signature its first update carries: a later envelope it sends under another device's
  name is rejected as a topic mismatch, as Mosquitto's ACL would refuse it;
* when the federation is done, every SuperNode gets a last message (``query``) with the final
  model and the end of the federation.

Statuses (the aggregator's and each device's last) are written as JSON files in
``<data_dir>/flower/status/``, where ``bedside demo`` and operators read them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.constants import (
    AGGREGATOR_ID,
    KIND_UPDATE,
    topic_model,
    topic_receipt,
    topic_receipts_all,
    topic_round,
    topic_status,
    topic_status_all,
    topic_update,
    topic_updates_all,
)
from bedside.errors import BedsideError, WireError
from bedside.files import atomic_write_bytes
from bedside.transport import topic_matches
from bedside.transport.flower import APP_CONFIG_KEY, Mailbox, pack, unpack
from bedside.wire.envelope import decode, peek

log = logging.getLogger("bedside.aggregator.flower")

#: How long the last message of a federation (final model, end) may take to be answered.
FINAL_SYNC_SECONDS = 60.0
#: A device's status larger than this is not read (it is a few hundred bytes).
MAX_STATUS_BYTES = 64 * 1024


@dataclass
class _Node:
    device: str | None = None  # bound by the first authentic update it carried
    model_version: int = 0  # what its last status said it holds
    asked: int = 0  # the last round it was sent


class FlowerDriver:
    """Drives an :class:`~bedside.aggregator.service.Aggregator` whose transport is ``link``
    over a Flower ``grid`` (``send_and_receive``, ``get_node_ids``)."""

    def __init__(self, aggregator: Any, link: Mailbox, grid: Any, *,
                 clock: Callable[[], float] = time.time, poll: float = 0.2,
                 status_dir: Path | None = None) -> None:
        self.agg, self.link, self.grid = aggregator, link, grid
        self.fleet = aggregator.cfg.fleet
        self.clock, self.poll = clock, poll
        self.status_dir = status_dir
        self.nodes: dict[int, _Node] = {}
        self.receipts: dict[str, list[bytes]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.messages = 0  # Flower messages sent (benchmarks)

    # -- the federation ----------------------------------------------------------------------------
    def run(self) -> None:
        from flwr.app import MessageType

        self.agg.start()
        self._collect()
        while not self.agg.finished:
            cur = self.agg.state.current_round()
            assert cur is not None
            remaining = cur.deadline - self.clock()
            ask = [n for n in self.grid.get_node_ids()
                   if self.nodes.setdefault(n, _Node()).asked != cur.round]
            if ask:
                for n in ask:
                    self.nodes[n].asked = cur.round
                self._exchange(ask, MessageType.TRAIN, str(cur.round), max(remaining, 1.0))
            else:
                time.sleep(max(0.0, min(self.poll, remaining)))
            self.agg.step(0.0)
            self._collect()
        nodes = list(self.grid.get_node_ids())
        if nodes:  # the end of the federation and the final model, to every device
            self._exchange(nodes, MessageType.QUERY, "final", FINAL_SYNC_SECONDS)
        log.info("federation done over Flower: %d message(s) to %d SuperNode(s)", self.messages,
                 len(self.nodes))

    # -- messages ----------------------------------------------------------------------------------
    def outgoing(self, node: _Node) -> list[tuple[str, bytes]]:
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
            items += [(topic_receipt(self.fleet, node.device), r)
                      for r in self.receipts.pop(node.device, [])]
        return items

    def _exchange(self, node_ids: Iterable[int], message_type: str, group: str,
                  timeout: float) -> None:
        from flwr.app import Message

        messages = [Message(content=pack(self.outgoing(self.nodes.setdefault(n, _Node()))),
                            message_type=message_type, dst_node_id=n, group_id=group)
                    for n in node_ids]
        self.messages += len(messages)
        for reply in self._send_and_receive(messages, timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("SuperNode %s answered with an error: %s", node_id,
                            reply.error.reason)
                continue
            try:
                self.receive(self.nodes.setdefault(node_id, _Node()), unpack(reply.content))
            except WireError as exc:
                log.warning("SuperNode %s: reply ignored: %s (%s)", node_id, exc.reason, exc)

    def _send_and_receive(self, messages: list[Any], timeout: float) -> Iterable[Any]:
        """``Grid.send_and_receive``, polling every ``poll`` seconds instead of Flower's fixed
        3 s (a round's replies arrive within a second of each other)."""
        pending = set(self.grid.push_messages(messages))
        end = time.monotonic() + timeout
        while pending:
            replies = list(self.grid.pull_messages(pending))
            pending -= {r.metadata.reply_to_message_id for r in replies}
            yield from replies
            if not pending or time.monotonic() >= end:
                return
            time.sleep(self.poll)

    def receive(self, node: _Node, items: list[tuple[str, bytes]]) -> None:
        """Hand a SuperNode's reply to the aggregator, as its messages would arrive over MQTT."""
        for topic, payload in items:
            if topic_matches(topic_updates_all(self.fleet), topic):
                self._bind(node, payload)
                device = node.device or topic.rsplit("/", 1)[-1]
                self.link.deliver(topic_update(self.fleet, device), payload)
            elif topic_matches(topic_status_all(self.fleet), topic):
                self._node_status(node, payload)
        self.agg.step(0.0)
        self._collect()

    def _bind(self, node: _Node, payload: bytes) -> None:
        """Bind an unbound SuperNode to the device that signed its update (verified here, once;
        the aggregator verifies every message again)."""
        if node.device is not None:
            return
        try:
            env = decode(payload, self.agg.devices, kinds={KIND_UPDATE})
        except BedsideError:
            return  # the aggregator rejects it, with its reason
        for other in self.nodes.values():  # the device's SuperNode restarted: a new node id
            if other is not node and other.device == env.header.sender:
                other.device = None
        node.device = env.header.sender
        log.info("SuperNode bound to device %s (its signed update)", node.device)

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

    def _collect(self) -> None:
        """What the aggregator published: receipts wait for their device's next message; its
        status is written out. Announcements and releases stay in ``link.retained``."""
        for topic, payload in self.link.take():
            if topic_matches(topic_receipts_all(self.fleet), topic):
                self.receipts.setdefault(topic.rsplit("/", 1)[-1], []).append(payload)
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
    if len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def status_dir(cfg: Any) -> Path:
    """Where the ServerApp writes statuses for an aggregator configured by ``cfg``."""
    return Path(cfg.data_dir) / "flower" / "status"


def serve(grid: Any, config: str | Path) -> None:
    """Run the federation of ``aggregator.toml`` at ``config`` over ``grid``."""
    from bedside.aggregator.config import load
    from bedside.aggregator.service import Aggregator

    cfg = load(config)
    link = Mailbox()
    agg = Aggregator(cfg, link)
    out = status_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    try:
        poll = cfg.flower.poll_seconds if cfg.flower is not None else 0.2
        FlowerDriver(agg, link, grid, poll=poll, status_dir=out).run()
    finally:
        agg.state.close()


def _server_app() -> Any:
    from flwr.serverapp import ServerApp

    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        from bedside.cli import configure_logging

        configure_logging(verbose=False)
        path = context.run_config.get(APP_CONFIG_KEY)
        if not isinstance(path, str) or not path:
            raise BedsideError(f"the Flower app has no {APP_CONFIG_KEY!r}; submit it with "
                               "'bedside flower run --config aggregator.toml'")
        serve(grid, path)

    return server


app = _server_app()


# -- processes (``bedside flower superlink|run``) -----------------------------------------------
def _flower(cfg: Any) -> Any:
    from bedside.errors import ConfigError

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
    from bedside.transport.flower import flower_env, superlink_argv

    fl = _flower(cfg)
    database = (Path(fl.database) if fl.database is not None
                else Path(cfg.data_dir) / "flower" / "superlink.db")
    database.parent.mkdir(parents=True, exist_ok=True)
    return superlink_argv(fl, database), flower_env(flower_home(cfg))


def run_command(cfg: Any, config_path: Path, *, stream: bool = True
                ) -> tuple[list[str], dict[str, str]]:
    """``flwr run`` of Bedside's app for the federation at ``config_path`` (argv, environment):
    writes the app (its pyproject.toml names this aggregator.toml) and the connection."""
    from bedside.transport.flower import flower_env, run_argv, write_app, write_connection

    fl = _flower(cfg)
    home = flower_home(cfg)
    write_connection(home, fl)
    app_dir = write_app(Path(cfg.data_dir) / "flower" / "app", config_path)
    return run_argv(app_dir, stream=stream), flower_env(home)
