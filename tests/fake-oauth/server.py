#!/usr/bin/env python3
"""A fake OAuth 2.0 authorization server and protected API for op-bridge's tests.

It models what makes broker-owned OAuth hard (RFC 6749 §6, RFC 9700 §4.14 refresh token
rotation): refresh tokens are single-use, and replaying a used one revokes the whole token
family unless the replay comes within a configurable reuse leeway; access tokens live a few
seconds. Standard library only.

Endpoints
  POST /token   grant_type=refresh_token (refresh_token=…) or client_credentials;
                client authentication by HTTP Basic (client_secret_basic) or form fields
                (client_secret_post); optional scope and audience are recorded.
                200 {"access_token","token_type":"Bearer","expires_in","refresh_token"?}
                400 {"error":"invalid_grant"|"invalid_request"|"unsupported_grant_type"}
                401 {"error":"invalid_client"}
  GET  /api/…   the protected API: 200 {"ok":true,"path":…} for a current access token as
                `Authorization: Bearer …`, else 401 (and the 401 is counted).
  POST /api/…   the same, and the answer echoes the request body as "body".
  GET  /health  200.

Environment
  FAKE_OAUTH_STATE   JSON file, read at start and rewritten atomically after every change:
                     {"clients": {"<id>": {"secret": "<s>" | null, "auth": "basic"|"post",
                                           "revoked": false}},
                      "refresh_tokens": {"<token>": {"client": "<id>", "family": "<f>",
                                                     "used_at": null, "successor": null}},
                      "families": {"<f>": {"revoked": false}},
                      "access_tokens": {"<token>": {"client": "<id>", "expires_at": <unix>}}}
                     Seed it with a client and one refresh token (see selftest.py).
  FAKE_OAUTH_CONTROL optional JSON knobs, re-read on every request:
                     {"access_ttl_s": 5, "reuse_leeway_s": 0, "server_error": N, "rate_limit": N,
                      "retry_after_s": 2, "slow_ms": 0, "drop_after_issue": N,
                      "revoke_access_tokens": N, "hold": false, "check_client": false,
                      "api_leeway_s": 0}
                     server_error / rate_limit / drop_after_issue are consumed one per token
                     request. drop_after_issue issues (and records) the tokens, then closes the
                     connection without an answer: the client never learns the new refresh
                     token, and its old one is already used. revoke_access_tokens (consumed one
                     per API request) makes every access token issued so far invalid before that
                     request is checked, as a provider revoking tokens early would.
                     hold: token requests wait, unanswered, while it is true (a test stops new
                     grants, waits for the running ones to finish, then kills the client).
                     check_client: a token request whose client has closed its connection by
                     the time it would be granted gets no answer and nothing is issued (event
                     client_gone), as a provider whose front end drops a request whose client
                     went away; without it a request from a killed client may still be granted.
                     api_leeway_s: the API still accepts an access token this long after it
                     expired (a resource server's clock-skew tolerance); expires_in is unchanged.
  FAKE_OAUTH_EVENTS  JSON-lines file: one line per token request and per API 401:
                     {"ts","event","client","grant","family","status"}; "event" is one of
                     issued, reuse_detected, reuse_within_leeway, invalid_grant, invalid_client,
                     server_error, rate_limited, dropped, client_gone, revoked, api_ok,
                     api_unauthorized. Tokens are logged only as an 8-character prefix.
  FAKE_OAUTH_BUSY    optional file holding the number of token requests being granted: counted
                     from before a request reads the knobs to after its answer is written, so
                     once a test has set `hold` and read 0 here, no grant is under way.
  FAKE_OAUTH_PORT_FILE  the port is written here once the server accepts (port 0 = any).
  FAKE_OAUTH_CERT / FAKE_OAUTH_KEY  serve https with this certificate.
"""

import base64
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

