"""Flower for tests: an in-memory Grid that runs Bedside's real ClientApp, and real Flower
processes (SuperLink, SuperNodes, ``flwr run``) on free 127.0.0.1 ports."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.demo.run import to_toml
from bedside.transport import free_port
from bedside.transport.flower import start_process, stop_processes, wait_listening
from tests.fleet import Fleet


class MemoryGrid:
    """The part of Flower's ``Grid`` the ServerApp driver uses, delivering every message to the
    real ClientApp (:data:`bedside.edge.flower.app`) of the node's ``agent.toml``, in this
    process. ``down`` holds node ids that do not answer, ``failing`` those whose ClientApp
    fails (an error reply)."""

    def __init__(self, agent_tomls: list[Path]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # a ServerApp
        # process has them; Message() reads them
        self.configs = {i + 1: str(p) for i, p in enumerate(agent_tomls)}
        self.down: set[int] = set()
        self.failing: set[int] = set()
        self.pushed: list[Any] = []
        self._replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.configs)

    def push_messages(self, messages: list[Any]) -> list[str]:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from bedside.edge.flower_app import app

        ids = []
        for m in messages:
            mid = m.object_id  # what Flower's push assigns as the message id
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            ids.append(mid)
            self.pushed.append(m)
            if node in self.down:
                continue
            if node in self.failing:
                from flwr.app import Message
                from flwr.app.error import Error

                self._replies[mid] = Message(Error(code=1, reason="failed"), reply_to=m)
                continue
            ctx = Context(run_id=1, node_id=node, node_config={"agent-config":
                                                               self.configs[node]},
                          state=RecordDict(), run_config={})
            TaskIdentity.node_id = node  # the reply's source, as in the node's ClientApp
            try:
                self._replies[mid] = app(message=m, context=ctx)
            finally:
                TaskIdentity.node_id = 0
        return ids

    def pull_messages(self, ids: set[str]) -> list[Any]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


def set_flower(fleet: Fleet, *, tls: Path | None = None) -> int:
    """Give the fleet's configs a ``[flower]`` table (insecure on loopback, or TLS with the CA
    and server certificate in ``tls``, as ``bedside broker certs`` writes them: the broker's
    certificate serves the SuperLink); return the port."""
    port = free_port()
    agg: dict[str, Any] = {"port": port}
    node: dict[str, Any] = {"superlink": f"127.0.0.1:{port}"}
    if tls is None:
        agg["insecure"] = node["insecure"] = True
    else:
        agg.update(ca_file=str(tls / "ca.crt"), cert_file=str(tls / "broker.crt"),
                   key_file=str(tls / "broker.key"))
        node["ca_file"] = str(tls / "ca.crt")
    fleet.plan["aggregator"]["flower"] = agg
    fleet.plan["aggregator"]["mqtt"]["port"] = 1883  # unused over Flower
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    for i, c in enumerate(fleet.plan["clinics"]):
        c["config"]["flower"] = {**node, "port": free_port()}
        c["config"]["mqtt"]["port"] = 1883
        fleet.agent_toml(i).write_text(to_toml(c["config"]))
    return port


@dataclass
class FlowerProcesses:
    """A SuperLink and one SuperNode per clinic, started with Bedside's own commands."""

    fleet: Fleet
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.procs[name] = start_process((argv, env), self.logs / f"{name}.log")

    def start(self, clinics: list[int] | None = None) -> None:
        from bedside.aggregator.config import load as load_agg
        from bedside.aggregator.flower import superlink_command
        from bedside.edge.config import load as load_agent
        from bedside.edge.flower import supernode_command

        self.logs.mkdir(parents=True, exist_ok=True)
        self._start("superlink", *superlink_command(load_agg(self.fleet.aggregator_toml)))
        assert wait_listening(load_agg(self.fleet.aggregator_toml).flower.port, 60), "SuperLink"
        for i in clinics if clinics is not None else range(len(self.fleet.clinic_ids)):
            path = self.fleet.agent_toml(i)
            self._start(self.fleet.clinic_ids[i], *supernode_command(load_agent(path), path))

    def run(self, timeout: float = 600, app: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Submit the federation (``flwr run --stream``; ``app``: another app directory in its
        place) and wait for it to end."""
        from bedside.aggregator.config import load as load_agg
        from bedside.aggregator.flower import run_command

        argv, env = run_command(load_agg(self.fleet.aggregator_toml))
        if app is not None:
            argv[2] = str(app)  # flwr run APP_DIR CONNECTION --stream
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
