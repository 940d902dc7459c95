"""The process around the app: gunicorn's worker class, the ASGI middleware, the rate-limit store."""
