"""`vlrl serve`: a Tinker-compatible training and sampling service on vlrl's own trainer and engines.

    wire.py     Tinker's wire format (the SDK's protobuf schema) <-> plain Python
    losses.py   Tinker's built-in losses on one datum's log-probs
    service.py  the models, optimizer steps, checkpoints and sampling (one thread, no locks)
    jobs.py     requests as futures: one worker, each model's requests in seq_id order, retries answered once
    store.py    what outlives the process (SQLite under --state)
    app.py      the HTTP routes, API key and size limits (Starlette, served by uvicorn)
"""

from __future__ import annotations

from pathlib import Path


def run_server(model: str, state_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str = "",
               engine: str = "hf", served_names: tuple[str, ...] = (), gpu_memory_utilization: float = 0.3,
               dtype: str | None = None, log=print) -> None:
    """Load the model and serve until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    from .app import make_app
    from .service import Service

    service = Service(model, state_dir, engine=engine, served_names=served_names,
                      gpu_memory_utilization=gpu_memory_utilization, dtype=dtype)
    app = make_app(service, api_key, log=log)
    log(f"vlrl serve: {model} ({engine} engine) on http://{host}:{port}, state in {state_dir}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=75)
    except SystemExit as e:  # uvicorn exits 3 when it cannot listen (the port was taken after the CLI checked it)
        if e.code not in (0, None):
            from ..errors import UserError

            raise UserError(f"could not listen on {host}:{port} (uvicorn exit {e.code}); is the port in use?") from None
        raise
    finally:
        app.jobs.stop()
