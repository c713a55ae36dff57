#!/usr/bin/env python3
"""A fake HTTPS upstream for op-bridge's egress-proxy tests and benchmark (stdlib only).

    server.py --certs DIR [--log FILE] [--key-file FILE] [--host 127.0.0.1] [--port 0]
              [--watch STRING]...
    server.py --make-certs DIR        # only make the certificates, then exit

Certificates: DIR/ca.pem (a test CA: trust it, and only it, to reach this server),
DIR/leaf.pem + DIR/leaf.key (for localhost, 127.0.0.1, ::1, upstream.test, *.upstream.test,
api.test, other.test), made with the openssl CLI on first use and reused after (DIR is
created; concurrent servers on one DIR are safe).

The expected key (the "real value" a proxy must put in place of a placeholder) comes from
--key-file, else the environment variable FAKE_UPSTREAM_KEY (default "sk-fake-upstream-key").

When it accepts, it prints one JSON line on stdout and flushes it:
    {"ready": true, "port": N, "ca": "DIR/ca.pem"}

HTTP/1.1 with keep-alive; request bodies with Content-Length or chunked. Endpoints (any
other path: 404):
  /echo                any method: answers JSON {method, path, query, headers, body (text,
                       or base64 in body_b64 if not UTF-8), body_len, body_sha256, conn}.
                       ?leak=1 also sends the expected key back, in the header
                       x-echoed-key and in the body's "key" field (an echo to reverse).
  /sse                 text/event-stream, chunked: ?n=20 events ?interval_ms=100 apart, each
                       "data: {"i": k, "sent": unix-seconds}" flushed as its own chunk.
  /upload              any size, streamed and hashed: {"len": N, "sha256": hex}.
  /download?bytes=N    N bytes (byte i is i % 251), streamed with Content-Length
                       (&chunked=1: chunked).
  /v1/models, /v1/chat/completions   OpenAI-compatible; 401 unless
                       "Authorization: Bearer <expected key>"; completions stream (SSE,
                       "data: [DONE]") when the request says "stream": true.
  /v1/responses        the OpenAI Responses API, same rules (streamed or not).

Log (--log FILE): one JSON line per request, appended and flushed before the answer's last
bytes are sent (a client holding a whole answer finds its line):
  {ts, conn, method, path, query, headers: [[name, value]...], body_len, body_sha256,
   status, key_at: [where the expected key appeared], watch_at: {STRING: [where]}}
where a place is "path", "query", "body", "header:<name>" or "basic:<name>" (inside Basic
credentials). --watch adds strings (placeholders, say) to look for the same way.
"""

import argparse
import base64
import fcntl
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

NAMES = ["localhost", "upstream.test", "*.upstream.test", "api.test", "other.test"]
IPS = ["127.0.0.1", "::1"]
ECHO_LIMIT = 16 << 20
MODEL = "fake-model"
REPLY = "Hello from the fake upstream."


