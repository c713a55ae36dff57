#!/usr/bin/env python3
"""Real HTTP clients for op-bridge's proxy tests: each mode makes requests the way an
application would and prints one JSON document on stdout. Run it with the venv's python
(`bash tests/fake-upstream/setup.sh` prints it).

    clients.py requests METHOD URL [options]   # requests.Session (trusts the environment)
    clients.py httpx    METHOD URL [options]   # httpx.Client(trust_env=True)
    clients.py openai   --base-url URL --api-key KEY [--stream] [--api chat|responses|models]

Both HTTP modes honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY and the CA bundle in
REQUESTS_CA_BUNDLE / SSL_CERT_FILE from the environment (as a child of `op-bridge run`
gets them); --proxy and --ca override. The openai mode is the official SDK, which uses
httpx underneath (so the same environment applies; --ca or SSL_CERT_FILE is passed to it).

Options (HTTP modes):
  -H/--header "Name: value"   repeatable
  --data TEXT | --json TEXT   a request body (--json also sets Content-Type)
  --upload-bytes N            stream N bytes (byte i is i % 251) as a chunked body
  --download                  read the body as a stream: report body_len and body_sha256
  --events                    read the body line by line, timing each "data:" line
  --repeat N                  N requests on one keep-alive session (statuses of all,
                              details of the last)

Output: {"client", "results": [{"status", "headers", "body" | "body_len"+"body_sha256",
"events": [{"at": unix-seconds, "data": "..."}]}], "statuses": [...], "error": null}; on a
failure "error" holds the exception's type and message, and the exit code is 1.
"""

import argparse
import hashlib
import json
import os
import ssl
import sys
import time

BLOCK = bytes(i % 251 for i in range(251 * 261))


def pattern(n):
    """Yields n bytes of the upload pattern in blocks."""
    left = n
    while left:
        part = BLOCK[: min(left, len(BLOCK))]
        left -= len(part)
        yield part


def ca_file(args):
    return args.ca or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")


def body_kwargs(args):
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    kwargs = {"headers": headers}
    if args.json is not None:
        headers.setdefault("Content-Type", "application/json")
        kwargs["data"] = args.json.encode()
    elif args.data is not None:
        kwargs["data"] = args.data.encode()
    elif args.upload_bytes is not None:
        kwargs["data"] = pattern(args.upload_bytes)
    return kwargs


def read_response(status, headers, lines, chunks, args):
    result = {"status": status, "headers": {k.lower(): v for k, v in headers.items()}}
    if args.events:
        events = []
        for line in lines():
            if isinstance(line, bytes):
                line = line.decode()
            if line.startswith("data:"):
                events.append({"at": time.time(), "data": line[5:].strip()})
        result["events"] = events
    elif args.download:
        digest, length = hashlib.sha256(), 0
        for chunk in chunks():
            digest.update(chunk)
            length += len(chunk)
        result["body_len"] = length
        result["body_sha256"] = digest.hexdigest()
    else:
        result["body"] = b"".join(chunks()).decode("utf-8", "replace")
    return result


def run_requests(args):
    import requests

    session = requests.Session()
    if args.proxy:
        session.proxies = {"http": args.proxy, "https": args.proxy}
    verify = ca_file(args) or True
    results = []
    for _ in range(args.repeat):
        kwargs = body_kwargs(args)
        if args.upload_bytes is not None:
            kwargs["data"] = pattern(args.upload_bytes)
        with session.request(args.method, args.url, stream=True, verify=verify, timeout=args.timeout,
                             **kwargs) as r:
            results.append(read_response(r.status_code, r.headers, lambda: r.iter_lines(),
                                         lambda: r.iter_content(65536), args))
    return results


def run_httpx(args):
    import httpx

    verify = True
    if ca_file(args):
        verify = ssl.create_default_context(cafile=ca_file(args))
    options = {"verify": verify, "trust_env": True, "timeout": args.timeout}
    if args.proxy:
        options["proxy"] = args.proxy
    results = []
    with httpx.Client(**options) as client:
        for _ in range(args.repeat):
            kwargs = body_kwargs(args)
            if "data" in kwargs:
                kwargs["content"] = kwargs.pop("data")
            with client.stream(args.method, args.url, **kwargs) as r:
                results.append(read_response(r.status_code, r.headers, lambda: r.iter_lines(),
                                             lambda: r.iter_bytes(65536), args))
    return results


def run_openai(args):
    import openai

    options = {"base_url": args.base_url, "api_key": args.api_key, "max_retries": 0, "timeout": args.timeout}
    if ca_file(args):
        options["http_client"] = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca_file(args)))
    client = openai.OpenAI(**options)
    results = []
    for _ in range(args.repeat):
        messages = [{"role": "user", "content": "Say hello."}]
        if args.api == "models":
            results.append({"models": [m.id for m in client.models.list()]})
        elif args.api == "chat" and args.stream:
            events, text = [], ""
            for chunk in client.chat.completions.create(model=args.model, messages=messages, stream=True):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                events.append({"at": time.time(), "data": piece})
                text += piece or ""
            results.append({"text": text, "events": events})
        elif args.api == "chat":
            answer = client.chat.completions.create(model=args.model, messages=messages)
            results.append({"text": answer.choices[0].message.content})
        elif args.stream:
            events, text = [], ""
            for event in client.responses.create(model=args.model, input="Say hello.", stream=True):
                events.append({"at": time.time(), "data": event.type})
                if event.type == "response.output_text.delta":
                    text += event.delta
            results.append({"text": text, "events": events})
        else:
            results.append({"text": client.responses.create(model=args.model, input="Say hello.").output_text})
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="client", required=True)
    for name in ("requests", "httpx"):
        p = sub.add_parser(name)
        p.add_argument("method")
        p.add_argument("url")
        p.add_argument("-H", "--header", action="append", default=[])
        body = p.add_mutually_exclusive_group()
        body.add_argument("--data")
        body.add_argument("--json")
        body.add_argument("--upload-bytes", type=int)
        p.add_argument("--download", action="store_true")
        p.add_argument("--events", action="store_true")
    p = sub.add_parser("openai")
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--api", choices=["chat", "responses", "models"], default="chat")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--stream", action="store_true")
    for p in sub.choices.values():
        p.add_argument("--proxy")
        p.add_argument("--ca")
        p.add_argument("--repeat", type=int, default=1)
        p.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    run = {"requests": run_requests, "httpx": run_httpx, "openai": run_openai}[args.client]
    out = {"client": args.client, "results": [], "statuses": [], "error": None}
    code = 0
    try:
        out["results"] = run(args)
        out["statuses"] = [r.get("status") for r in out["results"]]
        if len(out["results"]) > 1:
            out["results"] = out["results"][-1:]
    except Exception as e:  # every failure is reported as data, for the test to judge
        out["error"] = f"{type(e).__name__}: {e}"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            out["statuses"] = [status]
        code = 1
    print(json.dumps(out), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
