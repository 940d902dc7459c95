"""The service's gunicorn settings without preload, for the memory comparison only.

Every worker imports the app and loads the models itself in the lifespan, as a
deployment without ``preload_app`` would; nothing is loaded in the master.
"""

from app.gunicorn_conf import *  # noqa: F403  the same bind, workers, worker class, timeouts

preload_app = False


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Load nothing in the master: the workers load the models after they fork."""


def on_reload(server) -> None:  # type: ignore[no-untyped-def]
    """Nothing to reload in the master."""
