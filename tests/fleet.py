"""Build a small federation in a directory, for tests (reuses the demo's preparation)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.demo.run import DemoConfig, prepare, to_toml


@dataclass
class Fleet:
    work: Path
    plan: dict[str, Any]
    threads: list[threading.Thread] = field(default_factory=list)
    agents: list[Any] = field(default_factory=list)  # started by start_agent

    @property
    def aggregator_toml(self) -> Path:
        return self.plan["aggregator_dir"] / "aggregator.toml"

    def agent_toml(self, i: int) -> Path:
        return self.plan["clinics"][i]["dir"] / "agent.toml"

    @property
    def clinic_ids(self) -> list[str]:
        return [c["id"] for c in self.plan["clinics"]]


def make_fleet(work: Path, *, clients: int = 3, rounds: int = 3, mode: str = "central",
               broker: Any = None, aggregator: dict[str, Any] | None = None,
               agent: dict[str, Any] | None = None, extra_devices: int = 0,
               statistics: bool = False, **demo: Any) -> Fleet:
    """Prepare data, keys and configs; ``broker`` (tests.brokers.Broker) sets MQTT settings.
    ``statistics``: keep the demo's feature-statistics round (off: every round trains, which is
    what most tests count on)."""
    agg = {**({} if statistics else {"statistics": None}), **(aggregator or {})}
    cfg = DemoConfig(clients=clients, rounds=rounds, mode=mode, out=work,
                     extra={"aggregator": agg, "agent": agent or {}}, **demo)
    work.mkdir(parents=True, exist_ok=True)
    plan = prepare(cfg, work)
    if extra_devices:  # enrolled devices that never answer: keep rounds open until the deadline
        from bedside.wire.signing import SigningKey

        for i in range(extra_devices):
            SigningKey.generate().public.save(
                plan["aggregator_dir"] / "keys" / "devices" / f"silent-{i}.pub")
    fleet = Fleet(work=work, plan=plan)
    if broker is not None:
        set_broker(fleet, broker)
    return fleet


def set_broker(fleet: Fleet, broker: Any) -> None:
    fleet.plan["aggregator"]["mqtt"] = broker.table("aggregator")
    (fleet.aggregator_toml).write_text(to_toml(fleet.plan["aggregator"]))
    for i, c in enumerate(fleet.plan["clinics"]):
        c["config"]["mqtt"] = broker.table(c["id"])
        fleet.agent_toml(i).write_text(to_toml(c["config"]))


# -- in-memory federations (unit tests) ------------------------------------------------------------
class Clock:
    """A settable clock for deadlines."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class MemFleet:
    fleet: Fleet
    broker: Any
    aggregator: Any
    agents: list[Any]
    clock: Clock

    def step(self, agents: list[Any] | None = None) -> bool:
        alive = self.aggregator.step(0.0)
        for a in self.agents if agents is None else agents:
            a.step(0.0)
        return bool(alive)

    def run(self, max_steps: int = 2000, agents: list[Any] | None = None) -> None:
        for _ in range(max_steps):
            if not self.step(agents):
                break
        for a in self.agents if agents is None else agents:  # see the final release
            a.step(0.0)

    def new_agent(self, i: int) -> Any:
        from bedside.edge.agent import Agent
        from bedside.edge.config import load as load_agent
        from bedside.transport.memory import MemoryTransport

        cid = self.fleet.clinic_ids[i]
        return Agent(load_agent(self.fleet.agent_toml(i)),
                     MemoryTransport(self.broker, cid, clean_session=False), clock=self.clock)

    def restart(self) -> None:
        """New aggregator and agents from the configuration files, started."""
        self.aggregator = self.new_aggregator()
        self.agents = [self.new_agent(i) for i in range(len(self.fleet.clinic_ids))]
        self.aggregator.start()
        for a in self.agents:
            a.start()

    def new_aggregator(self) -> Any:
        from bedside.aggregator.config import load as load_agg
        from bedside.aggregator.service import Aggregator
        from bedside.transport.memory import MemoryTransport

        return Aggregator(load_agg(self.fleet.aggregator_toml),
                          MemoryTransport(self.broker, "aggregator", clean_session=False,
                                          manual_ack=True), clock=self.clock)