STATE_PATH = os.environ["FAKE_OAUTH_STATE"]
CONTROL = os.environ.get("FAKE_OAUTH_CONTROL", "")
EVENTS = os.environ.get("FAKE_OAUTH_EVENTS", "")
PORT_FILE = os.environ.get("FAKE_OAUTH_PORT_FILE", "")
BUSY_PATH = os.environ.get("FAKE_OAUTH_BUSY", "")
LOCK = threading.Lock()
BUSY_LOCK = threading.Lock()
BUSY = 0
MAX_BODY = 64 * 1024

with open(STATE_PATH, "rb") as f:
    STATE = json.load(f)
for key in ("clients", "refresh_tokens", "families", "access_tokens"):
    STATE.setdefault(key, {})


def save_state():
    tmp = STATE_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(STATE, f, indent=1)
    os.replace(tmp, STATE_PATH)


def knobs():
    if not CONTROL:
        return {}
    try:
        with open(CONTROL, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def consume(name):
    """Takes one from a counting knob; True when one was left."""
    if not CONTROL:
        return False
    current = knobs()
    left = int(current.get(name, 0) or 0)
    if left <= 0:
        return False
    current[name] = left - 1
    tmp = CONTROL + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f)
    os.replace(tmp, CONTROL)
    return True


def busy(delta):
    """Counts token requests being granted, published in FAKE_OAUTH_BUSY."""
    global BUSY
    with BUSY_LOCK:
        BUSY += delta
        if BUSY_PATH:
            tmp = BUSY_PATH + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(BUSY))
            os.replace(tmp, BUSY_PATH)


def client_gone(connection):
    """True when the peer has closed the TCP connection (EOF or reset pending)."""
    probe = socket.socket(fileno=os.dup(connection.fileno()))
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