def make_certs(directory):
    """Makes the test CA and leaf in `directory` unless they are there (atomically)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        # Two servers starting on one directory must not mix one's CA with the other's leaf.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(os.path.exists(os.path.join(directory, f)) for f in ("ca.pem", "leaf.pem", "leaf.key")):
            make_certs_locked(directory)


def make_certs_locked(directory):
    work = tempfile.mkdtemp(dir=directory, prefix=".make-")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650", "-subj",
            "/CN=op-bridge fake upstream test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *curve, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    san = ",".join([f"DNS:{n}" for n in NAMES] + [f"IP:{i}" for i in IPS])
    with open(os.path.join(work, "ext.cnf"), "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "3650", "-extfile", "ext.cnf")
    # Leaf files first, the CA last: a reader that sees ca.pem sees a complete set.
    for name in ("leaf.key", "leaf.pem", "ca.pem"):
        os.replace(os.path.join(work, name), os.path.join(directory, name))
    shutil.rmtree(work, ignore_errors=True)


class Places:
    """Where each watched string appeared; bodies are searched as they stream."""

    def __init__(self, needles):
        self.needles = [n for n in needles if n]
        self.found = {n: [] for n in self.needles}
        self.keep = max((len(n) for n in self.needles), default=1) - 1
        self.tail = b""

    def note(self, place, data):
        for n in self.needles:
            if n in data and place not in self.found[n]:
                self.found[n].append(place)

    def body(self, chunk):
        data = self.tail + chunk
        self.note("body", data)
        self.tail = data[-self.keep:] if self.keep else b""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, handler, context, key, watch, log):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.context = context
        self.key = key
        self.watch = watch
        self.log = log
        self.lock = threading.Lock()
        self.connections = 0

    def finish_request(self, request, client_address):
        # The TLS handshake happens here, in the connection's thread, so a slow or broken
        # client never holds up accept().
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.lock:
            self.connections += 1
            conn = self.connections
        try:
            self.RequestHandlerClass(tls, client_address, self, conn)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # A client that goes away mid-request is not the server's problem.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)

    def write_log(self, record):
        if not self.log:
            return
        line = json.dumps(record) + "\n"
        with self.lock:
            with open(self.log, "a") as f:
                f.write(line)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120

    def __init__(self, request, client_address, server, conn):
        self.conn = conn
        super().__init__(request, client_address, server)

    def log_message(self, format, *args):
        pass

    # -- request side --------------------------------------------------------------------

    def body_chunks(self):
        """Yields the request body as it arrives (Content-Length or chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    # The connection ended without the last chunk: an aborted request, which
                    # must not be mistaken for a complete body.
                    raise ConnectionError("body cut short")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        raise ConnectionError("body cut short")
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("body cut short")
                left -= len(chunk)
                yield chunk

    def read_request(self, keep_body):
        """Reads the whole body (hashing it; keeping at most `keep_body` bytes) and notes
        where the watched strings appeared."""
        split = urlsplit(self.path)
        self.req_path = split.path
        self.req_query = split.query
        self.places = Places([self.server.key] + self.server.watch)
        self.places.note("path", unquote_to_bytes(split.path))
        self.places.note("path", split.path.encode())
        self.places.note("query", unquote_to_bytes(split.query.replace("+", " ")))
        self.places.note("query", split.query.encode())
        for name, value in self.headers.items():
            raw = value.encode("latin-1", "replace")
            self.places.note("header:" + name.lower(), raw)
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "basic":
                try:
                    token = token.strip()
                    decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
                except ValueError:
                    decoded = b""
                self.places.note("basic:" + name.lower(), decoded)
        digest = hashlib.sha256()
        length = 0
        kept = []
        for chunk in self.body_chunks():
            digest.update(chunk)
            self.places.body(chunk)
            if length < keep_body:
                kept.append(chunk[: keep_body - length])
            length += len(chunk)
        self.body = b"".join(kept)
        self.body_len = length
        self.body_sha256 = digest.hexdigest()

    def authorized(self):
        return self.headers.get("Authorization", "") == "Bearer " + self.server.key.decode()

    # -- response side -------------------------------------------------------------------

    def finish_log(self, status):
        key = self.server.key
        self.server.write_log({
            "ts": time.time(),
            "conn": self.conn,
            "method": self.command,
            "path": self.req_path,
            "query": self.req_query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": self.body_len,
            "body_sha256": self.body_sha256,
            "status": status,
            "key_at": self.places.found.get(key, []),
            "watch_at": {w.decode(): self.places.found.get(w, []) for w in self.server.watch},
        })

    def send_json(self, status, obj, extra=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        # Logged before the headers go out: a client may act as soon as it has them (before
        # reading the body), and must then find the line.
        self.finish_log(status)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def start_chunked(self, content_type, extra=()):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_chunked(self):
        self.finish_log(200)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def unauthorized(self):
        self.send_json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}})

    # -- routes --------------------------------------------------------------------------

    def handle_any(self):
        path = urlsplit(self.path).path
        query = parse_qs(urlsplit(self.path).query)
        keep = ECHO_LIMIT if path in ("/echo", "/v1/chat/completions", "/v1/responses") else 0
        self.read_request(keep)
        if path == "/echo":
            self.echo(query)
        elif path == "/sse":
            self.sse(int(query.get("n", ["20"])[0]), int(query.get("interval_ms", ["100"])[0]) / 1000)
        elif path == "/upload":
            self.send_json(200, {"len": self.body_len, "sha256": self.body_sha256})
        elif path == "/download":
            self.download(int(query.get("bytes", ["0"])[0]), query.get("chunked", ["0"])[0] == "1")
        elif path == "/v1/models":
            if not self.authorized():
                return self.unauthorized()
            self.send_json(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake-upstream"}]})
        elif path == "/v1/chat/completions" and self.command == "POST":
            if not self.authorized():
                return self.unauthorized()
            self.chat()
        elif path == "/v1/responses" and self.command == "POST":
            if not self.authorized():
                return self.unauthorized()
            self.responses_api()
        else:
            self.send_json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    def echo(self, query):
        answer = {
            "method": self.command,
            "path": self.req_path,
            "query": self.req_query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_len": self.body_len,
            "body_sha256": self.body_sha256,
            "conn": self.conn,
        }
        try:
            answer["body"] = self.body.decode()
        except UnicodeDecodeError:
            answer["body_b64"] = base64.b64encode(self.body).decode()
        extra = []
        if query.get("leak", ["0"])[0] == "1":
            answer["key"] = self.server.key.decode()
            extra.append(("x-echoed-key", self.server.key.decode()))
        self.send_json(200, answer, extra)

    def sse(self, n, interval):
        self.start_chunked("text/event-stream")
        for i in range(n):
            if i:
                time.sleep(interval)
            self.chunk(b"data: %s\n\n" % json.dumps({"i": i, "sent": time.time()}).encode())
        self.end_chunked()

    def download(self, n, chunked):
        block = bytes(i % 251 for i in range(251 * 261))  # 65511 bytes, whole periods
        if chunked:
            self.start_chunked("application/octet-stream")
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
        left = n
        while left:
            part = block[: min(left, len(block))]
            left -= len(part)
            if chunked:
                self.chunk(part)
            else:
                if not left:
                    self.finish_log(200)
                self.wfile.write(part)
        if chunked:
            self.end_chunked()
        else:
            if n == 0:
                self.finish_log(200)
            self.wfile.flush()

    def request_json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return {}

    def chat(self):
        req = self.request_json()
        model = req.get("model", MODEL)
        created = int(time.time())
        if not req.get("stream"):
            return self.send_json(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}})
        self.start_chunked("text/event-stream")
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model}
        deltas = [{"role": "assistant", "content": ""}] + [{"content": w} for w in REPLY.split(" ")]
        for i, delta in enumerate(deltas):
            if i > 1:
                delta = {"content": " " + delta["content"]}
            event = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
            self.chunk(b"data: %s\n\n" % json.dumps(event).encode())
        last = dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}])
        self.chunk(b"data: %s\n\n" % json.dumps(last).encode())
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11})
            self.chunk(b"data: %s\n\n" % json.dumps(usage).encode())
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def responses_api(self):
        req = self.request_json()
        model = req.get("model", MODEL)
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": REPLY, "annotations": []}]}
        usage = {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        done = {"id": "resp_fake", "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": model, "output": [message], "usage": usage}
        if not req.get("stream"):
            return self.send_json(200, done)
        self.start_chunked("text/event-stream")
        pending = dict(done, status="in_progress", output=[], usage=None)
        item = dict(message, status="in_progress", content=[])
        part = {"type": "output_text", "text": "", "annotations": []}
        events = [
            ("response.created", {"response": pending}),
            ("response.output_item.added", {"output_index": 0, "item": item}),
            ("response.content_part.added", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                             "part": part}),
            ("response.output_text.delta", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                            "delta": REPLY}),
            ("response.output_text.done", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                           "text": REPLY}),
            ("response.content_part.done", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                            "part": dict(part, text=REPLY)}),
            ("response.output_item.done", {"output_index": 0, "item": message}),
            ("response.completed", {"response": done}),
        ]
        for seq, (kind, payload) in enumerate(events):
            event = dict(payload, type=kind, sequence_number=seq)
            self.chunk(b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(event).encode()))
        self.end_chunked()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--certs", help="certificate directory (made on first use)")
    ap.add_argument("--make-certs", metavar="DIR", help="only make the certificates in DIR")
    ap.add_argument("--log", help="append one JSON line per request here")
    ap.add_argument("--key-file", help="file holding the expected key (else $FAKE_UPSTREAM_KEY)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--watch", action="append", default=[], help="another string to report (repeatable)")
    args = ap.parse_args()
    if args.make_certs:
        make_certs(args.make_certs)
        return
    if not args.certs:
        ap.error("--certs DIR is required")
    if args.key_file:
        with open(args.key_file, "rb") as f:
            key = f.read().strip()
    else:
        key = os.environ.get("FAKE_UPSTREAM_KEY", "sk-fake-upstream-key").encode()
    make_certs(args.certs)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(args.certs, "leaf.pem"), os.path.join(args.certs, "leaf.key"))
    context.set_alpn_protocols(["http/1.1"])
    server = Server((args.host, args.port), Handler, context, key, [w.encode() for w in args.watch], args.log)
    print(json.dumps({"ready": True, "port": server.server_address[1],
                      "ca": os.path.abspath(os.path.join(args.certs, "ca.pem"))}), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