def seeded_fleet(work: Path, **kw: Any) -> Fleet:
    """:func:`make_fleet` with every noise draw seeded (deterministic unit tests) and a nominal
    MQTT port (an in-memory transport does not use it)."""
    fleet = make_fleet(work, **kw)
    fleet.plan["aggregator"]["mqtt"]["port"] = 1883
    fleet.plan["aggregator"]["privacy"].setdefault("noise_seed", 0)
    fleet.plan["aggregator"]["testing"] = True
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    for i, c in enumerate(fleet.plan["clinics"]):
        c["config"]["mqtt"]["port"] = 1883
        c["config"].setdefault("agent", {})["seed"] = i
        c["config"]["testing"] = True
        fleet.agent_toml(i).write_text(to_toml(c["config"]))
    return fleet


def mem_fleet(work: Path, **kw: Any) -> MemFleet:
    return start_mem(seeded_fleet(work, **kw))


def start_mem(fleet: Fleet, clock_start: float | None = None) -> MemFleet:
    """The aggregator and every agent of ``fleet`` on a new in-memory broker, started (each
    reads its configuration now: change the files first). ``clock_start``: the services' clock
    (default: a fixed time in 1970)."""
    from bedside.transport.memory import MemoryBroker

    clock = Clock() if clock_start is None else Clock(clock_start)
    mf = MemFleet(fleet=fleet, broker=MemoryBroker(), aggregator=None, agents=[], clock=clock)
    mf.restart()
    return mf


class GatedTransport:
    """Wraps a real transport; while ``closed`` the device's uplink is down (publish fails)."""

    def __init__(self, inner: Any, *, closed: bool = False) -> None:
        self.inner = inner
        self.closed = closed

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        from bedside.errors import TransportError

        if self.closed:
            raise TransportError("uplink down (test gate)")
        self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        return self.inner.wait_subscribed(topic_filter, timeout)

    def get(self, timeout: float | None = None) -> Any:
        return self.inner.get(timeout)

    @property
    def connected(self) -> bool:
        return not self.closed and bool(self.inner.connected)

    def close(self) -> None:
        self.inner.close()


def start_agent(fleet: Fleet, i: int, *, gated: bool = False,
                offline: bool = False) -> tuple[Any, threading.Event, threading.Thread]:
    """Run clinic i's agent in a thread over the fleet's broker settings.

    ``gated`` wraps its transport in a :class:`GatedTransport`; ``offline`` (implies ``gated``)
    starts with the uplink down, so that nothing is published before the test opens the gate
    (closing it after the thread started races with a fast first round).
    """
    from bedside.edge.agent import Agent
    from bedside.edge.config import load as load_agent
    from bedside.transport.mqtt import MqttTransport

    cfg = load_agent(fleet.agent_toml(i))
    transport: Any = MqttTransport(cfg.mqtt, client_id=cfg.device_id, clean_session=False)
    if gated or offline:
        transport = GatedTransport(transport, closed=offline)
    agent = Agent(cfg, transport)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), kwargs={"poll": 0.05}, daemon=True,
                         name=cfg.device_id)
    t.start()
    fleet.threads.append(t)
    fleet.agents.append(agent)
    return agent, stop, t


def close_agents(fleet: Fleet) -> None:
    """Close the clients of the agents :func:`start_agent` started (their threads stopped): none
    is left reconnecting to a broker the test stops."""
    for agent in fleet.agents:
        agent.transport.close()
        agent.close()
    fleet.agents.clear()


def start_aggregator(fleet: Fleet) -> tuple[Any, threading.Event, threading.Thread]:
    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.service import Aggregator

    agg = Aggregator(load_agg(fleet.aggregator_toml))
    stop = threading.Event()
    t = threading.Thread(target=agg.run, args=(stop,), kwargs={"poll": 0.05}, daemon=True,
                         name="aggregator")
    t.start()
    return agg, stop, t


def wait_for(cond: Any, timeout: float, what: str, poll: float = 0.1) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
