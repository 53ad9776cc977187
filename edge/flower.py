"""The device's side of Flower: the edge agent, driven by Flower messages instead of MQTT.

A SuperNode started by ``bedside flower supernode --config agent.toml`` runs Bedside's ClientApp
(:mod:`bedside.edge.flower_app`) for every message the ServerApp sends it (in a fresh process, as
Flower's Deployment Engine does), and never the ClientApp of the app that was submitted. The
message carries Bedside's signed envelopes (the round's announcement, a model release the device
lacks, its receipts; :mod:`bedside.transport.flower`); :func:`exchange` hands them to the same
:class:`~bedside.edge.agent.Agent` the MQTT service runs, through a
:class:`~bedside.transport.flower.Mailbox`, and returns what the agent published: its signed
update or decline, and its status. Everything that protects the device's records is the agent's
and the round core's, unchanged: the pinned aggregator key, the model's verification and
self-test, the device's privacy policy, its ledger (which refuses a round over budget), DP-SGD,
clipping, local noise and its own signature. The ServerApp learns exactly what an aggregator
learns over MQTT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bedside.constants import topic_status
from bedside.errors import ConfigError
from bedside.transport.flower import Mailbox

log = logging.getLogger("bedside.edge.flower")


#: How long one Flower message may spend downloading a large model (the rest resumes with the
#: next message).
DOWNLOAD_SECONDS = 120.0


def exchange(cfg: Any, items: list[tuple[str, bytes]], *,
             clock: Callable[[], float] = time.time) -> list[tuple[str, bytes]]:
    """One Flower message for the device configured by ``cfg`` (an ``AgentConfig``): deliver
    ``items`` (topic, envelope) to its agent, let it act, return what it published (its update
    or decline, then its current status)."""
    from bedside.edge.agent import Agent

    link = Mailbox()
    agent = Agent(cfg, link, clock=clock)
    try:
        agent.start()
        for topic, payload in items:
            link.deliver(topic, payload)
        agent.step(0.0)
        if agent.settle_download(DOWNLOAD_SECONDS):  # a ClientApp lives for one message:
            agent.step(0.0)  # a large model is fetched within it, then installed
        agent.publish_status(force=True)
    finally:
        agent.close()
    status = topic_status(cfg.fleet, cfg.device_id)
    sent = link.take()
    # one status (the last) is enough: it is the retained message an MQTT broker would keep
    return [(t, p) for t, p in sent if t != status] + [next((t, p) for t, p in reversed(sent)
                                                            if t == status)]


def supernode_command(cfg: Any, config_path: Path) -> tuple[list[str], dict[str, str]]:
    """The SuperNode of the device configured by ``cfg`` at ``config_path`` (argv, environment);
    its ClientApp processes read that file."""
    from bedside.transport.flower import flower_env, supernode_argv, write_runtime

    if cfg.flower is None:
        raise ConfigError(f"{cfg.source}: no [flower] table; add one to take part over Flower "
                          "(docs/flower.md): superlink = \"HOST:PORT\" and ca_file (TLS), or "
                          "insecure = true on 127.0.0.1 for a test")
    bin_dir = write_runtime(Path(cfg.data) / "flower-bin", "flwr-clientapp",
                            "bedside.edge.flower_app", "clientapp_main")
    return (supernode_argv(cfg.flower, config_path),
            flower_env(Path(cfg.data) / "flower-home", bin_dir))
