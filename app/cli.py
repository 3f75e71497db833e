"""``vqa-serve``: run the service with uvicorn, draining gracefully on SIGTERM/SIGINT -- one
process, or with ``VQA_WORKERS`` > 1 front ends and a model process (app/process/supervisor.py)."""

from __future__ import annotations

import argparse
import logging

from .main import create_app, front_door
from .process.server import DrainingServer, uvicorn_config
from .process.supervisor import resolve_workers, serve
from .settings import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(prog="vqa-serve", description="Serve the VQA model over HTTP. "
                                "All settings are VQA_* environment variables (see README).")
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    args = p.parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = resolve_workers(settings)
    if workers > 1:  # front ends + one model-owning process
        raise SystemExit(serve(args.host, args.port, workers, settings))
    app = create_app(settings)  # the model loads when the server starts
    service = app.state.service
    config = uvicorn_config(front_door(app), service, settings, args.host, args.port)
    server = DrainingServer(config, service, drain_grace_s=settings.drain_grace_s)
    # The listening socket is ours (not uvicorn's), so the drain can empty its accept queue.
    server.run(sockets=[config.bind_socket()])


if __name__ == "__main__":
    main()
