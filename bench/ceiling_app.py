"""The ceiling: a bare ASGI app that reads the request and returns a fixed small JSON body.

Served by the same gunicorn and uvicorn worker settings as the service, it is
the most any Python HTTP stack can answer on this machine; the service's
throughput is reported as a fraction of it.
"""

BODY = (
    b'{"model":"iris","version":"1","prediction":"setosa",'
    b'"probabilities":{"setosa":1.0,"versicolor":0.0,"virginica":0.0},'
    b'"request_id":"00000000000000000000000000000000"}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # Read the whole body, as any endpoint that parses it must.
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
