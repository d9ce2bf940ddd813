#!/usr/bin/env python3
"""oracle chromium: a real browser attacks real daemons (SPEC 5 and 9).

Run from the repository root, as CI does::

    python3 .ci/oracle_chromium.py [--daemon PATH/TO/poussetaches.py]

What it does, stdlib only:

1. Finds ``chromium``, or installs it with apt-get (as root).  If that cannot
   be done it prints ``oracle chromium: skipped: <why>`` and exits 0; that is
   the only skip.
2. Starts two daemons on free ports, each in a fresh 0700 data directory:
   (a) bound to 127.0.0.1 (the default); (b) bound to 0.0.0.0 with no API key
   and no --allow-host (the Docker setup).  Seeds each with tasks (two waiting
   and a cron task in the paused queue ``seeds``, a dead task) so that any
   purge, cancel, redrive or enqueue is visible.
3. Serves attack pages from other origins: ``http://evil.test:A`` (the
   attacker's site; ``--host-resolver-rules`` maps evil.test to 127.0.0.2),
   ``http://127.0.0.1:A2`` (a same-site page: another local web server) and,
   for DNS rebinding, ``http://evil.test:R`` served by a proxy on 127.0.0.2
   that answers the page's own request with the attack page and forwards every
   later connection, bytes unchanged, to the daemon, as if evil.test's DNS
   record had been rebound to the daemon's address.
   For (a) the proxy listens on 127.0.0.2:P, P the daemon's own port: exactly
   what rebinding gives the attacker.  For (b) the daemon holds 0.0.0.0:P, so
   nothing else can listen on port P of any address; the proxy takes another
   port Q and the daemon sees ``Host: evil.test:Q`` and ``Origin:
   http://evil.test:Q``.  The port is the only difference from a real
   rebinding (Host evil.test:P): the daemon's Host rule is about the name (any
   port), and its Origin rule compares Origin with the Host it received, so
   the two are equivalent for the contract.
4. Drives headless Chromium over the DevTools protocol: one page per attack
   (auto-submitted forms in text/plain, urlencoded and multipart, a
   no-referrer form and a sandboxed-iframe form (both ``Origin: null``), a
   form sent through a 307 redirect, a top-level form, no-cors and cors
   fetches, a beacon, cross-origin reads, and same-origin fetches from the
   rebound page).  After each one it checks the daemon from Python (no Origin
   header): every request the browser got to it was answered 403, nothing was
   enqueued, paused, deleted or redriven, and the page's DOM holds nothing it
   read.  Each attack is also shown to be potent: the very request Chromium
   made, replayed without its browser headers (Origin, Referer, Sec-Fetch-*;
   Host set to 127.0.0.1:P), is accepted (2xx), so a refusal is the browser
   check's doing, not a malformed attack.
5. Controls, in the same browser: the dashboard opened as
   http://127.0.0.1:P/ui and http://localhost:P/ui (a), by IP address for (b)
   (127.0.0.1 and this machine's non-loopback address, if it has one) lists
   the seeded tasks, and its Pause/Resume button pauses and resumes the
   daemon; for (b) an app calling by a compose service name (``Host:
   poussetaches:P``, no Origin) enqueues and cancels.  A daemon that refused
   everything would fail these.

Chromium runs with its own private-network protections turned off
(``--disable-features=LocalNetworkAccessChecks,...``): the attack pages are on
loopback anyway, and what is tested is the daemon's own refusal, not the
browser's.  Sandboxed iframes stay in their parent's process
(``IsolateSandboxedIframes`` off) only so that DevTools reliably reports the
requests they make; the headers they send are the same.

Prints one line per attack and per control, then exactly one summary line::

    oracle chromium <version>: N attacks tried, N refused, M control checks ok: 0 failures

and exits 1 on any failure.
"""

import argparse
import base64
import html
import http.client
import http.server
import itertools
import json
import os
import re
import shutil
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "evil.test"            # the attacker's domain, mapped to 127.0.0.2 in Chromium
ATTACKER_IP = "127.0.0.2"     # the attacker's servers and the rebinding proxy
APP_IP = "127.0.0.3"          # this script's own calls come from here (told apart in the log)
TABLES = ("waiting", "cron", "dead", "success")
PAGE_TIMEOUT = 8.0            # seconds an attack page may take
DEFAULT_PORT = 7991           # the daemon's default port: never used here
WATCHDOG = 240.0              # seconds before the whole run is declared hung
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--mute-audio", "--remote-debugging-port=0",
    "--host-resolver-rules=MAP %s %s" % (EVIL, ATTACKER_IP),
    "--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessPermissionPrompt,"
    "BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,HttpsUpgrades,"
    "IsolateSandboxedIframes",
)

_cleanups = []   # callables run once at exit, last registered first
_cleanup_lock = threading.Lock()


def cleanup():
    with _cleanup_lock:
        while _cleanups:
            try:
                _cleanups.pop()()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass


def say(line):
    print(line, flush=True)


# --------------------------------------------------------------------------
# Chromium: find or install
# --------------------------------------------------------------------------

def ensure_chromium():
    """The chromium binary's path, or (None, why) when it cannot be had."""
    exe = shutil.which("chromium")
    if exe:
        return exe, None
    if os.geteuid() != 0:
        return None, "no chromium binary, and not root to apt-get install it"
    if not shutil.which("apt-get"):
        return None, "no chromium binary and no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        say("oracle chromium: running %s" % " ".join(cmd))
        try:
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, "%s failed: %s" % (" ".join(cmd), exc)
        if done.returncode != 0:
            tail = done.stdout.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            return None, "%s exited %d: %s" % (" ".join(cmd), done.returncode, tail[0][:200])
    exe = shutil.which("chromium")
    if not exe:
        return None, "apt-get installed chromium but there is no chromium binary on PATH"
    return exe, None


# --------------------------------------------------------------------------
# A minimal DevTools protocol client (WebSocket, flat sessions)
# --------------------------------------------------------------------------

