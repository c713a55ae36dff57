#!/usr/bin/env python3
"""A fake 1Password Connect server for op-bridge's tests and benchmarks.

It follows the Connect OpenAPI spec (1Password/connect docs/openapi/spec.yaml, API 1.7):
bearer-token auth, GET /v1/vaults[?filter=name eq "X"], GET /v1/vaults/{id},
GET /v1/vaults/{id}/items[?filter=title eq "X"], GET/PATCH /v1/vaults/{id}/items/{id}
(RFC 6902 add/remove/replace), POST /v1/vaults/{id}/items, GET /health, GET /heartbeat,
errors as JSON {"status","message"}. Title filters compare case-insensitively, as the CLI does.

Files (environment variables):
  FAKE_CONNECT_STORE    JSON {"vaults": [{"id","name","items":[full item, ...]}]}; re-read on
                        every request (tests edit it), rewritten atomically after a write.
  FAKE_CONNECT_TOKEN    the bearer token accepted.
  FAKE_CONNECT_CONTROL  optional JSON knobs, re-read when it changes (counters restart then):
                        {"latency_ms": 20, "outage": true (503 everywhere but /health),
                         "rules": [{"status": 429, "count": 2, "method": "PATCH",
                                    "path_contains": "/items/", "retry_after": 1,
                                    "query_contains": "name eq \"W\""}],
                         "drop": N (close the next N connections' requests unanswered)}
  FAKE_CONNECT_STATS    written after every request: {"requests", "connections",
                        "max_in_flight", "by_route": {...},
                        "log": [{"method","path","status","headers","ts"}]}.
                        The Authorization header is logged only as "ok"/"bad", never its text.
  FAKE_CONNECT_PORT_FILE  the listening port is written here once the server accepts.
  FAKE_CONNECT_CERT / FAKE_CONNECT_KEY  serve https with this certificate.
  FAKE_CONNECT_BIND / FAKE_CONNECT_PORT  listen here (default 127.0.0.1, a free port); a
                        container serving other containers binds 0.0.0.0 on a fixed port.
"""

import json
import os
import random
import re
import ssl
import string
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

STORE = os.environ["FAKE_CONNECT_STORE"]
TOKEN = os.environ.get("FAKE_CONNECT_TOKEN", "")
CONTROL = os.environ.get("FAKE_CONNECT_CONTROL", "")
STATS = os.environ.get("FAKE_CONNECT_STATS", "")
PORT_FILE = os.environ.get("FAKE_CONNECT_PORT_FILE", "")

LOCK = threading.Lock()
STATE = {"requests": 0, "connections": 0, "in_flight": 0, "max_in_flight": 0, "by_route": {}, "log": []}
CONTROL_STATE = {"mtime": None, "knobs": {}}
ID_CHARS = string.ascii_lowercase + string.digits
FILTER = re.compile(r'^\s*(title|name)\s+eq\s+"((?:[^"\\]|\\.)*)"\s*$', re.IGNORECASE)


def new_id():
    return "".join(random.choice(ID_CHARS) for _ in range(26))


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_store():
    with open(STORE, "rb") as f:
        return json.load(f)


def save_store(store):
    tmp = STORE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(store, f, indent=1)
    os.replace(tmp, STORE)


def knobs():
    """The control knobs; a changed file resets the consumable counters."""
    if not CONTROL:
        return {}
    try:
        mtime = os.stat(CONTROL).st_mtime_ns
    except FileNotFoundError:
        return {}
    if mtime != CONTROL_STATE["mtime"]:
        try:
            with open(CONTROL) as f:
                CONTROL_STATE["knobs"] = json.load(f)
        except (OSError, ValueError):
            return CONTROL_STATE["knobs"]
        CONTROL_STATE["mtime"] = mtime
    return CONTROL_STATE["knobs"]


def write_stats():
    if not STATS:
        return
    tmp = STATS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(STATE, f)
    os.replace(tmp, STATS)


def item_summary(item, vault_id):
    keep = ("id", "title", "category", "version", "tags", "favorite", "createdAt", "updatedAt", "urls")
    out = {k: item[k] for k in keep if k in item}
    out["vault"] = {"id": vault_id}
    return out


def full_item(item, vault_id):
    out = dict(item)
    out["vault"] = {"id": vault_id}
    out.setdefault("sections", [])
    out.setdefault("fields", [])
    return out


