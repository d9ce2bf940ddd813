#!/usr/bin/env python3
"""Benchmark poussetaches against the limits of the machine it runs on.

    python3 bench_poussetaches.py            # full run, about 5 minutes on 2 cores
    python3 bench_poussetaches.py --quick    # under a minute
    python3 bench_poussetaches.py --json     # the same figures as JSON
    python3 bench_poussetaches.py --rounds 5 # steadier medians on a noisy machine
    python3 bench_poussetaches.py --instructions  # instructions per task, with valgrind

Every figure is measured in this run, beside the limit it is compared with
(a bare urllib loop, a no-op stdlib server...), because absolute times on
shared machines drift; the table gives the ratio and the target.  Where
a figure has a limit, the two are measured side by side, three times in a
full run (twice against Huey), and the table gives the medians: the speed of
a shared machine drifts within a run too, a ratio of neighbours much less.
Each role runs in its own process: the daemon, the receiver playing the app,
and the load client.  Stdlib only (Huey is imported for its row if present).

``--instructions`` counts, with valgrind's callgrind, the instructions the
daemon's process spends per delivery and per enqueue, beside a bare urllib
request and a no-op stdlib server counted the same way.  A count does not
drift with the machine's load as a time does: it is the figure that speed work
is judged by.  valgrind is a package (Debian, Ubuntu: ``apt-get install
valgrind``); without it the mode says so and exits.
"""

import argparse
import glob
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DAEMON = os.path.join(HERE, "poussetaches.py")


# --------------------------------------------------------------------------
# Roles run in their own processes: receiver, no-op server, load client
# --------------------------------------------------------------------------

def _serve(handler, port_file):
    """Serve ``handler`` on a free loopback port, written to ``port_file``."""
    import http.server
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def role_receiver(port_file, close=False):
    """The app: answers 200 to every POST, records when each task arrived.
    ``close``: every answer closes its connection, as gunicorn's sync workers
    (microblog.pub's deployment) and HTTP/1.0 servers do."""
    import http.server

    arrivals = {}
    lock = threading.Lock()
    arrived = threading.Condition(lock)
    wanted = []  # the counts that GET /wait callers wait for: woken when one is reached,
    # not at every arrival (a wake-up per task would cost the app CPU the bare loop never pays)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            now = time.monotonic()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            task_id = self.headers.get("Poussetaches-Task-ID") or self.headers.get("X-Bench-ID")
            with lock:
                if task_id not in arrivals:
                    arrivals[task_id] = now
                    if wanted and len(arrivals) >= min(wanted):
                        arrived.notify_all()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()

        def do_GET(self):
            with lock:
                if self.path.startswith("/wait?n="):  # block until n tasks arrived
                    n = int(self.path.split("=")[1])
                    wanted.append(n)
                    arrived.wait_for(lambda: len(arrivals) >= n, 120)
                    wanted.remove(n)
                    doc = {"count": len(arrivals),
                           "last": max(arrivals.values()) if arrivals else None}
                elif self.path == "/count":
                    doc = {"count": len(arrivals)}
                else:
                    doc = dict(arrivals)
                    if self.path == "/take":
                        arrivals.clear()
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    _serve(Handler, port_file)