class CDP:
    def __init__(self, ws_url, timeout=15):
        u = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n"
                           % (u.path, u.hostname, u.port, key)).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("DevTools closed the WebSocket handshake")
            buf += chunk
        head, _, self._buf = buf.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0] + b" ":
            raise OSError("DevTools refused the WebSocket: %r" % head[:200])
        self.sock.settimeout(None)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._results = {}
        self._send_lock = threading.Lock()
        self.handlers = []
        self.closed = False
        threading.Thread(target=self._reader, daemon=True).start()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv_exact(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _send_frame(self, opcode, payload):
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        word = int.from_bytes(mask * ((n + 3) // 4), "big") >> (8 * (-n % 4)) if n else 0
        masked = (int.from_bytes(payload, "big") ^ word).to_bytes(n, "big") if n else b""
        with self._send_lock:
            self.sock.sendall(head + mask + masked)

    def _reader(self):
        message = b""
        try:
            while True:
                b0, b1 = self._recv_exact(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._recv_exact(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._recv_exact(8))[0]
                mask = self._recv_exact(4) if b1 & 0x80 else None
                payload = self._recv_exact(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 9:
                    self._send_frame(10, payload)
                    continue
                if opcode == 8:
                    break
                if opcode not in (0, 1, 2):
                    continue
                message += payload
                if not b0 & 0x80:
                    continue
                msg, message = json.loads(message), b""
                if "id" in msg:
                    with self._cond:
                        self._results[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    for handler in list(self.handlers):
                        handler(msg)
        except (OSError, EOFError, ValueError):
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def post(self, method, params=None, session=None):
        """Send a command without waiting for its answer (safe from a handler)."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._send_frame(1, json.dumps(msg).encode())
        return msg_id

    def call(self, method, params=None, session=None, timeout=15):
        msg_id = self.post(method, params, session)
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._results:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise OSError("DevTools gave no answer to %s" % method)
                self._cond.wait(left)
            msg = self._results.pop(msg_id)
        if "error" in msg:
            raise OSError("DevTools %s: %s" % (method, msg["error"].get("message")))
        return msg.get("result", {})


class Browser:
    """One headless Chromium, one tab; records the requests the tab's frames make."""

    def __init__(self, exe, workdir):
        self.udd = os.path.join(workdir, "chromium-profile")
        os.mkdir(self.udd, 0o700)
        self.log_path = os.path.join(workdir, "chromium.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([exe] + list(CHROMIUM_FLAGS) + [
                "--user-data-dir=" + self.udd, "about:blank"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        _cleanups.append(self.stop)
        port_file = os.path.join(self.udd, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while True:
            try:
                with open(port_file) as f:
                    lines = f.read().split()
                if len(lines) >= 2:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start (exit %s); log: %s" % (
                    self.proc.poll(), self.log_tail()))
            time.sleep(0.05)
        self.cdp = CDP("ws://127.0.0.1:%s%s" % (lines[0], lines[1]))
        self.version = self.cdp.call("Browser.getVersion")["product"].partition("/")[2]
        self.requests = {}         # requestId -> {"method","url","post","headers","sent"}
        self._lock = threading.Lock()
        self.cdp.handlers.append(self._on_event)
        target = self.cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.cdp.call("Target.attachToTarget",
                                     {"targetId": target, "flatten": True})["sessionId"]
        self._instrument(self.session, child=False)

    def log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [l for l in f.read().splitlines() if "dbus" not in l]
            return " | ".join(lines[-5:])[:800]
        except OSError:
            return "?"

    def _instrument(self, session, child=True):
        """Record the session's requests; attach to its out-of-process frames too
        (they wait until their Network domain is on)."""
        send = self.cdp.post if child else self.cdp.call   # no waiting in the reader thread
        send("Network.enable", {}, session)
        if not child:
            send("Page.enable", {}, session)
        send("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True,
                                      "flatten": True}, session)
        if child:
            send("Runtime.runIfWaitingForDebugger", {}, session)

    def _on_event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Target.attachedToTarget":   # iframes in other processes, workers
            self._instrument(params["sessionId"])
        elif method == "Network.requestWillBeSent":
            req = params["request"]
            post = req.get("postData")
            if post is None and req.get("postDataEntries"):
                post = b"".join(base64.b64decode(e.get("bytes", ""))
                                for e in req["postDataEntries"]).decode("utf-8", "replace")
            with self._lock:
                entry = self.requests.setdefault(params["requestId"], {"hops": []})
                entry["hops"].append({"method": req["method"], "url": req["url"], "post": post,
                                      "headers": dict(req.get("headers", {})), "sent": None})
        elif method == "Network.requestWillBeSentExtraInfo":
            with self._lock:
                entry = self.requests.setdefault(params["requestId"], {"hops": []})
                entry.setdefault("extra", []).append(dict(params.get("headers", {})))

    def take_requests(self):
        """Every request hop seen since the last call: dicts with the headers sent."""
        with self._lock:
            entries, self.requests = self.requests, {}
        hops = []
        for entry in entries.values():
            extras = list(entry.get("extra", []))
            for hop in entry["hops"]:
                netloc = urllib.parse.urlsplit(hop["url"]).netloc
                for extra in extras:   # the headers on the wire, matched by Host
                    if {k.lower(): v for k, v in extra.items()}.get("host") == netloc:
                        hop["sent"] = extra
                        extras.remove(extra)
                        break
                hops.append(hop)
        return hops

    def evaluate(self, expression):
        try:
            r = self.cdp.call("Runtime.evaluate", {"expression": expression,
                                                   "returnByValue": True}, self.session, 5)
        except OSError:
            return None
        return r.get("result", {}).get("value")

    def navigate(self, url):
        r = self.cdp.call("Page.navigate", {"url": url}, self.session)
        return r.get("errorText")

    def stop(self):
        try:
            self.cdp.close()
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 3   # its renderers and helpers, in its process group
        try:
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.05)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


# --------------------------------------------------------------------------
# HTTP from Python: the app's view (no Origin, Host as given)
# --------------------------------------------------------------------------

def http_call(port, method, path, body=None, headers=None, host=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(APP_IP, 0))
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or "127.0.0.1:%d" % port)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            if isinstance(body, str):
                body = body.encode()
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def free_port(host):
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != DEFAULT_PORT:
            return port


def lan_address():
    """This machine's first non-loopback IPv4 address, or None."""
    found = []
    try:
        found += [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    for address in found:
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


# --------------------------------------------------------------------------
# Daemons under test
# --------------------------------------------------------------------------

REQUEST_LINE = re.compile(r'(\S+) "([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')


class Daemon:
    def __init__(self, label, script, bind, port, workdir, closed_port):
        self.label, self.bind, self.port = label, bind, port
        self.closed_port = closed_port
        self.data_dir = tempfile.mkdtemp(prefix="data-", dir=workdir)   # 0700
        env = {k: v for k, v in os.environ.items() if not k.startswith("POUSSETACHES_")}
        self.log = []          # (monotonic time, line)
        self.proc = subprocess.Popen(
            [sys.executable, script, "serve", "--host", bind, "--port", str(port),
             "--data-dir", self.data_dir, "--log-level", "DEBUG", "--grace", "1"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        _cleanups.append(self.stop)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError("daemon %s exited %s: %s" % (
                    label, self.proc.returncode, " | ".join(l for _, l in self.log[-3:])))
            try:
                if http_call(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daemon %s did not answer /healthz" % label)
            time.sleep(0.05)
        self.base = None
        self.seed()

    def _read_log(self):
        for raw in self.proc.stderr:
            self.log.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        self.proc.stderr.close()

    def requests_since(self, mark):
        """(method, target, status) of the requests the daemon logged after ``mark``,
        but this script's own (from APP_IP)."""
        out = []
        for _, line in self.log[mark:]:
            m = REQUEST_LINE.search(line)
            if m and m.group(1) != APP_IP:
                out.append((m.group(2), m.group(3), int(m.group(4))))
        return out

    def settle(self, quiet=0.15, cap=1.5):
        """Wait until the daemon's log has been quiet for ``quiet`` seconds."""
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            last = self.log[-1][0] if self.log else 0
            if time.monotonic() - last >= quiet:
                return
            time.sleep(0.03)

    # -- the app's calls -------------------------------------------------------

    def call(self, method, path, doc=None, expect=(200, 201)):
        body = None if doc is None else json.dumps(doc)
        headers = {"Content-Type": "application/json"} if doc is not None else {}
        status, data = http_call(self.port, method, path, body, headers)
        if expect and status not in expect:
            raise RuntimeError("%s %s on daemon %s: %d %s" % (method, path, self.label, status,
                                                               data[:200]))
        return json.loads(data) if data.strip() else {}

    def task_url(self, name):
        return "http://127.0.0.1:%d/oracle/%s" % (self.closed_port, name)

    def seed(self):
        """Seed tasks in queue 'seeds' (paused: they never run) and a dead one."""
        self.call("PUT", "/queues/seeds", {"paused": True})
        snap = self.snapshot()
        urls = {t: {json.loads(r)["url"] for r in snap[t].values()} for t in TABLES}
        for n in (1, 2):
            if self.task_url("seed-waiting-%d" % n) not in urls["waiting"]:
                self.call("POST", "/", {"url": self.task_url("seed-waiting-%d" % n),
                                        "queue": "seeds", "delay": 1440, "max_tries": 1,
                                        "json": {"seed": n}})
        if self.task_url("seed-cron") not in urls["cron"]:
            self.call("POST", "/", {"url": self.task_url("seed-cron"), "queue": "seeds",
                                    "schedule": "@every 1h", "max_tries": 1})
        if self.task_url("seed-dead") not in urls["dead"]:
            self.call("PUT", "/queues/dying", {"paused": None})
            task = self.call("POST", "/", {"url": self.task_url("seed-dead"), "queue": "dying",
                                           "max_tries": 1})
            deadline = time.monotonic() + 10
            while self.call("GET", "/tasks/" + task["id"]).get("state") != "dead":
                if time.monotonic() > deadline:
                    raise RuntimeError("the dead seed task did not die")
                time.sleep(0.02)
            self.call("PUT", "/queues/dying", {"paused": True})  # a redrive stays visible
        self.base = self.snapshot()
        self.victim = next(json.loads(r)["id"] for r in self.base["waiting"].values()
                           if json.loads(r)["url"] == self.task_url("seed-waiting-1"))
        self.seed_ids = {tid for t in TABLES for tid in self.base[t]}
        self.check_base()

    def check_base(self):
        """The state attacks are judged against: the seeds and nothing else."""
        seeds = {self.task_url(n) for n in ("seed-waiting-1", "seed-waiting-2", "seed-cron",
                                            "seed-dead")}
        extra = [json.loads(r)["url"] for t in TABLES for r in self.base[t].values()
                 if json.loads(r)["url"] not in seeds]
        queues = {k: v for k, v in self.base["queues"].items() if v}
        if self.base["paused"] or extra or queues != {"seeds": {"paused": True},
                                                      "dying": {"paused": True}}:
            raise RuntimeError("daemon %s: unexpected state to judge against: paused=%s, "
                               "tasks %s, queues %s" % (self.label, self.base["paused"], extra,
                                                        self.base["queues"]))

    def snapshot(self):
        snap = {"paused": self.call("GET", "/")["paused"]}
        for table in TABLES:
            snap[table] = {t["id"]: json.dumps(t, sort_keys=True)
                           for t in self.call("GET", "/" + table)["tasks"]}
        snap["queues"] = {q["name"]: q["settings"] for q in self.call("GET", "/queues")["queues"]}
        return snap

    def diff(self, snap):
        base, out = self.base, []
        if snap["paused"] != base["paused"]:
            out.append("dispatch %s" % ("PAUSED" if snap["paused"] else "resumed"))
        for table in TABLES:
            added = [json.loads(snap[table][k]) for k in snap[table].keys() - base[table].keys()]
            gone = [json.loads(base[table][k]) for k in base[table].keys() - snap[table].keys()]
            changed = [k for k in snap[table].keys() & base[table].keys()
                       if snap[table][k] != base[table][k]]
            if added:
                out.append("%s +%d (%s)" % (table, len(added),
                                            ", ".join(t["url"].rpartition("/")[2] for t in added)))
            if gone:
                out.append("%s -%d (%s)" % (table, len(gone),
                                            ", ".join(t["url"].rpartition("/")[2] for t in gone)))
            if changed:
                out.append("%s: %d task(s) changed" % (table, len(changed)))
        for name in sorted(set(snap["queues"]) | set(base["queues"])):
            if snap["queues"].get(name) != base["queues"].get(name):
                out.append("queue %s: %s -> %s" % (name, base["queues"].get(name),
                                                   snap["queues"].get(name)))
        return out

    def restore(self):
        """Undo whatever an attack (or a replay) changed; re-seed what it removed."""
        for _ in range(5):
            snap = self.snapshot()
            if snap == self.base:
                return
            if snap["paused"] and not self.base["paused"]:
                self.call("POST", "/resume")
            for table in TABLES:
                for tid, record in snap[table].items():
                    if self.base[table].get(tid) != record:
                        self.call("DELETE", "/tasks/" + tid, expect=None)
            for name, settings in snap["queues"].items():
                want = self.base["queues"].get(name)
                if want is None:
                    self.call("DELETE", "/queues/" + name, expect=None)
                elif settings != want:
                    self.call("PUT", "/queues/" + name,
                              dict({k: None for k in settings}, **want))
            if self.snapshot() != self.base:
                self.seed()       # something seeded was removed: seed it again
                self.check_base()
        raise RuntimeError("daemon %s could not be restored: %s" % (
            self.label, "; ".join(self.diff(self.snapshot()))))


# --------------------------------------------------------------------------
# The attacker's servers
# --------------------------------------------------------------------------

PAGES = {}   # path -> html bytes, served by the attacker's servers


class AttackerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body=b"", ctype="text/html; charset=utf-8", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        page = PAGES.get(self.path)
        if page is None:
            self._send(404, b"not found", "text/plain")
        else:
            self._send(200, page)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        to = urllib.parse.parse_qs(query).get("to", [""])[0]
        if path == "/redirect307" and to:
            self._send(307, b"", "text/plain", [("Location", to)])
        else:
            self._send(404, b"not found", "text/plain")

    def log_message(self, *args):
        pass


def start_attacker(host):
    server = http.server.ThreadingHTTPServer((host, 0), AttackerHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _cleanups.append(server.server_close)
    _cleanups.append(server.shutdown)
    return server.server_address[1]


class RebindProxy:
    """evil.test's server once its DNS record points at the daemon.

    Armed with a page, it answers that page's request (Connection: close) and
    from then on forwards every connection, bytes unchanged, to the daemon;
    the client-to-daemon bytes are kept for the report.  Arming it again
    closes the forwarded connections (the record's TTL ran out)."""

    def __init__(self, host, port, daemon_port):
        self.daemon_port = daemon_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self.mode, self.page_path, self.page = "page", None, b""
        self.socks = set()
        self.streams = []      # bytes each forwarded connection sent to the daemon
        _cleanups.append(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, path, page):
        with self._lock:
            socks, self.socks = self.socks, set()
            self.mode, self.page_path, self.page, self.streams = "page", path, page, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()
        self.arm(None, b"")

    def request_heads(self):
        """The first request head of each forwarded connection (favicon aside)."""
        with self._lock:
            streams = [bytes(s) for s in self.streams]
        heads = [s.partition(b"\r\n\r\n")[0].decode("latin-1") for s in streams]
        return [h for h in heads if not h.startswith("GET /favicon.ico ")]

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with self._lock:
            self.socks.add(conn)
        try:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return conn.close()
                head += chunk
            target = head.split(b"\r\n", 1)[0].split(b" ")[1:2]
            with self._lock:
                mode = self.mode
                if mode == "page" and self.page_path and target == [self.page_path.encode()]:
                    self.mode = "forward"
                    page = self.page
                    mode = "serve"
            if mode == "serve":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                             b"Cache-Control: no-store\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(page), page))
                return conn.close()
            if mode == "page":
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return conn.close()
            upstream = socket.create_connection(("127.0.0.1", self.daemon_port), timeout=30)
            stream = bytearray(head)
            with self._lock:
                self.socks.add(upstream)
                self.streams.append(stream)
            upstream.sendall(head)
            threading.Thread(target=self._pipe, args=(upstream, conn, None), daemon=True).start()
            self._pipe(conn, upstream, stream)
        except OSError:
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _pipe(src, dst, keep):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if keep is not None and len(keep) < 65536:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Attack pages
# --------------------------------------------------------------------------

def js(value):
    """A JavaScript literal of ``value``, safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")


PAGE = """<!doctype html><html><head><meta charset="utf-8">%(head)s<title>attack</title></head>
<body><pre id="out"></pre><script>
"use strict";
const out = document.getElementById("out");
function log(s) { out.textContent += s + "\\n"; }
let finished = false;
function done() { if (!finished) { finished = true; window.__oracle = {out: out.textContent}; } }
const sleep = ms => new Promise(r => setTimeout(r, ms));
function frame() {
  const f = document.createElement("iframe");
  f.name = "t" + Math.random().toString(36).slice(2);
  document.body.append(f);
  return f;
}
function unreadable(f) {
  try { return f.contentDocument ? "READ " + f.contentDocument.body.innerText.slice(0, 400)
                                 : "unreadable"; }
  catch (e) { return "unreadable"; }
}
function form(action, enctype, fields, target) {
  const f = frame();
  return new Promise(res => {
    const fm = document.createElement("form");
    fm.method = "POST"; fm.action = action; fm.enctype = enctype; fm.target = target || f.name;
    for (const [k, v] of fields) {
      const i = document.createElement("input");
      i.type = "hidden"; i.name = k; i.value = v; fm.append(i);
    }
    document.body.append(fm);
    f.onload = () => { log("form posted; response " + unreadable(f)); res(); };
    fm.submit();
  });
}
async function call(url, opts) {
  try {
    const r = await fetch(url, opts);
    if (r.type === "opaque") { log("sent; opaque response (unreadable)"); return; }
    let t = ""; try { t = await r.text(); } catch (e) { t = "(body unreadable: " + e + ")"; }
    log("READ " + r.status + " " + t.slice(0, 400));
  } catch (e) { log("refused: " + e); }
}
setTimeout(() => { log("page timeout"); done(); }, %(timeout)d);
(async () => { try { %(body)s } catch (e) { log("error: " + e); } done(); })();
</script></body></html>"""


def page_html(body, head=""):
    return (PAGE % {"head": head, "body": body, "timeout": int(PAGE_TIMEOUT * 1000) - 2000}
            ).encode()


def enqueue_parts(url):
    """An enqueue body cut so that a text/plain form sends it whole:
    name + "=" + value + CRLF is ``{"url": ..., "delay": 60, "json": "="}``."""
    return '{"url":"%s","delay":60,"json":"' % url, '"}'


def csrf_attacks():
    """(name, builder(ctx) -> (body js, head html)).  ctx: T (target origin), V
    (victim task id), U (URL an enqueue names), E (this page's own origin)."""
    def enq(c):
        return enqueue_parts(c["U"])

    def body_json(c):
        name, value = enq(c)
        return name + "=" + value

    return [
        ("form text/plain POST / (enqueue)", lambda c: (
            "await form(%s, 'text/plain', [[%s, %s]]);" % ((js(c["T"] + "/"),) + tuple(
                map(js, enq(c)))), "")),
        ("form text/plain POST /batch (enqueue)", lambda c: (
            "await form(%s, 'text/plain', [[%s, %s]]);" % (
                js(c["T"] + "/batch"),
                js('{"tasks":[{"url":"%s","delay":60,"json":"' % c["U"]), js('"}]}')), "")),
        ("form urlencoded POST /pause", lambda c: (
            "await form(%s, 'application/x-www-form-urlencoded', [['paused', 'true']]);"
            % js(c["T"] + "/pause"), "")),
        ("form urlencoded POST /dead/retry (redrive)", lambda c: (
            "await form(%s, 'application/x-www-form-urlencoded', [['all', '1']]);"
            % js(c["T"] + "/dead/retry"), "")),
        ("form multipart POST /queues/default/pause", lambda c: (
            "await form(%s, 'multipart/form-data', [['paused', 'true']]);"
            % js(c["T"] + "/queues/default/pause"), "")),
        ("form text/plain POST /tasks/ID/run (run now)", lambda c: (
            "await form(%s, 'text/plain', [['{\"json\":\"', '\"}']]);"
            % js(c["T"] + "/tasks/" + c["V"] + "/run"), "")),
        ("form text/plain, no-referrer page (Origin: null)", lambda c: (
            "await form(%s, 'text/plain', [[%s, %s]]);" % ((js(c["T"] + "/"),) + tuple(
                map(js, enq(c)))), '<meta name="referrer" content="no-referrer">')),
        ("form in a sandboxed iframe (Origin: null)", lambda c: (
            "const f = document.createElement('iframe'); f.sandbox = 'allow-forms allow-scripts';"
            "f.srcdoc = %s;"
            "await new Promise(r => { f.onload = r; document.body.append(f); });"
            "await sleep(500); log('sandboxed form posted; response ' + unreadable(f));" % js(
                '<form method="post" enctype="text/plain" action="%s"><input type="hidden" '
                'name="%s" value="%s"></form><script>document.forms[0].submit()</script>' % (
                    html.escape(c["T"] + "/"), html.escape(enq(c)[0]), html.escape(enq(c)[1]))),
            "")),
        ("form through a 307 redirect (Origin: null)", lambda c: (
            "await form(%s, 'text/plain', [[%s, %s]]);" % ((js(
                c["E"] + "/redirect307?to=" + urllib.parse.quote(c["T"] + "/", safe="")),)
                + tuple(map(js, enq(c)))), "")),
        ("top-level form text/plain POST / (enqueue)", lambda c: (
            "await form(%s, 'text/plain', [[%s, %s]], '_top'); await sleep(10000);" % (
                (js(c["T"] + "/"),) + tuple(map(js, enq(c)))), "")),
        ("fetch no-cors POST / (enqueue)", lambda c: (
            "await call(%s, {method: 'POST', mode: 'no-cors', body: %s});"
            % (js(c["T"] + "/"), js(body_json(c))), "")),
        ("fetch no-cors POST /pause", lambda c: (
            "await call(%s, {method: 'POST', mode: 'no-cors'});" % js(c["T"] + "/pause"), "")),
        ("fetch no-cors POST /tasks/ID/run (run now)", lambda c: (
            "await call(%s, {method: 'POST', mode: 'no-cors', body: '{}'});"
            % js(c["T"] + "/tasks/" + c["V"] + "/run"), "")),
        ("sendBeacon POST / (enqueue)", lambda c: (
            "log('beacon queued: ' + navigator.sendBeacon(%s, %s)); await sleep(600);"
            % (js(c["T"] + "/"), js(body_json(c))),
            "")),
        ("fetch cors POST / text/plain (enqueue, no preflight)", lambda c: (
            "await call(%s, {method: 'POST', credentials: 'include', body: %s});"
            % (js(c["T"] + "/"), js(body_json(c))), "")),
        ("fetch cors POST / application/json (enqueue, preflight)", lambda c: (
            "await call(%s, {method: 'POST', headers: {'Content-Type': 'application/json'},"
            " body: %s});" % (js(c["T"] + "/"), js(body_json(c))), "")),
        ("fetch cors DELETE /dead (purge)", lambda c: (
            "await call(%s, {method: 'DELETE'});" % js(c["T"] + "/dead"), "")),
        ("fetch cors DELETE /cron (purge)", lambda c: (
            "await call(%s, {method: 'DELETE'});" % js(c["T"] + "/cron"), "")),
        ("fetch cors DELETE /tasks/ID (cancel)", lambda c: (
            "await call(%s, {method: 'DELETE'});" % js(c["T"] + "/tasks/" + c["V"]), "")),
        ("fetch cors PUT /queues/default (pause)", lambda c: (
            "await call(%s, {method: 'PUT', headers: {'Content-Type': 'application/json'},"
            " body: '{\"paused\": true}'});" % js(c["T"] + "/queues/default"), "")),
        ("fetch cors GET /waiting (read the listing)", lambda c: (
            "await call(%s, {credentials: 'include'});" % js(c["T"] + "/waiting"), "")),
        ("fetch cors GET / (read the status)", lambda c: (
            "await call(%s, {credentials: 'include'});" % js(c["T"] + "/"), "")),
    ]


SAME_SITE = ("form text/plain POST / (enqueue)", "fetch no-cors POST /pause",
             "fetch cors DELETE /dead (purge)", "fetch cors GET /waiting (read the listing)")
LAN = SAME_SITE + ("form text/plain, no-referrer page (Origin: null)",
                   "form urlencoded POST /dead/retry (redrive)")


def rebind_attacks():
    """Same-origin fetches from the rebound page http://evil.test:R/."""
    def enq(c):
        name, value = enqueue_parts(c["U"])
        return name + "=" + value
    return [
        ("GET /waiting (read the listing)", lambda c: "await call('/waiting');"),
        ("GET / (read the status)", lambda c: "await call('/');"),
        ("GET /dead (read the dead table)", lambda c: "await call('/dead');"),
        ("POST / (enqueue)", lambda c: (
            "await call('/', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            " body: %s});" % js(enq(c)))),
        ("POST /pause", lambda c: "await call('/pause', {method: 'POST'});"),
        ("DELETE /dead (purge)", lambda c: "await call('/dead', {method: 'DELETE'});"),
        ("DELETE /cron (purge)", lambda c: "await call('/cron', {method: 'DELETE'});"),
        ("DELETE /tasks/ID (cancel)", lambda c: (
            "await call(%s, {method: 'DELETE'});" % js("/tasks/" + c["V"]))),
        ("POST /tasks/ID/run (run now)", lambda c: (
            "await call(%s, {method: 'POST', body: '{}'});" % js("/tasks/" + c["V"] + "/run"))),
        ("PUT /queues/default (pause)", lambda c: (
            "await call('/queues/default', {method: 'PUT',"
            " headers: {'Content-Type': 'application/json'}, body: '{\"paused\": true}'});")),
    ]


# --------------------------------------------------------------------------
# Running attacks and controls
# --------------------------------------------------------------------------

DROP = ("host", "origin", "referer", "connection", "content-length", "cookie", "keep-alive",
        "transfer-encoding", "authorization")


class Oracle:
    def __init__(self, browser):
        self.browser = browser
        self.tried = self.refused = self.controls_ok = self.failures = 0
        self.serial = itertools.count(1)
        self.first_reproducer = None

    def fail(self, line):
        self.failures += 1
        say("FAIL " + line)

    # -- one attack ------------------------------------------------------------

    def wait_page(self, page_url, timeout=PAGE_TIMEOUT):
        """The page's result: {"out": ...} when it said done, {"navigated": url, ...}
        when a top-level form took it away, or None."""
        expr = ("(() => { try { if (location.href === %s) return window.__oracle ?"
                " JSON.stringify(window.__oracle) : null;"
                " if (location.href === 'about:blank' || location.href.startsWith('chrome'))"
                " return null;"
                " if (document.readyState !== 'complete') return null;"
                " return JSON.stringify({navigated: location.href,"
                " out: document.body ? document.body.innerText.slice(0, 300) : ''});"
                " } catch (e) { return null; } })()" % js(page_url))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.browser.evaluate(expr)
            if value:
                return json.loads(value)
            time.sleep(0.03)
        return None

    def attack(self, daemon, where, name, page_url, arm, addresses, top_level=False,
               proxy=None):
        """Run one attack page; judge it from the daemon's side; show it potent."""
        label = "[%s] %s: %s" % (daemon.label, where, name)
        self.tried += 1
        daemon.restore()
        mark = len(daemon.log)
        self.browser.take_requests()
        arm()
        error = self.browser.navigate(page_url)
        result = None if error else self.wait_page(page_url)
        daemon.settle()
        seen = daemon.requests_since(mark)
        hops = [h for h in self.browser.take_requests()   # what reached the daemon
                if urllib.parse.urlsplit(h["url"]).netloc in addresses and h["url"] != page_url]
        wire = proxy.request_heads() if proxy else []
        snap = daemon.snapshot()
        problems = []
        if error or result is None:
            problems.append("the attack page did not run (%s)" % (error or "no result"))
        elif bool(result.get("navigated")) != top_level:
            problems.append("the page %s" % (
                "was taken to %s" % result["navigated"] if result.get("navigated")
                else "was not taken to the daemon by its top-level form"))
        relevant = [s for s in seen if s[1] != "/favicon.ico"]
        if not relevant:
            problems.append("the browser never reached the daemon: the attack was not tried")
        let_through = [s for s in relevant if s[2] != 403]
        if let_through:
            problems.append("answered %s" % ", ".join("%s %s %d" % s for s in let_through))
        changes = daemon.diff(snap)
        if changes:
            problems.append("daemon state changed: " + "; ".join(changes))
        dom = (result or {}).get("out", "")
        if not top_level and leaked(dom, daemon):
            problems.append("the page read: %s" % " ".join(dom.split())[:300])
        # potency: the same requests without the browser's headers are accepted
        daemon.restore()
        replays = []
        if not problems:
            for hop in hops:
                if hop["method"] == "OPTIONS" or urllib.parse.urlsplit(hop["url"]).path == \
                        "/favicon.ico":
                    continue
                replays.append(replay(daemon, hop))
            daemon.restore()
            if not any(isinstance(r, int) and 200 <= r < 300 for r in replays):
                problems.append("attack not potent: without its browser headers the request "
                                "got %s (fix the attack)" % (replays or "nothing to replay"))
        saw = ", ".join("%s %s %d" % s for s in seen[:4]) + (" ..." if len(seen) > 4 else "")
        sent = describe_headers(hops)
        if problems:
            self.fail("%s: %s; daemon saw %s%s" % (label, "; ".join(problems), saw or "nothing",
                                                   sent))
            repro = reproducer(daemon, hops)
            if repro:
                say("     reproducer: " + repro)
            for head in wire[:1]:
                say("     on the wire (rebinding proxy -> daemon): %r" % head[:900])
        else:
            self.refused += 1
            say("PASS %s: daemon saw %s%s; replayed without them: %s" % (
                label, saw, sent, ", ".join(map(str, replays))))

    # -- controls --------------------------------------------------------------

    def control(self, label, ok, detail):
        if ok:
            self.controls_ok += 1
            say("ok   [control] %s: %s" % (label, detail))
        else:
            self.fail("[control] %s: %s" % (label, detail))

    def dashboard(self, daemon, base_url):
        """Open the dashboard; it must list the seeded tasks, and Pause/Resume must work."""
        label = "[%s] dashboard %s/ui" % (daemon.label, base_url)
        daemon.restore()
        self.browser.take_requests()
        mark = len(daemon.log)
        error = self.browser.navigate(base_url + "/ui")
        expr = ("(() => { try { const $ = id => document.getElementById(id);"
                " return JSON.stringify({rows: $('rows').textContent, counts: $('counts')"
                ".textContent, err: $('err').textContent, toggle: $('toggle').textContent}); }"
                " catch (e) { return null; } })()")
        state, listed = None, False
        deadline = time.monotonic() + 8
        while not error and time.monotonic() < deadline:
            value = self.browser.evaluate(expr)
            state = json.loads(value) if value else None
            if state and daemon.victim[:12] in state["rows"] and "waiting" in state["counts"]:
                listed = True
                break
            if state and state["err"]:
                break
            time.sleep(0.05)
        seen = daemon.requests_since(mark)
        if not listed:
            self.control(label, False, "did not list the seeded tasks (%s; error %r); daemon "
                         "saw %s" % (error or "timeout", state and state["err"],
                                     ", ".join("%s %s %d" % s for s in seen[:6])))
            return
        self.control(label, True, "listed the seeded tasks (%s)" % ", ".join(
            "%s %s %d" % s for s in seen if s[1] != "/favicon.ico")[:200])
        # Pause, then Resume, with the dashboard's own button (a same-origin POST)
        steps = []
        for want, button in ((True, "Pause"), (False, "Resume")):
            mark = len(daemon.log)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:   # the button says what it will do
                value = self.browser.evaluate("document.getElementById('toggle').textContent")
                if value == button:
                    break
                time.sleep(0.05)
            self.browser.evaluate("document.getElementById('toggle').click()")
            while time.monotonic() < deadline and daemon.call("GET", "/")["paused"] != want:
                time.sleep(0.05)
            got = daemon.call("GET", "/")["paused"]
            posted = [s for s in daemon.requests_since(mark) if s[0] == "POST"]
            steps.append((got == want, "%s -> paused=%s (%s)" % (
                button, got, ", ".join("%s %s %d" % s for s in posted) or "no POST")))
        hops = [h for h in self.browser.take_requests() if h["method"] == "POST"]
        origins = sorted({header(h, "origin") or "-" for h in hops})
        self.control(label + " Pause/Resume", all(ok for ok, _ in steps),
                     "; ".join(d for _, d in steps) + " [Origin: %s]" % ", ".join(origins))
        daemon.restore()

    def app_by_service_name(self, daemon):
        host = "poussetaches:%d" % daemon.port
        label = "[%s] app calling it as http://%s (no Origin)" % (daemon.label, host)
        body = json.dumps({"url": daemon.task_url("app-control"), "delay": 60})
        status, data = http_call(daemon.port, "POST", "/", body,
                                 {"Content-Type": "application/json"}, host=host)
        statuses = [status]
        if status == 201:
            tid = json.loads(data)["id"]
            statuses.append(http_call(daemon.port, "GET", "/tasks/" + tid, host=host)[0])
            statuses.append(http_call(daemon.port, "DELETE", "/tasks/" + tid, host=host)[0])
        daemon.restore()
        self.control(label, statuses == [201, 200, 200],
                     "enqueue, show, cancel -> %s" % ", ".join(map(str, statuses)))


def header(hop, name):
    headers = hop.get("sent") or hop["headers"]
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def describe_headers(hops):
    shown = []
    for hop in hops:
        if hop["method"] == "OPTIONS":
            continue
        parts = ["%s: %s" % (n, header(hop, n.lower())) for n in
                 ("Host", "Origin", "Sec-Fetch-Site") if header(hop, n.lower()) is not None]
        if not hop.get("sent"):
            parts.append("not sent: preflight refused")
        item = "%s %s {%s}" % (hop["method"], urllib.parse.urlsplit(hop["url"]).path,
                               ", ".join(parts))
        if item not in shown:
            shown.append(item)
    return " [Chromium: %s]" % "; ".join(shown[:3]) if shown else ""


def leaked(dom, daemon):
    """Did the page get to read anything of the daemon's?"""
    if any(tid in dom for tid in daemon.seed_ids):
        return True
    return any(marker in dom for marker in ('"tasks"', '"total"', '"paused"', '"in_flight"',
                                            "READ 2"))


def replay(daemon, hop):
    """Send ``hop`` as an app would: same method, path, Content-Type and body,
    without Origin, Referer and Sec-Fetch-*, to 127.0.0.1:P."""
    parts = urllib.parse.urlsplit(hop["url"])
    path = parts.path + ("?" + parts.query if parts.query else "")
    headers = {k: v for k, v in (hop.get("sent") or hop["headers"]).items()
               if not k.startswith(":") and k.lower() not in DROP
               and not k.lower().startswith("sec-fetch-")}
    try:
        return http_call(daemon.port, hop["method"], path, hop["post"], headers)[0]
    except OSError as exc:
        return "error %s" % exc


def reproducer(daemon, hops):
    """A curl command sending what Chromium sent (first request not refused)."""
    for hop in hops:
        if hop["method"] == "OPTIONS" or not hop.get("sent"):
            continue
        parts = urllib.parse.urlsplit(hop["url"])
        args = ["curl", "-si", "-X", hop["method"], "http://127.0.0.1:%d%s" % (
            daemon.port, parts.path + ("?" + parts.query if parts.query else ""))]
        for key, value in hop["sent"].items():
            if key.lower() in ("host", "origin", "sec-fetch-site", "sec-fetch-mode",
                               "content-type", "referer"):
                args += ["-H", "%s: %s" % (key, value)]
        if hop["post"] is not None:
            args += ["--data-binary", hop["post"]]
        return " ".join(shlex.quote(a) for a in args)
    return None


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def retrying(start, tries=3):
    for attempt in range(tries):
        try:
            return start()
        except RuntimeError:
            if attempt == tries - 1:
                raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daemon", default=os.path.join(ROOT, "poussetaches.py"),
                        help="the poussetaches.py to test (default: the repository's)")
    args = parser.parse_args(argv)

    exe, why = ensure_chromium()
    if not exe:
        say("oracle chromium: skipped: %s" % why)
        return 0

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="oracle-chromium-")
    _cleanups.insert(0, lambda: shutil.rmtree(workdir, ignore_errors=True))
    run = {"version": "?", "oracle": Oracle(None)}

    def hung():
        oracle = run["oracle"]
        oracle.fail("harness: no result after %d s; giving up" % WATCHDOG)
        cleanup()
        say(summary(run["version"], oracle))
        os._exit(1)
    watchdog = threading.Timer(WATCHDOG, hung)
    watchdog.daemon = True
    watchdog.start()

    version = "?"
    oracle = run["oracle"]
    try:
        # a port nobody listens on: the tasks' URLs (deliveries fail at once)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        _cleanups.append(closed.close)
        closed_port = closed.getsockname()[1]

        evil_port = start_attacker(ATTACKER_IP)
        same_site_port = start_attacker("127.0.0.1")
        browser = Browser(exe, workdir)
        version = run["version"] = browser.version
        oracle = run["oracle"] = Oracle(browser)
        say("oracle chromium %s: %s; attacker at http://%s:%d (= %s), same-site page at "
            "http://127.0.0.1:%d" % (version, args.daemon, EVIL, evil_port, ATTACKER_IP,
                                     same_site_port))

        # (a) bound to 127.0.0.1; its rebinding proxy on 127.0.0.2, same port
        def start_a():
            proxy = RebindProxy(ATTACKER_IP, 0, 0)
            if proxy.port == DEFAULT_PORT:
                proxy.close()
                raise RuntimeError("drew port %d" % DEFAULT_PORT)
            try:
                daemon = Daemon("a: 127.0.0.1", args.daemon, "127.0.0.1", proxy.port, workdir,
                                closed_port)
            except RuntimeError:
                proxy.close()
                raise
            proxy.daemon_port = daemon.port
            return daemon, proxy
        daemon_a, proxy_a = retrying(start_a)
        # (b) bound to 0.0.0.0, no API key, no --allow-host; proxy on another port
        daemon_b = retrying(lambda: Daemon("b: 0.0.0.0, no key", args.daemon, "0.0.0.0",
                                           free_port("0.0.0.0"), workdir, closed_port))
        proxy_b = RebindProxy(ATTACKER_IP, 0, daemon_b.port)
        lan = lan_address()
        if lan:
            try:
                socket.create_connection((lan, daemon_b.port), timeout=2).close()
            except OSError:
                lan = None
        say("daemons: (a) http://127.0.0.1:%d, rebinding page http://%s:%d; (b) "
            "http://0.0.0.0:%d, rebinding page http://%s:%d (proxy %s:%d -> daemon port %d)%s"
            % (daemon_a.port, EVIL, proxy_a.port, daemon_b.port, EVIL, proxy_b.port,
               ATTACKER_IP, proxy_b.port, daemon_b.port,
               "; LAN address %s" % lan if lan else "; no non-loopback address to test"))

        csrf = csrf_attacks()
        by_name = dict(csrf)
        for daemon, proxy in ((daemon_a, proxy_a), (daemon_b, proxy_b)):
            origins = [("http://%s:%d" % (EVIL, evil_port), "cross-site page", csrf)]
            origins.append(("http://127.0.0.1:%d" % same_site_port, "same-site page",
                            [(n, by_name[n]) for n in SAME_SITE]))
            targets = [("127.0.0.1", o) for o in origins]
            if daemon is daemon_b and lan:
                targets.append((lan, ("http://%s:%d" % (EVIL, evil_port),
                                      "cross-site page -> %s" % lan,
                                      [(n, by_name[n]) for n in LAN])))
            rebind_netloc = "%s:%d" % (EVIL, proxy.port)
            addresses = {"127.0.0.1:%d" % daemon.port, "localhost:%d" % daemon.port,
                         rebind_netloc}
            if lan:
                addresses.add("%s:%d" % (lan, daemon.port))
            for host, (origin, where, attacks) in targets:
                for name, build in attacks:
                    daemon.restore()    # the page names the current seeds
                    key = "/attack-%d" % next(oracle.serial)
                    ctx = {"T": "http://%s:%d" % (host, daemon.port), "V": daemon.victim,
                           "U": daemon.task_url("attack" + key), "E": origin}
                    body, head = build(ctx)
                    PAGES[key] = page_html(body, head)
                    oracle.attack(daemon, where, name, origin + key, lambda: None, addresses,
                                  top_level=name.startswith("top-level"))
            for name, build in rebind_attacks():
                daemon.restore()
                key = "/rebind-%d" % next(oracle.serial)
                ctx = {"V": daemon.victim, "U": daemon.task_url("attack" + key)}
                page = page_html(build(ctx))
                oracle.attack(daemon, "DNS rebinding, same-origin fetch", name,
                              "http://%s%s" % (rebind_netloc, key),
                              lambda key=key, page=page: proxy.arm(key, page), addresses,
                              proxy=proxy)
            proxy.arm(None, b"")

        # controls: the dashboard works in the same browser; the app by service name
        oracle.dashboard(daemon_a, "http://127.0.0.1:%d" % daemon_a.port)
        oracle.dashboard(daemon_a, "http://localhost:%d" % daemon_a.port)
        oracle.dashboard(daemon_b, "http://127.0.0.1:%d" % daemon_b.port)
        if lan:
            oracle.dashboard(daemon_b, "http://%s:%d" % (lan, daemon_b.port))
        oracle.app_by_service_name(daemon_b)

        # a last look: nothing an attack sent late went through
        for daemon in (daemon_a, daemon_b):
            changes = daemon.diff(daemon.snapshot())
            if changes:
                oracle.fail("[%s] state at the end: %s" % (daemon.label, "; ".join(changes)))
    except Exception as exc:  # noqa: BLE001 - any harness error is a failure, said once
        oracle.fail("harness: %s: %s" % (type(exc).__name__, exc))
    finally:
        watchdog.cancel()
        cleanup()
    say("(%.1f s)" % (time.monotonic() - started))
    say(summary(version, oracle))
    return 1 if oracle.failures else 0


def summary(version, oracle):
    return "oracle chromium %s: %d attacks tried, %d refused, %d control checks ok: %d failures" % (
        version, oracle.tried, oracle.refused, oracle.controls_ok, oracle.failures)


if __name__ == "__main__":
    sys.exit(main())
