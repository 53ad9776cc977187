"""Bedside's Flower ClientApp, and the ``flwr-clientapp`` process a Bedside SuperNode runs.

Flower's Deployment Engine runs, for every message, the ClientApp named by the app (FAB) that was
submitted to the SuperLink: whoever can submit a run would choose the code that runs on every
device, next to its records, keys and ledger. A Bedside SuperNode therefore starts its ClientApp
processes through :func:`clientapp_main` (``bedside flower supernode`` puts a ``flwr-clientapp``
that calls it first on the SuperNode's PATH): Flower's own ClientApp process (its Runtime API
client, heartbeat, message transfer), with the app fixed to :data:`app` below. The FAB that comes
with a run is never installed, imported or given dependencies.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bedside.errors import ConfigError
from bedside.transport.flower import (
    NODE_CONFIG_KEY,
    pack,
    refuse_dependencies,
    replace_in,
    skip_fab,
    unpack,
)

log = logging.getLogger("bedside.edge.flower")


def _config_path(context: Any) -> Path:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(f"this SuperNode has no {NODE_CONFIG_KEY!r} in its node config; start "
                          "it with 'bedside flower supernode --config agent.toml'")
    return Path(path)


def _reply(msg: Any, context: Any) -> Any:
    from flwr.app import Message

    from bedside.edge.config import load
    from bedside.edge.flower import exchange

    try:
        cfg = load(_config_path(context))
        return Message(content=pack(exchange(cfg, unpack(msg.content))), reply_to=msg)
    except Exception:
        # the reason stays on the device (its log): an exception's text could describe records
        log.exception("this device could not handle a Flower message")
        raise RuntimeError("the device could not handle the message; see its log") from None


def _client_app() -> Any:
    from flwr.clientapp import ClientApp

    client = ClientApp()
    client.train()(_reply)  # a round: the announcement opens it
    client.query()(_reply)  # no round: the end of the federation, a final model, receipts
    return client


app = _client_app()


def clientapp_main() -> None:
    """``flwr-clientapp`` of a Bedside SuperNode (Flower's, with Bedside's app and no FAB)."""
    import importlib
    import tempfile

    from flwr.supernode.cli import flwr_clientapp

    from bedside.cli import configure_logging

    configure_logging(verbose=False)
    # the module, not the function of the same name its package exports
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    replace_in(runtime, install_from_fab=skip_fab, install_app_dependencies=refuse_dependencies,
               get_project_dir=lambda *_, **__: Path(tempfile.gettempdir()),
               get_load_client_app_fn=lambda **_: (lambda *__: app))
    flwr_clientapp()
