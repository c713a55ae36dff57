#!/usr/bin/env python3
"""Scans every /proc/*/environ and /proc/*/cmdline this process may read for a token.

Run inside a container as the application's uid (`docker exec -u node`). argv: the file
holding the token (readable by this uid only for the test's sake: it is a copy made for the
scan), the seconds to keep scanning, and the pid of a process whose environ must have been
read (proof that the scan reached the `docker exec` process it is about). While it scans, it
asks op-bridge to refresh, so `op` processes run during the scan. Prints one JSON line:
{"found": [...], "environ_read": [pids], "scans": N}.
"""
import json, os, subprocess, sys, time

needle = open(sys.argv[1], "rb").read().strip()
seconds = float(sys.argv[2])
found, environ_read, scans = set(), set(), 0
refresh = subprocess.Popen(["op-bridge", "refresh"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.time() + seconds
while time.time() < deadline:
    scans += 1
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if part == "environ":
                environ_read.add(int(pid))
            if needle in data:
                found.add((part, int(pid)))
    if refresh.poll() is not None:
        refresh = subprocess.Popen(["op-bridge", "refresh"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.02)
refresh.wait()
print(json.dumps({"found": sorted(found), "environ_read": sorted(environ_read), "scans": scans}))
