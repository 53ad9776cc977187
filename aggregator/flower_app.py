"""Bedside's Flower ServerApp, and the ``flwr-serverapp`` process a Bedside SuperLink runs.

A SuperLink started by ``bedside flower superlink --config aggregator.toml`` runs, for every run
submitted to it, :func:`serverapp_main` (a ``flwr-serverapp`` that calls it comes first on the
SuperLink's PATH): Flower's own ServerApp process (its Grid, heartbeat, log upload), with the app
fixed to :data:`app` below and the federation fixed to that ``aggregator.toml`` (the
``BEDSIDE_AGGREGATOR_CONFIG`` of the SuperLink's environment). The app (FAB) that comes with a run
is never installed or imported, and its run config is not read: submitting a run starts (or
resumes) this federation and nothing else.
"""

from __future__ import annotations

import os
from typing import Any

from bedside.errors import ConfigError
from bedside.transport.flower import CONFIG_ENV, refuse_dependencies, replace_in, skip_fab


def _server_app() -> Any:
    from flwr.serverapp import ServerApp

    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        from bedside.aggregator.flower import serve
        from bedside.cli import configure_logging

        configure_logging(verbose=False)
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"{CONFIG_ENV} is not set: start the SuperLink with 'bedside flower "
                              "superlink --config aggregator.toml'")
        serve(grid, path)

    return server


app = _server_app()


def serverapp_main() -> None:
    """``flwr-serverapp`` of a Bedside SuperLink (Flower's, with Bedside's app and no FAB)."""
    import importlib
    import tempfile
    from pathlib import Path

    from flwr.server.run_serverapp import run as run_server_app
    from flwr.superlink.cli import flwr_serverapp

    # the module, not the function of the same name its package exports
    runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    empty = Path(tempfile.mkdtemp(prefix="bedside-serverapp-"))

    def bedside_server_app(grid: Any, context: Any, **_: Any) -> Any:
        return run_server_app(grid=grid, context=context, server_app_dir=str(empty),
                              loaded_server_app=app)

    replace_in(runtime, install_from_fab=skip_fab, install_app_dependencies=refuse_dependencies,
               get_project_dir=lambda *_, **__: empty,
               get_project_config=lambda *_, **__: {
                   "tool": {"flwr": {"app": {"components": {"serverapp": "bedside"}}}}},
               get_fused_config_from_dir=lambda *_, **__: {}, run_=bedside_server_app)
    flwr_serverapp()