def role_noop(port_file):
    """The enqueue limit: a stdlib ThreadingHTTPServer that parses the JSON and answers 201."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.send_header("Poussetaches-Task-ID", "0" * 32)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    _serve(Handler, port_file)


BENCH_KEY = "whsec_" + "YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaA=="  # the tasks app and its daemon
HAND_PAYLOAD = "eyJrIjogMX0="                          # {"k": 1}
CALL_PAYLOAD = "eyJhcmdzIjogW10sICJrd2FyZ3MiOiB7ImsiOiAxfX0="  # {"args": [], "kwargs": {"k": 1}}


def role_tasks_app(port_file):
    """An app with a task function, served by wsgiref (a thread per request),
    taking deliveries two ways: ``/hand``, a handler written by hand as apps
    did before task functions (parse, then call), and ``/_tasks/<name>``, the
    task endpoint.  Both record arrivals as the receiver does."""
    import socketserver
    import wsgiref.simple_server
    sys.path.insert(0, HERE)
    import poussetaches

    pt = poussetaches.PousseTaches(auth_key=BENCH_KEY)
    arrivals, lock = {}, threading.Lock()
    arrived = threading.Condition(lock)

    @pt.task(name="bench.noop")
    def noop(k):
        return k

    def hand(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {key[5:].replace("_", "-").lower(): value
                   for key, value in environ.items() if key.startswith("HTTP_")}
        try:
            envelope = pt.parse(headers=headers, body=body)
        except (poussetaches.AuthError, poussetaches.InvalidEnvelope) as exc:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [str(exc).encode()]
        noop(**envelope.payload)
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Content-Length", "0")])
        return [b""]

    endpoint = pt.wsgi(hand)

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            with lock:
                query = environ.get("QUERY_STRING", "")
                if query.startswith("n="):
                    n = int(query[2:])
                    arrived.wait_for(lambda: len(arrivals) >= n, 120)
                    doc = {"count": len(arrivals),
                           "last": max(arrivals.values()) if arrivals else None}
                else:
                    doc = dict(arrivals)
                    arrivals.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(doc).encode()]
        out = endpoint(environ, start_response)
        with lock:
            arrivals.setdefault(environ.get("HTTP_POUSSETACHES_TASK_ID"), time.monotonic())
            arrived.notify_all()
        return out

    class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        daemon_threads = True
        request_queue_size = 1024

    class Handler(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = Server(("127.0.0.1", 0), Handler)
    server.set_app(app)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def _connection(url):
    import http.client
    host, port = url.split("//")[1].rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def role_enqueue(url, target, threads, n, delay_s, eta_spread, payload=HAND_PAYLOAD):
    """POST / from ``threads`` keep-alive connections; prints rate and latencies."""
    per = n // threads
    latencies = [[] for _ in range(threads)]
    sent = {}
    start_gate = threading.Barrier(threads + 1)

    def worker(k):
        conn = _connection(url)
        start_gate.wait()
        for i in range(per):
            body = {"url": target, "payload": payload, "expected": 200,
                    "schedule": "", "delay": 0}
            if delay_s:
                body["delay_s"] = delay_s
            if eta_spread:
                body["eta"] = time.time() + 1.0 + eta_spread * (i / per)
            t0 = time.monotonic()
            conn.request("POST", "/", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 201:
                raise SystemExit("enqueue answered %d" % resp.status)
            latencies[k].append(time.monotonic() - t0)
            if eta_spread:
                sent[resp.headers["Poussetaches-Task-ID"]] = body["eta"]
        conn.close()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    start_gate.wait()
    t0 = time.monotonic()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - t0
    flat = sorted(x for part in latencies for x in part)
    print(json.dumps({"rate": per * threads / elapsed, "count": per * threads,
                      "p50": flat[len(flat) // 2],
                      "p99": flat[int(len(flat) * 0.99)], "etas": sent,
                      "wall_offset": time.time() - time.monotonic()}))


def role_bare(target, threads, n):
    """The delivery limit: ``threads`` threads POSTing the same envelope with urllib."""
    import urllib.request
    per = n // threads
    envelope = json.dumps({"payload": "eyJrIjogMX0=", "tries": 1, "req_id": "0" * 12}).encode()
    gate = threading.Barrier(threads + 1)

    def worker(k):
        opener = urllib.request.build_opener()
        gate.wait()
        for i in range(per):
            req = urllib.request.Request(target, data=envelope, method="POST", headers={
                "Content-Type": "application/json", "X-Bench-ID": "%d-%d" % (k, i)})
            with opener.open(req, timeout=60) as resp:
                resp.read()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    gate.wait()
    t0 = time.monotonic()
    for w in workers:
        w.join()
    print(json.dumps({"rate": per * threads / (time.monotonic() - t0)}))


def role_latency(url, target, n):
    """One enqueue at a time on an idle daemon; prints when each was sent."""
    conn = _connection(url)
    sent = {}
    pause = threading.Event()
    for _ in range(n):
        body = json.dumps({"url": target, "payload": "eyJrIjogMX0="})
        t0 = time.monotonic()
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        sent[resp.headers["Poussetaches-Task-ID"]] = t0
        pause.wait(0.01)  # idle between tasks
    print(json.dumps(sent))


def role_e2e(url, base, threads, n, size=1):
    """App threads enqueueing through the project's own PousseTaches client: push,
    or push_many with ``size`` tasks a call."""
    sys.path.insert(0, HERE)
    import poussetaches
    per = n // threads
    gate = threading.Barrier(threads + 1)

    def worker():
        client = poussetaches.PousseTaches(url, base)
        gate.wait()
        for _ in range(per // size):
            if size == 1:
                client.push({"k": 1}, "/e2e")
            else:
                client.push_many([{"payload": {"k": 1}, "path": "/e2e"}] * size)
        client.close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    gate.wait()
    print(json.dumps({"start": time.monotonic(), "count": per // size * size * threads}))


def role_batch(url, target, n, size):
    """POST /batch with ``size`` tasks per call until ``n`` are enqueued; prints the rate."""
    conn = _connection(url)
    body = json.dumps({"tasks": [{"url": target, "payload": "eyJrIjogMX0=",
                                  "delay_s": 3600}] * size})
    t0 = time.monotonic()
    for _ in range(n // size):
        conn.request("POST", "/batch", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise SystemExit("batch answered %d" % resp.status)
    print(json.dumps({"rate": (n // size) * size / (time.monotonic() - t0)}))


def role_huey(tmp, threads, n):
    """Huey's end to end: SqliteHuey, 4 thread workers, ``n`` no-op tasks enqueued by
    ``threads`` app threads and drained; prints the rate (or that huey is missing)."""
    try:
        from huey import SqliteHuey
    except ImportError:
        print(json.dumps({"rate": None}))
        return
    huey = SqliteHuey(filename=os.path.join(tmp, "huey.db"))
    done, lock, count = threading.Event(), threading.Lock(), [0]

    @huey.task()
    def noop():
        with lock:
            count[0] += 1
            if count[0] == n:
                done.set()

    consumer = huey.create_consumer(workers=4, worker_type="thread", periodic=False,
                                    initial_delay=0.001, backoff=1.0, max_delay=0.01)
    consumer.start()
    t0 = time.monotonic()
    enqueuers = [threading.Thread(target=lambda: [noop() for _ in range(n // threads)])
                 for _ in range(threads)]
    for t in enqueuers:
        t.start()
    done.wait(600)
    rate = n / (time.monotonic() - t0)
    consumer.stop(graceful=False)
    print(json.dumps({"rate": rate}))


def role_steps(kind, url, target, n, warm=20):
    """A load client driven from stdin, for the instruction counts: ``warm``
    calls, then "ready" on stdout; at each line read, ``n`` calls and "done".
    ``kind``: ``bare`` (urllib POSTs to ``target``, a new connection each, as
    urllib makes them) or ``enqueue`` (POST / to ``url`` on one kept-alive
    connection, the body role_enqueue sends)."""
    import urllib.request
    n, warm = int(n), int(warm)
    envelope = json.dumps({"payload": HAND_PAYLOAD, "tries": 1, "req_id": "0" * 12}).encode()
    body = json.dumps({"url": target, "payload": HAND_PAYLOAD, "expected": 200,
                       "schedule": "", "delay": 0})
    conn = _connection(url) if kind == "enqueue" else None
    opener = urllib.request.build_opener()

    def call(i):
        if conn is None:
            req = urllib.request.Request(target, data=envelope, method="POST", headers={
                "Content-Type": "application/json", "X-Bench-ID": "steps-%d" % i})
            with opener.open(req, timeout=600) as resp:
                resp.read()
            return
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise SystemExit("enqueue answered %d" % resp.status)

    count = itertools.count()
    for _ in range(warm):
        call(next(count))
    print("ready", flush=True)
    for _ in sys.stdin:
        for _ in range(n):
            call(next(count))
        print("done", flush=True)


ROLES = {"receiver": role_receiver, "noop": role_noop, "tasks-app": role_tasks_app,
         "receiver-close": lambda port_file: role_receiver(port_file, close=True)}


# --------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------

class Proc:
    """A role or the daemon in a subprocess."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=HERE)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def start_server(role, tmp):
    port_file = os.path.join(tmp, role + ".port")
    proc = Proc([__file__, "_role", role, port_file])
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file) or not open(port_file).read():
        if time.monotonic() > deadline or proc.proc.poll() is not None:
            raise SystemExit("the %s did not start" % role)
        time.sleep(0.02)
    return proc, "http://127.0.0.1:%s" % open(port_file).read()


