"""A generic HTTP client (Python `requests`) against `cella serve`, for the e2e tests.

    python3 post.py URL CA_PEM API_KEY < plan.json

plan.json is a list of requests, run at once on threads of their own:

    {"name": "...", "path": "/v1/jobs", "after": 0.0,
     "body": {"kind": "sized" | "chunked", "bytes": N, "chunk": 8192, "every": 0.0}}

`sized` sends N bytes with Content-Length; `chunked` sends them from a generator (chunked
transfer encoding) in `chunk`-byte pieces, one every `every` seconds. `after` delays the start.
`{"name": ..., "hold": S}` instead opens a TLS connection, sends nothing and keeps it S seconds.

Prints one JSON object per request, in plan order: name, status, retry_after, problem (the
parsed problem document) or error (the exception's type and text).
"""

import json
import socket
import ssl
import sys
import threading
import time

import requests

url, ca, key = sys.argv[1], sys.argv[2], sys.argv[3]
plan = json.load(sys.stdin)


def body(spec):
    n, chunk, every = spec["bytes"], spec.get("chunk", 8192), spec.get("every", 0.0)
    if spec["kind"] == "sized":
        return b"a" * n

    def pieces():
        sent = 0
        while sent < n:
            if every:
                time.sleep(every)
            piece = min(chunk, n - sent)
            yield b"a" * piece
            sent += piece

    return pieces()


def hold(seconds):
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port))) as raw:
        with context.wrap_socket(raw, server_hostname=host):
            time.sleep(seconds)
    return {}


def post(item):
    time.sleep(item.get("after", 0.0))
    if "hold" in item:
        return hold(item["hold"])
    try:
        r = requests.post(
            url + item["path"],
            data=body(item["body"]),
            headers={"Authorization": "Bearer " + key},
            verify=ca,
            timeout=120,
        )
    except Exception as e:  # noqa: BLE001 - the test wants to see what a client would
        return {"error": f"{type(e).__name__}: {e}"}
    out = {"status": r.status_code, "retry_after": r.headers.get("Retry-After")}
    if r.headers.get("Content-Type") == "application/problem+json":
        out["problem"] = r.json()
    else:
        out["body"] = r.text[:200]
    return out


results = [None] * len(plan)


def run(i, item):
    results[i] = {"name": item["name"], **post(item)}


threads = [threading.Thread(target=run, args=(i, item)) for i, item in enumerate(plan)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for r in results:
    print(json.dumps(r))
