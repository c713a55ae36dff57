#!/usr/bin/env python3
"""Checks tests/fake-oauth/server.py behaves as its docstring says. Prints `N passed, M failed`."""

import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
PASSED, FAILED = [], []


def check(name, condition):
    (PASSED if condition else FAILED).append(name)
    if not condition:
        print(f"FAIL: {name}", file=sys.stderr)


def main():
    tmp = tempfile.mkdtemp(prefix="fake-oauth-")
    state, control, events, port_file, busy = (os.path.join(tmp, n) for n in
                                                ("state.json", "control.json", "events.jsonl", "port", "busy"))
    with open(state, "w") as f:
        json.dump({
            "clients": {"app": {"secret": "s3cret", "auth": "basic"},
                        "poster": {"secret": "p0st", "auth": "post"},
                        "machine": {"secret": "m4ch", "auth": "basic"}},
            "refresh_tokens": {"rt_seed": {"client": "app", "family": "f1", "used_at": None, "successor": None},
                               "rt_post": {"client": "poster", "family": "f2", "used_at": None, "successor": None},
                               "rt_held": {"client": "app", "family": "f3", "used_at": None, "successor": None}},
            "families": {"f1": {"revoked": False}, "f2": {"revoked": False}, "f3": {"revoked": False}},
        }, f)
    env = dict(os.environ, FAKE_OAUTH_STATE=state, FAKE_OAUTH_CONTROL=control, FAKE_OAUTH_EVENTS=events,
               FAKE_OAUTH_PORT_FILE=port_file, FAKE_OAUTH_BUSY=busy)
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py")], env=env)
    try:
        deadline = time.time() + 10
        while not os.path.exists(port_file) and time.time() < deadline:
            time.sleep(0.05)
        port = int(open(port_file).read())

        def knobs(**k):
            # Atomically: the server re-reads the file on every request.
            with open(control + ".new", "w") as f:
                json.dump(k, f)
            os.replace(control + ".new", control)

        def token(form, basic=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            if basic:
                headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
            try:
                conn.request("POST", "/token", urlencode(form), headers)
                response = conn.getresponse()
                return response.status, json.loads(response.read() or b"{}"), response.getheader("Retry-After")
            except (ConnectionError, http.client.HTTPException):
                return None, None, None
            finally:
                conn.close()

        def api(access):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/me", headers={"Authorization": f"Bearer {access}"})
            status = conn.getresponse().status
            conn.close()
            return status

        knobs(access_ttl_s=1)
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": "rt_seed"}, basic="app:s3cret")
        check("refresh grant answers 200 with a new refresh token", status == 200 and body["refresh_token"] != "rt_seed")
        rt1, at1 = body["refresh_token"], body["access_token"]
        check("the access token opens the API", api(at1) == 200)
        time.sleep(1.2)
        check("an expired access token gets 401", api(at1) == 401)
        knobs(access_ttl_s=1, api_leeway_s=30)
        check("the API's leeway accepts an expired access token", api(at1) == 200)
        knobs(access_ttl_s=1)
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": rt1}, basic="app:s3cret")
        check("the successor refresh token works once", status == 200)
        rt2 = body["refresh_token"]
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": rt1}, basic="app:s3cret")
        check("replaying a used refresh token is invalid_grant", status == 400 and body["error"] == "invalid_grant")
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": rt2}, basic="app:s3cret")
        check("reuse revokes the whole family", status == 400 and "revoked" in body.get("error_description", ""))

        knobs(reuse_leeway_s=30)
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": "rt_post",
                                 "client_id": "poster", "client_secret": "p0st"})
        check("client_secret_post is accepted", status == 200)
        successor = body["refresh_token"]
        status, body, _ = token({"grant_type": "refresh_token", "refresh_token": "rt_post",
                                 "client_id": "poster", "client_secret": "p0st"})
        check("a replay within the leeway gets the same successor", status == 200 and body["refresh_token"] == successor)
        status, _, _ = token({"grant_type": "refresh_token", "refresh_token": successor}, basic="poster:p0st")
        check("a client registered for post is refused with basic", status == 401)

        status, body, _ = token({"grant_type": "client_credentials", "scope": "read"}, basic="machine:m4ch")
        check("client_credentials gives an access token and no refresh token",
              status == 200 and "refresh_token" not in body and api(body["access_token"]) == 200)
        status, _, _ = token({"grant_type": "client_credentials"}, basic="machine:wrong")
        check("a wrong secret is invalid_client", status == 401)

        knobs(server_error=1, rate_limit=1, retry_after_s=7)
        status, _, _ = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        check("server_error knob answers 503 once", status == 503)
        status, _, retry = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        check("rate_limit knob answers 429 with Retry-After", status == 429 and retry == "7")
        status, _, _ = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        check("knobs are consumed", status == 200)

        status, body, _ = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        fresh = body["access_token"]
        check("the API accepts a current token", api(fresh) == 200)
        knobs(revoke_access_tokens=1)
        check("revoke_access_tokens makes the tokens issued so far invalid", api(fresh) == 401)
        status, body, _ = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        check("a token issued after the revocation works", api(body["access_token"]) == 200)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/api/echo", body=b"hello", headers={"Authorization": f"Bearer {body['access_token']}"})
        reply = conn.getresponse()
        check("POST /api echoes the body", reply.status == 200 and json.loads(reply.read())["body"] == "hello")
        conn.close()

        knobs(drop_after_issue=1)
        status, body, _ = token({"grant_type": "client_credentials"}, basic="machine:m4ch")
        check("drop_after_issue closes the connection unanswered", status is None)

        def busy_count():
            with open(busy) as f:
                return int(f.read() or 0)

        def raw_refresh(refresh_token):
            """Sends a refresh request on a raw socket and returns the socket, unanswered."""
            import socket
            body = urlencode({"grant_type": "refresh_token", "refresh_token": refresh_token})
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall((f"POST /token HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                          f"{base64.b64encode(b'app:s3cret').decode()}\r\n"
                          f"Content-Type: application/x-www-form-urlencoded\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            return sock

        def wait_for(condition):
            deadline = time.time() + 10
            while not condition() and time.time() < deadline:
                time.sleep(0.02)
            return condition()

        knobs(hold=True, check_client=True)
        held = raw_refresh("rt_held")
        time.sleep(0.3)
        check("a held request is unanswered and not busy", wait_for(lambda: busy_count() == 0)
              and json.load(open(state))["refresh_tokens"]["rt_held"]["used_at"] is None)
        held.close()
        knobs(check_client=True)
        check("a held request whose client left issues nothing", wait_for(
            lambda: any(json.loads(line)["event"] == "client_gone" for line in open(events)))
            and json.load(open(state))["refresh_tokens"]["rt_held"]["used_at"] is None)
        knobs(hold=True, check_client=True)
        held = raw_refresh("rt_held")
        time.sleep(0.2)
        knobs(check_client=True)
        held.settimeout(10)
        answer = b""
        while not answer.endswith(b"}"):
            chunk = held.recv(4096)
            if not chunk:
                break
            answer += chunk
        held.close()
        check("a held request whose client waits is granted once released",
              answer.startswith(b"HTTP/1.1 200") and json.load(open(state))["refresh_tokens"]["rt_held"]["used_at"])
        check("nothing is busy once answered", wait_for(lambda: busy_count() == 0))

        lines = [json.loads(line) for line in open(events)]
        kinds = [line["event"] for line in lines]
        check("events record reuse, leeway, drops and 401s",
              {"reuse_detected", "reuse_within_leeway", "dropped", "api_unauthorized", "issued", "revoked"} <= set(kinds))
        check("events never hold a whole token",
              all(len(line.get("token", "")) <= 8 for line in lines))
    finally:
        server.terminate()
        server.wait()
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