class Daemon:
    """The daemon in a subprocess, its log (a line per delivery) in a file, as a
    service manager's would be: a pipe read here would wake this process for
    every line, on the cores the figures share."""

    def __init__(self, data_dir, *flags, env=None):
        started = time.monotonic()
        self.log = open(data_dir + ".log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, DAEMON, "serve", "--port", "0", "--data-dir", data_dir]
            + list(flags), stdout=subprocess.DEVNULL, stderr=self.log, cwd=HERE, env=env)
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            match = re.search(rb"serving on (http://\S+)", open(self.log.name, "rb").read())
            if match:
                self.url = match.group(1).decode()
            else:
                time.sleep(0.005)
        if self.url is None:
            self.stop()
            raise SystemExit("the daemon did not start")
        get(self.url + "/")
        self.startup = time.monotonic() - started
        self.pid = self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def rss(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def get(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def post(url, body=None):
    import urllib.request
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


def client(*args):
    """Run a load-client role in its own process; returns its JSON output."""
    out = subprocess.run([sys.executable, __file__, "_role"] + [str(a) for a in args],
                         capture_output=True, timeout=600, cwd=HERE)
    if out.returncode != 0:
        raise SystemExit("client %s failed: %s" % (args[0], out.stderr.decode()[-2000:]))
    return json.loads(out.stdout)


def wait_count(receiver, n):
    """Block until the receiver has n tasks; return when the last one arrived
    (CLOCK_MONOTONIC, shared by the processes of this machine)."""
    doc = get(receiver + "/wait?n=%d" % n)
    if doc["count"] < n:
        raise SystemExit("the receiver got %d of %d" % (doc["count"], n))
    return doc["last"]


def medians(pairs):
    """(median limit, median figure, median of the per-round ratios) of (limit, figure) pairs."""
    return (statistics.median(limit for limit, _ in pairs),
            statistics.median(value for _, value in pairs),
            statistics.median(value / limit for limit, value in pairs))


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


class Table:
    def __init__(self):
        self.rows = []

    def add(self, figure, value, unit, limit=None, target=None, higher=True, ratio=None,
            ok=None, target_text=None):
        """One row; ``target_text`` (with ``ok``, or alone for a row without a
        target) says the target where it is not one number."""
        if ratio is None and limit:
            ratio = value / limit
        if ok is None and target is not None:
            measured = ratio if ratio is not None else value
            ok = measured >= target if higher else measured <= target
        self.rows.append({"figure": figure, "value": value, "unit": unit, "limit": limit,
                          "ratio": ratio, "target": target, "higher_is_better": higher,
                          "target_text": target_text, "pass": ok})
        sys.stderr.write("  %-48s %s\n" % (figure, fmt(value, unit)))


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s" and value < 1:
        return "%.2f ms" % (value * 1000)
    if isinstance(value, float):
        return "%.3g %s" % (value, unit) if value < 100 else "%.0f %s" % (value, unit)
    return "%s %s" % (value, unit)


def run(quick, rounds=None):
    sizes = {"delivery": 1500 if quick else 6000, "enqueue": 2000 if quick else 8000,
             "batch": 20000 if quick else 100000, "queues": 5000 if quick else 30000,
             "latency": 100 if quick else 300, "timer": 100 if quick else 300,
             "backlog": 10000 if quick else 100000, "e2e": 1500 if quick else 6000}
    table = Table()
    tmp = tempfile.mkdtemp(prefix="pt-bench-")
    procs = []
    try:
        receiver_proc, receiver = start_server("receiver", tmp)
        noop_proc, noop = start_server("noop", tmp)
        closing_proc, closing = start_server("receiver-close", tmp)
        procs += [receiver_proc, noop_proc, closing_proc]
        target = receiver + "/task"

        # -- delivery -------------------------------------------------------
        # each limit and its figure are measured side by side, ``rounds`` times:
        # the machine's speed drifts within a run, a ratio of neighbours less
        rounds = rounds or (1 if quick else 3)

        def delivery(app, tag, workers=4):
            n = sizes["delivery"]
            get(app + "/take")
            d = Daemon(os.path.join(tmp, "delivery-%s" % tag), "--paused", "--workers",
                       str(workers))
            n = client("enqueue", d.url, app + "/task", 8, n, 0, 0)["count"]
            t0 = time.monotonic()
            post(d.url + "/resume")
            rate = n / (wait_count(app, n) - t0)
            d.stop()
            return rate

        def bare_loop(app, threads=4):
            get(app + "/take")
            return client("bare", app + "/task", threads, sizes["delivery"])["rate"]

        for app, figure in ((receiver, "delivery: tasks/s, 4 workers"),
                            (closing, "delivery to an app that closes every connection")):
            pairs = [(bare_loop(app), delivery(app, "%s-%d" % (len(table.rows), k)))
                     for k in range(rounds)]
            limit, rate, ratio = medians(pairs)
            # four threads on each side: bounded by the one interpreter lock, a figure
            # without a target (the 1-worker row below says what a delivery costs)
            table.add(figure, rate, "/s", limit, ratio=ratio, target_text="-")
        # the same with one thread on each side: what a delivery costs, without four
        # threads contending for one interpreter lock (no target: it explains the row above)
        pairs = [(bare_loop(closing, 1), delivery(closing, "single-%d" % k, 1))
                 for k in range(rounds)]
        limit, rate, ratio = medians(pairs)
        table.add("the same with 1 worker, against a 1-thread loop", rate, "/s", limit,
                  ratio=ratio, target_text="-")

        # -- the task endpoint against a handler written by hand, in one app ---------
        tasks_proc, tasks_app = start_server("tasks-app", tmp)
        procs.append(tasks_proc)
        keyed = dict(os.environ, POUSSETACHES_AUTH_KEY=BENCH_KEY)

        def through(path, payload, tag):
            get(tasks_app + "/take")
            d = Daemon(os.path.join(tmp, "endpoint-%s" % tag), "--paused", "--workers", "4",
                       "--allow-url", tasks_app + "/", env=keyed)
            n = client("enqueue", d.url, tasks_app + path, 8, sizes["delivery"], 0, 0,
                       payload)["count"]
            t0 = time.monotonic()
            post(d.url + "/resume")
            rate = n / (get(tasks_app + "/wait?n=%d" % n)["last"] - t0)
            d.stop()
            return rate

        pairs = [(through("/hand", HAND_PAYLOAD, "hand-%d" % k),
                  through("/_tasks/bench.noop", CALL_PAYLOAD, "task-%d" % k))
                 for k in range(rounds)]
        limit, rate, ratio = medians(pairs)
        table.add("delivery through the task endpoint vs a handler by hand", rate, "/s",
                  limit, 0.95, ratio=ratio)

        # -- enqueue ----------------------------------------------------------
        n = sizes["enqueue"]
        pairs = {"always": [], "never": []}
        for k in range(rounds):
            limit = client("enqueue", noop, target, 8, n, 0, 0)["rate"]
            for mode in ("always", "never"):
                d = Daemon(os.path.join(tmp, "enqueue-%s-%d" % (mode, k)), "--paused",
                           "--fsync", mode)
                pairs[mode].append((limit, client("enqueue", d.url, target, 8, n, 0, 0)["rate"]))
                d.stop()
        rates = {}
        for mode in ("always", "never"):  # 8 clients: the interpreter lock's too
            limit, rates[mode], ratio = medians(pairs[mode])
            table.add("enqueue: POST / per s, 8 clients, fsync " + mode, rates[mode], "/s",
                      limit, ratio=ratio, target_text="-")
        d = Daemon(os.path.join(tmp, "batch"), "--paused", "--fsync", "always")
        batch = client("batch", d.url, target, sizes["batch"], 500)["rate"]
        d.stop()
        table.add("batch enqueue: tasks/s in POST /batch of 500, fsync always", batch, "/s",
                  rates["always"], 10.0)

        # -- dispatch with 100 paused queues holding 10,000 tasks, beside a plain one -----
        def held(tag):
            get(receiver + "/take")
            d = Daemon(os.path.join(tmp, "held-%s" % tag), "--paused", "--workers", "4")
            for q in range(100):
                post(d.url + "/queues/held-%d/pause" % q)
                post(d.url + "/batch", {"tasks": [{"url": target, "queue": "held-%d" % q}] * 100})
            n = client("enqueue", d.url, target, 8, sizes["delivery"], 0, 0)["count"]
            t0 = time.monotonic()
            post(d.url + "/resume")
            rate = n / (wait_count(receiver, n) - t0)
            d.stop()
            return rate

        pairs = [(delivery(receiver, "plain-%d" % k), held(str(k))) for k in range(rounds)]
        limit, rate, ratio = medians(pairs)
        table.add("delivery with 100 paused queues holding 10k tasks", rate, "/s", limit, 0.90,
                  ratio=ratio)

        # -- dispatch with a queue per task, against one queue of them all ---------
        def spread(tag, queues):
            get(receiver + "/take")
            n = sizes["queues"]
            d = Daemon(os.path.join(tmp, "queues-%s" % tag), "--paused", "--workers", "4")
            for start in range(0, n, 1000):
                post(d.url + "/batch", {"tasks": [
                    {"url": target, "queue": "q%d" % i if queues else "one"}
                    for i in range(start, start + 1000)]})
            t0 = time.monotonic()
            post(d.url + "/resume")
            rate = n / (wait_count(receiver, n) - t0)
            d.stop()
            return rate

        pairs = [(spread("one-%d" % k, False), spread("many-%d" % k, True))
                 for k in range(rounds)]
        limit, rate, ratio = medians(pairs)
        table.add("delivery of %d tasks in %d queues vs in one" % (sizes["queues"],
                                                                 sizes["queues"]),
                  rate, "/s", limit, 0.90, ratio=ratio)

        # -- dispatch latency and timer precision (idle daemon) ------------------
        get(receiver + "/take")
        d = Daemon(os.path.join(tmp, "latency"))
        sent = client("latency", d.url, target, sizes["latency"])
        wait_count(receiver, len(sent))
        arrived = get(receiver + "/take")
        lat = [arrived[i] - t for i, t in sent.items()]
        table.add("dispatch latency p50: enqueue -> receiver", percentile(lat, 0.5), "s",
                  target=0.002, higher=False)
        table.add("dispatch latency p99", percentile(lat, 0.99), "s", target=0.020, higher=False)
        result = client("enqueue", d.url, target, 2, sizes["timer"], 0, 2.0)
        wait_count(receiver, len(result["etas"]))
        arrived = get(receiver + "/take")
        late = [arrived[i] + result["wall_offset"] - eta for i, eta in result["etas"].items()]
        table.add("timer precision: lateness p99", percentile(late, 0.99), "s", target=0.010,
                  higher=False)
        d.stop()

        # -- backlog, listing, memory, growth, restart, snapshot pause -------------
        n = sizes["backlog"]
        data = os.path.join(tmp, "backlog")
        d = Daemon(data, "--paused", "--snapshot-interval", "3600")
        empty_rate = client("enqueue", d.url, target, 8, 2000, 3600, 0)["rate"]
        rss0 = d.rss()
        growth = []
        loaded = 2000
        for mark in (1000, 10000, 100000):
            if mark > n:
                break
            batch = max(2000, mark // 10)
            while loaded + batch < mark:
                client("enqueue", d.url, target, 8, mark - batch - loaded, 3600, 0)
                loaded = mark - batch
            r = client("enqueue", d.url, target, 8, batch, 3600, 0)
            loaded += batch
            growth.append((loaded, 1e6 / r["rate"], r["p99"]))
        full_rate = client("enqueue", d.url, target, 8, 2000, 3600, 0)["rate"]
        loaded += 2000
        per_task = (d.rss() - rss0) / (loaded - 2000)
        listing = []
        for _ in range(50):
            t0 = time.monotonic()
            get(d.url + "/waiting?limit=100")
            listing.append(time.monotonic() - t0)
        table.add("backlog: enqueue rate with %dk waiting" % (loaded // 1000), full_rate, "/s",
                  empty_rate, 0.90)
        table.add("listing: GET /waiting?limit=100, %dk waiting (p50)" % (loaded // 1000),
                  percentile(listing, 0.5), "s", target=0.020, higher=False)
        table.add("memory: resident bytes per waiting task", per_task, "B", target=1024,
                  higher=False)
        d.stop()  # final snapshot
        copy = data + "-copy"
        shutil.copytree(data, copy)
        d = Daemon(data, "--paused", "--snapshot-interval", "3600")
        table.add("restart: start to serving, %dk waiting" % (loaded // 1000), d.startup, "s",
                  target=2.0, higher=False)
        calm = client("enqueue", d.url, target, 8, 2000, 3600, 0)["p99"]
        d.stop()
        d = Daemon(copy, "--paused", "--snapshot-interval", "0.2")
        busy = client("enqueue", d.url, target, 8, 4000, 3600, 0)["p99"]
        metrics = urlopen_text(d.url + "/metrics")
        d.stop()
        snaps = re.search(r"poussetaches_snapshots_total (\d+)", metrics)
        table.add("snapshot pause: enqueue p99 during snapshots (%s taken)"
                  % (snaps.group(1) if snaps else "?"), busy, "s", calm, None,
                  ok=busy <= 0.100 and busy <= 3 * calm, ratio=busy / calm,
                  target_text="≤ 100 ms, ≤ 3×")

        # -- end to end -------------------------------------------------------------
        def end_to_end(tag):
            n = sizes["e2e"]
            get(receiver + "/take")
            d = Daemon(os.path.join(tmp, "e2e-%s" % tag), "--workers", "4")
            result = client("e2e", d.url, receiver, 4, n)
            n = result["count"]
            rate = n / (wait_count(receiver, n) - result["start"])
            d.stop()
            return rate

        pairs = []
        for k in range(rounds):  # the limit: the bare loop and the no-op server, combined
            combined = 1 / (1 / bare_loop(receiver) + 1 / client(
                "enqueue", noop, target, 8, sizes["enqueue"], 0, 0)["rate"])
            pairs.append((combined, end_to_end(str(k))))
        limit, rate, ratio = medians(pairs)
        table.add("end to end: 4 app threads via PousseTaches", rate, "/s", limit,
                  ratio=ratio, target_text="-")
        pairs = []
        for k in range(max(1, rounds - 1)):
            n = sizes["e2e"]
            get(receiver + "/take")
            d = Daemon(os.path.join(tmp, "e2e-many-%d" % k), "--workers", "4")
            result = client("e2e", d.url, receiver, 4, n, 100)
            n = result["count"]
            many = n / (wait_count(receiver, n) - result["start"])
            d.stop()
            where = os.path.join(tmp, "huey-%d" % k)
            os.mkdir(where)
            huey = client("huey", where, 4, n)["rate"]
            if huey is None:
                print("huey not installed, skipped", file=sys.stderr)
                break
            pairs.append((huey, many))
        if pairs:
            huey, many, ratio = medians(pairs)
            table.add("end to end with push_many (100 a call) vs Huey (SqliteHuey, 4 threads)",
                      many, "/s", huey, ratio=ratio, target_text="-")  # 4 threads, one lock
        return table, growth
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Instructions per task, counted by valgrind
# --------------------------------------------------------------------------

class Callgrind:
    """A command under ``valgrind --tool=callgrind``; ``count()`` is the
    instructions the process ran since the previous ``count()`` (or its start)."""

    def __init__(self, argv, tmp, tag, env=None, stdin=None, stdout=None,
                 stderr=subprocess.DEVNULL):
        """``tag`` None: the command runs without valgrind (a load client)."""
        self.out = os.path.join(tmp, "callgrind-%s" % tag)
        env = dict(env or os.environ, PYTHONHASHSEED="0")  # the same dicts, run to run
        wrap = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + self.out + ".%p"]
        self.proc = subprocess.Popen(
            (wrap if tag else []) + [sys.executable] + argv, stdin=stdin, stdout=stdout,
            stderr=stderr, env=env, cwd=HERE)
        self.dumps = 0

    def count(self):
        self.dumps += 1
        subprocess.run(["callgrind_control", "--dump", str(self.proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = "%s.%d.%d" % (self.out, self.proc.pid, self.dumps)
        with open(path) as f:
            for line in f:
                if line.startswith("totals:"):
                    return int(line.split()[1])
        raise SystemExit("no totals in " + path)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def instructions(n):
    """Rows of instructions per delivery and per enqueue, beside their limits."""
    table = Table()
    tmp = tempfile.mkdtemp(prefix="pt-instr-")
    procs = []

    def daemon(tag, *flags):
        """The daemon under callgrind (dispatch paused, one worker); returns it and its URL."""
        data = os.path.join(tmp, tag)
        log = open(data + ".log", "w+b")
        cg = Callgrind([DAEMON, "serve", "--port", "0", "--data-dir", data, "--paused",
                        "--workers", "1"] + list(flags), tmp, tag, stdout=log, stderr=log)
        procs.append(cg)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and cg.proc.poll() is None:
            match = re.search(rb"serving on (http://\S+)", open(data + ".log", "rb").read())
            if match:
                return cg, match.group(1).decode()
            time.sleep(0.2)
        raise SystemExit("the daemon did not start under valgrind")

    def steps(cg_argv, tag, env=None):
        """A role_steps client; under callgrind when ``tag`` is given."""
        argv = [__file__, "_role", "steps"] + [str(a) for a in cg_argv]
        proc = Callgrind(argv, tmp, tag, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.proc.stdout.readline().strip() == b"ready"
        return proc

    def step(proc):
        proc.proc.stdin.write(b"go\n")
        proc.proc.stdin.flush()
        if proc.proc.stdout.readline().strip() != b"done":
            raise SystemExit("a load client stopped")

    def settled(url, n):
        """Wait until ``n`` tasks are in success and none is in flight (each look is
        counted too: a look every 2 s of a run that takes minutes under valgrind)."""
        while True:
            time.sleep(2.0)
            doc = get(url + "/")
            if doc["success"] >= n and not doc["in_flight"]:
                return

    try:
        receiver_proc, receiver = start_server("receiver", tmp)
        closing_proc, closing = start_server("receiver-close", tmp)
        procs += [receiver_proc, closing_proc]

        bare = steps(["bare", "-", closing + "/task", n], "bare")
        bare.count()
        step(bare)
        per_bare = bare.count() / n
        bare.stop()
        for app, figure in ((closing, "delivery to an app that closes every connection"),
                            (receiver, "delivery to a kept-alive app")):
            cg, url = daemon("delivery-%d" % len(table.rows))
            loader = steps(["enqueue", url, app + "/task", n, 0], None)  # n tasks exactly
            step(loader)
            loader.stop()
            get(app + "/take")  # the receiver counts from 0
            cg.count()
            post(url + "/resume")
            wait_count(app, n)
            settled(url, n)
            table.add(figure + ": instructions per task", cg.count() / n, "instr",
                      per_bare, 1.25, higher=False)
            cg.stop()

        noop = Callgrind([__file__, "_role", "noop", os.path.join(tmp, "noop.port")], tmp,
                         "noop")
        procs.append(noop)
        deadline = time.monotonic() + 600
        while not (os.path.exists(os.path.join(tmp, "noop.port"))
                   and open(os.path.join(tmp, "noop.port")).read()):
            if time.monotonic() > deadline or noop.proc.poll() is not None:
                raise SystemExit("the no-op server did not start under valgrind")
            time.sleep(0.2)
        noop_url = "http://127.0.0.1:%s" % open(os.path.join(tmp, "noop.port")).read()
        per_limit = {}
        for tag, server, url in (("noop", noop, noop_url), ("enqueue", None, None)):
            if server is None:
                server, url = daemon("enqueue")
            loader = steps(["enqueue", url, receiver + "/task", n], None)
            server.count()
            step(loader)
            per_limit[tag] = server.count() / n
            loader.stop()
            server.stop()
        table.add("enqueue (POST /, one kept-alive client): instructions per task",
                  per_limit["enqueue"], "instr", per_limit["noop"], 1.20, higher=False)
        table.add("a bare urllib request (the delivery rows' limit)", per_bare, "instr",
                  target_text="-")
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return table


def urlopen_text(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read().decode()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_role":
        name, rest = argv[1], argv[2:]
        if name in ROLES:
            return ROLES[name](*rest)
        if name == "enqueue":
            return role_enqueue(rest[0], rest[1], int(rest[2]), int(rest[3]), float(rest[4]),
                                float(rest[5]), *rest[6:])
        if name == "bare":
            return role_bare(rest[0], int(rest[1]), int(rest[2]))
        if name == "latency":
            return role_latency(rest[0], rest[1], int(rest[2]))
        if name == "e2e":
            return role_e2e(rest[0], rest[1], *[int(x) for x in rest[2:]])
        if name == "batch":
            return role_batch(rest[0], rest[1], int(rest[2]), int(rest[3]))
        if name == "steps":
            return role_steps(*rest)
        if name == "huey":
            return role_huey(rest[0], int(rest[1]), int(rest[2]))
        raise SystemExit("unknown role " + name)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="measure each paired figure N times (default 3, 1 with --quick; "
                             "N-1 against Huey): more rounds, steadier medians")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per delivery and per enqueue with valgrind "
                             "(about 5 minutes) instead of the timed run")
    args = parser.parse_args(argv)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform()}
    sys.stderr.write("poussetaches benchmark on %d CPUs, Python %s (%s)%s\n"
                     % (machine["cpus"], machine["python"], machine["platform"],
                        ", quick" if args.quick else ""))
    started = time.monotonic()
    if args.instructions:
        if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
            print("--instructions needs valgrind (Debian, Ubuntu: apt-get install valgrind); "
                  "not run")
            return 0
        table, growth = instructions(100 if args.quick else 300), []
    else:
        table, growth = run(args.quick, args.rounds)
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({"machine": machine, "quick": args.quick, "seconds": elapsed,
                          "figures": table.rows,
                          "growth": [{"tasks": n, "enqueue_us_per_task": us, "enqueue_p99_s": p}
                                     for n, us, p in growth]}, indent=2))
    else:
        print("poussetaches benchmark: %d CPUs, Python %s, %s%s, %.0f s"
              % (machine["cpus"], machine["python"], machine["platform"],
                 ", --quick" if args.quick else "", elapsed))
        print()
        print("| figure | measured | limit | ratio | target | |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in table.rows:
            target = row["target"]
            if row["target_text"] is not None:
                target_text = row["target_text"]
            elif row["ratio"] is not None:
                target_text = ("≥ %.2f" if row["higher_is_better"] else "≤ %.2f") % target
            else:
                target_text = ("≥ " if row["higher_is_better"] else "≤ ") + fmt(target, row["unit"])
            print("| %s | %s | %s | %s | %s | %s |" % (
                row["figure"], fmt(row["value"], row["unit"]), fmt(row["limit"], row["unit"]),
                "%.2f" % row["ratio"] if row["ratio"] is not None else "-", target_text,
                "-" if row["pass"] is None else "pass" if row["pass"] else "FAIL"))
        if not growth:
            return 0 if all(row["pass"] is not False for row in table.rows) else 1
        print()
        print("| waiting tasks | enqueue cost per task | enqueue p99 |")
        print("| --- | --- | --- |")
        for n, us, p99 in growth:
            print("| %d | %.0f µs | %.2f ms |" % (n, us, p99 * 1000))
    return 0 if all(row["pass"] is not False for row in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