def title_filter(query):
    """(attribute, wanted title) of a SCIM `eq` filter, or None when absent; ValueError if bad."""
    values = parse_qs(query).get("filter")
    if not values:
        return None
    m = FILTER.match(values[0])
    if not m:
        raise ValueError("invalid filter")
    return m.group(1).lower(), re.sub(r"\\(.)", r"\1", m.group(2))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeConnect/1.7"

    def setup(self):
        super().setup()
        with LOCK:
            STATE["connections"] += 1

    def log_message(self, *args):
        pass

    # -- plumbing --------------------------------------------------------------------------

    def reply(self, status, body, content_type="application/json", extra=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.status = status

    def error(self, status, message, extra=None):
        self.reply(status, {"status": status, "message": message}, extra=extra)

    def read_body(self):
        """Reads the request body at once, as a real server does: an answer given before the
        body is looked at (an injected 429) must not leave it on a kept-alive connection,
        where it would be read as the next request."""
        length = int(self.headers.get("Content-Length") or 0)
        self.raw_body = self.rfile.read(length) if length else b""

    def body_json(self):
        return json.loads(getattr(self, "raw_body", b"") or b"null")

    def handle_any(self):
        self.status = 0
        self.read_body()
        url = urlsplit(self.path)
        route = "other"
        try:
            with LOCK:
                k = knobs()
                STATE["requests"] += 1
                STATE["in_flight"] += 1
                STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
                drop = k.get("drop", 0) > 0
                if drop:
                    k["drop"] -= 1
                rule = None
                for r in k.get("rules", []):
                    if r.get("count", 0) <= 0:
                        continue
                    if r.get("method") and r["method"] != self.command:
                        continue
                    if r.get("path_contains") and r["path_contains"] not in url.path:
                        continue
                    if r.get("query_contains") and r["query_contains"] not in unquote(url.query.replace("+", " ")):
                        continue
                    r["count"] -= 1
                    rule = r
                    break
            if k.get("latency_ms"):
                time.sleep(k["latency_ms"] / 1000.0)
            if drop:
                # Read nothing more, answer nothing: the client sees the connection close.
                self.close_connection = True
                self.status = "dropped"
                return
            route = self.route(url, k, rule)
        except (ValueError, KeyError, TypeError) as e:
            self.error(400, "bad request: %s" % e.__class__.__name__)
        finally:
            headers = {
                name: ("ok" if self.headers[name] == "Bearer " + TOKEN else "bad")
                if name.lower() == "authorization"
                else self.headers[name]
                for name in self.headers.keys()
            }
            with LOCK:
                STATE["in_flight"] -= 1
                STATE["by_route"][route] = STATE["by_route"].get(route, 0) + 1
                STATE["log"].append({"method": self.command, "path": self.path, "status": self.status,
                                     "headers": headers, "ts": time.time()})
                write_stats()

    do_GET = handle_any
    do_PATCH = handle_any
    do_POST = handle_any
    do_PUT = handle_any
    do_DELETE = handle_any

    # -- the API ---------------------------------------------------------------------------

    def route(self, url, k, rule):
        path = url.path.rstrip("/")
        if self.command == "GET" and path == "/heartbeat":
            self.reply(200, b".", "text/plain")
            return "heartbeat"
        if self.command == "GET" and path == "/health":
            sync = "ACTIVE" if not k.get("outage") else "UNAVAILABLE"
            self.reply(200, {"name": "1Password Connect API", "version": "1.7.1",
                             "dependencies": [{"service": "sync", "status": sync},
                                              {"service": "sqlite", "status": "ACTIVE",
                                               "message": "Connected to ./1password.sqlite"}]})
            return "health"
        if self.headers.get("Authorization") != "Bearer " + TOKEN:
            self.error(401, "Invalid token signature")
            return "unauthorized"
        if k.get("outage"):
            self.error(503, "sync unavailable")
            return "outage"
        if rule:
            extra = {"Retry-After": str(rule["retry_after"])} if "retry_after" in rule else None
            self.error(rule["status"], rule.get("message", "injected failure"), extra)
            return "injected"
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts[:2] != ["v1", "vaults"]:
            self.error(404, "not found")
            return "other"
        store = load_store()
        vaults = store.get("vaults", [])
        if len(parts) == 2 and self.command == "GET":
            f = title_filter(url.query)
            found = [v for v in vaults if f is None or v.get("name", "").lower() == f[1].lower()]
            self.reply(200, [{k2: v[k2] for k2 in v if k2 != "items"} for v in found])
            return "vaults"
        vault = next((v for v in vaults if v["id"] == parts[2]), None)
        if vault is None:
            self.error(404, "vault %s not found" % parts[2])
            return "vault_missing"
        items = vault.setdefault("items", [])
        if len(parts) == 3 and self.command == "GET":
            self.reply(200, {k2: vault[k2] for k2 in vault if k2 != "items"})
            return "vault"
        if len(parts) == 4 and parts[3] == "items":
            if self.command == "GET":
                f = title_filter(url.query)
                found = [i for i in items if f is None or i.get("title", "").lower() == f[1].lower()]
                self.reply(200, [item_summary(i, vault["id"]) for i in found])
                return "items"
            if self.command == "POST":
                item = self.body_json()
                item["id"] = new_id()
                item["version"] = 1
                item["createdAt"] = item["updatedAt"] = now()
                for field in item.setdefault("fields", []):
                    field.setdefault("id", new_id())
                item.pop("vault", None)
                items.append(item)
                save_store(store)
                self.reply(200, full_item(item, vault["id"]))
                return "create"
        if len(parts) == 5 and parts[3] == "items":
            item = next((i for i in items if i["id"] == parts[4]), None)
            if item is None:
                self.error(404, "item %s not found" % parts[4])
                return "item_missing"
            if self.command == "GET":
                self.reply(200, full_item(item, vault["id"]))
                return "item"
            if self.command == "PATCH":
                if "json" not in (self.headers.get("Content-Type") or ""):
                    self.error(400, "expected application/json")
                    return "patch"
                problem = apply_patch(item, self.body_json())
                if problem:
                    self.error(400, problem)
                    return "patch"
                item["version"] = item.get("version", 0) + 1
                item["updatedAt"] = now()
                save_store(store)
                self.reply(200, full_item(item, vault["id"]))
                return "patch"
        self.error(404, "not found")
        return "other"


def apply_patch(item, ops):
    """Applies RFC 6902 add/remove/replace ops as Connect does (fields addressed by id)."""
    if not isinstance(ops, list):
        return "patch must be an array"
    for op in ops:
        kind, path, value = op.get("op"), op.get("path", ""), op.get("value")
        if kind not in ("add", "remove", "replace"):
            return "unsupported op %s" % kind
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        if parts and parts[0] in ("fields", "sections"):
            coll = item.setdefault(parts[0], [])
            if len(parts) == 1:
                if kind != "add" or not isinstance(value, dict):
                    return "only add of an object to /%s" % parts[0]
                value = dict(value)
                value.setdefault("id", new_id())
                if parts[0] == "fields":
                    value.setdefault("type", "STRING")
                coll.append(value)
                continue
            target = next((x for x in coll if x.get("id") == parts[1]), None)
            if target is None:
                return "The item doesn't have a %s field." % parts[1]
            if len(parts) == 2:
                if kind == "remove":
                    coll.remove(target)
                else:
                    target.clear()
                    target.update(value)
                    target["id"] = parts[1]
            elif len(parts) == 3:
                if kind == "remove":
                    target.pop(parts[2], None)
                else:
                    target[parts[2]] = value
            else:
                return "path too deep"
        elif len(parts) == 1 and parts[0] in ("title", "tags", "favorite", "urls"):
            if kind == "remove":
                item.pop(parts[0], None)
            else:
                item[parts[0]] = value
        else:
            return "unsupported path %s" % path
    return None


def main():
    bind = (os.environ.get("FAKE_CONNECT_BIND", "127.0.0.1"), int(os.environ.get("FAKE_CONNECT_PORT", "0")))
    server = ThreadingHTTPServer(bind, Handler)
    server.daemon_threads = True
    cert, key = os.environ.get("FAKE_CONNECT_CERT"), os.environ.get("FAKE_CONNECT_KEY")
    if cert and key:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    write_stats()
    if PORT_FILE:
        with open(PORT_FILE + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(PORT_FILE + ".tmp", PORT_FILE)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
