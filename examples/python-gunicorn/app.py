"""A plain WSGI app, served by gunicorn."""

import os


def app(environ, start_response):
    body = f"hello from gunicorn on {os.uname().nodename}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]
