"""``sigil-server run``: start the server in this process."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from ca import log
from ca.cli.common import (
    _fail,
)
from identity.errors import SigilError


@click.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML config file (see docs/configuration.md).")
@click.option("--trust-domain", help="Trust domain, e.g. example.org (required somewhere).")
@click.option("--data-dir", help="Where the datastore and keys live.")
@click.option("--bind-address", help="HOST:PORT of the agent API (TLS); port 0 picks one.")
@click.option("--socket-path", help="Path of the admin Unix socket.")
@click.option("--database-url", help="SQLAlchemy URL; default SQLite in the data dir.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["text", "json"]))
@click.option("--health-address",
              help='HOST:PORT of /live, /ready and /metrics (HTTP); "" turns it off.')
@click.option("--worker-processes",
              help="Agent API processes sharing the port; 0 = one per core.")
def run(config_file: str | None, **flags: str | None) -> None:
    """Run the server until SIGTERM or SIGINT.

    \b
    Example:
      sigil-server run --trust-domain example.org --data-dir ./data \\
          --bind-address 127.0.0.1:8081 --socket-path /run/sigil-server/private/admin.sock
    """
    from ca.config.server import load_config

    try:
        config = load_config(Path(config_file) if config_file else None,
                             env=os.environ, overrides=flags)
    except SigilError as exc:
        _fail(str(exc))
    log.configure(level=config.log_level, fmt=config.log_format)
    metrics_dir = None
    if config.ops.workers > 1:
        import tempfile

        # Before anything imports prometheus_client: it picks its value store at
        # import time (multiprocess files here; see ca/metrics.py).
        metrics_dir = tempfile.mkdtemp(prefix="sigil-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from ca.ratelimit import BucketTable
    from ca.server import SigilServer
    from ca.workers import WorkerPool

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.event("shutdown requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    table = BucketTable()
    server = SigilServer(config, rate_table=table)
    pool: WorkerPool | None = None
    try:
        server.start()
        if config.ops.workers > 1:
            pool = WorkerPool(config, count=config.ops.workers - 1, table=table,
                              bind_address=server.agent_address)
            pool.start()
            server.readiness.add(pool.not_ready)
    except (SigilError, RuntimeError) as exc:
        server.stop(0)
        _fail(str(exc))
    try:
        while not stop.wait(3600):
            pass
    finally:
        if pool is not None:
            pool.stop()
        server.stop(grace=5.0)
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