def record(event, **fields):
    if not EVENTS:
        return
    line = {"ts": time.time(), "event": event}
    line.update(fields)
    with open(EVENTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def short(token):
    return (token or "")[:8]


def new_token(kind):
    return f"{kind}_{secrets.token_urlsafe(24)}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.answer(200, {"ok": True})
        if not self.path.startswith("/api/"):
            return self.answer(404, {"error": "not_found"})
        self.api(None)

    def api(self, body):
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        with LOCK:
            if consume("revoke_access_tokens"):
                STATE["access_tokens"].clear()
                save_state()
                record("revoked")
            entry = STATE["access_tokens"].get(token)
            leeway = float(knobs().get("api_leeway_s", 0) or 0)
            valid = entry is not None and entry["expires_at"] + leeway > time.time()
            record("api_ok" if valid else "api_unauthorized", token=short(token))
        if valid:
            answer = {"ok": True, "path": self.path}
            if body is not None:
                answer["body"] = body.decode("utf-8", "replace")
            return self.answer(200, answer)
        return self.answer(401, {"error": "invalid_token"}, [("WWW-Authenticate", 'Bearer error="invalid_token"')])

    def do_POST(self):
        if self.path.startswith("/api/"):
            length = int(self.headers.get("Content-Length", "0") or 0)
            if length > MAX_BODY:
                return self.answer(413, {"error": "too_large"})
            return self.api(self.rfile.read(length))
        if self.path != "/token":
            return self.answer(404, {"error": "not_found"})
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > MAX_BODY:
            return self.answer(413, {"error": "invalid_request"})
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode("utf-8", "replace")).items()}
        # Counted before the knobs are read: a test that sets `hold` and then reads 0 busy knows
        # every later request sees the hold.
        busy(1)
        try:
            k = knobs()
            while k.get("hold"):
                busy(-1)
                time.sleep(0.05)
                busy(1)
                k = knobs()
            self.token_request(form, k)
        finally:
            busy(-1)

    def token_request(self, form, k):
        if k.get("slow_ms"):
            time.sleep(k["slow_ms"] / 1000)
        if consume("server_error"):
            record("server_error", status=503)
            return self.answer(503, {"error": "temporarily_unavailable"})
        if consume("rate_limit"):
            record("rate_limited", status=429)
            return self.answer(429, {"error": "slow_down"}, [("Retry-After", str(k.get("retry_after_s", 2)))])
        with LOCK:
            if k.get("check_client") and client_gone(self.connection):
                record("client_gone", grant=form.get("grant_type", ""))
                self.close_connection = True
                return
            status, body, family = self.grant(form, k)
            save_state()
        if status == 200 and consume("drop_after_issue"):
            record("dropped", family=family)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.answer(status, body)

    def client(self, form):
        """The authenticated client id, or None."""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                pair = base64.b64decode(auth[6:], validate=True).decode()
                cid, _, secret = pair.partition(":")
                cid, secret, method = unquote(cid), unquote(secret), "basic"
            except ValueError:
                return None
        else:
            cid, secret, method = form.get("client_id"), form.get("client_secret"), "post"
        client = STATE["clients"].get(cid or "")
        if client is None or client.get("revoked"):
            return None
        if client.get("secret") is not None and (client["secret"] != secret or client.get("auth", "basic") != method):
            return None
        return cid

    def grant(self, form, k):
        cid = self.client(form)
        grant = form.get("grant_type", "")
        if cid is None:
            record("invalid_client", grant=grant, status=401)
            return 401, {"error": "invalid_client"}, None
        ttl = int(k.get("access_ttl_s", 5))
        access = new_token("at")
        answer = {"access_token": access, "token_type": "Bearer", "expires_in": ttl}
        if grant == "client_credentials":
            STATE["access_tokens"][access] = {"client": cid, "expires_at": time.time() + ttl}
            record("issued", client=cid, grant=grant, status=200,
                   scope=form.get("scope"), audience=form.get("audience"))
            return 200, answer, None
        if grant != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}, None
        presented = form.get("refresh_token", "")
        entry = STATE["refresh_tokens"].get(presented)
        if entry is None or entry["client"] != cid:
            record("invalid_grant", client=cid, grant=grant, status=400, token=short(presented))
            return 400, {"error": "invalid_grant", "error_description": "unknown refresh token"}, None
        family = entry["family"]
        if STATE["families"].get(family, {}).get("revoked"):
            record("invalid_grant", client=cid, grant=grant, family=family, status=400)
            return 400, {"error": "invalid_grant", "error_description": "token family revoked"}, family
        if entry["used_at"] is not None:
            leeway = float(k.get("reuse_leeway_s", 0))
            if time.time() - entry["used_at"] <= leeway and entry["successor"]:
                # Within the leeway a replay gets the successor it was already given.
                successor = entry["successor"]
                STATE["access_tokens"][access] = {"client": cid, "expires_at": time.time() + ttl}
                answer["refresh_token"] = successor
                record("reuse_within_leeway", client=cid, grant=grant, family=family, status=200)
                return 200, answer, family
            STATE["families"].setdefault(family, {})["revoked"] = True
            record("reuse_detected", client=cid, grant=grant, family=family, status=400, token=short(presented))
            return 400, {"error": "invalid_grant", "error_description": "refresh token reused"}, family
        successor = new_token("rt")
        entry["used_at"] = time.time()
        entry["successor"] = successor
        STATE["refresh_tokens"][successor] = {"client": cid, "family": family, "used_at": None, "successor": None}
        STATE["access_tokens"][access] = {"client": cid, "expires_at": time.time() + ttl}
        answer["refresh_token"] = successor
        if form.get("scope"):
            answer["scope"] = form["scope"]
        record("issued", client=cid, grant=grant, family=family, status=200)
        return 200, answer, family


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("FAKE_OAUTH_PORT", "0"))), Handler)
    server.daemon_threads = True
    cert, key = os.environ.get("FAKE_OAUTH_CERT"), os.environ.get("FAKE_OAUTH_KEY")
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    if PORT_FILE:
        tmp = PORT_FILE + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(tmp, PORT_FILE)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
