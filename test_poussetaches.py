"""Tests for poussetaches: stdlib unittest, real sockets, real files, real processes.

Run: python3 -m unittest -v
"""

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock
from datetime import datetime, timedelta, timezone

import poussetaches as pt

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT = 15.0  # generous bound for every condition a test waits on
# long load, fuzz, soak and random-case sizes run with POUSSETACHES_STRESS=1
STRESS = os.environ.get("POUSSETACHES_STRESS") == "1"

try:
    import zoneinfo
    zoneinfo.ZoneInfo("America/New_York")
    HAVE_TZDATA = True
except Exception:  # no zoneinfo module or no tz database on this machine
    HAVE_TZDATA = False

logging.getLogger("poussetaches").addHandler(logging.NullHandler())
logging.getLogger("poussetaches").propagate = False


# --------------------------------------------------------------------------
# Helpers: a receiver playing the app, a daemon context, a tiny HTTP client
# --------------------------------------------------------------------------

class QuietServer(http.server.ThreadingHTTPServer):
    """A receiver's server: a peer resetting its kept-alive connection (a killed
    daemon) is not an error worth a traceback in the test output."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Receiver:
    """A real HTTP server playing the app.  ``answers[path]`` is a list of
    answers consumed in order (the last one repeats): (status, body, headers,
    delay_s).  Every request is recorded in ``got``."""

    def __init__(self):
        self.got = []
        self.answers = {}
        self.cond = threading.Condition()
        self.changes = Changes()  # one event per request received
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.cond:
                    plan = receiver.answers.get(self.path) or [(200, b"", {}, 0)]
                    answer = plan.pop(0) if len(plan) > 1 else plan[0]
                answer = tuple(answer)
                status, text, headers, delay = answer + (200, b"", {}, 0)[len(answer):]
                if delay:
                    time.sleep(delay)  # simulates a slow app
                with receiver.cond:
                    receiver.got.append({"path": self.path, "headers": self.headers,
                                         "body": body, "at": time.time(),
                                         "json": json.loads(body) if body else None})
                    receiver.cond.notify_all()
                receiver.changes.note()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        # shutdown() is noticed at socketserver's next poll: keep it short, tests stop many
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]

    def url(self, path="/task"):
        return self.base + path

    def wait_for(self, n, path=None, timeout=WAIT):
        """Block until ``n`` requests (to ``path``) arrived; return them."""
        def matching():
            return [g for g in self.got if path is None or g["path"] == path]
        with self.cond:
            ok = self.cond.wait_for(lambda: len(matching()) >= n, timeout)
            got = matching()
        if not ok:
            raise AssertionError("receiver got %d of %d requests in %.0fs" % (len(got), n, timeout))
        return got

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@contextlib.contextmanager
def running_daemon(data_dir=None, **kwargs):
    """A Daemon on 127.0.0.1:0 in a temporary directory; always stopped."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        data_dir = os.path.join(tmp, "data")
    kwargs.setdefault("min_backoff", 0.05)
    kwargs.setdefault("max_backoff", 0.2)
    kwargs.setdefault("grace", 2.0)
    kwargs.setdefault("on_change", CHANGES.note)
    daemon = pt.Daemon(host="127.0.0.1", port=0, data_dir=data_dir, **kwargs)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def call(base, method, path, body=None, headers=None, raw=None, timeout=WAIT):
    """One HTTP request: returns (status, headers, parsed JSON or text)."""
    host, port = base.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = text
        return resp.status, resp.headers, doc
    finally:
        conn.close()


def b64(data):
    return base64.b64encode(data).decode()


class Changes:
    """A count of events with a Condition: ``note()`` from any thread, and
    ``wait_past(seen)`` blocks until the count moves past ``seen``."""

    def __init__(self):
        self.cond = threading.Condition()
        self.count = 0

    def note(self):
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait_past(self, seen, timeout):
        with self.cond:
            self.cond.wait_for(lambda: self.count != seen, timeout)


# every daemon a test starts notes each change of its tables (and each snapshot) here
CHANGES = Changes()


def wait_until(predicate, timeout=WAIT, what="condition", changes=CHANGES, poll=None):
    """Wait for a condition observed from outside (an HTTP listing, a file): the
    predicate is evaluated again each time ``changes`` notes an event, never on a
    timer, unless ``poll`` (seconds) is given: for state that notes no event (a
    daemon in another process, the server's connection count).  Returns the
    predicate's true value."""
    deadline = time.monotonic() + timeout
    while True:
        seen = changes.count
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for " + what)
        changes.wait_past(seen, remaining if poll is None else min(poll, remaining))


def ts(text):
    """ISO time (with offset) -> Unix ns."""
    return int(datetime.fromisoformat(text).timestamp()) * 10 ** 9


def iso(ns, tz):
    return datetime.fromtimestamp(ns // 10 ** 9, tz).isoformat()


UTC = timezone.utc
SEED_UNIT = 1126


# --------------------------------------------------------------------------
# Fixtures: a cron oracle written from SPEC 3's grammar, Go's ParseDuration
# --------------------------------------------------------------------------
#
# The oracle (OracleSpec, oracle_next) is written from SPEC 3's grammar and
# rules only; it calls none of poussetaches' parsing or matching helpers.
# POUSSETACHES_SEED=<int> changes the seed (default 20261128); every failure
# message names the seed, the case, the spec, the zone and the start.

try:
    import zoneinfo
except ImportError:  # pragma: no cover - Python < 3.9
    zoneinfo = None

NS = 10 ** 9
INT64_MAX = 2 ** 63 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SEED = int(os.environ.get("POUSSETACHES_SEED", "20261128"))
ZONES = ("UTC", "Europe/Paris", "America/New_York", "America/Santiago",
         "Australia/Lord_Howe")
RANGE_START = int(datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp())
RANGE_END = int(datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp())


def oracle_utc(*args):
    """Unix ns of a UTC calendar time."""
    return int(datetime(*args, tzinfo=timezone.utc).timestamp()) * NS


def oracle_iso(t_ns, tz=None):
    if t_ns is None:
        return "None"
    when = EPOCH + timedelta(seconds=t_ns // NS)
    text = when.isoformat().replace("+00:00", "Z")
    if t_ns % NS:
        text += " +%dns" % (t_ns % NS)
    if tz is not None:
        text += " (%s wall %s)" % (tz.key, when.astimezone(tz).strftime("%a %Y-%m-%d %H:%M:%S %Z"))
    return text


# --------------------------------------------------------------------------
# Go's time.ParseDuration, as a reference (exact integers for the fraction)
# --------------------------------------------------------------------------

GO_UNITS = {"ns": 1, "us": 1000, "\u00b5s": 1000, "\u03bcs": 1000, "ms": 10 ** 6,
            "s": NS, "m": 60 * NS, "h": 3600 * NS}


class GoDurationError(ValueError):
    pass


def go_parse_duration(s, float_fraction=False):
    """Go's time.ParseDuration (src/time/format.go): leadingInt, leadingFraction,
    overflow checks against 1<<63.  Go adds the fraction as
    uint64(float64(f) * (float64(unit) / scale)); with float_fraction=False the
    same term is computed exactly (f * unit // scale)."""
    orig = s
    neg = False
    if s and s[0] in "-+":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise GoDurationError("invalid duration %r" % orig)
    d = 0
    digits = "0123456789"
    while s:
        if not (s[0] == "." or s[0] in digits):
            raise GoDurationError("invalid duration %r" % orig)
        i, v = 0, 0
        while i < len(s) and s[i] in digits:               # leadingInt
            if v > (1 << 63) // 10:
                raise GoDurationError("invalid duration %r" % orig)
            v = v * 10 + ord(s[i]) - 48
            if v > 1 << 63:
                raise GoDurationError("invalid duration %r" % orig)
            i += 1
        pre = i > 0
        s = s[i:]
        post, f, scale = False, 0, 1
        if s and s[0] == ".":
            s = s[1:]
            i, overflow = 0, False
            while i < len(s) and s[i] in digits:           # leadingFraction
                if not overflow:
                    if f > ((1 << 63) - 1) // 10:
                        overflow = True
                    else:
                        y = f * 10 + ord(s[i]) - 48
                        if y > 1 << 63:
                            overflow = True
                        else:
                            f, scale = y, scale * 10
                i += 1
            post = i > 0
            s = s[i:]
        if not pre and not post:
            raise GoDurationError("invalid duration %r" % orig)
        i = 0
        while i < len(s) and not (s[i] == "." or s[i] in digits):
            i += 1
        if i == 0:
            raise GoDurationError("missing unit in duration %r" % orig)
        unit_text, s = s[:i], s[i:]
        if unit_text not in GO_UNITS:
            raise GoDurationError("unknown unit %r in duration %r" % (unit_text, orig))
        unit = GO_UNITS[unit_text]
        if v > (1 << 63) // unit:
            raise GoDurationError("invalid duration %r" % orig)
        v *= unit
        if f > 0:
            if float_fraction:
                v += int(float(f) * (float(unit) / float(scale)))
            else:
                v += f * unit // scale
            if v > 1 << 63:
                raise GoDurationError("invalid duration %r" % orig)
        d += v
        if d > 1 << 63:
            raise GoDurationError("invalid duration %r" % orig)
    if neg:
        return -d
    if d > INT64_MAX:
        raise GoDurationError("invalid duration %r" % orig)
    return d


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------

ORACLE_MONTHS = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
                 "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}
ORACLE_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# robfig/cron's descriptors, written as 6-field specs.
ORACLE_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}


class OracleError(ValueError):
    pass


def _oracle_number(word, lo, hi, names, allow=()):
    low = word.lower()
    if names is not None and low in names:
        return names[low]
    if not word or any(c not in "0123456789" for c in word):
        raise OracleError("not a number: %r" % word)
    n = int(word)
    if not (lo <= n <= hi or n in allow):
        raise OracleError("out of range: %r" % word)
    return n


def oracle_field(text, lo, hi, names=None, five_field_dow=False):
    """(set of values, list of elements) of one field, from the grammar
    element := ("*" | "?" | value | value "-" value) ["/" step]."""
    values = set()
    elements = text.split(",")
    for element in elements:
        if element.count("/") > 1:
            raise OracleError("two slashes: %r" % element)
        base, slash, step_text = element.partition("/")
        step = 1
        if slash:
            step = _oracle_number(step_text, 1, 10 ** 9, None)
        if base in ("*", "?"):
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            # Vixie cron and croniter: a 5-field range may end at 7, which is Sunday
            allow = (7,) if five_field_dow else ()
            first, last = _oracle_number(a, lo, hi, names), _oracle_number(b, lo, hi, names, allow)
            if first > last:
                raise OracleError("reversed range %r" % base)
        else:
            # A plain 7 is Sunday in 5-field specs; never with a step (N/step ends at 6).
            allow = (7,) if five_field_dow and not slash else ()
            first = _oracle_number(base, lo, hi, names, allow)
            if five_field_dow and first == 7:
                first = 0
            last = hi if slash else first
        values.update(range(first, last + 1, step))
    if five_field_dow and 7 in values:
        values.discard(7)
        values.add(0)
    return values, elements


class OracleSpec:
    def __init__(self, text):
        text = text.strip()
        if text.startswith("@"):
            text = ORACLE_DESCRIPTORS[text.lower()]
        fields = text.split(" ")
        fields = [f for f in fields if f]
        if len(fields) == 5:
            six = False
            sec, minute, hour, dom, month, dow = ["0"] + fields
        elif len(fields) == 6:
            six = True
            sec, minute, hour, dom, month, dow = fields
        else:
            raise OracleError("%d fields" % len(fields))
        self.seconds = sorted(oracle_field(sec, 0, 59)[0])
        self.minutes = sorted(oracle_field(minute, 0, 59)[0])
        self.hours = sorted(oracle_field(hour, 0, 23)[0])
        self.dom, dom_elements = oracle_field(dom, 1, 31)
        self.months = oracle_field(month, 1, 12, ORACLE_MONTHS)[0]
        self.dow, dow_elements = oracle_field(dow, 0, 6, ORACLE_DAYS, five_field_dow=not six)
        if six:   # robfig/cron: any "*"/"?"-prefixed element in either field -> AND
            self.days_and = any(e[:1] in ("*", "?") for e in dom_elements + dow_elements)
        else:     # Vixie: a field whose text starts with * or ? is unrestricted -> AND
            self.days_and = dom[:1] in ("*", "?") or dow[:1] in ("*", "?")

    def day_ok(self, day):
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.dom
        dow_ok = day.isoweekday() % 7 in self.dow      # Sunday = 0
        return (dom_ok and dow_ok) if self.days_and else (dom_ok or dow_ok)


def oracle_wall(t, tz):
    """Unix seconds -> naive wall time in tz."""
    return (EPOCH + timedelta(seconds=t)).astimezone(tz).replace(tzinfo=None)


def oracle_first_instant(wall, tz):
    """Earliest Unix second whose wall time in tz is ``wall``; None if DST skips it."""
    found = None
    for fold in (0, 1):
        offset = wall.replace(fold=fold, tzinfo=tz).utcoffset()
        t = (wall - offset - EPOCH.replace(tzinfo=None)) // timedelta(seconds=1)
        if oracle_wall(t, tz) == wall and (found is None or t < found):
            found = t
    return found


def oracle_next(spec, tz, t_ns, max_days=6 * 366 + 2):
    """First run strictly after t_ns (Unix ns): scan days, then hours, minutes,
    seconds of wall time, starting at the wall time of t (no earlier wall time
    can have an instant after t), keeping the first instant of each matching
    wall time that DST does not skip."""
    start = oracle_wall(t_ns // NS, tz)
    first_day = start.date()
    for i in range(max_days):
        day = first_day + timedelta(days=i)
        if not spec.day_ok(day):
            continue
        for h in spec.hours:
            if i == 0 and h < start.hour:
                continue
            for m in spec.minutes:
                if i == 0 and (h, m) < (start.hour, start.minute):
                    continue
                for s in spec.seconds:
                    wall = datetime(day.year, day.month, day.day, h, m, s)
                    if wall < start:
                        continue
                    t = oracle_first_instant(wall, tz)
                    if t is not None and t * NS > t_ns:
                        return t * NS
    return None


# --------------------------------------------------------------------------
# Random specs from the grammar
# --------------------------------------------------------------------------

FIELD_BOUNDS = {"second": (0, 59), "minute": (0, 59), "hour": (0, 23),
                "dom": (1, 31), "month": (1, 12), "dow": (0, 6)}
MONTH_WORDS = list(ORACLE_MONTHS)
DAY_WORDS = list(ORACLE_DAYS)


def _word(rng, kind, n):
    """n as a number or, for month/dow, sometimes as a name in random case."""
    words = MONTH_WORDS if kind == "month" else DAY_WORDS if kind == "dow" else None
    if words is None or rng.random() < 0.6:
        return str(n)
    w = words[n - 1] if kind == "month" else words[n]
    return rng.choice((w, w.upper(), w.capitalize()))


def _step(rng, lo, hi):
    if rng.random() < 0.05:
        return rng.randint(hi - lo + 1, hi - lo + 10)      # beyond the range: allowed
    return rng.randint(1, max(1, min(hi - lo, 15)))


def gen_element(rng, kind, five):
    lo, hi = FIELD_BOUNDS[kind]
    r = rng.random()
    if r < 0.30:
        if kind == "dow" and five and rng.random() < 0.2:
            return "7"                                     # plain 7 = Sunday (5 fields)
        return _word(rng, kind, rng.randint(lo, hi))
    if r < 0.57:
        a = rng.randint(lo, hi)
        b = rng.randint(a, hi)
        end = _word(rng, kind, b)
        if kind == "dow" and five and rng.random() < 0.25:
            end = "7"                                      # a range may end at 7 = Sunday
        if r < 0.45:
            return "%s-%s" % (_word(rng, kind, a), end)
        return "%s-%s/%d" % (_word(rng, kind, a), end, _step(rng, lo, hi))
    if r < 0.72:
        return "*/%d" % _step(rng, lo, hi)
    if r < 0.86:
        return "%s/%d" % (_word(rng, kind, rng.randint(lo, hi)), _step(rng, lo, hi))
    if r < 0.94:
        return "*"
    return "?"


def gen_field(rng, kind, five, restricted_day=None):
    if kind in ("dom", "dow"):
        if not restricted_day:
            return rng.choice(("*", "*", "*", "?"))
    elif rng.random() < 0.25:
        return "*"
    elif kind in ("second", "minute") and rng.random() < 0.3:
        return str(rng.randint(*FIELD_BOUNDS[kind]))
    n = rng.choice((1, 1, 1, 2, 2, 3))
    return ",".join(gen_element(rng, kind, five) for _ in range(n))


def gen_spec(rng):
    if rng.random() < 0.04:
        return rng.choice(sorted(ORACLE_DESCRIPTORS))
    five = rng.random() < 0.5
    # both day fields restricted often; each alone sometimes; neither sometimes
    mode = rng.random()
    dom_r, dow_r = mode < 0.45 or 0.65 <= mode < 0.8, mode < 0.65
    fields = []
    if not five:
        fields.append(gen_field(rng, "second", five))
    fields += [gen_field(rng, "minute", five), gen_field(rng, "hour", five),
               gen_field(rng, "dom", five, dom_r), gen_field(rng, "month", five),
               gen_field(rng, "dow", five, dow_r)]
    return " ".join(fields)


# DST transitions (Unix seconds) of a zone between 2020 and 2030, to start near them.
_TRANSITIONS = {}


def transitions(tz):
    if tz.key not in _TRANSITIONS:
        found = []
        step = 6 * 3600
        prev = (EPOCH + timedelta(seconds=RANGE_START)).astimezone(tz).utcoffset()
        t = RANGE_START
        while t < RANGE_END:
            off = (EPOCH + timedelta(seconds=t + step)).astimezone(tz).utcoffset()
            if off != prev:
                lo, hi = t, t + step      # offset(lo) == prev, offset(hi) == off
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if (EPOCH + timedelta(seconds=mid)).astimezone(tz).utcoffset() == prev:
                        lo = mid
                    else:
                        hi = mid
                found.append(hi)
                prev = off
            t += step
        _TRANSITIONS[tz.key] = found
    return _TRANSITIONS[tz.key]


def gen_start(rng, tz):
    trans = transitions(tz)
    if trans and rng.random() < 0.4:
        t = rng.choice(trans) + rng.randint(-2 * 86400, 2 * 3600)
    else:
        t = rng.randrange(RANGE_START, RANGE_END)
    t_ns = t * NS
    if rng.random() < 0.25:
        t_ns += rng.randrange(1, NS)
    return t_ns


# --------------------------------------------------------------------------
# The edge cases of the cron grammar, case by case
# --------------------------------------------------------------------------

def spec_runs(spec, t_ns, n):
    out = []
    for _ in range(n):
        t_ns = spec.next_after(t_ns)
        out.append(t_ns)
        if t_ns is None:
            break
    return out


def oracle_runs(text, tz, t_ns, n):
    spec = OracleSpec(text)
    out = []
    for _ in range(n):
        t_ns = oracle_next(spec, tz, t_ns)
        out.append(t_ns)
    return out


# --------------------------------------------------------------------------
# 3. Invalid specs (also run through the HTTP API by the API tests)
# --------------------------------------------------------------------------

INVALID_SPECS = [
    # only ASCII digits are numbers
    ("0 0 \u00b2 * *", "superscript two in day of month"),
    ("\u00b2 * * * *", "superscript two in minute"),
    ("0 0 0 \u00b2 * *", "superscript two, 6 fields"),
    ("\u0663 * * * *", "Arabic-Indic three in minute"),
    ("\uff13 * * * *", "full-width three in minute"),
    ("0 \u0967 * * *", "Devanagari one in hour"),
    ("*/\u0663 * * * *", "non-ASCII step"),
    ("1-\u0663 * * * *", "non-ASCII range end"),
    ("0 0 * * \u0661", "non-ASCII day of week"),
    ("@every \u0661h", "Arabic-Indic digit in a duration"),
    ("@every \u00b2h", "superscript digit in a duration"),
    ("@every \uff13s", "full-width digit in a duration"),
    # overflows
    ("@every 99999999999h", "duration overflows 64-bit ns"),
    ("@every 2562048h", "above Go's maximum duration"),
    ("@every 2562047h47m16.854775808s", "one ns above Go's maximum duration"),
    ("@every 9223372036854775808ns", "2**63 ns"),
    ("@every 99999999999999999999s", "integer part overflows"),
    ("99999999999999999999 * * * *", "huge minute"),
    # empty list items (robfig/cron would skip them; SPEC 3 and pt refuse them)
    ("1,,2 * * * *", "empty list item"),
    (",5 * * * *", "leading empty list item"),
    ("5, * * * *", "trailing empty list item"),
    ("0 0 0 * * 1,", "trailing empty list item, 6 fields"),
    # reversed ranges
    ("5-1 * * * *", "reversed minute range"),
    ("0 0 20-10 * *", "reversed day-of-month range"),
    ("0 0 * dec-jan *", "reversed month names"),
    ("0 0 0 * * fri-mon", "reversed day names"),
    ("0 0 5-1/2 * *", "reversed range with a step"),
    # zero / bad steps
    ("*/0 * * * *", "zero step"),
    ("0 0 1-10/0 * *", "zero step on a range"),
    ("0 0 0 * * 1/0", "zero step in day of week"),
    ("*/ * * * *", "empty step"),
    ("*/x * * * *", "non-numeric step"),
    ("1/2/3 * * * *", "two slashes"),
    ("*/-1 * * * *", "negative step"),
    # unknown names
    ("0 0 * foo *", "unknown month name"),
    ("0 0 * * funday", "unknown day name"),
    ("0 0 * january *", "full month name"),
    ("0 0 * * monday", "full day name"),
    ("0 0 mon * *", "day name in day of month"),
    ("0 0 * * jan", "month name in day of week"),
    ("jan * * * *", "month name in minute"),
    ("@fortnightly", "unknown descriptor"),
    ("@", "bare @"),
    # @every syntax
    ("@every1h", "missing @every space"),
    ("@every1.5h", "missing @every space"),
    ("@every", "no duration"),
    ("@every ", "empty duration"),
    ("@every 1", "missing unit"),
    ("@every 1d", "unknown unit d"),
    ("@every 1H", "unknown unit H"),
    ("@every .h", "no digits"),
    ("@every 1h 30m", "space inside a duration"),
    ("@every 1.2.3s", "two decimal points"),
    ("@every 1e3s", "exponent"),
    # durations below 1s
    ("@every 999ms", "below 1s"),
    ("@every 999999999ns", "1 ns below 1s"),
    ("@every 0.5s", "below 1s, decimal"),
    ("@every 0s", "zero"),
    ("@every 0", "zero without unit"),
    ("@every -1h", "negative"),
    ("@every -0.5s", "negative, below 1s"),
    # above the maximum
    ("@every 2562047h47m17s", "above Go's maximum duration"),
    ("@every 106752d", "days are not a Go unit"),
    # field counts
    ("", "empty spec"),
    ("   ", "blank spec"),
    ("* * * *", "four fields"),
    ("*", "one field"),
    ("* * * * * * *", "seven fields"),
    ("0 0 0 1 1 * 2030", "seven fields with a year"),
    # out of range values
    ("60 * * * *", "minute 60"),
    ("* 24 * * *", "hour 24"),
    ("* * 0 * *", "day of month 0"),
    ("* * 32 * *", "day of month 32"),
    ("* * * 0 *", "month 0"),
    ("* * * 13 *", "month 13"),
    ("* * * * 8", "day of week 8"),
    ("60 * * * * *", "second 60, 6 fields"),
    ("0 0 0 * * 7", "day of week 7 in 6 fields (robfig/cron's range is 0-6)"),
    ("0-60 * * * *", "range end out of range"),
    ("0 0 0-5 * *", "range start below day-of-month minimum"),
    ("-1 * * * *", "negative minute"),
    # garbage
    ("a b c d e", "letters"),
    ("1-2-3 * * * *", "two dashes"),
    ("* * * * mon-", "dangling dash"),
    ("*-5 * * * *", "star as a range start (crontab refuses it)"),
    ("** * * * *", "double star"),
    ("1.5 * * * *", "decimal minute"),
    ("CRON_TZ=Not/AZone 0 0 * * *", "unknown time zone"),
]

# Valid under robfig/cron and SPEC: steps beyond the range simply give one value.
VALID_SPECS = [
    ("*/70 * * * *", "step beyond the minute range: minute 0 only"),
    ("5/100 * * * *", "N/step beyond the range: minute 5 only"),
    ("0 0 1-10/40 * *", "range step beyond the range"),
    ("0 0 0 * * 1/9", "day-of-week step beyond the range: Monday only"),
    ("0 0 * * 7", "7 = Sunday in 5 fields"),
    ("0 0 ? * MON-fri", "? and mixed-case names"),
    ("@every 1s", "the minimum @every"),
    ("@every 2562047h47m16.854775807s", "the maximum @every"),
]

# Valid syntax that matches no time in the next 5 years: a 400 at the API,
# None from next_after.
NO_MATCH_SPECS = [
    ("0 0 30 2 *", "February 30th"),
    ("0 0 0 31 4,6,9,11 *", "31st of a 30-day month"),
    ("0 0 0 31 2 ?", "February 31st, 6 fields"),
]


class FakeClock:
    """An injected wall clock (Unix ns) that only moves when told."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


# --------------------------------------------------------------------------
# Fixtures: the original's task shape
# --------------------------------------------------------------------------

TASK_KEYS = {"id": str, "url": str, "payload": str, "expected": int, "schedule": str,
             "next_scheduled_run": int, "next_run": int, "tries": int, "last_run": int,
             "last_error_status_code": int}


def urllib_quote(text):
    import urllib.parse
    return urllib.parse.quote(text, safe="")


def raw_exchange(port, data, timeout=WAIT):
    """Send raw bytes on a fresh connection, half-close, read every byte until the
    daemon closes: returns the whole answer (one or more responses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class ErrorRecords(logging.Handler):
    """Collects the daemon's ERROR records (a traceback in the log is a bug)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


# --------------------------------------------------------------------------
# Fixtures: the original's files and client
# --------------------------------------------------------------------------

ORIGINAL_FIELDS = ("id", "url", "payload", "expected", "schedule", "next_scheduled_run",
                   "next_run", "tries", "last_run", "last_error_body", "last_error_status_code")


def original_file(url, payload=None, expected=200, schedule="", next_run=0,
                  next_scheduled_run=None, tries=0, last_run=0, last_error_body=None,
                  last_error_status_code=0, task_id=None):
    """One task file as the Go daemon writes it: json.Marshal of its struct
    (compact, fields in struct order, []byte as base64 or null, times in int ns,
    no newline); named by the bare id: 32 hex, or sha1(url + payload + schedule)."""
    raw = b"" if payload is None else payload
    if task_id is None:
        task_id = (hashlib.sha1(url.encode() + raw + schedule.encode()).hexdigest() if schedule
                   else os.urandom(16).hex())
    values = (task_id, url, None if payload is None else b64(payload), expected, schedule,
              next_run if next_scheduled_run is None else next_scheduled_run, next_run, tries,
              last_run, None if last_error_body is None else b64(last_error_body),
              last_error_status_code)
    return task_id, json.dumps(dict(zip(ORIGINAL_FIELDS, values)), separators=(",", ":")).encode()


def write_original(data_dir, files):
    """files: [(folder, (id, bytes))]; folders 0700, files 0644, as the original."""
    for folder in ("dead", "waiting", "success"):
        os.makedirs(os.path.join(data_dir, folder), 0o700, exist_ok=True)
    for folder, (task_id, data) in files:
        path = os.path.join(data_dir, folder, task_id)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)


def expand_like_the_original(doc):
    """The steps the original client's _expand_task takes on a listing entry,
    raising where it raises (strict UTF-8 decode of the error body, float
    timestamps, a missing last_run key)."""
    doc = dict(doc)
    try:
        doc["payload"] = json.loads(base64.b64decode(doc["payload"]))
    except json.JSONDecodeError:
        doc["payload"] = base64.b64decode(doc["payload"]).decode()
    if doc["last_error_body"]:
        doc["last_error_body"] = base64.b64decode(doc["last_error_body"]).decode()
    doc["next_run"] = datetime.fromtimestamp(float(doc["next_run"] / 1e9))
    if doc["last_run"]:
        doc["last_run"] = datetime.fromtimestamp(float(doc["last_run"] / 1e9))
    else:
        del doc["last_run"]
    for key in ("id", "expected", "schedule", "tries", "url", "last_error_status_code"):
        doc[key]  # GetTask reads these: a KeyError here would crash microblog.pub's page
    return doc


def original_push(api_url, url, payload, expected=200, schedule="", delay=0):
    """What the original client's push() sends: always the five fields."""
    body = {"url": url, "payload": b64(json.dumps(payload).encode()), "expected": expected,
            "schedule": schedule, "delay": delay}
    return call(api_url, "POST", "/", body)


class RestartableReceiver(Receiver):
    """A receiver that can go down and come back on the same port."""

    def down(self):
        self.server.shutdown()
        self.server.server_close()

    def up(self):
        handler = self.server.RequestHandlerClass
        port = int(self.base.rsplit(":", 1)[1])
        self.server = QuietServer(("127.0.0.1", port), handler)
        # shutdown() is noticed at socketserver's next poll: keep it short, tests stop many
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()


# --------------------------------------------------------------------------
# Fixtures: the requests of Flask and Django
# --------------------------------------------------------------------------

class FakeFlaskRequest:
    """What a Flask/Werkzeug request offers parse(): headers and get_data()."""

    def __init__(self, headers, body):
        self.headers = headers
        self._body = body

    def get_data(self):
        return self._body


class FakeDjangoRequest:
    """What a Django request offers parse(): META (HTTP_* keys) and body."""

    def __init__(self, headers, body):
        self.META = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
        self.META["CONTENT_TYPE"] = "application/json"
        self.body = body


# --------------------------------------------------------------------------
# Fixtures: keys, apps and servers for the task endpoint
# --------------------------------------------------------------------------

KEY = "whsec_" + b64(b"t" * 24)


class QuietWSGIHandler(pt._QuietWSGIHandler):
    pass


@contextlib.contextmanager
def serving_wsgi(app):
    """A wsgiref server (one thread per request) on 127.0.0.1:0 serving ``app``;
    yields its base URL."""
    server = pt._TestWSGIServer(("127.0.0.1", 0), QuietWSGIHandler)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def envelope_of(payload, tries=1, req_id="0123456789ab"):
    return json.dumps({"payload": b64(json.dumps(payload).encode()), "tries": tries,
                       "req_id": req_id}).encode()


def signed_headers(key, body, task_id="t1", stamp=None):
    stamp = int(time.time()) if stamp is None else stamp
    return {"webhook-id": task_id, "webhook-timestamp": str(stamp),
            "webhook-signature": pt.sign(key, task_id, stamp, body)}


async def asyncio_sleep0():
    import asyncio
    await asyncio.sleep(0)


def parse_prometheus(text):
    """A small parser of the text exposition format 0.0.4: {(name, labels): value}."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$', line)
        if match is None:
            raise AssertionError("bad sample line: %r" % line)
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        if family not in types:
            raise AssertionError("sample %s has no # TYPE" % name)
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels or "")))
        samples[(name, labels)] = float(value)
    return types, samples


# --------------------------------------------------------------------------
# Fixtures: a daemon process, a file layer that forgets, a misbehaving app
# --------------------------------------------------------------------------

class DaemonProcess:
    """``python3 poussetaches.py serve`` in a subprocess, on a free port."""

    def __init__(self, data_dir, *args, env=None):
        cmd = [sys.executable, os.path.join(HERE, "poussetaches.py"), "serve", "--port", "0",
               "--data-dir", data_dir, "--min-backoff", "0.05", "--max-backoff", "0.2"]
        self.proc = subprocess.Popen(cmd + list(args), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, env=env, cwd=HERE)
        self.lines = []
        self.url = None
        deadline = time.monotonic() + WAIT
        for line in self.proc.stderr:
            line = line.decode()
            self.lines.append(line)
            match = re.search(r"serving on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.proc.kill()
            raise AssertionError("daemon did not start:\n" + "".join(self.lines))
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self):
        for line in self.proc.stderr:
            self.lines.append(line.decode())

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        return self._reap()

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)
        return self._reap()

    def _reap(self):
        code = self.proc.wait(WAIT)
        self._drain.join(WAIT)
        self.proc.stderr.close()
        return code


# --------------------------------------------------------------------------
# Fixtures: the seed of the reliability tests
# --------------------------------------------------------------------------

SEED = int(os.environ.get("POUSSETACHES_SEED", "20261126"))


def report(line):
    """Figures of a reliability run, for the README and the closing note."""
    sys.stderr.write("\n  [figures] %s\n" % line)


class ForgetfulFS(pt.FileSystem):
    """A file layer that models a power loss: only what was fsync'ed survives.

    A file keeps the size it had at its last fsync; a created, renamed or
    unlinked directory entry is durable only after an fsync of the directory.
    ``power_loss()`` rewinds the real files to that state; after it every
    call fails, as a machine that lost power does nothing more.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.paths = {}        # fd -> path
        self.durable = {}      # path -> size at its last fsync
        self.dir_log = []      # directory changes since the last directory fsync
        self.dead = False

    def _alive(self):
        if self.dead:
            raise OSError(5, "power lost")

    def open(self, path, flags, mode=0o777):
        with self.lock:
            self._alive()
            existed = os.path.exists(path)
            fd = os.open(path, flags, mode)
            self.paths[fd] = path
            if not existed:
                self.dir_log.append(("create", path))
                self.durable[path] = 0
            elif path not in self.durable:
                self.durable[path] = os.fstat(fd).st_size  # it was there before us
            return fd

    def write(self, fd, data):
        with self.lock:
            self._alive()
            return os.write(fd, data)

    def fsync(self, fd):
        with self.lock:
            self._alive()
            os.fsync(fd)
            self.durable[self.paths[fd]] = os.fstat(fd).st_size

    def ftruncate(self, fd, size):
        with self.lock:
            self._alive()
            os.ftruncate(fd, size)
            path = self.paths[fd]
            self.durable[path] = min(self.durable.get(path, 0), size)

    def close(self, fd):
        with self.lock:
            self.paths.pop(fd, None)
            os.close(fd)

    def replace(self, src, dst):
        with self.lock:
            self._alive()
            old = None
            if os.path.exists(dst):
                with open(dst, "rb") as f:
                    old = f.read()[:self.durable.get(dst, 0)]
            os.replace(src, dst)
            self.dir_log.append(("replace", src, dst, old, self.durable.get(dst)))
            self.durable[dst] = self.durable.pop(src, 0)

    def unlink(self, path):
        with self.lock:
            self._alive()
            with open(path, "rb") as f:
                old = f.read()[:self.durable.get(path, 0)]
            os.unlink(path)
            self.dir_log.append(("unlink", path, old))
            self.durable.pop(path, None)

    def fsync_dir(self, path):
        with self.lock:
            self._alive()
            super().fsync_dir(path)
            self.dir_log = []

    def power_loss(self):
        with self.lock:
            self.dead = True
            for op in reversed(self.dir_log):
                if op[0] == "create":
                    if os.path.exists(op[1]):
                        os.unlink(op[1])
                    self.durable.pop(op[1], None)
                elif op[0] == "replace":
                    _, src, dst, old, old_size = op
                    if os.path.exists(dst):
                        os.replace(dst, src)
                        self.durable[src] = self.durable.pop(dst, 0)
                    if old is not None:
                        with open(dst, "wb") as f:
                            f.write(old)
                        self.durable[dst] = len(old)
                elif op[0] == "unlink":
                    with open(op[1], "wb") as f:
                        f.write(op[2])
                    self.durable[op[1]] = len(op[2])
            for path, size in self.durable.items():
                if os.path.exists(path) and os.path.getsize(path) > size:
                    os.truncate(path, size)


class RawApp:
    """A TCP server playing a misbehaving app; the path picks the misbehaviour."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.base = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.sent_bytes = 0
        self.paths = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.stop.set()
        self.sock.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            self.paths.append(path)
            if path == "/hang":
                self.stop.wait(5)
            elif path == "/reset":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif path == "/garbage":
                conn.sendall(b"NONSENSE GARBAGE\r\n\r\n")
            elif path == "/huge":
                conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 100000000\r\n\r\n")
                block = b"z" * 65536
                for _ in range(100000000 // len(block)):
                    conn.sendall(block)
                    self.sent_bytes += len(block)
            elif path == "/redirect":
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/internal\r\n"
                             b"Content-Length: 0\r\n\r\n")
            elif path in ("/drip", "/drip-body"):
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 400\r\n\r\n"
                                                          if path == "/drip-body" else b""))
                for _ in range(400):
                    if self.stop.wait(0.05):
                        break
                    conn.sendall(b"X")
            elif path == "/huge-utf8":  # 90 KB: the 64 KiB read ends inside a character
                conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 90000\r\n\r\n"
                             + "\u20ac".encode() * 30000)
        except OSError:
            pass
        finally:
            conn.close()


def rss_bytes(pid="self"):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def thread_count(pid):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------
# The task model and the retry policy
# --------------------------------------------------------------------------


class TestTaskModel(unittest.TestCase):
    """A task's fields, its JSON and row forms, its checks."""

    def test_json_round_trip_and_types(self):
        task = pt.Task("ab" * 16, "http://x/y", b"\x00\xff", 201, "", next_run=5,
                       last_error_body=b"oops", last_error_status_code=500, tries=2)
        doc = task.to_json()
        self.assertEqual(doc["payload"], b64(b"\x00\xff"))
        self.assertEqual(doc["last_error_body"], b64(b"oops"))
        back = pt.Task.from_json(json.loads(json.dumps(doc)))
        self.assertEqual(back.to_json(), doc)

    def test_encoded_task_is_what_the_json_module_writes(self):
        # encode_task formats each field by its kind; the stdlib encoder of the
        # task's dict is the oracle, over random values of every field
        rng = random.Random(7)
        texts = ["", "plain", 'q"uote\\', "line\nbreak\x00\x1f", "é\u2028\U0001f600", "</script>"]
        pick = {
            "string": lambda: rng.choice(texts),
            "integer": lambda: rng.choice([0, 1, -7, 2 ** 63, True, 3.5]),
            "time": lambda: rng.choice([0, 1_764_000_000_000_000_000, 12.25]),
            "number": lambda: rng.choice([0.1, 3600, 1e-7, 2.5]),
            "bytes": lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(9))),
            "object": lambda: {rng.choice(texts): rng.choice(texts) for _ in range(3)},
            "list": lambda: rng.choice([[], [{"at": 1, "error": None}], [None, "x", 1.5]]),
        }
        for _ in range(3000 if STRESS else 300):
            task = pt.Task(pt.new_id(), "http://x/y")
            for field in pt.TASK_FIELDS:
                nullable = field.default is None and field.kind != "list" and rng.random() < 0.3
                setattr(task, field.name, None if nullable else pick[field.kind]())
            expected = json.dumps(task.to_json(), separators=(",", ":")).encode()
            self.assertEqual(pt.encode_task(task), expected)

    def test_original_layout_record(self):
        original = {"id": "0123456789ab", "url": "http://a/b", "payload": b64(b"{}"),
                    "expected": 0, "schedule": "", "next_run": 1600000000000000000,
                    "tries": 3, "last_error_body": None, "last_error_status_code": 0}
        task = pt.Task.from_json(original)
        self.assertEqual((task.expected, task.payload, task.tries), (200, b"{}", 3))
        self.assertEqual(task.next_scheduled_run, 1600000000000000000)

    def test_cron_id_is_sha1_of_url_payload_schedule(self):
        self.assertEqual(pt.cron_id("http://a/b", b"xyz", "@daily"),
                         hashlib.sha1(b"http://a/bxyz@daily").hexdigest())

    def test_ids(self):
        self.assertRegex(pt.new_id(), r"^[0-9a-f]{32}$")
        self.assertRegex(pt.new_id(6), r"^[0-9a-f]{12}$")


class TestBackoff(unittest.TestCase):
    """The delay before each next attempt: growth, jitter, caps, Retry-After."""

    def dispatcher(self, **kw):
        return pt.Dispatcher(None, None, None, rng=random.Random(7), **kw)

    def test_exponential_with_jitter_and_cap(self):
        d = self.dispatcher(min_backoff=1.0, max_backoff=86400.0)
        for tries in range(1, 12):
            base = 4.0 ** (tries - 1)
            for _ in range(20):
                delay = d.backoff(tries)
                self.assertGreaterEqual(delay, min(base * 0.7, 86400))
                self.assertLessEqual(delay, min(base * 1.3, 86400))
        self.assertEqual(d.backoff(40), 86400.0)

    def test_jitter_goes_both_ways(self):
        d = self.dispatcher(min_backoff=10.0)
        delays = [d.backoff(1) for _ in range(200)]
        self.assertTrue(any(x < 10 for x in delays) and any(x > 10 for x in delays))

    def test_retry_after_is_a_floor_still_capped(self):
        d = self.dispatcher(min_backoff=1.0, max_backoff=100.0)
        self.assertGreaterEqual(d.backoff(1, retry_after=30), 30)
        self.assertEqual(d.backoff(1, retry_after=1000), 100.0)

    def test_parse_retry_after(self):
        self.assertEqual(pt.parse_retry_after("120", 0), 120.0)
        self.assertAlmostEqual(pt.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT",
                                                    1445412470.0), 10.0)
        self.assertIsNone(pt.parse_retry_after("soon", 0))
        self.assertIsNone(pt.parse_retry_after(None, 0))


class TestPolicy(unittest.TestCase):
    """Dispatcher.decide: what an outcome does to a task, with an injected clock."""

    T0 = ts("2026-01-01T00:00:00+00:00")

    def setUp(self):
        self.clock = FakeClock(self.T0)
        self.d = pt.Dispatcher(None, None, None, max_tries=3, min_backoff=1.0,
                               max_backoff=3600.0, clock=self.clock, rng=random.Random(1),
                               cron_tz=UTC)

    def outcome(self, status, body=b""):
        return pt.Outcome(status, body, self.clock.now, 0.01, None, "r" * 12)

    def test_retry_then_dead(self):
        task = pt.Task("a" * 32, "http://x/", next_run=self.T0)
        buried = []
        self.assertEqual(self.d.decide(task, self.outcome(500, b"e"), buried), ("waiting", []))
        self.assertTrue(0.7e9 <= task.next_run - self.T0 <= 1.3e9)
        self.assertEqual((task.tries, task.last_error_status_code, task.last_error_body),
                         (1, 500, b"e"))
        self.d.decide(task, self.outcome(500), buried)
        self.assertTrue(2.8e9 <= task.next_run - self.T0 <= 5.2e9)  # 4 s +/- 30 %
        self.assertEqual(self.d.decide(task, self.outcome(-1, b"refused"), buried), ("dead", []))
        self.assertEqual(len(buried), 1)
        self.assertEqual([a["status"] for a in task.attempts], [500, 500, -1])

    def test_per_task_max_tries_and_410(self):
        task = pt.Task("a" * 32, "http://x/", max_tries=1)
        self.assertEqual(self.d.decide(task, self.outcome(500), [])[0], "dead")
        task = pt.Task("b" * 32, "http://x/")
        self.assertEqual(self.d.decide(task, self.outcome(410), [])[0], "dead")
        task = pt.Task("c" * 32, "http://x/", expected=410)
        self.assertEqual(self.d.decide(task, self.outcome(410), [])[0], "success")

    def test_attempt_history_keeps_ten(self):
        d = pt.Dispatcher(None, None, None, max_tries=50, clock=self.clock, rng=random.Random(1))
        task = pt.Task("a" * 32, "http://x/")
        for _ in range(15):
            d.decide(task, self.outcome(500, b"x" * 1000), [])
        self.assertEqual(len(task.attempts), 10)
        self.assertEqual(len(task.attempts[-1]["error"]), pt.ATTEMPT_ERROR_LIMIT)

    def test_cron_success_coalesces_missed_runs(self):
        occurrence = self.T0
        task = pt.Task("c" * 40, "http://x/", schedule="*/5 * * * *", next_run=occurrence)
        self.clock.now = occurrence + 17 * 60 * 10 ** 9  # the daemon was down 17 minutes
        table, copies = self.d.decide(task, self.outcome(200), [])
        self.assertEqual(table, "waiting")
        self.assertEqual(task.next_run, occurrence + 20 * 60 * 10 ** 9)  # one run, then 00:20
        self.assertEqual((task.tries, task.next_scheduled_run), (0, task.next_run))
        self.assertEqual(copies[0][0], "success")
        self.assertEqual((copies[0][1].cron_id, copies[0][1].schedule), (task.id, ""))
        self.assertNotEqual(copies[0][1].id, task.id)

    def test_a_cron_run_by_hand_keeps_its_next_occurrence(self):
        """POST /tasks/<id>/run on a cron is a run more, not the next one: the
        occurrence it was waiting for still comes (as Cloud Scheduler's force run)."""
        occurrence = self.T0 + 3600 * 10 ** 9  # 01:00, an hour away
        task = pt.Task("c" * 40, "http://x/", schedule="0 * * * *", next_run=self.T0,
                       next_scheduled_run=occurrence)  # as run_now leaves it
        for status, table in ((200, "success"), (500, "dead")):
            d = pt.Dispatcher(None, None, None, max_tries=1, clock=self.clock,
                              rng=random.Random(1), cron_tz=UTC)
            task.next_run = self.T0
            self.assertEqual(d.decide(task, self.outcome(status), [])[1][0][0], table)
            self.assertEqual((task.next_run, task.next_scheduled_run), (occurrence, occurrence))
        self.clock.now = occurrence  # and that occurrence, when it comes, goes on as ever
        self.d.decide(task, self.outcome(200), [])
        self.assertEqual(task.next_run, occurrence + 3600 * 10 ** 9)

    def test_cron_failure_retries_but_never_past_next_occurrence(self):
        task = pt.Task("c" * 40, "http://x/", schedule="* * * * *", next_run=self.T0)
        d = pt.Dispatcher(None, None, None, max_tries=12, min_backoff=20.0, clock=self.clock,
                          rng=random.Random(1), cron_tz=UTC)
        buried = []
        self.assertEqual(d.decide(task, self.outcome(500), buried), ("waiting", []))
        self.assertEqual(task.tries, 1)  # a retry 14-26 s later, before 00:01
        self.clock.now = task.next_run
        table, copies = d.decide(task, self.outcome(500), buried)  # next: 56-104 s, too late
        self.assertEqual(table, "waiting")
        self.assertEqual(copies[0][0], "dead")
        self.assertEqual(copies[0][1].tries, 2)
        self.assertEqual(task.next_run, self.T0 + 60 * 10 ** 9)
        self.assertEqual(task.tries, 0)
        self.assertEqual(len(buried), 1)


# --------------------------------------------------------------------------
# Cron: parsing, "next time after t", against an oracle
# --------------------------------------------------------------------------


class TestCron(unittest.TestCase):
    """CronSpec: the next run after a time, for every kind of field and zone."""

    # (spec, after, expected next) in UTC; 2026-01-01 is a Thursday
    TABLE = [
        ("* * * * *", "2026-01-01T00:00:00+00:00", "2026-01-01T00:01:00+00:00"),
        ("* * * * *", "2026-01-01T00:00:30+00:00", "2026-01-01T00:01:00+00:00"),
        ("*/15 * * * *", "2026-01-01T00:07:00+00:00", "2026-01-01T00:15:00+00:00"),
        ("*/15 * * * *", "2026-01-01T00:45:00+00:00", "2026-01-01T01:00:00+00:00"),
        ("5 4 * * *", "2026-01-01T04:05:00+00:00", "2026-01-02T04:05:00+00:00"),
        ("5 4 * * *", "2026-01-01T04:04:59+00:00", "2026-01-01T04:05:00+00:00"),
        ("0 0 1 * *", "2026-01-15T12:00:00+00:00", "2026-02-01T00:00:00+00:00"),
        ("0 0 1 1 *", "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("0 12 * * mon", "2026-01-01T00:00:00+00:00", "2026-01-05T12:00:00+00:00"),
        ("0 12 * * MON-FRI", "2026-01-02T13:00:00+00:00", "2026-01-05T12:00:00+00:00"),
        ("0 12 * * 0", "2026-01-01T00:00:00+00:00", "2026-01-04T12:00:00+00:00"),
        ("0 12 * * 7", "2026-01-01T00:00:00+00:00", "2026-01-04T12:00:00+00:00"),
        ("0 0 * jun *", "2026-01-01T00:00:00+00:00", "2026-06-01T00:00:00+00:00"),
        ("0 0 * JAN-MAR *", "2026-03-31T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("0 0 13 * 5", "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"),  # OR: Friday 2nd
        ("0 0 13 * 5", "2026-01-10T00:00:00+00:00", "2026-01-13T00:00:00+00:00"),  # OR: the 13th
        ("0 0 13 * *", "2026-01-01T00:00:00+00:00", "2026-01-13T00:00:00+00:00"),
        ("0 0 * * 5", "2026-01-03T00:00:00+00:00", "2026-01-09T00:00:00+00:00"),
        ("0 0 */10 * *", "2026-01-01T00:00:00+00:00", "2026-01-11T00:00:00+00:00"),
        ("0 0 ? * 1", "2026-01-01T00:00:00+00:00", "2026-01-05T00:00:00+00:00"),
        ("30 9-17/2 * * *", "2026-01-01T10:00:00+00:00", "2026-01-01T11:30:00+00:00"),
        ("30 9-17/2 * * *", "2026-01-01T17:31:00+00:00", "2026-01-02T09:30:00+00:00"),
        ("0,30 * * * *", "2026-01-01T00:10:00+00:00", "2026-01-01T00:30:00+00:00"),
        ("1-3,58 * * * *", "2026-01-01T00:04:00+00:00", "2026-01-01T00:58:00+00:00"),
        ("10/20 * * * *", "2026-01-01T00:31:00+00:00", "2026-01-01T00:50:00+00:00"),
        ("0 0 29 2 *", "2026-01-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
        ("0 0 31 * *", "2026-04-01T00:00:00+00:00", "2026-05-31T00:00:00+00:00"),
        ("*/10 * * * * *", "2026-01-01T00:00:05+00:00", "2026-01-01T00:00:10+00:00"),
        ("30 0 0 * * *", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:30+00:00"),
        ("0 */5 * * * *", "2026-01-01T00:04:59+00:00", "2026-01-01T00:05:00+00:00"),
        ("@hourly", "2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+00:00"),
        ("@daily", "2026-01-01T10:00:00+00:00", "2026-01-02T00:00:00+00:00"),
        ("@midnight", "2026-01-01T10:00:00+00:00", "2026-01-02T00:00:00+00:00"),
        ("@weekly", "2026-01-01T10:00:00+00:00", "2026-01-04T00:00:00+00:00"),
        ("@monthly", "2026-01-01T10:00:00+00:00", "2026-02-01T00:00:00+00:00"),
        ("@yearly", "2026-01-01T10:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("@annually", "2026-06-01T10:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("@every 90s", "2026-01-01T00:00:00+00:00", "2026-01-01T00:01:30+00:00"),
        ("@every 1h30m", "2026-01-01T00:00:00+00:00", "2026-01-01T01:30:00+00:00"),
        ("@every 1.5h", "2026-01-01T00:00:00+00:00", "2026-01-01T01:30:00+00:00"),
        ("CRON_TZ=UTC 0 9 * * *", "2026-01-01T10:00:00+00:00", "2026-01-02T09:00:00+00:00"),
    ]

    def test_table(self):
        self.assertGreaterEqual(len(self.TABLE), 30)
        for spec, after, expected in self.TABLE:
            with self.subTest(spec=spec, after=after):
                got = pt.CronSpec(spec, UTC).next_after(ts(after))
                self.assertEqual(iso(got, UTC), datetime.fromisoformat(expected).isoformat())

    def test_weekday_ranges_ending_at_7_include_sunday(self):
        """Vixie cron and croniter: 7 reached by an explicit range is Sunday, with
        a step too (``1-7/2`` is Mon, Wed, Fri, Sun); only ``N/step`` stops at 6.
        Checked against the brute-force oracle over two weeks of runs."""
        start = ts("2026-01-01T00:00:00+00:00")
        for text in ("0 0 * * 1-7/2", "0 0 * * MON-7/1", "0 0 * * 3-7/2", "0 0 * * 5-7",
                     "0 0 * * 0-7/7", "0 0 * * 1/2", "0 0 * * */2"):
            with self.subTest(spec=text):
                spec, oracle = pt.CronSpec(text, UTC), OracleSpec(text)
                got, want, t_ns, u_ns = [], [], start, start
                for _ in range(14):
                    t_ns, u_ns = spec.next_after(t_ns), oracle_next(oracle, UTC, u_ns)
                    got.append(t_ns)
                    want.append(u_ns)
                self.assertEqual([iso(t, UTC) for t in got], [iso(t, UTC) for t in want])
        # 7/step: Sunday alone for Vixie cron, 0/step for croniter (but Sunday alone
        # in a list); it was the empty set here, silently: now a 400 that says why
        for text in ("0 0 * * 7/2", "0 0 * * 7/1", "0 0 1 * 1,7/3"):
            with self.subTest(refused=text), self.assertRaisesRegex(pt.CronError, "0/"):
                pt.CronSpec(text, UTC)
        sundays = {datetime.fromtimestamp(t // NS, UTC).isoweekday()
                   for t in pt.CronSpec("0 0 * * 1-7/2", UTC).preview(start, 8)}
        self.assertEqual(sundays, {1, 3, 5, 7})

    def test_strictly_after_and_subsecond(self):
        spec = pt.CronSpec("* * * * *", UTC)
        t = ts("2026-01-01T00:01:00+00:00")
        self.assertEqual(spec.next_after(t), t + 60 * 10 ** 9)
        self.assertEqual(spec.next_after(t - 1), t)

    def test_dom_dow_and_when_one_is_star(self):
        # both restricted: OR; one a star: AND (the star matches everything)
        spec = pt.CronSpec("0 0 1 * mon", UTC)
        runs = [iso(n, UTC)[:10] for n in spec.preview(ts("2026-01-01T00:00:00+00:00"), 4)]
        self.assertEqual(runs, ["2026-01-05", "2026-01-12", "2026-01-19", "2026-01-26"])
        runs = [iso(n, UTC)[:10] for n in spec.preview(ts("2026-01-26T00:00:00+00:00"), 2)]
        self.assertEqual(runs, ["2026-02-01", "2026-02-02"])

    @unittest.skipUnless(HAVE_TZDATA, "no IANA time zone database on this machine")
    def test_dst_spring_forward_skips_missing_time(self):
        # America/New_York: 2026-03-08 02:00 EST jumps to 03:00 EDT
        ny = zoneinfo.ZoneInfo("America/New_York")
        spec = pt.CronSpec("CRON_TZ=America/New_York 30 2 * * *")
        runs = [iso(n, ny) for n in spec.preview(ts("2026-03-06T12:00:00-05:00"), 3)]
        self.assertEqual(runs, ["2026-03-07T02:30:00-05:00", "2026-03-09T02:30:00-04:00",
                                "2026-03-10T02:30:00-04:00"])
        hourly = pt.CronSpec("CRON_TZ=America/New_York 0 * * * *")
        runs = [iso(n, ny) for n in hourly.preview(ts("2026-03-08T00:30:00-05:00"), 3)]
        self.assertEqual(runs, ["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00",
                                "2026-03-08T04:00:00-04:00"])

    @unittest.skipUnless(HAVE_TZDATA, "no IANA time zone database on this machine")
    def test_dst_fall_back_runs_repeated_time_once(self):
        # America/New_York: 2026-11-01 02:00 EDT falls back to 01:00 EST
        ny = zoneinfo.ZoneInfo("America/New_York")
        spec = pt.CronSpec("CRON_TZ=America/New_York 30 1 * * *")
        runs = [iso(n, ny) for n in spec.preview(ts("2026-10-31T12:00:00-04:00"), 3)]
        self.assertEqual(runs, ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00",
                                "2026-11-03T01:30:00-05:00"])
        hourly = pt.CronSpec("CRON_TZ=America/New_York 0 * * * *")
        runs = hourly.preview(ts("2026-11-01T00:30:00-04:00"), 3)
        self.assertEqual([iso(n, ny) for n in runs],
                         ["2026-11-01T01:00:00-04:00", "2026-11-01T02:00:00-05:00",
                          "2026-11-01T03:00:00-05:00"])
        self.assertEqual(runs[1] - runs[0], 2 * 3600 * 10 ** 9)  # 01:00 EST did not run
        # started inside the repeated hour: the next run is the next new wall time
        self.assertEqual(iso(hourly.next_after(ts("2026-11-01T01:10:00-05:00")), ny),
                         "2026-11-01T02:00:00-05:00")

    @unittest.skipUnless(HAVE_TZDATA, "no IANA time zone database on this machine")
    def test_cron_tz_beats_default_zone(self):
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        spec = pt.CronSpec("CRON_TZ=Europe/Paris 0 9 * * *", UTC)
        self.assertEqual(iso(spec.next_after(ts("2026-07-01T00:00:00+00:00")), paris),
                         "2026-07-01T09:00:00+02:00")

    def test_invalid_specs_say_why(self):
        cases = [
            ("", "empty cron spec"),
            ("* * * *", "expected 5 fields"),
            ("* * * * * * *", "got 7"),
            ("60 * * * *", "minute field: 60 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day of month field: 0 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            ("* * * * 8", "day of week field: 8 is out of range 0-7"),
            ("* * * foo *", "month field: 'foo' is not a number or a name"),
            ("*/0 * * * *", "step '0' must be a positive number"),
            ("5-1 * * * *", "range 5-1 goes backwards"),
            ("1,,2 * * * *", "empty list item"),
            ("@fortnightly", "unknown descriptor"),
            ("@every 500ms", "at least 1s"),
            ("@every soon", "invalid duration 'soon'"),
            ("CRON_TZ=Mars/Olympus 0 * * * *", "unknown time zone 'Mars/Olympus'"),
        ]
        for spec, message in cases:
            with self.subTest(spec=spec):
                with self.assertRaises(pt.CronError) as ctx:
                    pt.CronSpec(spec, UTC)
                self.assertIn(message, str(ctx.exception))

    def test_never_matching_spec_gives_none(self):
        self.assertIsNone(pt.CronSpec("0 0 30 2 *", UTC).next_after(ts("2026-01-01T00:00:00+00:00")))

    def test_duration(self):
        self.assertEqual(pt.parse_duration("1h30m"), 5400 * 10 ** 9)
        self.assertEqual(pt.parse_duration("90s"), 90 * 10 ** 9)
        self.assertEqual(pt.parse_duration("1.5s"), 1500 * 10 ** 6)
        for bad in ("", "1", "1d", "-1s", "1s2"):
            with self.subTest(bad=bad), self.assertRaises(pt.CronError):
                pt.parse_duration(bad)


@unittest.skipIf(zoneinfo is None, "needs zoneinfo")
class TestCronOracle(unittest.TestCase):
    """CronSpec against a brute-force oracle, on specs drawn from the grammar."""

    CASES = 10000 if STRESS else 1000

    CHAIN = 3                      # successive runs compared per case

    SURE_NS = 4 * 365 * 86400 * NS  # pt must find any run within 4 years

    def compare(self, rng, index, failures):
        zone = ZONES[index % len(ZONES)]
        tz = zoneinfo.ZoneInfo(zone)
        spec_text = gen_spec(rng)
        t_ns = gen_start(rng, tz)
        oracle = OracleSpec(spec_text)
        # sometimes through the CRON_TZ= prefix instead of the tz argument
        use_prefix = rng.random() < 0.1
        where = "seed=%d case=%d spec=%r zone=%s%s start=%s (%d ns)" % (
            SEED, index, spec_text, zone, " via CRON_TZ" if use_prefix else "",
            oracle_iso(t_ns), t_ns)
        try:
            if use_prefix:
                spec = pt.CronSpec("CRON_TZ=%s %s" % (zone, spec_text))
            else:
                spec = pt.CronSpec(spec_text, tz)
        except Exception as exc:  # noqa: BLE001 - any refusal of a valid spec is a failure
            failures.append("%s: refused: %s: %s" % (where, type(exc).__name__, exc))
            return
        start = t_ns
        for k in range(self.CHAIN):
            want = oracle_next(oracle, tz, start)
            try:
                got = spec.next_after(start)
            except Exception as exc:  # noqa: BLE001
                failures.append("%s: run %d after %s raised %s: %s"
                                % (where, k + 1, oracle_iso(start), type(exc).__name__, exc))
                return
            sure = want is not None and want - start <= self.SURE_NS
            if got != want and (sure or got is not None):
                failures.append("%s: run %d after %s: expected %s, got %s"
                                % (where, k + 1, oracle_iso(start), oracle_iso(want, tz), oracle_iso(got, tz)))
                return
            if want is None or got is None:
                return
            start = want

    def test_random_specs_match_oracle(self):
        rng = random.Random(SEED)
        failures = []
        t0 = time.monotonic()
        for index in range(self.CASES):
            self.compare(rng, index, failures)
        elapsed = time.monotonic() - t0
        if os.environ.get("POUSSETACHES_VERBOSE"):
            print("\n%d random cases x %d runs, seed %d, %.2fs"
                  % (self.CASES, self.CHAIN, SEED, elapsed), file=sys.stderr)
        if failures:
            self.fail("%d of %d random cases disagree with the oracle (seed %d; rerun with "
                      "POUSSETACHES_SEED=%d); first ones:\n%s"
                      % (len(failures), self.CASES, SEED, SEED, "\n".join(failures[:12])))

    def test_oracle_self_checks(self):
        """Hand-checked answers, so that the oracle itself is trusted."""
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        ny = zoneinfo.ZoneInfo("America/New_York")
        lh = zoneinfo.ZoneInfo("Australia/Lord_Howe")
        u = zoneinfo.ZoneInfo("UTC")
        # Paris 2024-03-31: 02:00-02:59 skipped; `30 2 * * *` runs next on 04-01.
        self.assertEqual(oracle_next(OracleSpec("30 2 * * *"), paris, oracle_utc(2024, 3, 30, 12)),
                         oracle_utc(2024, 4, 1, 0, 30))
        # Paris 2024-10-27: 02:30 happens twice; it runs at the first (00:30Z), once.
        o = OracleSpec("30 2 * * *")
        self.assertEqual(oracle_next(o, paris, oracle_utc(2024, 10, 26, 12)), oracle_utc(2024, 10, 27, 0, 30))
        self.assertEqual(oracle_next(o, paris, oracle_utc(2024, 10, 27, 0, 30)), oracle_utc(2024, 10, 28, 1, 30))
        # start inside the second pass of the repeated hour
        self.assertEqual(oracle_next(OracleSpec("45 2 * * *"), paris, oracle_utc(2024, 10, 27, 1, 10)),
                         oracle_utc(2024, 10, 28, 1, 45))
        # New York 2024-11-03 01:30 EDT (05:30Z) then 01:30 EST (06:30Z): once.
        self.assertEqual(oracle_next(OracleSpec("30 1 * * *"), ny, oracle_utc(2024, 11, 3, 5, 30)),
                         oracle_utc(2024, 11, 4, 6, 30))
        # Lord Howe 2024-10-06: 02:00 -> 02:30 (+10:30 -> +11): 02:15 skipped.
        self.assertEqual(oracle_next(OracleSpec("15 2 * * *"), lh, oracle_utc(2024, 10, 5, 0)),
                         oracle_utc(2024, 10, 6, 15, 15))            # 10-06 02:15 skipped: 10-07 +11
        self.assertEqual(oracle_next(OracleSpec("45 2 * * *"), lh, oracle_utc(2024, 10, 5, 0)),
                         oracle_utc(2024, 10, 5, 15, 45))            # 10-06 02:45 +11 exists
        # Vixie: both restricted -> OR; one starting with * -> AND.
        self.assertEqual(oracle_next(OracleSpec("0 0 13 * 5"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2024, 9, 6))                     # Friday 09-06 (OR)
        self.assertEqual(oracle_next(OracleSpec("0 0 */1 * 5"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2024, 9, 6))
        self.assertEqual(oracle_next(OracleSpec("0 0 0 13 * 5"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2024, 9, 6))                     # 6 fields, no * -> OR
        self.assertEqual(oracle_next(OracleSpec("0 0 0 13,*/31 * 5"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2024, 9, 13))                    # 6 fields, a * element -> AND
        self.assertEqual(oracle_next(OracleSpec("0 0 0 13,*/31 * 1"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2025, 1, 13))                    # Mondays that are the 1st or 13th
        self.assertEqual(oracle_next(OracleSpec("0 0 0 ? * 5"), u, oracle_utc(2024, 9, 1)),
                         oracle_utc(2024, 9, 6))
        # 7 = Sunday in 5 fields; N/step stops at 6.
        self.assertEqual(oracle_next(OracleSpec("0 0 * * 7"), u, oracle_utc(2024, 9, 2)), oracle_utc(2024, 9, 8))
        self.assertEqual(OracleSpec("0 0 * * 1/2").dow, {1, 3, 5})
        self.assertEqual(OracleSpec("0 0 * * */2").dow, {0, 2, 4, 6})
        self.assertEqual(OracleSpec("0 0 * JAN-mar/2 Mon-FRI").months, {1, 3})
        self.assertRaises(OracleError, OracleSpec, "0 0 0 * * 7")   # 0-6 in 6 fields


@unittest.skipIf(zoneinfo is None, "needs zoneinfo")
class TestCronCases(unittest.TestCase):
    """The edge cases of the grammar, each with its exact runs or refusal."""

    def setUp(self):
        self.utc = zoneinfo.ZoneInfo("UTC")

    def assertRuns(self, text, start, expected, tz=None):
        tz = tz or self.utc
        self.assertEqual(oracle_runs(text, tz, start, len(expected)), expected,
                         "oracle disagrees with the issue on %r" % text)
        got = spec_runs(pt.CronSpec(text, tz), start, len(expected))
        self.assertEqual([oracle_iso(t) for t in got], [oracle_iso(t) for t in expected],
                         "%r from %s" % (text, oracle_iso(start)))

    def assertRefused(self, text):
        try:
            pt.CronSpec(text)
        except pt.CronError as exc:
            self.assertTrue(str(exc).strip(), "empty CronError message for %r" % text)
        except Exception as exc:  # noqa: BLE001
            self.fail("%r raised %s (%s), not CronError" % (text, type(exc).__name__, exc))
        else:
            self.fail("%r was accepted" % text)

    def test_1_dow_step_ends_at_saturday(self):
        start = oracle_utc(2023, 3, 10, 4, 30, 58)
        expected = [oracle_utc(2023, 3, d) for d in (13, 15, 17, 20, 22)]
        self.assertRuns("0 0 * * 1/2", start, expected)
        self.assertRuns("0 0 0 * * 1/2", start, expected)
        self.assertRuns("0 0 * * mon/2", start, expected)
        # every N/step with 7-N a multiple of the step: never a Sunday
        for text in ("0 0 * * 1/3", "0 0 * * 4/3", "0 0 * * 5/2", "0 0 0 * * 3/4",
                     "0 0 * * 1-6/5", "0 0 * * 6/1"):
            for t in spec_runs(pt.CronSpec(text, self.utc), start, 8):
                self.assertIsNotNone(t, text)
                self.assertNotEqual(datetime.fromtimestamp(t // NS, timezone.utc).isoweekday(), 7,
                                    "%r runs on Sunday %s" % (text, oracle_iso(t)))

    def test_2_six_field_day_rule_any_star_element(self):
        start = oracle_utc(2027, 2, 27, 11, 58, 1)
        expected = [oracle_utc(2027, 3, 1), oracle_utc(2027, 5, 31), oracle_utc(2027, 6, 21),
                    oracle_utc(2027, 10, 11), oracle_utc(2027, 11, 1)]
        self.assertRuns("0 0 0 1,*/10 * 1", start, expected)
        self.assertRuns("0 0 0 */10,1 * 1", start, expected)
        # no element starts with * or ?: OR-ed
        self.assertRuns("0 0 0 1,11,21,31 * 1", start,
                        [oracle_utc(2027, 3, 1), oracle_utc(2027, 3, 8), oracle_utc(2027, 3, 11),
                         oracle_utc(2027, 3, 15), oracle_utc(2027, 3, 21)])
        # 5 fields: Vixie looks at the field's first character only
        self.assertRuns("0 0 1,*/10 * 1", start,
                        [oracle_utc(2027, 3, 1), oracle_utc(2027, 3, 8), oracle_utc(2027, 3, 11),
                         oracle_utc(2027, 3, 15), oracle_utc(2027, 3, 21)])
        self.assertRuns("0 0 */10,1 * 1", start, expected)

    def test_3_every_decimal_is_exact(self):
        for text, ns in (("1.15h", 4_140_000_000_000), ("4.35m", 261_000_000_000),
                         ("1.5h", 5_400_000_000_000), ("0.1h", 360_000_000_000),
                         ("1.1s", 1_100_000_000), ("2.675s", 2_675_000_000),
                         ("1h0.7m", 3_642_000_000_000), (".5h", 1_800_000_000_000),
                         ("1.000000001s", 1_000_000_001)):
            self.assertEqual(go_parse_duration(text), ns, text)
            self.assertEqual(pt.parse_duration(text), ns, text)
            spec = pt.CronSpec("@every " + text)
            self.assertEqual(spec.every_ns, ns, text)
            start = oracle_utc(2026, 1, 1, 12)
            self.assertEqual(spec_runs(spec, start, 3), [start + ns, start + 2 * ns, start + 3 * ns], text)

    def test_4_superscript_digit_is_cron_error(self):
        for text in ("0 0 \u00b2 * *", "\u00b2 * * * *", "0 0 0 \u00b2 * *", "*/\u00b2 * * * *",
                     "1-\u00b2 * * * *", "0 0 * \u00b9 *", "@every \u00b2h", "@every 1.\u00b2h"):
            self.assertRefused(text)

    def test_5_non_ascii_digits_refused(self):
        for text in ("\u0663 * * * *", "@every \u0661h", "\uff13 * * * *", "0 0 \uff11\uff10 * *",
                     "0 0 0 * * \u0661", "0 \u0967 * * *", "@every 1\u0660s"):
            self.assertRefused(text)

    def test_6_overflow_refused(self):
        for text in ("@every 99999999999h", "@every 2562048h", "@every 2562047h47m16.854775808s",
                     "@every 9223372036854775808ns", "@every 99999999999999999999s",
                     "@every 2562047h47m17s", "@every 153722867m280s"):
            self.assertRefused(text)

    def test_6_go_maximum_accepted(self):
        for text in ("2562047h47m16.854775807s", "9223372036854775807ns",
                     "2562047h47m16s854ms775us807ns"):
            self.assertEqual(go_parse_duration(text), INT64_MAX)
            self.assertEqual(pt.parse_duration(text), INT64_MAX, text)
            self.assertEqual(pt.CronSpec("@every " + text).every_ns, INT64_MAX, text)
        self.assertEqual(pt.CronSpec("@every 2562047h47m16.854775807s").next_after(0), INT64_MAX)

    def test_7_every_needs_its_space(self):
        for text in ("@every1h", "@every1.5h", "@every_1h"):
            self.assertRefused(text)
        self.assertEqual(pt.CronSpec("@every 1h").every_ns, 3600 * NS)

    def test_next_run_beyond_int64(self):
        """A next run past 2**63-1 ns (2262-04-11T23:47:16.854775807Z) must not be
        returned as a number: next_after gives None (no run) or raises CronError;
        the API turns either into a 400."""
        cases = [
            ("@every 2562047h47m16.854775807s", 1),
            ("@every 2562047h", oracle_utc(2026, 1, 1)),
            ("@every 1s", INT64_MAX),
            ("@every 1h", INT64_MAX - 1800 * NS),
            ("0 0 0 1 1 *", oracle_utc(2262, 4, 1)),          # next would be 2263-01-01
            ("0 0 12 * *", oracle_utc(2262, 4, 11, 23, 59)),   # next would be 2262-04-12
        ]
        for text, start in cases:
            try:
                got = pt.CronSpec(text, self.utc).next_after(start)
            except pt.CronError:
                continue
            except Exception as exc:  # noqa: BLE001
                self.fail("%r after %d raised %s (%s), not CronError"
                          % (text, start, type(exc).__name__, exc))
            self.assertIsNone(got, "%r after %d gave %r, beyond 64-bit ns" % (text, start, got))

    @staticmethod
    def refused_as_cron_error(call, what, problems):
        """(True, value or None when CronError), or (False, None) after noting any other
        exception in ``problems``."""
        try:
            return True, call()
        except pt.CronError:
            return True, None
        except Exception as exc:  # noqa: BLE001
            problems.append("%s raised %s (%s), not CronError" % (what, type(exc).__name__, exc))
            return False, None

    def test_go_duration_conformance(self):
        """pt.parse_duration against Go's ParseDuration on valid and invalid text.
        Values below 1 s or negative may also be refused (they are invalid for
        @every anyway); everything Go refuses must be a CronError."""
        texts = ["1h", "90s", "1h30m", "1.5h", ".5h", "1.h", "+1h", "1h0.5m", "2h45m30.5s",
                 "1000ms", "1000000us", "1000000\u00b5s", "1000000\u03bcs", "1000000000ns",
                 "1.0000000001h", "0.000000001h", "3.999999999999s", "1m1m1m",
                 "0", "-0", "+0", "0s", "-1h", "999ms", "1.5ns",
                 "", "1", "h", ".h", "-.h", ".", "1.2.3h", "1hh", "1 h", " 1h", "1h ", "1H",
                 "1d", "-", "+", "--1h", "+-1h", "1h-1m", "1e3s", "0x10s", "1_000s",
                 "\u0661h", "\u00b2s", "1\u00b5", "1\u00b5\u00b5s"]
        problems = []
        for text in texts:
            try:
                want = go_parse_duration(text)
            except GoDurationError:
                want = None
            if want is not None:   # the exact fraction and Go's float64 fraction agree here
                self.assertEqual(want, go_parse_duration(text, float_fraction=True), text)
            ok, got = self.refused_as_cron_error(lambda: pt.parse_duration(text),
                                                 "parse_duration(%r)" % text, problems)
            if not ok:
                continue
            if want is None and got is not None:
                problems.append("parse_duration(%r) = %r but Go refuses it" % (text, got))
            elif want is not None and (got != want if want >= NS else got not in (None, want)):
                problems.append("parse_duration(%r) = %r, Go gives %r" % (text, got, want))
            # and at the spec level: valid iff Go accepts it and it is 1s .. max
            if not text or text.strip() != text:
                continue
            ok, every = self.refused_as_cron_error(
                lambda: pt.CronSpec("@every " + text).every_ns,
                "CronSpec('@every %s')" % text, problems)
            if not ok:
                continue
            expected = want if want is not None and want >= NS else None
            if every != expected:
                problems.append("CronSpec('@every %s').every_ns = %r, expected %s"
                                % (text, every, "a CronError" if expected is None else expected))
        if problems:
            self.fail("\n".join(problems))


class TestInvalidSpecs(unittest.TestCase):
    """Every invalid spec is refused with a CronError naming what is wrong."""

    def test_invalid_specs_raise_cron_error(self):
        problems = []
        for text, reason in INVALID_SPECS:
            try:
                pt.CronSpec(text)
            except pt.CronError as exc:
                if not str(exc).strip():
                    problems.append("%r (%s): CronError with an empty message" % (text, reason))
            except Exception as exc:  # noqa: BLE001
                problems.append("%r (%s): %s: %s" % (text, reason, type(exc).__name__, exc))
            else:
                problems.append("%r (%s): accepted" % (text, reason))
        if problems:
            self.fail("%d of %d invalid specs not refused with a CronError:\n%s"
                      % (len(problems), len(INVALID_SPECS), "\n".join(problems)))

    def test_valid_specs_accepted(self):
        for text, reason in VALID_SPECS:
            try:
                pt.CronSpec(text)
            except Exception as exc:  # noqa: BLE001
                self.fail("%r (%s) refused: %s" % (text, reason, exc))

    @unittest.skipIf(zoneinfo is None, "needs zoneinfo")
    def test_steps_beyond_range(self):
        tz = zoneinfo.ZoneInfo("UTC")
        start = oracle_utc(2026, 1, 5, 10, 3)  # a Monday
        self.assertEqual(pt.CronSpec("*/70 * * * *", tz).next_after(start), oracle_utc(2026, 1, 5, 11, 0))
        self.assertEqual(pt.CronSpec("5/100 * * * *", tz).next_after(start), oracle_utc(2026, 1, 5, 10, 5))
        self.assertEqual(pt.CronSpec("0 0 0 * * 1/9", tz).next_after(start), oracle_utc(2026, 1, 12))

    @unittest.skipIf(zoneinfo is None, "needs zoneinfo")
    def test_no_match_specs(self):
        tz = zoneinfo.ZoneInfo("UTC")
        for text, reason in NO_MATCH_SPECS:
            self.assertIsNone(pt.CronSpec(text, tz).next_after(oracle_utc(2026, 1, 1)), reason)


class TestCronApi(unittest.TestCase):
    """Cron specs over HTTP: every invalid spec is a 400 with a message on every path
    that takes one, never a 500; the edge cases with their exact answers."""

    def test_run_now_on_a_cron_leaves_its_schedule(self):
        with receiver() as rx, running_daemon() as d:
            cron = call(d.url, "POST", "/", {"url": rx.url("/nightly"),
                                             "schedule": "0 0 1 1 *"})[2]
            self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % cron["id"])[0], 200)
            rx.wait_for(1, path="/nightly")
            wait_until(lambda: call(d.url, "GET", "/success")[2]["total"] == 1, what="the run")
            after = call(d.url, "GET", "/tasks/" + cron["id"])[2]
            self.assertEqual((after["next_run"], after["next_scheduled_run"], after["tries"]),
                             (cron["next_run"], cron["next_run"], 0))

    def test_invalid_specs_are_400_on_every_path(self):
        errors = ErrorRecords()
        logging.getLogger("poussetaches").addHandler(errors)
        self.addCleanup(logging.getLogger("poussetaches").removeHandler, errors)
        table = INVALID_SPECS + NO_MATCH_SPECS + [
            ("@every 99999999999h", "past Go's maximum duration"),
            ("@every 2562047h", "next run past 64-bit nanoseconds")]
        with receiver() as rx, running_daemon() as d:
            for spec, reason in table:
                with self.subTest(spec=spec, reason=reason):
                    if spec:  # on POST /, "" means "no schedule"
                        status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/c"),
                                                                   "schedule": spec})
                        self.assertEqual(status, 400, doc)
                        self.assertIn("schedule", doc["error"])
                    status, _, doc = call(d.url, "GET", "/cron/preview?schedule="
                                          + urllib_quote(spec))
                    self.assertEqual(status, 400, doc)
                    self.assertIn("schedule", doc["error"])
            self.assertEqual(call(d.url, "GET", "/cron")[2]["total"], 0)
            self.assertEqual(errors.records, [])
            code, _, err = TestCli.run_cli(self, "push", rx.url("/c"), "--schedule", "0 0 \u00b2 * *",
                                           env={"POUSSETACHES_URL": d.url})
            self.assertEqual(code, 1)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn("schedule", err)

    def test_issue_cases_over_http(self):
        with running_daemon() as d:
            spec = "CRON_TZ=UTC 0 0 * * 1/2"
            status, _, doc = call(d.url, "GET", "/cron/preview?n=5&schedule=" + urllib_quote(spec))
            self.assertEqual(status, 200)
            days = [iso[:10] for iso in doc["next_runs_iso"]]
            self.assertTrue(all(datetime.fromisoformat(day).weekday() in (0, 2, 4) for day in days),
                            days)  # Mon, Wed, Fri: never Sunday
            status, _, doc = call(d.url, "GET", "/cron/preview?n=3&schedule="
                                  + urllib_quote("@every 1.15h"))
            self.assertEqual(status, 200)
            gaps = {b - a for a, b in zip(doc["next_runs"], doc["next_runs"][1:])}
            self.assertEqual(gaps, {4_140_000_000_000})
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/",
                                                       "schedule": "@every1h"})[0], 400)


# --------------------------------------------------------------------------
# Storage: the ordered index, journal, group commit, snapshots, recovery
# --------------------------------------------------------------------------


class TestSortedKeys(unittest.TestCase):
    """The ordered index of the tables, against a sorted list."""

    def test_against_a_sorted_list(self):
        rng = random.Random(SEED_UNIT)
        keys, model = pt.SortedKeys(), []
        keys.LOAD = 8  # small blocks: many splits and empty blocks
        for step in range(5000):
            if model and rng.random() < 0.45:
                victim = rng.choice(model)
                model.remove(victim)
                keys.discard(victim)
            else:
                key = (rng.randrange(1000), "%04d" % step)
                model.append(key)
                keys.add(key)
            keys.discard((-1, "absent"))
            if step % 97 == 0:
                model.sort()
                self.assertEqual(list(keys), model)
                self.assertEqual(len(keys), len(model))
                offset, limit = rng.randrange(len(model) + 3), rng.randrange(1, 40)
                self.assertEqual(keys.page(offset, limit), model[offset:offset + limit])
                newest = model[::-1]
                self.assertEqual(keys.page(offset, limit, reverse=True),
                                 newest[offset:offset + limit])
                probe = rng.choice(model) if model and rng.random() < 0.5 else (
                    rng.randrange(-5, 1005), "%04d" % rng.randrange(10000))
                self.assertEqual(keys.before(probe, limit),
                                 [k for k in newest if k < probe][:limit])
                self.assertEqual(keys.after(probe, limit), [k for k in model if k > probe][:limit])


class TestStorage(unittest.TestCase):
    """The Store: journal, group commit, snapshots, recovery, caps."""

    def test_the_data_directory_records_its_format(self):
        """Nothing said what an older daemon does with a newer data directory."""
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        with running_daemon(data_dir=data) as d:
            task_id = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/t", "delay_s": 600})[
                2]["id"]
        with open(os.path.join(data, "format")) as f:
            self.assertEqual(f.read(), "poussetaches data format %d\n" % pt.FORMAT_VERSION)
        # a newer format: refused, naming both, nothing touched
        with open(os.path.join(data, "format"), "w") as f:
            f.write("poussetaches data format 99\n")
        before = sorted(os.listdir(data))
        daemon = pt.Daemon(host="127.0.0.1", port=0, data_dir=data)
        with self.assertRaises(pt.ConfigError) as ctx:
            daemon.start()
        self.assertIn("is of format 99, newer than the format %d" % pt.FORMAT_VERSION,
                      str(ctx.exception))
        self.assertEqual(sorted(os.listdir(data)), before)
        # an older one: copied aside, then upgraded, the tasks kept
        with open(os.path.join(data, "format"), "w") as f:
            f.write("poussetaches data format 1\n")
        with self.assertLogs("poussetaches", "WARNING") as logs:
            with running_daemon(data_dir=data, paused=True) as d:
                self.assertEqual(call(d.url, "GET", "/tasks/" + task_id)[0], 200)
        self.assertIn("from format 1 to %d" % pt.FORMAT_VERSION, "\n".join(logs.output))
        with open(os.path.join(data + ".format-1", "format")) as f:
            self.assertEqual(f.read(), "poussetaches data format 1\n")
        with open(os.path.join(data, "format")) as f:
            self.assertEqual(f.read(), "poussetaches data format %d\n" % pt.FORMAT_VERSION)
        with open(os.path.join(data, "format"), "w") as f:
            f.write("hello\n")
        with self.assertRaises(pt.ConfigError):
            pt.Daemon(host="127.0.0.1", port=0, data_dir=data).start()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pt-store-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def store(self):
        return pt.Store(self.dir, pt.DueQueue())

    def task(self, n=0):
        return pt.Task(pt.new_id(), "http://127.0.0.1:1/%d" % n, b"p%d" % n, next_run=n)

    def test_group_commit_writes_queued_records_at_once(self):
        journal = pt.Journal(self.dir, 1)
        tickets = [journal.append({"op": "del", "id": str(i)}) for i in range(10)]
        journal.start()  # the writer finds all ten waiting: one write, one fsync
        for t in tickets:
            t.wait()
        self.assertEqual((journal.records, journal.commits), (10, 1))
        journal.close()

    def test_concurrent_adds_share_fsyncs(self):
        s = self.store()
        s.start()
        threads = [threading.Thread(target=s.add, args=(self.task(i),)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        self.assertEqual(s.counts()["waiting"], 40)
        self.assertLessEqual(s.journal.commits, 40)
        s.close()

    def test_recovery_from_journal_and_snapshot(self):
        s = self.store()
        s.start()
        tasks = [self.task(i) for i in range(5)]
        for t in tasks:
            s.add(t)
        s.snapshot()
        s.add(self.task(9))
        s.delete(tasks[0].id)
        s.close()
        names = sorted(os.listdir(self.dir))
        self.assertIn("snapshot.json", names)
        self.assertEqual(len([n for n in names if n.startswith("journal")]), 1)
        again = self.store()
        self.assertEqual(again.counts()["waiting"], 5)
        self.assertIsNone(again.get(tasks[0].id)[1])
        self.assertEqual(again.recovery["snapshot_tasks"], 5)
        self.assertEqual(again.recovery["journal_records"], 2)

    def test_snapshot_versions(self):
        task = self.task(7)
        task.last_error_body, task.attempts = b"oops", [{"status": 500}]
        with open(os.path.join(self.dir, "snapshot.json"), "w") as f:  # version 1: objects
            json.dump({"version": 1, "journal": 1, "waiting": [task.to_json()]}, f)
        self.assertEqual(self.store().get(task.id)[1], task.to_json())
        s = self.store()
        s.start()
        s.snapshot()  # version 2: rows in a declared order
        s.close()
        with open(os.path.join(self.dir, "snapshot.json")) as f:
            doc = json.load(f)
        self.assertEqual((doc["version"], tuple(doc["fields"])), (2, pt.TASK_NAMES))
        self.assertEqual(self.store().get(task.id)[1], task.to_json())

    def test_files_are_private(self):
        s = self.store()
        s.start()
        s.add(self.task())
        s.snapshot()
        s.close()
        for name in os.listdir(self.dir):
            self.assertEqual(os.stat(os.path.join(self.dir, name)).st_mode & 0o077, 0, name)

    def write_journal(self, n):
        s = self.store()
        s.start()
        ids = []
        for i in range(n):
            t = self.task(i)
            s.add(t)
            ids.append(t.id)
        s.close()
        name = [n for n in os.listdir(self.dir) if n.startswith("journal")][0]
        return os.path.join(self.dir, name), ids

    def test_torn_last_record_is_dropped(self):
        path, ids = self.write_journal(3)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            last_len = len(f.read().split(b"\n")[-2]) + 1
        for cut in (1, last_len // 2, last_len - 1):
            with self.subTest(cut=cut):
                with open(path, "r+b") as f:
                    f.truncate(size - cut)
                with self.assertLogs("poussetaches", "WARNING") as logs:
                    s = self.store()
                self.assertEqual(s.counts()["waiting"], 2)
                self.assertEqual(s.recovery["torn_records"], 1)
                self.assertTrue(any("torn" in line for line in logs.output))
                for task_id in ids[:2]:
                    self.assertIsNotNone(s.get(task_id)[1])

    def test_corrupt_middle_record_is_skipped_and_counted(self):
        path, ids = self.write_journal(3)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        lines[1] = lines[1][:40] + (b"X" if lines[1][40:41] != b"X" else b"Y") + lines[1][41:]
        with open(path, "wb") as f:
            f.write(b"\n".join(lines))
        with self.assertLogs("poussetaches", "WARNING"):
            s = self.store()
        self.assertEqual(s.recovery["corrupt_records"], 1)
        self.assertIsNotNone(s.get(ids[0])[1])
        self.assertIsNone(s.get(ids[1])[1])
        self.assertIsNotNone(s.get(ids[2])[1])

    def test_import_original_layout(self):
        ns = 1700000000 * 10 ** 9
        for table, n in (("waiting", 3), ("dead", 2), ("success", 1)):
            os.makedirs(os.path.join(self.dir, table))
            for i in range(n):
                task_id = "%s%02d" % (table[:2], i)
                with open(os.path.join(self.dir, table, task_id), "w") as f:
                    json.dump({"id": task_id, "url": "http://127.0.0.1:9/%s" % table,
                               "payload": b64(b"hello"), "expected": 200,
                               "schedule": "", "next_run": ns + i, "tries": i,
                               "last_error_body": b64(b"err") if table == "dead" else None,
                               "last_error_status_code": 500 if table == "dead" else 0}, f)
        with open(os.path.join(self.dir, "waiting", "broken"), "w") as f:
            f.write("{not json")
        with self.assertLogs("poussetaches", "INFO") as logs:
            s = self.store()
        # the line counts what the tables then hold
        self.assertTrue(any("3 waiting (0 cron, 0 of them restored from their last run), "
                            "1 success, 2 dead" in line for line in logs.output), logs.output)
        self.assertEqual(s.counts(), {"waiting": 3, "success": 1, "dead": 2, "cron": 0})
        state, doc = s.get("de01")
        self.assertEqual((state, doc["tries"], doc["last_error_status_code"]), ("dead", 1, 500))
        self.assertEqual(base64.b64decode(doc["payload"]), b"hello")
        s.start()
        s.snapshot()
        s.close()
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "waiting")))  # left as it was,
        self.assertEqual(len(os.listdir(os.path.join(self.dir, "waiting"))), 3)  # less the
        self.assertEqual(os.listdir(os.path.join(self.dir, "import-rejected", "waiting")),
                         ["broken"])                                  # file set aside
        again = self.store()  # imported once: the snapshot holds them now
        self.assertEqual(again.recovery["imported"], 0)
        self.assertEqual(again.counts()["waiting"], 3)

    def test_second_daemon_is_refused(self):
        with running_daemon(data_dir=os.path.join(self.dir, "d")):
            second = pt.Daemon(port=0, data_dir=os.path.join(self.dir, "d"))
            with self.assertRaises(pt.LockedError) as ctx:
                second.start()
            self.assertIn("another poussetaches", str(ctx.exception))

    def test_disk_error_gives_503_and_recovers(self):
        broken = threading.Event()

        class BrokenFS(pt.FileSystem):
            def __init__(self, flag):
                self.flag = flag

            def open(self, path, flags, mode=0o777):
                if self.flag.is_set():
                    raise OSError(28, "No space left on device")
                return os.open(path, flags, mode)

        with receiver() as rx, running_daemon(data_dir=os.path.join(self.dir, "d"),
                                              fs=BrokenFS(broken)) as d:
            ok = call(d.url, "POST", "/", {"url": rx.url()})
            self.assertEqual(ok[0], 201)
            rx.wait_for(1)  # delivered and settled: the waiting table is empty again
            wait_until(lambda: call(d.url, "GET", "/")[2]["waiting"] == 0, what="settled")
            broken.set()
            d.store.journal._close_quietly()  # the next write must reopen the file, and fails
            status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/lost")})
            self.assertEqual(status, 503)
            self.assertIn("No space left", doc["error"])
            self.assertIs(call(d.url, "GET", "/")[2]["healthy"], False)
            self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 0)
            broken.clear()
            status, _, _ = call(d.url, "POST", "/", {"url": rx.url()})
            self.assertEqual(status, 201)
            self.assertIs(call(d.url, "GET", "/")[2]["healthy"], True)
            rx.wait_for(2)
            self.assertNotIn("/lost", [g["path"] for g in rx.got])

    def test_fsync_failure_after_an_early_delivery_takes_the_change_back(self):
        # A new task is dispatched once written, while its fsync runs.  When that
        # fsync fails, the answer is a 503 and the task does not stay: not even
        # as the retry its early attempt settled as.  A named cron whose
        # replacement fails keeps its old schedule, and that schedule still runs.
        failing = []   # [wait first for the early attempt to settle?]: the next fsync fails

        class FailingFsync(pt.FileSystem):
            def fsync(self, fd):
                if failing:
                    if failing.pop():  # the attempt was made and settled (not in flight)
                        wait_until(lambda: rx.got and not d.store.in_flight(), poll=0.005,
                                   what="the early attempt")
                    raise OSError(5, "Input/output error")
                os.fsync(fd)

        with receiver() as rx, running_daemon(fs=FailingFsync(), max_tries=5,
                                              min_backoff=30, max_backoff=30) as d:
            rx.answers["/retry"] = [(500, b"not yet")]
            failing.append(True)
            status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/retry")})
            self.assertEqual((status, "Input/output error" in doc["error"]), (503, True))
            self.assertEqual(rx.wait_for(1, path="/retry")[0]["path"], "/retry")
            self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 0)

            cron = {"url": rx.url("/old"), "schedule": "@every 1s", "name": "digest"}
            self.assertEqual(call(d.url, "POST", "/", cron)[0], 201)
            failing.append(False)
            status, _, _ = call(d.url, "POST", "/", dict(cron, url=rx.url("/new"),
                                                         schedule="@every 1h"))
            self.assertEqual(status, 503)
            tasks = call(d.url, "GET", "/cron")[2]["tasks"]
            self.assertEqual([(t["url"], t["schedule"]) for t in tasks],
                             [(rx.url("/old"), "@every 1s")])
            rx.wait_for(1, path="/old")  # the old schedule is still on the due queue

    def test_success_and_dead_tables_are_capped(self):
        """The quotas covered the waiting table only: 60 tasks of 900 KB under
        --max-stored-bytes 1000000 ended as 30 success and 30 dead records, RSS
        up 60 MB, the data dir up 138 MB.  Each table now has a record and a
        byte cap; the oldest records go, logged and counted in /metrics."""
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "d")
        caps = dict(keep_success=100, max_success_bytes=2500, keep_dead=3,
                    max_dead_bytes=10 ** 6, max_stored_bytes=1000)
        with receiver() as rx, self.assertLogs("poussetaches", "WARNING") as logs:
            rx.answers["/gone"] = [(410, b"")] * 10
            with running_daemon(data_dir=data, **caps) as d:
                ok = []
                for n in range(1, 5):  # one at a time: two 900-byte payloads waiting are a 507
                    ok.append(call(d.url, "POST", "/", {"url": rx.url("/ok"),
                                                        "payload": b64(b"s" * 900)})[2]["id"])
                    rx.wait_for(n, path="/ok")
                    wait_until(lambda: call(d.url, "GET", "/")[2]["waiting"] == 0,
                               what="the task settled")
                wait_until(lambda: call(d.url, "GET", "/")[2]["success"] == 2 and
                           d.store.dropped["success", "bytes"] == 2, what="success trimmed")
                gone = [call(d.url, "POST", "/", {"url": rx.url("/gone"),
                                                  "payload": b64(b"d" * 10)})[2]["id"]
                        for _ in range(5)]
                wait_until(lambda: d.store.dropped["dead", "records"] == 2, what="dead trimmed")
                kept = {t["id"] for t in call(d.url, "GET", "/dead")[2]["tasks"]}
                self.assertEqual(kept, set(gone[2:]))  # the newest three
                self.assertEqual({t["id"] for t in call(d.url, "GET", "/success")[2]["tasks"]},
                                 set(ok[2:]))
                self.assertEqual(d.store.table_bytes, {"success": 1800, "dead": 30})
                metrics = call(d.url, "GET", "/metrics")[2].decode()
                self.assertIn('poussetaches_records_dropped_total{table="dead",cap="records"} 2',
                              metrics)
                self.assertIn('poussetaches_records_dropped_total{table="success",cap="bytes"} 2',
                              metrics)
                self.assertIn('poussetaches_table_bytes{table="success"} 1800', metrics)
            with running_daemon(data_dir=data, **caps) as d:  # the same after a restart
                self.assertEqual({t["id"] for t in call(d.url, "GET", "/dead")[2]["tasks"]},
                                 set(gone[2:]))
                self.assertEqual(d.store.table_bytes, {"success": 1800, "dead": 30})
        dropped = [m for m in logs.output if "dead table over its cap of 3 records" in m]
        self.assertEqual(len(dropped), 2, logs.output)
        self.assertIn(gone[0], dropped[0])


# --------------------------------------------------------------------------
# Scheduling: the due-time queue, queues, ordering keys, priorities
# --------------------------------------------------------------------------


class TestDueQueue(unittest.TestCase):
    """The due-time queue: order, waits, holds, sizes, queues and rates."""

    def test_order_and_ties(self):
        q = pt.DueQueue()
        q.put_task(3, "c", 0)
        q.put_task(1, "a", 0)
        q.put_task(1, "b", 0)
        self.assertEqual([q.get_due()[2] for _ in range(3)], ["a", "b", "c"])

    def test_sleeps_until_due_and_wakes_for_earlier(self):
        q = pt.DueQueue()
        now = time.time_ns()
        q.put_task(now + 30 * 10 ** 9, "late", 0)
        got = []
        worker = threading.Thread(target=lambda: got.append(q.get_due()))
        worker.start()
        self.assertFalse(got)
        q.put_task(now + 50 * 10 ** 6, "soon", 0)  # must wake the sleeping worker
        worker.join(WAIT)
        self.assertFalse(worker.is_alive())
        self.assertEqual(got[0][2], "soon")
        self.assertGreaterEqual(time.time_ns(), now + 50 * 10 ** 6)

    def test_wall_clock_steps(self):
        """Due times are wall-clock, waits are monotonic: a worker waiting for a
        task an hour away slept the hour through a one-hour step forward."""
        clock = FakeClock(10 ** 18)
        q = pt.DueQueue(clock)
        q.put_task(clock.now + 3600 * NS, "in an hour", 0)
        got = []
        worker = threading.Thread(target=lambda: got.append(q.get_due()))
        worker.start()
        worker.join(0.3)
        self.assertTrue(worker.is_alive())
        clock.now += 3600 * NS  # the clock steps an hour forward
        started = time.monotonic()
        worker.join(WAIT)
        self.assertEqual(got[0][2], "in an hour")
        self.assertLess(time.monotonic() - started, pt.CLOCK_CHECK + 1.0)
        # an hour back: a task due in 2 s of wall time is now due in an hour and
        # 2 s; stepped forward again, it runs within a second of its due time
        q.put_task(clock.now + 2 * NS, "soon", 0)
        clock.now -= 3600 * NS
        worker = threading.Thread(target=lambda: got.append(q.get_due()))
        worker.start()
        worker.join(0.3)
        self.assertTrue(worker.is_alive())  # not due before its own wall time
        clock.now += 3600 * NS + 2 * NS
        started = time.monotonic()
        worker.join(WAIT)
        self.assertEqual(got[1][2], "soon")
        self.assertLess(time.monotonic() - started, pt.CLOCK_CHECK + 1.0)

    def test_hold_release_close(self):
        q = pt.DueQueue()
        q.hold()
        q.put_task(0, "x", 0)
        got = []
        worker = threading.Thread(target=lambda: got.append(q.get_due()))
        worker.start()
        worker.join(0.2)
        self.assertTrue(worker.is_alive(), "a held queue must not hand out tasks")
        q.release()
        worker.join(WAIT)
        self.assertEqual(got[0][2], "x")
        worker = threading.Thread(target=lambda: got.append(q.get_due()))
        worker.start()
        q.close()
        worker.join(WAIT)
        self.assertFalse(worker.is_alive())
        self.assertIsNone(got[1])

    def test_size_empty_and_join_count_every_entry(self):
        """queue.Queue's own calls tell the truth: an entry due, ready or taken and
        not done is in the queue; join() returns once every one is done."""
        clock = FakeClock(10 ** 18)
        q = pt.DueQueue(clock)
        self.assertTrue(q.empty())
        q.put((clock.now + NS, "later", 0))          # queue.Queue's own put
        q.put_task(clock.now, "now", 0, "mail", 5)
        self.assertEqual((q.qsize(), q.empty()), (2, False))
        entry = q.get(timeout=WAIT)                  # and its own get
        self.assertEqual(entry[2:], ("now", 0, "mail", 5))
        self.assertEqual(q.qsize(), 1)
        self.assertRaises(queue.Empty, q.get, False)  # "later" is not due
        self.assertRaises(queue.Empty, q.get, True, 0.05)
        joined = threading.Thread(target=q.join)
        joined.start()
        q.done("mail")
        clock.now += NS
        self.assertEqual(q.get(timeout=WAIT)[2], "later")
        self.assertEqual((q.qsize(), q.empty()), (0, True))
        joined.join(0.2)
        self.assertTrue(joined.is_alive(), "an entry taken and not done is not finished")
        q.done("default")
        joined.join(WAIT)
        self.assertFalse(joined.is_alive())

    def test_choosing_among_many_queues_takes_the_best_entry(self):
        """The runnable queues are a heap by their best entry: against a brute-force
        model (every ready entry, the best by priority, due time, arrival), over
        random puts, takes and done calls in 300 queues, paused ones included."""
        rng = random.Random(21)
        clock = FakeClock(10 ** 18)
        q = pt.DueQueue(clock)
        paused = {"q%d" % n for n in range(0, 300, 7)}
        for name in paused:
            q.configure(name, paused=True)
        model, taken = [], []   # model: (-priority, due, n, id, queue)
        for n in range(3000):
            if rng.random() < 0.6 or not model:
                name, prio = "q%d" % rng.randrange(300), rng.choice((0, 0, 1, 5))
                due = clock.now - rng.randrange(100)
                q.put_task(due, "t%d" % n, 0, name, prio)
                model.append((-prio, due, n, "t%d" % n, name))
            else:
                runnable = [m for m in model if m[4] not in paused]
                got = q.get(False) if runnable else None
                if runnable:
                    best = min(runnable)
                    self.assertEqual(got[2], best[3])
                    model.remove(best)
                    taken.append(best[4])
                else:
                    self.assertRaises(queue.Empty, q.get, False)
            if taken and rng.random() < 0.5:
                q.done(taken.pop(rng.randrange(len(taken))))
        for name in taken:
            q.done(name)
        self.assertEqual(q.qsize(), len(model))
        # only the queues holding entries or settings are left
        self.assertLessEqual(set(q._gates), {m[4] for m in model} | paused)
        self.assertLess(len(q._gates), 300)

    def test_a_rate_holds_no_entry_while_it_waits(self):
        """With the daemon's rate spent, the next entry stays in the queue (a worker
        that took it and slept would hold it from every other worker and from a
        stop); it is handed out when the token is back."""
        clock = FakeClock(10 ** 18)
        q = pt.DueQueue(clock, rate=2.0, burst=1)
        q.put_task(clock.now, "a", 0)
        q.put_task(clock.now, "b", 0)
        self.assertEqual(q.get(False)[2], "a")
        self.assertRaises(queue.Empty, q.get, False)
        self.assertEqual(q.qsize(), 1)
        clock.now += NS // 2   # half a second at 2 a second: a token
        self.assertEqual(q.get(False)[2], "b")
        # the wall clock stepped an hour back: the bucket refills from there, it does
        # not owe an hour of tokens
        clock.now -= 3600 * NS
        q.put_task(clock.now, "c", 0)
        self.assertRaises(queue.Empty, q.get, False)  # a worker's look at the new time
        clock.now += NS // 2
        self.assertEqual(q.get(False)[2], "c")
        self.assertRaises(TypeError, q.put, (0, 0, "d", 0, "default", 0))  # a taken entry


class TestQueues(unittest.TestCase):
    """Queues: their settings and lag, ordering keys, priorities, held tasks."""

    def test_a_held_task_says_why(self):
        """Tasks held behind an ordering key's head showed "-" and a past next run,
        and a queue's lag turned red with no reason given."""
        with receiver() as rx, running_daemon(paused=True, min_backoff=60, max_backoff=60,
                                              grace=0.1) as d:
            rx.answers["/slow"] = [(200, b"", {}, 2.0)]
            rx.answers["/fails"] = [(500, b"no")]

            def push(path, **extra):
                return call(d.url, "POST", "/", dict({"url": rx.url(path)}, **extra))[2]["id"]

            def held(task_id):
                return call(d.url, "GET", "/tasks/" + task_id)[2]["held"]
            first = push("/fails", ordering_key="k")
            second = push("/x", ordering_key="k")
            slow = push("/slow", queue="one")
            behind = push("/x", queue="one")
            self.assertEqual(held(second), "dispatching is paused (POST /resume)")
            call(d.url, "PUT", "/queues/one", {"concurrency": 1, "paused": True})
            call(d.url, "POST", "/resume")
            self.assertEqual(held(behind), "its queue one is paused")
            wait_until(lambda: call(d.url, "GET", "/tasks/" + first)[2]["tries"] == 1,
                       what="the head's first failure")
            self.assertIsNone(held(first))  # not due: its retry is a minute away
            self.assertEqual(held(second), "its ordering key 'k' runs task %s first" % first)
            call(d.url, "POST", "/queues/one/resume")
            wait_until(lambda: d.store.in_flight() == 1 and
                       call(d.url, "GET", "/tasks/" + slow)[2]["tries"] == 0, poll=0.02,
                       what="the slow task under way")
            self.assertEqual(held(behind), "its queue one is at its concurrency (1 under way)")
            self.assertIsNone(held(slow))  # on its way, not held
            for _ in range(5):
                d.dispatcher.breakers.record("http://down.example:80", True)
            task = call(d.url, "POST", "/", {"url": "http://down.example/t"})
            self.assertEqual(task[0], 201)
            self.assertRegex(held(task[2]["id"]),
                             r"^the circuit for http://down\.example:80 is open")
            # a page of a listing says it for each task; a whole listing stays the original's
            page = call(d.url, "GET", "/waiting?limit=10")[2]["tasks"]
            self.assertIn(("its ordering key 'k' runs task %s first" % first),
                          [t["held"] for t in page])
            self.assertNotIn("held", call(d.url, "GET", "/waiting")[2]["tasks"][0])
            code, out, _ = TestCli.run_cli(self, "--url", d.url, "show", second)
            self.assertIn("held:                   its ordering key 'k' runs task", out)

    def test_paused_and_saturated_queues_do_not_block_others(self):
        with receiver() as rx, running_daemon(workers=4) as d:
            self.assertEqual(call(d.url, "POST", "/queues/held/pause")[0], 200)
            status, _, q = call(d.url, "PUT", "/queues/slow", {"concurrency": 1})
            self.assertEqual((status, q["settings"]), (200, {"concurrency": 1}))
            rx.answers["/slow"] = [(200, b"", {}, 1.0)]
            for i in range(2):
                call(d.url, "POST", "/", {"url": rx.url("/held"), "queue": "held"})
                call(d.url, "POST", "/", {"url": rx.url("/slow"), "queue": "slow"})
            wait_until(lambda: call(d.url, "GET", "/queues/slow")[2]["in_flight"] == 1,
                       what="a slow task under way", poll=0.02)
            for i in range(5):
                call(d.url, "POST", "/", {"url": rx.url("/fast"), "queue": "fast"})
            rx.wait_for(5, path="/fast")
            # the slow queue is saturated (its first task still runs) and the paused one
            # holds its tasks, yet the fast ones went through
            slow = call(d.url, "GET", "/queues/slow")[2]
            self.assertEqual((slow["in_flight"], slow["waiting"]), (1, 2))
            self.assertEqual(len([g for g in rx.got if g["path"] == "/held"]), 0)
            held = call(d.url, "GET", "/queues/held")[2]
            self.assertEqual((held["waiting"], held["due"], held["settings"]),
                             (2, 2, {"paused": True}))
            self.assertGreaterEqual(held["oldest_due_age_s"], 0)
            self.assertEqual(call(d.url, "POST", "/queues/held/resume")[0], 200)
            rx.wait_for(2, path="/held")
            got = [g["at"] for g in rx.wait_for(2, path="/slow")]
            self.assertGreaterEqual(got[1] - got[0], 0.9)  # one /slow at a time

    def test_per_queue_rate(self):
        with receiver() as rx, running_daemon(workers=4) as d:
            call(d.url, "PUT", "/queues/partner", {"rate": 20, "burst": 1})
            started = time.time()
            for i in range(20):
                call(d.url, "POST", "/", {"url": rx.url("/partner"), "queue": "partner"})
                call(d.url, "POST", "/", {"url": rx.url("/free")})
            free = rx.wait_for(20, path="/free")
            partner = rx.wait_for(20, path="/partner", timeout=WAIT)
            span = partner[-1]["at"] - partner[0]["at"]
            self.assertGreater(span, 0.8)   # 20 at 20/s, burst 1: about 0.95 s
            self.assertLess(span, 2.5)
            # the other queue is not throttled: all of it is done before half of the partner's
            self.assertLess(free[-1]["at"], partner[10]["at"])
            self.assertLess(free[-1]["at"] - started, 2.0)

    def test_ordering_keys(self):
        with receiver() as rx, running_daemon(workers=4, max_tries=5,
                                              min_backoff=0.02, max_backoff=0.05) as d:
            for key in range(5):
                rx.answers["/k%d/0" % key] = [(500, b"no"), (500, b"no"), (200, b"")]
            for i in range(10):
                for key in range(5):
                    call(d.url, "POST", "/", {"url": rx.url("/k%d/%d" % (key, i)),
                                              "ordering_key": "k%d" % key, "json": i})
            rx.wait_for(50 + 10)  # 50 tasks, each key's first failing twice
            wait_until(lambda: call(d.url, "GET", "/")[2]["waiting"] == 0, what="all done")
            for key in range(5):
                mine = [g for g in rx.got if g["path"].startswith("/k%d/" % key)]
                order = [int(g["path"].split("/")[2]) for g in mine]
                firsts = [i for i, n in enumerate(order) if n != 0]
                self.assertEqual(order[firsts[0]:], list(range(1, 10)), order)  # in order
                self.assertEqual(order[:3], [0, 0, 0])
            # a dead head releases its key
            rx.answers["/dies"] = [(500, b"no")]
            call(d.url, "POST", "/", {"url": rx.url("/dies"), "ordering_key": "x",
                                      "max_tries": 1})
            call(d.url, "POST", "/", {"url": rx.url("/after-death"), "ordering_key": "x"})
            rx.wait_for(1, path="/after-death")
            self.assertEqual(call(d.url, "GET", "/")[2]["dead"], 1)

    def test_the_head_leaves_while_the_next_task_is_fsynced(self):
        # B is written while A is its key's head (so not scheduled then), and A
        # succeeds while B's fsync runs: B must still be scheduled.
        hold = []

        class SlowFsync(pt.FileSystem):
            def fsync(self, fd):
                if hold:
                    hold.pop()
                    wait_until(lambda: d.store.counts()["success"] == 1, poll=0.005,
                               what="the head to succeed")
                os.fsync(fd)

        with receiver() as rx, running_daemon(fs=SlowFsync()) as d:
            rx.answers["/a"] = [(200, b"", {}, 0.3)]
            call(d.url, "POST", "/", {"url": rx.url("/a"), "ordering_key": "k"})
            wait_until(lambda: d.store.in_flight() == 1, poll=0.005, what="A in flight")
            hold.append(True)
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/b"),
                                                       "ordering_key": "k"})[0], 201)
            rx.wait_for(1, path="/b")

    def test_no_overlap_within_a_key(self):
        with receiver() as rx, running_daemon(workers=4) as d:
            rx.answers["/o"] = [(200, b"", {}, 0.15)]
            for i in range(4):
                call(d.url, "POST", "/", {"url": rx.url("/o"), "ordering_key": "same"})
            got = rx.wait_for(4, path="/o")
            gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:])]
            self.assertTrue(all(gap >= 0.14 for gap in gaps), gaps)

    def test_priority_then_fifo(self):
        with receiver() as rx, running_daemon(workers=1, paused=True) as d:
            rng = random.Random(SEED_UNIT)
            sent = []
            for i in range(30):
                priority = rng.choice([-5, 0, 0, 3, 10])
                call(d.url, "POST", "/", {"url": rx.url("/p/%d" % i), "priority": priority})
                sent.append((priority, i))
            call(d.url, "POST", "/resume")
            got = [int(g["path"].split("/")[2]) for g in rx.wait_for(30)]
            expected = [i for _, i in sorted(sent, key=lambda pi: (-pi[0], pi[1]))]
            self.assertEqual(got, expected)
            status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/x"), "priority": 101})
            self.assertEqual((status, doc["field"]), (400, "priority"))

    def test_queue_calls_and_bad_settings(self):
        with running_daemon(paused=True) as d:
            for body, field in (({"rate": 0}, "rate"), ({"concurrency": 1.5}, "concurrency"),
                                ({"paused": "yes"}, "paused"), ({"bogus": 1}, "bogus"),
                                ({"min_backoff": 5, "max_backoff": 1}, "min_backoff")):
                status, _, doc = call(d.url, "PUT", "/queues/q", body)
                self.assertEqual((status, doc.get("field")), (400, field), body)
            self.assertEqual(call(d.url, "PUT", "/queues/Bad!", {})[0], 400)
            self.assertEqual(call(d.url, "GET", "/queues/none")[0], 404)
            call(d.url, "PUT", "/queues/q", {"rate": 5, "max_tries": 3})
            status, _, q = call(d.url, "PUT", "/queues/q", {"rate": None, "timeout_s": 5})
            self.assertEqual(q["settings"], {"max_tries": 3, "timeout_s": 5})
            # null is the default, on either side of the backoff pair (a 500 before)
            for body, settings in (({"min_backoff": 1, "max_backoff": None},
                                    {"min_backoff": 1}),
                                   ({"min_backoff": None, "max_backoff": 2}, {"max_backoff": 2}),
                                   ({"max_backoff": None}, {})):
                status, _, q = call(d.url, "PUT", "/queues/n", body)
                self.assertEqual((status, q["settings"]), (200, settings), body)
            call(d.url, "DELETE", "/queues/n")
            call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/x", "queue": "q"})
            self.assertEqual(call(d.url, "DELETE", "/queues/q")[0], 409)
            names = [q["name"] for q in call(d.url, "GET", "/queues")[2]["queues"]]
            self.assertEqual(names, ["default", "q"])
            self.assertEqual(call(d.url, "PUT", "/queues/q", {},
                                  headers={"Sec-Fetch-Site": "cross-site"})[0], 403)
            call(d.url, "DELETE", "/waiting")  # 405, harmless
            call(d.url, "DELETE", "/tasks/" + call(d.url, "GET", "/waiting?queue=q")[2]
                 ["tasks"][0]["id"])
            self.assertEqual(call(d.url, "DELETE", "/queues/q")[0], 200)
            self.assertEqual(call(d.url, "GET", "/queues/q")[0], 404)

    def test_queue_policy_and_state_survive_a_crash(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "d")
        with receiver() as rx:
            daemon = DaemonProcess(data, "--paused")
            try:
                call(daemon.url, "PUT", "/queues/slow", {"concurrency": 1, "max_tries": 1})
                call(daemon.url, "POST", "/queues/slow/pause")
                for i in range(3):
                    call(daemon.url, "POST", "/", {"url": rx.url("/s/%d" % i), "queue": "slow",
                                                   "ordering_key": "k"})
            finally:
                daemon.kill()
            again = DaemonProcess(data)
            try:
                q = call(again.url, "GET", "/queues/slow")[2]
                self.assertEqual(q["settings"], {"concurrency": 1, "max_tries": 1, "paused": True})
                self.assertEqual(q["waiting"], 3)
                call(again.url, "POST", "/queues/slow/resume")
                got = [g["path"] for g in rx.wait_for(3)]
                self.assertEqual(got, ["/s/0", "/s/1", "/s/2"])
                call(again.url, "POST", "/", {"url": rx.url("/snap"), "queue": "slow",
                                              "delay_s": 60})
            finally:
                self.assertEqual(again.terminate(), 0)  # a final snapshot
            third = DaemonProcess(data, "--paused")
            try:
                q = call(third.url, "GET", "/queues/slow")[2]
                self.assertEqual((q["settings"], q["waiting"]),
                                 ({"concurrency": 1, "max_tries": 1}, 1))
            finally:
                third.terminate()

    def test_a_queue_goes_with_its_last_task_unless_it_has_settings(self):
        data = os.path.join(tempfile.mkdtemp(prefix="pt-test-"), "data")
        self.addCleanup(shutil.rmtree, os.path.dirname(data), True)
        names = lambda d: [q["name"] for q in call(d.url, "GET", "/queues")[2]["queues"]]
        with running_daemon(data, paused=True) as d:
            call(d.url, "POST", "/queues/held/pause")
            ids = [call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/", "queue": q}
                        )[2]["id"] for q in ("held", "mail", "mail", "news")]
            self.assertEqual(names(d), ["default", "held", "mail", "news"])
            for task_id in ids[:3]:
                call(d.url, "DELETE", "/tasks/" + task_id)
            self.assertEqual(names(d), ["default", "held", "news"])
        with running_daemon(data, paused=True) as d:  # the journal replayed says the same
            self.assertEqual(names(d), ["default", "held", "news"])
            call(d.url, "DELETE", "/tasks/" + ids[3])
            self.assertEqual(names(d), ["default", "held"])
            # settings given and taken back on an idle queue: gone at once, as at a restart
            call(d.url, "POST", "/queues/idle/pause")
            self.assertEqual(call(d.url, "POST", "/queues/idle/resume")[2]["settings"], {})
            self.assertEqual(names(d), ["default", "held"])
        with running_daemon(paused=True) as d:  # fresh: no snapshot under way
            before = d.store.health()["records"]
            for _ in range(3):  # naming a forgotten queue again costs no record of its own
                call(d.url, "DELETE", "/tasks/" + call(d.url, "POST", "/", {
                    "url": "http://127.0.0.1:9/", "queue": "mail"})[2]["id"])
            self.assertEqual(d.store.health()["records"] - before, 6)  # a put, a del each

    def test_held_tasks_cost_nothing_per_dispatch(self):
        q = pt.DueQueue()
        for n in range(100):
            q.configure("held-%d" % n, paused=True)
            for i in range(100):
                q.put_task(0, "h-%d-%d" % (n, i), 0, "held-%d" % n)
        q.put_task(0, "free", 0, "default")
        entry = q.get_due()  # moves every due entry to its ready heap, once
        self.assertEqual(entry[2], "free")
        # the 100 paused queues are not even looked at
        self.assertEqual([name for name, gate in q._gates.items() if gate.listed], [])


# --------------------------------------------------------------------------
# Delivery: attempts, retries, https, breakers, hooks
# --------------------------------------------------------------------------


class TestDelivery(unittest.TestCase):
    """Deliveries to a real receiver: the request, retries, time-outs, outcomes."""

    def setUp(self):
        self.rx = Receiver()
        self.addCleanup(self.rx.close)

    def push(self, d, path="/task", **fields):
        body = {"url": self.rx.url(path), "payload": b64(b'{"n": 1}'), "expected": 200,
                "schedule": "", "delay": 0}
        body.update(fields)
        status, headers, doc = call(d.url, "POST", "/", body)
        self.assertIn(status, (200, 201), doc)
        return headers["Poussetaches-Task-ID"]

    def state(self, d, task_id, table):
        _, _, doc = call(d.url, "GET", "/" + table)
        return next((t for t in doc["tasks"] if t["id"] == task_id), None)

    def test_deadline_socket_times_out_receives_and_sends(self):
        # the kernel's time-outs (or Python's, where there are none) end a
        # receive at the deadline and a send that the peer never reads
        def tcp_pair():
            listener = socket.create_server(("127.0.0.1", 0))
            near = socket.create_connection(listener.getsockname())
            far, _ = listener.accept()
            listener.close()
            self.addCleanup(far.close)
            sock = pt.DeadlineSocket.adopt(near, time.monotonic() + 0.3)
            self.addCleanup(sock.close)
            return sock, far

        sock, far = tcp_pair()
        started = time.monotonic()  # no time-out set: the deadline alone ends the receive
        with self.assertRaises(socket.timeout):
            sock.recv_into(bytearray(10))
        self.assertLess(time.monotonic() - started, 2.0)
        sock, far = tcp_pair()
        sock.settimeout(0.3)
        self.assertEqual(sock.gettimeout(), 0.3)
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            sock.recv_into(bytearray(10))
        self.assertLess(time.monotonic() - started, 2.0)
        far.sendall(b"hello")
        sock.deadline = time.monotonic() + 5
        buffer = bytearray(10)
        self.assertEqual(sock.recv_into(buffer), 5)
        sock.settimeout(0.3)  # a receive under a deadline set the time-out to what was left
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            sock.sendall(b"x" * (64 << 20))  # more than any socket buffer holds
        self.assertLess(time.monotonic() - started, 3.0)
        # a peer that reads a little now and then: the time-out bounds the whole
        # send (the kernel's SO_SNDTIMEO bounds one send call only)
        sock, far = tcp_pair()
        stop = threading.Event()

        def trickle():
            deadline = time.monotonic() + 4.0  # then stop reading: never a hang
            while not stop.wait(0.05) and time.monotonic() < deadline:
                far.recv(16384)
        reader = threading.Thread(target=trickle)
        reader.start()
        self.addCleanup(reader.join)
        self.addCleanup(stop.set)
        sock.settimeout(0.5)
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            sock.sendall(b"x" * (64 << 20))
        self.assertLess(time.monotonic() - started, 2.0)

    def test_a_later_deadline_gets_its_whole_time(self):
        # a receive near one deadline shortens the socket's time-out; the next
        # exchange (a kept-alive API connection's next request) has a later
        # deadline, and a receive must wait until it, not until the old one
        listener = socket.create_server(("127.0.0.1", 0))
        near = pt.DeadlineSocket.connect_to(listener.getsockname(), 5.0)
        far, _ = listener.accept()
        listener.close()
        for sock in (near, far):
            self.addCleanup(sock.close)
        near.deadline = time.monotonic() + 0.3
        far.sendall(b"a")
        time.sleep(0.1)
        buffer = bytearray(1)
        self.assertEqual(near.recv_into(buffer), 1)  # at 0.2 s from the deadline
        self.assertEqual(near.gettimeout(), 5.0)  # what sendall bounds a send by: not lowered
        near.deadline = time.monotonic() + 5.0
        timer = threading.Timer(0.6, far.sendall, (b"b",))
        timer.start()
        self.addCleanup(timer.cancel)
        self.assertEqual((near.recv_into(buffer), buffer), (1, bytearray(b"b")))

    @unittest.skipUnless(hasattr(signal, "setitimer"), "needs signal.setitimer (POSIX)")
    def test_time_outs_hold_under_a_stream_of_signals(self):
        # an app's timer or profiler interrupts system calls: a kernel time-out
        # restarts at each signal and a blocking connect interrupted by one
        # has no bound, so the connect and the client keep Python's time-outs
        started = time.monotonic()

        def tick(signum, frame):
            if time.monotonic() - started > 8:  # a regression fails, rather than hangs
                raise AssertionError("a time-out did not hold under signals")
        previous = signal.signal(signal.SIGALRM, tick)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        silent = socket.create_server(("127.0.0.1", 0), backlog=0)  # accepts, never answers
        self.addCleanup(silent.close)
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        client = pt.PousseTaches("http://127.0.0.1:%d" % silent.getsockname()[1], timeout=0.3)
        self.addCleanup(client.close)
        with self.assertRaises(pt.DaemonUnavailable):
            client.status()
        self.assertLess(time.monotonic() - started, 3.0)
        self.assert_connects_time_out(silent.getsockname(), 0.2)

    def assert_connects_time_out(self, address, timeout):
        """Connect to a listener that never accepts until its backlog is full and
        it drops new SYNs: that connect must end at its time-out."""
        for _ in range(8):  # the first few fill the backlog
            started = time.monotonic()
            try:
                sock = pt.DeadlineSocket.connect_to(address, timeout)
            except socket.timeout:
                break
            self.addCleanup(sock.close)
        else:
            self.fail("eight connects to a full backlog all succeeded")
        self.assertLess(time.monotonic() - started, 3.0)

    def test_a_connect_that_is_never_accepted_times_out(self):
        listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.addCleanup(listener.close)
        address = listener.getsockname()
        self.assert_connects_time_out(address, 0.3)
        # and a delivery to it fails at its time-out, as a network error
        task = pt.Task(pt.new_id(), "http://127.0.0.1:%d/" % address[1], timeout_s=0.3)
        outcome = pt.Delivery().attempt(task)
        self.assertEqual(outcome.status, -1)
        self.assertIn("timed out", outcome.body.decode())
        self.assertLess(outcome.duration, 3.0)

    def test_envelope_and_headers(self):
        with running_daemon(auth_key="s3cret") as d:
            started = time.time()
            task_id = self.push(d)
            got = self.rx.wait_for(1)[0]
            latency = got["at"] - started
            env = got["json"]
            self.assertEqual(set(env), {"payload", "tries", "req_id"})
            self.assertEqual(env["payload"], b64(b'{"n": 1}'))
            self.assertEqual(env["tries"], 1)
            self.assertRegex(env["req_id"], r"^[0-9a-f]{12}$")
            h = got["headers"]
            self.assertEqual(h["Poussetaches-Auth-Key"], "s3cret")
            self.assertEqual(h["Content-Type"], "application/json")
            self.assertTrue(h["User-Agent"].startswith("poussetaches/"))
            self.assertEqual((h["Poussetaches-Task-ID"], h["Poussetaches-Tries"],
                              h["Poussetaches-Req-ID"]), (task_id, "1", env["req_id"]))
            mac = hmac.new(b"s3cret", b"%s.%s.%s" % (task_id.encode(),
                           h["webhook-timestamp"].encode(), got["body"]), hashlib.sha256)
            self.assertEqual(h["webhook-signature"], "v1," + b64(mac.digest()))
            done = wait_until(lambda: self.state(d, task_id, "success"), what="success")
            self.assertEqual(done["tries"], 1)
            self.assertGreater(done["last_run"], 0)
            self.assertLess(latency, 2.0)
            TestDelivery.latency = latency

    def test_no_auth_header_without_a_key(self):
        with running_daemon() as d:
            self.push(d)
            self.assertNotIn("Poussetaches-Auth-Key", self.rx.wait_for(1)[0]["headers"])

    def test_failure_then_success(self):
        self.rx.answers["/task"] = [(500, b"boom"), (500, b"boom"), (200, b"")]
        with running_daemon() as d:
            task_id = self.push(d)
            got = self.rx.wait_for(3)
            self.assertEqual([g["json"]["tries"] for g in got], [1, 2, 3])
            self.assertEqual(len({g["json"]["req_id"] for g in got}), 3)
            done = wait_until(lambda: self.state(d, task_id, "success"), what="success")
            self.assertEqual(done["tries"], 3)
            self.assertEqual(len(done["attempts"]), 3)
            self.assertEqual([a["status"] for a in done["attempts"]], [500, 500, 200])

    def test_exhaustion_moves_to_dead_with_status_and_body(self):
        self.rx.answers["/task"] = [(418, b"I am a teapot")]
        with running_daemon(max_tries=3) as d:
            task_id = self.push(d)
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertEqual(dead["tries"], 3)
            self.assertEqual(dead["last_error_status_code"], 418)
            self.assertEqual(base64.b64decode(dead["last_error_body"]), b"I am a teapot")
            self.assertEqual(len(self.rx.got), 3)
            self.assertIsNone(self.state(d, task_id, "waiting"))

    def test_expected_status_other_than_200(self):
        self.rx.answers["/task"] = [(200, b""), (204, b"")]
        with running_daemon() as d:
            task_id = self.push(d, expected=204)
            wait_until(lambda: self.state(d, task_id, "success"), what="success")
            self.assertEqual(len(self.rx.got), 2)

    def test_refused_connection_is_minus_one(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        with running_daemon(max_tries=2) as d:
            status, headers, _ = call(d.url, "POST", "/", {"url": "http://127.0.0.1:%d/x" % port})
            task_id = headers["Poussetaches-Task-ID"]
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertEqual(dead["last_error_status_code"], -1)
            self.assertIn(b"refused", base64.b64decode(dead["last_error_body"]).lower())

    def test_timeout_is_minus_one(self):
        self.rx.answers["/slow"] = [(200, b"", {}, 3.0)]
        with running_daemon(max_tries=1, timeout=0.3) as d:
            started = time.monotonic()
            task_id = self.push(d, path="/slow")
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertLess(time.monotonic() - started, 2.9)
            self.assertEqual(dead["last_error_status_code"], -1)
            self.assertIn(b"timed out", base64.b64decode(dead["last_error_body"]))

    def test_per_task_timeout(self):
        self.rx.answers["/slow"] = [(200, b"", {}, 1.0)]
        with running_daemon(max_tries=1, timeout=30) as d:
            task_id = self.push(d, path="/slow", timeout_s=0.2)
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertEqual(dead["last_error_status_code"], -1)

    def test_retry_after_is_honoured(self):
        self.rx.answers["/busy"] = [(503, b"", {"Retry-After": "1"}), (200, b"")]
        with running_daemon(min_backoff=0.01, max_backoff=60) as d:
            self.push(d, path="/busy")
            first, second = self.rx.wait_for(2)
            self.assertGreaterEqual(second["at"] - first["at"], 0.95)

    def test_redirect_is_not_followed(self):
        self.rx.answers["/moved"] = [(302, b"", {"Location": self.rx.url("/target")})]
        with running_daemon(max_tries=1) as d:
            task_id = self.push(d, path="/moved")
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertEqual(dead["last_error_status_code"], 302)
            self.assertEqual([g["path"] for g in self.rx.got], ["/moved"])

    def test_410_is_dead_at_once(self):
        self.rx.answers["/gone"] = [(410, b"gone")]
        with running_daemon(max_tries=10) as d:
            task_id = self.push(d, path="/gone")
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            self.assertEqual((dead["tries"], len(self.rx.got)), (1, 1))

    def test_error_body_is_cut(self):
        self.rx.answers["/big"] = [(500, b"x" * 100_000)]
        with running_daemon(max_tries=1) as d:
            task_id = self.push(d, path="/big")
            dead = wait_until(lambda: self.state(d, task_id, "dead"), what="dead")
            body = base64.b64decode(dead["last_error_body"])  # 64 KiB read: head + tail kept
            self.assertEqual(body, b"x" * 8192 + b"\n[... 49152 bytes cut ...]\n" + b"x" * 8192)

    def test_cron_runs_and_keeps_its_schedule(self):
        # two runs made now by hand (a run more each: the schedule's hour still comes),
        # not two real seconds of @every 1s
        with running_daemon() as d:
            task_id = self.push(d, path="/cron", schedule="@every 1h")
            for n in (1, 2):
                self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % task_id)[0], 200)
                self.rx.wait_for(n, path="/cron")
                wait_until(lambda: len([t for t in call(d.url, "GET", "/success")[2]["tasks"]
                                        if t["cron_id"] == task_id]) == n, what="run %d" % n)
            cron = self.state(d, task_id, "cron")
            self.assertEqual((cron["tries"], cron["schedule"]), (0, "@every 1h"))
            self.assertGreater(cron["next_run"], time.time_ns() + 3500 * 10 ** 9)
            _, _, success = call(d.url, "GET", "/success")
            copies = [t for t in success["tasks"] if t["cron_id"] == task_id]
            self.assertGreaterEqual(len(copies), 2)

    def test_failing_cron_occurrence_is_recorded_dead_and_schedule_goes_on(self):
        self.rx.answers["/cron"] = [(500, b"nope")]
        with running_daemon(max_tries=2, min_backoff=0.05, max_backoff=0.1) as d:
            task_id = self.push(d, path="/cron", schedule="@every 1h")
            for n in (1, 2):  # two runs by hand, each failing twice
                self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % task_id)[0], 200)
                wait_until(lambda: call(d.url, "GET", "/dead")[2]["total"] == n,
                           what="%d dead runs" % n)
            cron = self.state(d, task_id, "cron")
            self.assertIsNotNone(cron, "the schedule must survive failures")
            _, _, dead = call(d.url, "GET", "/dead")
            for run in dead["tasks"]:
                self.assertEqual((run["cron_id"], run["schedule"], run["tries"]), (task_id, "", 2))

    def test_rate_limit(self):
        with running_daemon(rate=5, burst=1) as d:
            for _ in range(4):
                self.push(d)
            got = self.rx.wait_for(4)
            span = got[-1]["at"] - got[0]["at"]
            self.assertGreaterEqual(span, 0.55)  # 3 gaps of 0.2 s, less clock slack


class TestHttps(unittest.TestCase):
    """Deliveries over https: one deadline for the whole attempt, kept-alive
    connections, certificates verified.  The certificate is made at run time."""

    @classmethod
    def setUpClass(cls):
        if shutil.which("openssl") is None or pt.ssl is None:
            raise unittest.SkipTest("needs the openssl command and Python's ssl module")
        cls.tmp = tempfile.mkdtemp(prefix="pt-tls-")
        cls.cert, cls.key = os.path.join(cls.tmp, "cert.pem"), os.path.join(cls.tmp, "key.pem")
        proc = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", cls.key, "-out", cls.cert, "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            capture_output=True, timeout=60)
        if proc.returncode != 0:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise unittest.SkipTest("openssl could not make a certificate: %s"
                                    % proc.stderr.decode()[-200:])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def tls_app(self):
        """A https app: /ok answers 200; /drip sends its head a byte a second."""
        state = {"connections": 0, "got": []}
        cond = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                with cond:
                    state["connections"] += 1
                super().setup()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with cond:
                    state["got"].append(self.path)
                    cond.notify_all()
                try:
                    if self.path == "/drip":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        self.wfile.flush()
                        for _ in range(30):
                            time.sleep(1)
                            self.wfile.write(b"X")
                            self.wfile.flush()
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        context = pt.ssl.SSLContext(pt.ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        server = QuietServer(("127.0.0.1", 0), Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return "https://127.0.0.1:%d" % server.server_address[1], state, cond

    def test_keep_alive_and_drip_deadline(self):
        base, state, cond = self.tls_app()
        tls = pt.tls_context(cafile=self.cert)
        with running_daemon(workers=1, max_tries=1, tls=tls) as d:
            for n in (1, 2):
                call(d.url, "POST", "/", {"url": base + "/ok"})
                with cond:
                    self.assertTrue(cond.wait_for(lambda: len(state["got"]) == n, WAIT))
                wait_until(lambda: call(d.url, "GET", "/")[2]["success"] == n, what="success")
            self.assertEqual(state["connections"], 1)  # the second reused the first's
            started = time.monotonic()
            task_id = call(d.url, "POST", "/", {"url": base + "/drip", "timeout_s": 0.8})[2]["id"]
            dead = wait_until(lambda: call(d.url, "GET", "/dead")[2]["tasks"], what="dead")[0]
            elapsed = time.monotonic() - started
            self.assertEqual((dead["id"], dead["last_error_status_code"]), (task_id, -1))
            self.assertIn("timed out", base64.b64decode(dead["last_error_body"]).decode())
            self.assertLess(elapsed, 0.8 + 3.0)  # the whole attempt, not each byte's wait
            self.assertGreater(elapsed, 0.7)

    def test_certificates_are_verified(self):
        base, state, _ = self.tls_app()
        with running_daemon(max_tries=1) as d:  # the system's CAs do not know ours
            call(d.url, "POST", "/", {"url": base + "/ok"})
            dead = wait_until(lambda: call(d.url, "GET", "/dead")[2]["tasks"], what="dead")[0]
            self.assertEqual(dead["last_error_status_code"], -1)
            self.assertIn("CERTIFICATE_VERIFY_FAILED",
                          base64.b64decode(dead["last_error_body"]).decode())
            self.assertEqual(state["got"], [])


class TestBreakerAndHooks(unittest.TestCase):
    """The circuit breaker of an origin that is down, and the dead-task hook."""

    def test_app_restart_does_not_burn_retries(self):
        rx = RestartableReceiver()
        self.addCleanup(rx.close)
        rx.down()
        # probes a quarter of a second apart, not a second: the same story, 4 times faster
        self.addCleanup(setattr, pt, "BREAKER_FIRST_PROBE", pt.BREAKER_FIRST_PROBE)
        pt.BREAKER_FIRST_PROBE = 0.25
        with running_daemon(max_tries=12, min_backoff=0.2, max_backoff=0.5, workers=4) as d:
            for i in range(50):
                call(d.url, "POST", "/", {"url": rx.url("/t/%d" % i)})
            first = wait_until(lambda: call(d.url, "GET", "/")[2]["breakers"], what="breaker open")
            self.assertEqual(call(d.url, "GET", "/")[2]["open_breakers"],
                             ["http://127.0.0.1:%s" % rx.base.rsplit(":", 1)[1]])
            # the app stays down (a deploy) until a probe has failed: the breaker backs off
            wait_until(lambda: call(d.url, "GET", "/")[2]["breakers"][0]["next_probe"]
                       != first[0]["next_probe"], what="a failed probe")
            rx.up()
            rx.wait_for(50, timeout=30)
            wait_until(lambda: call(d.url, "GET", "/success")[2]["total"] == 50, timeout=30,
                       what="50 successes")
            tasks = call(d.url, "GET", "/success")[2]["tasks"]
            self.assertEqual(call(d.url, "GET", "/dead")[2]["total"], 0)
            failed = sum(t["tries"] - 1 for t in tasks)
            # without a breaker, the outage (two probes, 0.75 s) of 0.2-0.5 s retries would
            # cost a few tries per task (~100 in all)
            self.assertLessEqual(failed, 20, [t["tries"] for t in tasks])
            self.assertLessEqual(max(t["tries"] for t in tasks), 6)
            self.assertEqual(call(d.url, "GET", "/")[2]["open_breakers"], [])

    def test_500_does_not_open_the_breaker(self):
        breakers = pt.Breakers(pt.DueQueue())
        for _ in range(10):
            breakers.record("http://a:80", False)
        self.assertEqual(breakers.open_origins(), [])
        for _ in range(5):
            breakers.record("http://a:80", True)
        self.assertEqual(breakers.open_origins(), ["http://a:80"])
        self.assertFalse(breakers.admit("http://a:80", (0, 0, "t", 0, "default", 0)))
        self.assertTrue(breakers.admit("http://b:80", (0, 0, "t", 0)))
        breakers.record("http://a:80", False)
        self.assertEqual(breakers.open_origins(), [])

    def test_on_dead_notifies_once_per_dead_task(self):
        with receiver() as rx:
            rx.answers["/t"] = [(500, b"")]
            with running_daemon(max_tries=2, on_dead=rx.url("/hook")) as d:
                _, _, doc = call(d.url, "POST", "/", {"url": rx.url("/t")})
                hook = rx.wait_for(1, path="/hook")[0]
                self.assertEqual(hook["json"]["id"], doc["id"])
                self.assertEqual(hook["json"]["tries"], 2)
                call(d.url, "POST", "/", {"url": rx.url("/t2"), "delay_s": 0.3})
                rx.answers["/t2"] = [(200, b"")]
                rx.wait_for(1, path="/t2")
            self.assertEqual(len([g for g in rx.got if g["path"] == "/hook"]), 1)


# --------------------------------------------------------------------------
# HTTP API: the original's calls, task calls, batches and filters, malformed input
# --------------------------------------------------------------------------


class TestApi(unittest.TestCase):
    """The original's HTTP calls: status, enqueue, listings, cron, pause."""

    def setUp(self):
        self.rx = Receiver()
        self.addCleanup(self.rx.close)
        self.ctx = running_daemon(paused=True)
        self.d = self.ctx.__enter__()
        self.addCleanup(self.ctx.__exit__, None, None, None)

    def push(self, **fields):
        body = {"url": self.rx.url(), "payload": b64(b"{}"), "expected": 200,
                "schedule": "", "delay": 0}
        body.update(fields)
        return call(self.d.url, "POST", "/", body)

    def assert_task_shape(self, task):
        for key, kind in TASK_KEYS.items():
            self.assertIsInstance(task[key], kind, key)
        self.assertIn("last_error_body", task)

    def test_status(self):
        status, _, doc = call(self.d.url, "GET", "/")
        self.assertEqual(status, 200)
        self.assertIs(doc["paused"], True)
        self.assertIsInstance(doc["in_flight"], int)

    def test_enqueue_answers_201_with_id_header_and_task(self):
        status, headers, doc = self.push(payload=b64(b'{"a": 1}'), expected=202, delay=2)
        self.assertEqual(status, 201)
        self.assertRegex(headers["Poussetaches-Task-ID"], r"^[0-9a-f]{32}$")
        self.assertEqual(doc["id"], headers["Poussetaches-Task-ID"])
        self.assert_task_shape(doc)
        self.assertEqual((doc["expected"], doc["tries"], doc["last_run"]), (202, 0, 0))
        self.assertIsNone(doc["last_error_body"])
        self.assertEqual(doc["last_error_status_code"], 0)
        self.assertAlmostEqual(doc["next_run"] / 1e9, time.time() + 120, delta=10)

    def test_defaults_of_a_minimal_task(self):
        status, _, doc = call(self.d.url, "POST", "/", {"url": self.rx.url()})
        self.assertEqual(status, 201)
        self.assertEqual((doc["payload"], doc["expected"], doc["schedule"]), ("", 200, ""))
        status, _, doc = self.push(payload=None, expected=0)
        self.assertEqual((status, doc["payload"], doc["expected"]), (201, "", 200))

    def test_listings_sorted_by_next_run(self):
        ids = [self.push(delay=d)[1]["Poussetaches-Task-ID"] for d in (3, 1, 2)]
        status, _, doc = call(self.d.url, "GET", "/waiting")
        self.assertEqual(status, 200)
        self.assertEqual([t["id"] for t in doc["tasks"]], [ids[1], ids[2], ids[0]])
        self.assertEqual(doc["total"], 3)
        for task in doc["tasks"]:
            self.assert_task_shape(task)
        for table in ("success", "dead", "cron"):
            status, _, doc = call(self.d.url, "GET", "/" + table)
            self.assertEqual((status, doc["tasks"]), (200, []))

    def test_paging(self):
        for d in range(5):
            self.push(delay=d)
        _, _, doc = call(self.d.url, "GET", "/waiting?limit=2&offset=1")
        self.assertEqual((len(doc["tasks"]), doc["total"]), (2, 5))
        _, _, full = call(self.d.url, "GET", "/waiting")
        self.assertEqual([t["id"] for t in doc["tasks"]], [t["id"] for t in full["tasks"][1:3]])
        for bad in ("limit=-1", "limit=abc", "limit=100001", "offset=x"):
            status, _, doc = call(self.d.url, "GET", "/waiting?" + bad)
            self.assertEqual(status, 400, bad)
            self.assertIn(bad.split("=")[0], doc["error"])

    def test_cron_table_dedup_and_delete(self):
        status, headers, doc = self.push(schedule="*/5 * * * *", payload=b64(b"p"))
        self.assertEqual(status, 201)
        expected_id = hashlib.sha1(self.rx.url().encode() + b"p" + b"*/5 * * * *").hexdigest()
        self.assertEqual(headers["Poussetaches-Task-ID"], expected_id)
        status, headers, again = self.push(schedule="*/5 * * * *", payload=b64(b"p"))
        self.assertEqual((status, headers["Poussetaches-Task-ID"]), (200, expected_id))
        self.push()  # a plain task is in waiting, not in cron
        _, _, cron = call(self.d.url, "GET", "/cron")
        self.assertEqual([t["id"] for t in cron["tasks"]], [expected_id])
        _, _, waiting = call(self.d.url, "GET", "/waiting")
        self.assertEqual(waiting["total"], 2)
        self.assertEqual(doc["next_run"] % (300 * 10 ** 9), 0)
        status, _, doc = call(self.d.url, "DELETE", "/cron")
        self.assertEqual((status, doc["deleted"]), (200, 1))
        _, _, waiting = call(self.d.url, "GET", "/waiting")
        self.assertEqual(waiting["total"], 1)

    def test_pause_resume(self):
        self.push()
        self.assertEqual(call(self.d.url, "POST", "/resume")[0], 200)
        self.rx.wait_for(1)
        self.assertEqual(call(self.d.url, "POST", "/pause")[0], 200)
        self.assertIs(call(self.d.url, "GET", "/")[2]["paused"], True)
        self.push()
        status, _, waiting = call(self.d.url, "GET", "/waiting")
        self.assertEqual(waiting["total"], 1)  # held while paused; the API still accepts
        call(self.d.url, "POST", "/resume")
        self.rx.wait_for(2)

    def test_unknown_path_and_wrong_method(self):
        status, _, doc = call(self.d.url, "GET", "/nope")
        self.assertEqual(status, 404)
        self.assertIn("/nope", doc["error"])
        status, headers, doc = call(self.d.url, "PUT", "/waiting")
        self.assertEqual(status, 405)
        self.assertEqual(headers["Allow"], "GET")
        self.assertIn("error", doc)
        status, headers, _ = call(self.d.url, "GET", "/pause")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))
        status, headers, _ = call(self.d.url, "DELETE", "/")
        self.assertEqual((status, headers["Allow"]), (405, "GET, POST"))

    def test_bad_input_is_a_400_naming_the_field(self):
        url = self.rx.url()
        cases = [
            (b"{not json", "invalid JSON"),
            (b"[1, 2]", "JSON object"),
            (b'"text"', "JSON object"),
            (b"", "JSON object"),
            (b'{"url": "http://a/", "delay": NaN}', "NaN"),
            (b'{"url": "http://a/", "delay": Infinity}', "Infinity"),
            (b"\xff\xfe", "UTF-8"),
            (json.dumps({}).encode(), "url is required"),
            (json.dumps({"url": 5}).encode(), "url must be"),
            (json.dumps({"url": ""}).encode(), "url must be"),
            (json.dumps({"url": "ftp://x/y"}).encode(), "http:// or https://"),
            (json.dumps({"url": "file:///etc/passwd"}).encode(), "http:// or https://"),
            (json.dumps({"url": "/relative"}).encode(), "http:// or https://"),
            (json.dumps({"url": "http://a b/"}).encode(), "spaces"),
            (json.dumps({"url": "http://x:99999/"}).encode(), "url is not a valid URL"),
            (json.dumps({"url": url, "payload": "!!!"}).encode(), "payload is not valid"),
            (json.dumps({"url": url, "payload": 5}).encode(), "payload must be"),
            (json.dumps({"url": url, "expected": 99}).encode(), "expected"),
            (json.dumps({"url": url, "expected": 600}).encode(), "expected"),
            (json.dumps({"url": url, "expected": "200"}).encode(), "expected"),
            (json.dumps({"url": url, "expected": True}).encode(), "expected"),
            (json.dumps({"url": url, "delay": -1}).encode(), "delay must be"),
            (json.dumps({"url": url, "delay": 1.5}).encode(), "delay must be"),
            (json.dumps({"url": url, "delay": "5"}).encode(), "delay must be"),
            (json.dumps({"url": url, "schedule": 5}).encode(), "schedule must be"),
            (json.dumps({"url": url, "schedule": "61 * * * *"}).encode(),
             "schedule: invalid cron spec '61 * * * *': minute field: 61 is out of range"),
            (json.dumps({"url": url, "schedule": "0 0 30 2 *"}).encode(), "matches no time"),
            (json.dumps({"url": url, "bogus": 1}).encode(), "unknown field(s): bogus"),
        ]
        for raw, message in cases:
            with self.subTest(raw=raw):
                status, headers, doc = call(self.d.url, "POST", "/", raw=raw)
                self.assertEqual(status, 400)
                self.assertEqual(headers["Content-Type"], "application/json")
                self.assertIn(message, doc["error"])
        # the daemon carries on
        self.assertEqual(self.push()[0], 201)

    def test_oversized_body_413_without_reading(self):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=WAIT) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50000000\r\n\r\n")
            answer = s.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:40])
        self.assertIn(b'"error"', answer)

    def raw(self, data):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=WAIT) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    def test_request_framing(self):
        cases = [
            (b"GET / HTTP/2.0\r\n\r\n", b"HTTP/1.1 505"),
            (b"GET / HTTX/1.1\r\n\r\n", b"HTTP/1.1 400"),
            (b"GET /\r\n\r\n", b"HTTP/1.1 400"),
            (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", b"HTTP/1.1 400"),
            (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", b"HTTP/1.1 400"),
            (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", b"HTTP/1.1 400"),
            (b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", b"HTTP/1.1 431"),
            (b"GET / HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", b"HTTP/1.1 431"),
        ]
        for request, status in cases:
            with self.subTest(request=request[:60]):
                answer = self.raw(request)
                self.assertTrue(answer.startswith(status), answer[:80])
                self.assertIn(b'{"error":', answer)
        # HTTP/1.0 closes after one answer; 1.1 keeps going; a header repeated the same is fine
        answer = self.raw(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n")
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 1)
        answer = self.raw(b"GET / HTTP/1.1\r\nHost: localhost\r\nhost: localhost\r\n\r\n"
                          b"GET /waiting HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 2)

    def test_an_unneeded_body_is_drained_not_reset(self):
        # found by the 50,000-case fuzz: GET with a body used to close with the
        # body unread, and the reset could destroy the answer in flight
        for _ in range(5):
            self.push()
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=WAIT)
        for _ in range(20):
            conn.request("GET", "/waiting", body=b'{"some": "body"}' * 50)
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertEqual(json.loads(resp.read())["total"], 5)
            self.assertFalse(resp.will_close)  # drained: the connection goes on
        conn.close()
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=WAIT) as s:
            s.sendall(b"GET /waiting HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50000000\r\n\r\n"
                      + b"x" * 300000)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:40])  # answered, then closed

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=WAIT)
        started = time.monotonic()
        for _ in range(20):
            conn.request("POST", "/", body=json.dumps({"url": self.rx.url()}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 201)
        conn.close()
        # 20 answers stalled by Nagle + delayed ACK would take 20 x 40 ms
        self.assertLess(time.monotonic() - started, 0.8)


class TestTaskCalls(unittest.TestCase):
    """One task's calls: get, cancel, run now or redrive, retry and purge."""

    def setUp(self):
        self.rx = Receiver()
        self.addCleanup(self.rx.close)
        self.ctx = running_daemon(max_tries=1)
        self.d = self.ctx.__enter__()
        self.addCleanup(self.ctx.__exit__, None, None, None)

    def push(self, path="/task", expect=201, http_headers=None, **fields):
        body = {"url": self.rx.url(path)}
        body.update(fields)
        status, hdrs, doc = call(self.d.url, "POST", "/", body, headers=http_headers)
        self.assertEqual(status, expect, doc)
        return doc

    def get(self, task_id):
        return call(self.d.url, "GET", "/tasks/" + task_id)

    def test_get_task_in_each_state(self):
        self.rx.answers["/fail"] = [(500, b"no")]
        later = self.push(delay_s=3600)
        ok = self.push()
        bad = self.push("/fail")
        self.rx.wait_for(2)
        wait_until(lambda: self.get(bad["id"])[2].get("state") == "dead", what="dead")
        wait_until(lambda: self.get(ok["id"])[2].get("state") == "success", what="success")
        status, _, doc = self.get(later["id"])
        self.assertEqual((status, doc["state"], doc["id"]), (200, "waiting", later["id"]))
        status, _, doc = self.get("0" * 32)
        self.assertEqual(status, 404)
        self.assertIn("0" * 32, doc["error"])

    def test_delete_task(self):
        later = self.push(delay_s=3600)
        status, _, doc = call(self.d.url, "DELETE", "/tasks/" + later["id"])
        self.assertEqual((status, doc["state"]), (200, "waiting"))
        self.assertEqual(self.get(later["id"])[0], 404)
        self.assertEqual(call(self.d.url, "DELETE", "/tasks/" + later["id"])[0], 404)
        ok = self.push()
        wait_until(lambda: self.get(ok["id"])[2].get("state") == "success", what="success")
        self.assertEqual(call(self.d.url, "DELETE", "/tasks/" + ok["id"])[0], 200)
        self.assertEqual(self.get(ok["id"])[0], 404)

    def test_run_now_and_redrive_with_overrides(self):
        later = self.push(delay_s=3600, json={"v": 1})
        status, _, doc = call(self.d.url, "POST", "/tasks/%s/run" % later["id"])
        self.assertEqual((status, doc["state"]), (200, "waiting"))
        got = self.rx.wait_for(1)[0]
        self.assertEqual(base64.b64decode(got["json"]["payload"]), b'{"v":1}')
        self.rx.answers["/fail"] = [(500, b"no")]
        bad = self.push("/fail")
        wait_until(lambda: self.get(bad["id"])[2].get("state") == "dead", what="dead")
        status, _, doc = call(self.d.url, "POST", "/tasks/%s/run" % bad["id"],
                              {"url": self.rx.url("/fixed"), "json": {"v": 2},
                               "headers": {"X-Why": "redrive"}, "max_tries": 3})
        self.assertEqual((status, doc["tries"], doc["max_tries"]), (200, 0, 3))
        got = self.rx.wait_for(1, path="/fixed")[0]
        self.assertEqual(base64.b64decode(got["json"]["payload"]), b'{"v":2}')
        self.assertEqual(got["headers"]["X-Why"], "redrive")
        self.assertEqual(got["json"]["tries"], 1)
        wait_until(lambda: self.get(bad["id"])[2].get("state") == "success", what="success")
        status, _, doc = call(self.d.url, "POST", "/tasks/%s/run" % bad["id"])
        self.assertEqual(status, 404)  # a success record cannot be run
        status, _, doc = call(self.d.url, "POST", "/tasks/%s/run" % bad["id"], {"bogus": 1})
        self.assertEqual(status, 400)

    def test_retry_dead_with_prefix_and_purge(self):
        self.rx.answers["/a/1"] = [(500, b""), (200, b"")]
        self.rx.answers["/b/1"] = [(500, b""), (200, b"")]
        a, b = self.push("/a/1"), self.push("/b/1")
        wait_until(lambda: call(self.d.url, "GET", "/dead")[2]["total"] == 2, what="2 dead")
        status, _, doc = call(self.d.url, "POST", "/dead/retry?url_prefix=" +
                              urllib_quote(self.rx.url("/a/")))
        self.assertEqual((status, doc["requeued"]), (200, 1))
        wait_until(lambda: self.get(a["id"])[2].get("state") == "success", what="a redriven")
        self.assertEqual(self.get(b["id"])[2]["state"], "dead")
        status, _, doc = call(self.d.url, "DELETE", "/dead")
        self.assertEqual((status, doc["deleted"]), (200, 1))
        self.assertEqual(call(self.d.url, "GET", "/dead")[2]["total"], 0)
        self.rx.answers["/c/1"] = [(500, b"")]
        self.push("/c/1")
        wait_until(lambda: call(self.d.url, "GET", "/dead")[2]["total"] == 1, what="dead")
        self.assertEqual(call(self.d.url, "POST", "/dead/retry")[2]["requeued"], 1)

    def test_cron_preview(self):
        status, _, doc = call(self.d.url, "GET",
                              "/cron/preview?schedule=CRON_TZ%3DUTC+0+9+*+*+mon&n=3")
        self.assertEqual(status, 200)
        self.assertEqual(len(doc["next_runs"]), 3)
        for ns, text in zip(doc["next_runs"], doc["next_runs_iso"]):
            when = datetime.fromisoformat(text)
            self.assertEqual((when.weekday(), when.hour, int(when.timestamp()) * 10 ** 9),
                             (0, 9, ns))
        status, _, doc = call(self.d.url, "GET", "/cron/preview?schedule=bad")
        self.assertEqual(status, 400)
        self.assertIn("invalid cron spec", doc["error"])
        self.assertEqual(call(self.d.url, "GET", "/cron/preview")[0], 400)
        self.assertEqual(call(self.d.url, "GET", "/cron/preview?schedule=@daily&n=0")[0], 400)

    def test_idempotency_key_field_and_header(self):
        first = self.push(delay_s=60, idempotency_key="order-1")
        status, headers, doc = call(self.d.url, "POST", "/",
                                    {"url": self.rx.url(), "idempotency_key": "order-1"})
        self.assertEqual((status, headers["Poussetaches-Task-ID"], doc["id"]),
                         (200, first["id"], first["id"]))
        by_header = self.push(delay_s=60, http_headers={"Idempotency-Key": "order-2"})
        status, headers, _ = call(self.d.url, "POST", "/", {"url": self.rx.url()},
                                  headers={"Idempotency-Key": "order-2"})
        self.assertEqual((status, headers["Poussetaches-Task-ID"]), (200, by_header["id"]))
        self.assertNotEqual(first["id"], by_header["id"])
        self.assertEqual(call(self.d.url, "GET", "/waiting")[2]["total"], 2)
        status, _, doc = call(self.d.url, "POST", "/", {"url": self.rx.url(),
                                                        "idempotency_key": "order-3"},
                              headers={"Idempotency-Key": "order-4"})
        self.assertEqual((status, doc["field"]), (400, "idempotency_key"))
        both = call(self.d.url, "POST", "/", {"url": self.rx.url(), "idempotency_key": "order-2"},
                    headers={"Idempotency-Key": "order-2"})
        self.assertEqual((both[0], both[2]["id"]), (200, by_header["id"]))
        self.assertEqual(call(self.d.url, "GET", "/waiting")[2]["total"], 2)

    def test_json_delay_s_eta_headers(self):
        now = time.time()
        doc = self.push(json={"é": [1, None]}, delay_s=30.5)
        self.assertEqual(json.loads(base64.b64decode(doc["payload"])), {"é": [1, None]})
        self.assertAlmostEqual(doc["next_run"] / 1e9, now + 30.5, delta=5)
        doc = self.push(eta=now + 100)
        self.assertAlmostEqual(doc["next_run"] / 1e9, now + 100, delta=1)
        doc = self.push(eta="2030-01-02T03:04:05+01:00")
        self.assertEqual(doc["next_run"], ts("2030-01-02T03:04:05+01:00"))
        doc = self.push(eta="2030-01-02T03:04:05.5Z")
        self.assertEqual(doc["next_run"], ts("2030-01-02T03:04:05+00:00") + 5 * 10 ** 8)
        self.push("/h", headers={"X-Request-Source": "test"}, timeout_s=5, max_tries=2)
        got = self.rx.wait_for(1, path="/h")[0]
        self.assertEqual(got["headers"]["X-Request-Source"], "test")

    def test_chunked_body_is_400(self):
        # SPEC 5 (2026-11-28): any Transfer-Encoding is a 400 (it was a 411)
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=WAIT) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\n{}\r\n0\r\n\r\n")
            answer = s.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:40])
        self.assertIn(b"Content-Length", answer)

    def test_redrive_respects_the_quotas(self):
        with running_daemon(paused=True, max_waiting=3, max_stored_bytes=1000, max_tries=1) as d:
            ids = [call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/x"})[2]["id"]
                   for _ in range(2)]
            status, _, doc = call(d.url, "POST", "/tasks/%s/run" % ids[0],
                                  {"payload": b64(b"x" * 2000)})
            self.assertEqual(status, 507, doc)
            self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % ids[0],
                                  {"payload": b64(b"x" * 900)})[0], 200)
            self.assertEqual(d.store.waiting_bytes, 900)
            call(d.url, "POST", "/resume")
            wait_until(lambda: call(d.url, "GET", "/")[2]["dead"] == 2, what="two dead")
            call(d.url, "POST", "/pause")
            for _ in range(2):
                call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/y", "delay_s": 60})
            self.assertEqual(call(d.url, "POST", "/dead/retry")[0], 507)  # 2 + 2 > 3
            self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % ids[1])[0], 200)  # 3 fit
            self.assertEqual(call(d.url, "GET", "/")[2]["waiting"], 3)


class TestBatchesCronsAndFilters(unittest.TestCase):
    """POST /batch, named crons replaced in place, and the listings' filters."""

    def test_batch(self):
        with receiver() as rx, running_daemon(paused=True) as d:
            body = {"tasks": [{"url": rx.url("/b/%d" % i)} for i in range(5)]
                    + [{"url": rx.url("/b/key"), "idempotency_key": "k1"}] * 2}
            status, _, doc = call(d.url, "POST", "/batch", body)
            self.assertEqual(status, 201)
            self.assertEqual([t["created"] for t in doc["tasks"]], [True] * 6 + [False])
            self.assertEqual(doc["tasks"][5]["id"], doc["tasks"][6]["id"])
            status, _, doc = call(d.url, "POST", "/batch", body)  # again: the keyed one is a twin
            self.assertEqual([t["created"] for t in doc["tasks"]], [True] * 5 + [False] * 2)
            bad = {"tasks": [{"url": rx.url("/ok")}, {"url": rx.url("/ok"), "max_tries": 0}]}
            status, _, doc = call(d.url, "POST", "/batch", bad)
            self.assertEqual((status, doc["index"], doc["field"]), (400, 1, "max_tries"))
            self.assertEqual(call(d.url, "GET", "/")[2]["waiting"], 11)  # nothing of it
            for wrong in ({}, {"tasks": []}, {"tasks": [{}] * 1001}, {"tasks": {}},
                          {"tasks": [1]}, {"tasks": [{"url": rx.url("/")}], "x": 1}):
                self.assertEqual(call(d.url, "POST", "/batch", wrong)[0], 400, wrong)
            self.assertEqual(call(d.url, "POST", "/batch", body,
                                  headers={"Origin": "http://evil.example"})[0], 403)

    def test_batch_is_on_disk_before_the_answer(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        daemon = DaemonProcess(os.path.join(tmp, "d"), "--paused")
        try:
            body = {"tasks": [{"url": "http://127.0.0.1:9/b/%d" % i} for i in range(1000)]}
            status, _, doc = call(daemon.url, "POST", "/batch", body)
            self.assertEqual(status, 201)
        finally:
            daemon.kill()  # right after the answer
        ids = {t["id"] for t in doc["tasks"]}
        again = DaemonProcess(os.path.join(tmp, "d"), "--paused")
        try:
            listed = {t["id"] for t in call(again.url, "GET", "/waiting")[2]["tasks"]}
        finally:
            again.terminate()
        self.assertEqual(listed, ids)

    def test_named_cron_replaces_in_place(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "d")
        with running_daemon(data_dir=data, paused=True) as d:
            first = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/digest", "name": "digest",
                                              "schedule": "0 7 * * *"})
            self.assertEqual(first[0], 201)
            same = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/digest", "name": "digest",
                                             "schedule": "0 7 * * *"})
            self.assertEqual((same[0], same[2].get("replaced")), (200, None))
            new = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/digest", "name": "digest",
                                            "schedule": "0 8 * * *"})
            self.assertEqual((new[0], new[2]["id"], new[2]["replaced"]),
                             (200, first[2]["id"], True))
            crons = call(d.url, "GET", "/cron")[2]["tasks"]
            self.assertEqual([(c["id"], c["schedule"]) for c in crons],
                             [(first[2]["id"], "0 8 * * *")])
            self.assertNotEqual(crons[0]["next_run"], first[2]["next_run"])
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/x",
                                                       "name": "n"})[2]["field"], "name")
        # the replacement is one journal record: a restart finds exactly one cron
        with running_daemon(data_dir=data, paused=True) as d:
            crons = call(d.url, "GET", "/cron")[2]["tasks"]
            self.assertEqual([c["schedule"] for c in crons], ["0 8 * * *"])

    def test_a_replacement_outlives_the_old_definitions_attempt(self):
        # the old definition's attempt, in flight during the replacement, settles
        # after it: the replacement stays (its version is above the old one's)
        with receiver() as rx, running_daemon() as d:
            rx.answers["/old"] = [(200, b"", {}, 0.3)]
            cron = {"url": rx.url("/old"), "name": "digest", "schedule": "@every 1h"}
            status, _, old = call(d.url, "POST", "/", cron)
            self.assertEqual(status, 201)
            self.assertEqual(call(d.url, "POST", "/tasks/%s/run" % old["id"])[0], 200)  # now
            wait_until(lambda: d.store.in_flight() == 1, poll=0.01, what="the old attempt")
            new = call(d.url, "POST", "/", dict(cron, url=rx.url("/new"), schedule="@every 2h"))
            self.assertEqual((new[0], new[2]["replaced"]), (200, True))
            rx.wait_for(1, path="/old")
            wait_until(lambda: d.store.in_flight() == 0, poll=0.01, what="its settling")
            crons = call(d.url, "GET", "/cron")[2]["tasks"]
            self.assertEqual([(c["url"], c["schedule"]) for c in crons],
                             [(rx.url("/new"), "@every 2h")])
            # a batch naming one cron twice: the second definition, and no error
            twice = call(d.url, "POST", "/batch", {"tasks": [
                dict(cron, schedule="@every 4h"), dict(cron, schedule="@every 3h")]})
            self.assertEqual(twice[0], 201, twice[2])
            crons = call(d.url, "GET", "/cron")[2]["tasks"]
            self.assertEqual([c["schedule"] for c in crons], ["@every 3h"])

    def test_filters_and_prefixes(self):
        with running_daemon(paused=True) as d:
            ids = {}
            for name, body in (("a", {"url": "http://127.0.0.1:9/mail/1", "queue": "mail"}),
                               ("b", {"url": "http://127.0.0.1:9/mail/2", "queue": "mail",
                                      "idempotency_key": "Order-77"}),
                               ("c", {"url": "http://127.0.0.1:9/sitemap"})):
                ids[name] = call(d.url, "POST", "/", body)[2]["id"]
            get = lambda q: call(d.url, "GET", "/waiting?" + q)[2]
            self.assertEqual(get("queue=mail")["total"], 2)
            self.assertEqual(get("url_prefix=" + urllib_quote("http://127.0.0.1:9/site"))["total"], 1)
            self.assertEqual([t["id"] for t in get("q=order-77")["tasks"]], [ids["b"]])
            self.assertEqual(get("queue=mail&limit=1&offset=1")["total"], 2)
            self.assertEqual(len(get("queue=mail&limit=1&offset=1")["tasks"]), 1)
            self.assertEqual(call(d.url, "GET", "/waiting?bogus=1")[0], 400)
            self.assertEqual(call(d.url, "GET", "/dead?queue=mail")[2]["total"], 0)
            status, _, doc = call(d.url, "GET", "/tasks/" + ids["a"][:8])
            self.assertEqual((status, doc["id"]), (200, ids["a"]))
            status, _, doc = call(d.url, "GET", "/tasks/" + ids["a"][:5])  # no task has that id
            self.assertEqual((status, "at least 6" in doc["error"]), (404, True))
            # an ambiguous prefix: find two ids that share one
            more = [call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/%d" % i})[2]["id"]
                    for i in range(300)]
            firsts = collections.Counter(i[:6] for i in more + list(ids.values()))
            shared = [p for p, n in firsts.items() if n > 1]
            if shared:
                self.assertEqual(call(d.url, "GET", "/tasks/" + shared[0])[0], 409)
            self.assertEqual(call(d.url, "GET", "/tasks/" + "0" * 31)[0], 404)

    def test_an_unknown_query_parameter_is_refused_by_every_call(self):
        """A mistyped filter (``?queue=`` on a retry, ``?url-prefix=``) must not widen
        a retry or a purge to every task: every call refuses what it does not take,
        before doing anything."""
        with running_daemon(max_tries=1) as d:
            dead = [call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/%s" % q, "queue": q}
                         )[2]["id"] for q in ("qa", "qa", "qb")]
            wait_until(lambda: call(d.url, "GET", "/dead")[2]["total"] == 3, what="3 dead")
            task = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/x", "delay_s": 3600,
                                             "queue": "mail"})[2]["id"]
            for route in pt.Api.ROUTES:
                path = route.pattern.replace("{id}", task).replace("{name}", "mail")
                for query in ("bogus=1", "queue=qa&url-prefix=x")[:1 if route.params else 2]:
                    status, _, doc = call(d.url, route.method, path + "?" + query,
                                          {} if route.method in ("POST", "PUT") else None)
                    self.assertEqual(status, 400, (route.method, path, query, doc))
                    self.assertIn("unknown query parameter(s): ", doc["error"])
                    self.assertIn("use " + route.params[0][0] if route.params
                                  else "this call takes none", doc["error"])
            # nothing was done: no retry, no purge, no cancel, no pause
            self.assertEqual(sorted(t["id"] for t in call(d.url, "GET", "/dead")[2]["tasks"]),
                             sorted(dead))
            self.assertEqual(call(d.url, "GET", "/tasks/" + task)[2]["state"], "waiting")
            self.assertFalse(call(d.url, "GET", "/")[2]["paused"])
            self.assertFalse(call(d.url, "GET", "/queues/mail")[2]["settings"].get("paused"))
            # and the filters that are there still work
            status, _, doc = call(d.url, "POST", "/dead/retry?url_prefix=" +
                                  urllib_quote("http://127.0.0.1:9/qb"))
            self.assertEqual((status, doc["requeued"]), (200, 1))


class TestMalformed(unittest.TestCase):
    """At least 60 malformed requests, each with its exact status and a JSON error;
    then a normal task must still be delivered."""

    def cases(self, url):
        def task(**fields):
            body = {"url": url}
            body.update(fields)
            return json.dumps(body).encode()
        long_url = "http://127.0.0.1/" + "a" * 5000
        return [
            # the body itself
            ("POST", "/", b"{", {}, 400),
            ("POST", "/", b"[]", {}, 400),
            ("POST", "/", b"42", {}, 400),
            ("POST", "/", b"null", {}, 400),
            ("POST", "/", b'"str"', {}, 400),
            ("POST", "/", b"", {}, 400),
            ("POST", "/", b"\xff\xfe\xfd", {}, 400),
            ("POST", "/", b"[" * 100000 + b"]" * 100000, {}, 400),
            ("POST", "/", b'{"url": "http://a/", "delay_s": NaN}', {}, 400),
            ("POST", "/", b'{"url": "http://a/", "delay_s": Infinity}', {}, 400),
            ("POST", "/", b'{"url": "http://a/", "delay_s": -Infinity}', {}, 400),
            ("POST", "/", task(extra=1), {}, 400),
            # url
            ("POST", "/", json.dumps({"payload": ""}).encode(), {}, 400),
            ("POST", "/", task(url=5), {}, 400),
            ("POST", "/", task(url=None), {}, 400),
            ("POST", "/", task(url=["http://a/"]), {}, 400),
            ("POST", "/", task(url=""), {}, 400),
            ("POST", "/", task(url="file:///etc/passwd"), {}, 400),
            ("POST", "/", task(url="ftp://example.com/x"), {}, 400),
            ("POST", "/", task(url="data:text/plain,hi"), {}, 400),
            ("POST", "/", task(url="javascript:alert(1)"), {}, 400),
            ("POST", "/", task(url="gopher://127.0.0.1:70/"), {}, 400),
            ("POST", "/", task(url="http://"), {}, 400),
            ("POST", "/", task(url="//127.0.0.1/x"), {}, 400),
            ("POST", "/", task(url="http://127.0.0.1/\r\nX-Injected: 1"), {}, 400),
            ("POST", "/", task(url="http://[::1/"), {}, 400),
            ("POST", "/", task(url="http://ex\u00e4mple.com/"), {}, 400),
            ("POST", "/", task(url=long_url), {}, 400),
            # payload and json
            ("POST", "/", task(payload=5), {}, 400),
            ("POST", "/", task(payload=["a"]), {}, 400),
            ("POST", "/", task(payload="not base64!"), {}, 400),
            ("POST", "/", task(payload="YQ"), {}, 400),
            ("POST", "/", task(payload="\u00e9\u00e9\u00e9\u00e9"), {}, 400),
            ("POST", "/", task(payload="YQ==", json={"a": 1}), {}, 400),
            # expected
            ("POST", "/", task(expected=-1), {}, 400),
            ("POST", "/", task(expected=99), {}, 400),
            ("POST", "/", task(expected=600), {}, 400),
            ("POST", "/", task(expected=200.5), {}, 400),
            ("POST", "/", task(expected="200"), {}, 400),
            ("POST", "/", task(expected=True), {}, 400),
            ("POST", "/", task(expected=10 ** 30), {}, 400),
            # delay, delay_s, eta
            ("POST", "/", task(delay=-1), {}, 400),
            ("POST", "/", task(delay=1.5), {}, 400),
            ("POST", "/", task(delay="1"), {}, 400),
            ("POST", "/", task(delay=True), {}, 400),
            ("POST", "/", task(delay=10 ** 30), {}, 400),
            ("POST", "/", task(delay_s=-0.5), {}, 400),
            ("POST", "/", task(delay_s="1"), {}, 400),
            ("POST", "/", task(delay_s=1e308), {}, 400),
            ("POST", "/", task(delay_s=False), {}, 400),
            ("POST", "/", task(eta="tomorrow"), {}, 400),
            ("POST", "/", task(eta="2030-01-01 00:00:00"), {}, 400),
            ("POST", "/", task(eta="2030-01-01T00:00:00"), {}, 400),
            ("POST", "/", task(eta=-5), {}, 400),
            ("POST", "/", task(eta=1e20), {}, 400),
            ("POST", "/", task(eta=[2030]), {}, 400),
            ("POST", "/", task(eta=time.time() + 20 * 365 * 86400), {}, 400),
            ("POST", "/", task(eta=time.time() + 60, delay_s=5), {}, 400),
            ("POST", "/", task(delay=1, delay_s=5), {}, 400),
            # max_tries, timeout_s
            ("POST", "/", task(max_tries=0), {}, 400),
            ("POST", "/", task(max_tries=101), {}, 400),
            ("POST", "/", task(max_tries=2.5), {}, 400),
            ("POST", "/", task(max_tries="3"), {}, 400),
            ("POST", "/", task(timeout_s=0), {}, 400),
            ("POST", "/", task(timeout_s=0.05), {}, 400),
            ("POST", "/", task(timeout_s=3601), {}, 400),
            ("POST", "/", task(timeout_s="5"), {}, 400),
            # headers
            ("POST", "/", task(headers=[]), {}, 400),
            ("POST", "/", task(headers="X-A: b"), {}, 400),
            ("POST", "/", task(headers={"Host": "evil"}), {}, 400),
            ("POST", "/", task(headers={"content-length": "1"}), {}, 400),
            ("POST", "/", task(headers={"Poussetaches-Auth-Key": "x"}), {}, 400),
            ("POST", "/", task(headers={"X-A": "b\r\nX-B: c"}), {}, 400),
            ("POST", "/", task(headers={"X-A": "b\nc"}), {}, 400),
            ("POST", "/", task(headers={"bad name": "x"}), {}, 400),
            ("POST", "/", task(headers={"": "x"}), {}, 400),
            ("POST", "/", task(headers={"X-\u00e9": "x"}), {}, 400),
            ("POST", "/", task(headers={"X-A": 5}), {}, 400),
            # idempotency key and schedule
            ("POST", "/", task(idempotency_key=""), {}, 400),
            ("POST", "/", task(idempotency_key="k" * 201), {}, 400),
            ("POST", "/", task(idempotency_key=5), {}, 400),
            ("POST", "/", task(schedule="nonsense"), {}, 400),
            ("POST", "/", task(schedule="* * *"), {}, 400),
            ("POST", "/", task(schedule=["@daily"]), {}, 400),
            ("POST", "/", task(schedule="@every 0s"), {}, 400),
            ("POST", "/", task(schedule="0 0 30 2 *"), {}, 400),
            ("POST", "/", task(schedule="*" * 300), {}, 400),
            # framing
            ("POST", "/", b"{}", {"Content-Length": "abc"}, 400),
            ("POST", "/", b"x" * 2048, {"Content-Length": str(10 ** 9)}, 413),
            # paths and methods
            ("GET", "/tasks/..%2F..%2Fetc%2Fpasswd", None, {}, 404),
            ("GET", "/tasks/../../etc/passwd", None, {}, 404),
            ("GET", "/tasks/%00", None, {}, 404),
            ("GET", "/tasks/" + "a" * 65, None, {}, 404),
            ("DELETE", "/tasks/..", None, {}, 404),
            ("POST", "/tasks/x/run/again", None, {}, 404),
            ("GET", "/nothing/here", None, {}, 404),
            ("PATCH", "/", b"{}", {}, 405),
            ("PUT", "/tasks/abc", b"{}", {}, 405),
            ("DELETE", "/waiting", None, {}, 405),
            ("GET", "/waiting?limit=1e3", None, {}, 400),
            ("GET", "/waiting?offset=-1", None, {}, 400),
        ]

    def test_malformed_requests(self):
        with receiver() as rx, running_daemon() as d:
            cases = self.cases(rx.url())
            self.assertGreaterEqual(len(cases), 60)
            host, port = "127.0.0.1", d.port
            for method, path, raw, headers, status in cases:
                with self.subTest(method=method, path=path[:60], raw=(raw or b"")[:80],
                                  headers=headers):
                    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
                    try:
                        conn.putrequest(method, path, skip_accept_encoding=True)
                        hdrs = {"Content-Type": "application/json"}
                        if raw is not None:
                            hdrs["Content-Length"] = str(len(raw))
                        hdrs.update(headers)
                        for name, value in hdrs.items():
                            conn.putheader(name, value)
                        conn.endheaders()
                        if raw and status != 413:
                            conn.send(raw)
                        resp = conn.getresponse()
                        body = resp.read()
                    finally:
                        conn.close()
                    self.assertEqual(resp.status, status, body[:300])
                    self.assertEqual(resp.headers["Content-Type"], "application/json")
                    self.assertIsInstance(json.loads(body)["error"], str)
            self.assertEqual(rx.got, [])
            status, _, _ = call(d.url, "POST", "/", {"url": rx.url("/after")})
            self.assertEqual(status, 201)
            rx.wait_for(1, path="/after")
            # the receiver records the request before it answers: wait for the outcome
            wait_until(lambda: call(d.url, "GET", "/waiting")[2]["total"] == 0, what="done")

    def test_no_500_before_the_checks_and_origin_form_only(self):
        errors = ErrorRecords()
        logging.getLogger("poussetaches").addHandler(errors)
        self.addCleanup(logging.getLogger("poussetaches").removeHandler, errors)
        with running_daemon() as d:
            evil = b"Host: evil.example\r\nSec-Fetch-Site: cross-site\r\n"
            for line, status in ((b"GET //[ HTTP/1.1\r\n" + evil, b"403"),
                                 (b"GET http://[/ HTTP/1.1\r\n" + evil, b"403"),
                                 (b"GET http://evil/waiting HTTP/1.1\r\nHost: localhost\r\n", b"400"),
                                 (b"GET //evil/waiting HTTP/1.1\r\nHost: localhost\r\n", b"400"),
                                 (b"POST\x85/pause HTTP/1.1\r\nHost: localhost\r\n", b"400"),
                                 (b"GET  /waiting HTTP/1.1\r\nHost: localhost\r\n", b"400"),
                                 (b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Sec-Fetch-Site: cross-site, none\r\n", b"403"),
                                 # two Origins, or two Sec-Fetch-Sites: which one would count?
                                 (b"POST /pause HTTP/1.1\r\nHost: localhost\r\nOrigin: "
                                  b"http://localhost\r\nOrigin: http://evil.example\r\n",
                                  b"400"),
                                 (b"POST /pause HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-"
                                  b"Site: none\r\nSec-Fetch-Site: cross-site\r\n", b"400")):
                with self.subTest(line=line):
                    answer = raw_exchange(d.port, line + b"Connection: close\r\n\r\n")
                    self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer[:80])
            self.assertFalse(call(d.url, "GET", "/")[2]["paused"])
        self.assertEqual(errors.records, [])

    def test_huge_integers_and_control_characters_are_400(self):
        with receiver() as rx, running_daemon() as d:
            url = json.dumps(rx.url("/x"))
            for text in ('{"url": %s, "delay_s": 1%s}' % (url, "0" * 400),
                         '{"url": %s, "timeout_s": 1%s}' % (url, "0" * 400),
                         '{"url": %s, "max_tries": 1%s}' % (url, "0" * 400)):
                self.assertEqual(call(d.url, "POST", "/", raw=text.encode())[0], 400)
            for value in ("a\x01b", "a\x0bb", "a\x7fb", "a\x1fb"):
                status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/x"),
                                                           "headers": {"X-A": value}})
                self.assertEqual((status, doc.get("field")), (400, "headers"))
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/x"),
                                                       "headers": {"X-A": "caf\u00e9 \t ok"}})[0], 201)

    def test_a_refused_large_body_is_not_read(self):
        with running_daemon() as d:
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n"
                          b"Content-Length: 10000000\r\n\r\n")
                started = time.monotonic()
                answer = s.recv(4096)  # answered at once, without the 10 MB
            self.assertTrue(answer.startswith(b"HTTP/1.1 403"), answer[:60])
            self.assertLess(time.monotonic() - started, 5.0)


# --------------------------------------------------------------------------
# Security: keys, signatures, browsers, DNS rebinding, limits
# --------------------------------------------------------------------------


class TestSecurity(unittest.TestCase):
    """Keys and signatures: who may call the API, and where the key goes."""

    def test_header_names_a_server_reads_as_ours_are_refused(self):
        """WSGI servers read Poussetaches_Auth_Key as Poussetaches-Auth-Key (both are
        HTTP_POUSSETACHES_AUTH_KEY); a task's own webhook-* headers would shadow
        the signature."""
        with running_daemon(paused=True) as d:
            for name in ("Poussetaches_Auth_Key", "poussetaches_task_id", "webhook-id",
                         "Webhook_Signature"):
                status, _, doc = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/t",
                                                           "headers": {name: "x"}})
                self.assertEqual((status, doc.get("field")), (400, "headers"), name)
                self.assertIn("is set by poussetaches", doc["error"])

    def test_retry_after_takes_ascii_digits_only(self):
        """"\u00b2".isdigit() is True and float() refuses it: the 503 became a network
        error that counted toward the circuit breaker."""
        self.assertIsNone(pt.parse_retry_after("\u00b2", 0))
        self.assertIsNone(pt.parse_retry_after("\u0663", 0))  # an Arabic-Indic 3
        self.assertEqual(pt.parse_retry_after("120", 0), 120.0)
        self.assertEqual(pt.parse_retry_after("9" * 400, 0), 1e12)  # finite: max_backoff caps

    def test_standard_webhooks_published_vector(self):
        # from the Standard Webhooks reference libraries' test suite
        self.assertEqual(pt.sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                 "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                                 b'{"test": 2432232314}'),
                         "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")

    def test_signature_headers_stay_the_same_id_across_retries(self):
        secret = "whsec_" + b64(b"0123456789abcdef0123456789abcdef")
        with receiver() as rx, running_daemon(auth_key=secret) as d:
            rx.answers["/t"] = [(500, b""), (200, b"")]
            call(d.url, "POST", "/", {"url": rx.url("/t")})
            got = rx.wait_for(2)
            for g in got:
                h = g["headers"]
                expected = hmac.new(b"0123456789abcdef0123456789abcdef",
                                    b"%s.%s.%s" % (h["webhook-id"].encode(),
                                                   h["webhook-timestamp"].encode(), g["body"]),
                                    hashlib.sha256).digest()
                self.assertEqual(h["webhook-signature"], "v1," + b64(expected))
                self.assertLess(abs(int(h["webhook-timestamp"]) - time.time()), 60)
            self.assertEqual(got[0]["headers"]["webhook-id"], got[1]["headers"]["webhook-id"])

    def test_api_key_bearer_basic_and_401(self):
        with running_daemon(api_key="k3y") as d:
            status, headers, doc = call(d.url, "GET", "/")
            self.assertEqual(status, 401)
            self.assertIn("API key", doc["error"])
            self.assertIn("Basic", headers["WWW-Authenticate"])
            self.assertEqual(call(d.url, "GET", "/", headers={"Authorization": "Bearer nope"})[0], 401)
            self.assertEqual(call(d.url, "GET", "/", headers={"Authorization": "Bearer k3y"})[0], 200)
            basic = "Basic " + b64(b":k3y")
            self.assertEqual(call(d.url, "GET", "/", headers={"Authorization": basic})[0], 200)
            basic = "Basic " + b64(b"user:wrong")
            self.assertEqual(call(d.url, "GET", "/", headers={"Authorization": basic})[0], 401)
            self.assertEqual(call(d.url, "GET", "/", headers={"Authorization": "Basic !!"})[0], 401)
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/"})[0], 401)

    def test_allow_url_and_key_never_sent_outside(self):
        with receiver() as rx, running_daemon(allow_urls=[rx.url("/ok/")]) as d:
            status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/other")})
            self.assertEqual(status, 400)
            self.assertIn("allow", doc["error"])
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/ok/1")})[0], 201)
        delivery = pt.Delivery(auth_key="secret", allow_list=pt.AllowList(["http://in/"]))
        inside = delivery.request(pt.Task("a" * 32, "http://in/x"), 1, "r")
        outside = delivery.request(pt.Task("a" * 32, "http://out/x"), 1, "r")
        self.assertEqual(inside.get_header("Poussetaches-auth-key"), "secret")
        self.assertIsNotNone(inside.get_header("Webhook-signature"))
        self.assertIsNone(outside.get_header("Poussetaches-auth-key"))
        self.assertIsNone(outside.get_header("Webhook-signature"))

    def test_encoded_separators_are_refused_in_task_paths(self):
        """A framework or proxy that decodes %2F, reads \\ as / or strips ; would route
        these outside the allowed /tasks; they were delivered, with the key."""
        with receiver() as rx, running_daemon(allow_urls=[rx.url("/tasks")],
                                              auth_key="k") as d:
            for path in ("/tasks/..%2fstolen", "/tasks/%2e%2e%2fstolen", "/tasks/..\\stolen",
                         "/tasks/x/..;/..;/stolen", "/tasks/%252e%252e/stolen",
                         "/tasks/a%5Cb", "/tasks/a%2Fb", "/tasks/a%252Fb", "/tasks/%2E%2E",
                         "/tasks;x"):
                status, _, doc = call(d.url, "POST", "/", {"url": rx.url(path)})
                self.assertEqual((status, doc.get("field")), (400, "url"), path)
                self.assertIn("path", doc["error"])
            # what stays fine: percent-encoding of ordinary characters, and the query
            for path in ("/tasks/100%25", "/tasks/caf%C3%A9", "/tasks/x?next=%2Fa;b", "/tasks/.x"):
                self.assertEqual(call(d.url, "POST", "/", {"url": rx.url(path)})[0], 201, path)
            rx.wait_for(4)
        self.assertEqual(sorted(g["path"] for g in rx.got),
                         sorted(["/tasks/100%25", "/tasks/caf%C3%A9", "/tasks/x?next=%2Fa;b",
                                 "/tasks/.x"]))

    def test_secrets_never_in_logs_or_answers(self):
        logger = logging.getLogger("poussetaches")
        old = logger.level
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.setLevel, old)
        with receiver() as rx, self.assertLogs("poussetaches", "DEBUG") as logs:
            rx.answers["/t"] = [(500, b"")]
            with running_daemon(auth_key="AUTH-SECRET-1", api_key="API-SECRET-2",
                                max_tries=2) as d:
                auth = {"Authorization": "Bearer API-SECRET-2"}
                answers = [call(d.url, "GET", "/", headers={"Authorization": "Bearer API-SECRET-X"})]
                status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/t")}, headers=auth)
                answers.append(doc)
                wait_until(lambda: call(d.url, "GET", "/dead", headers=auth)[2]["total"], what="dead")
                for path in ("/", "/dead", "/tasks/" + doc["id"]):
                    answers.append(call(d.url, "GET", path, headers=auth)[2])
        text = json.dumps(answers, default=str) + "\n".join(logs.output)
        self.assertNotIn("AUTH-SECRET-1", text)
        self.assertNotIn("API-SECRET", text)

    def test_data_dir_private(self):
        with running_daemon() as d:
            self.assertEqual(os.stat(d.settings.data_dir).st_mode & 0o777, 0o700)
            call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/", "delay_s": 60})
            d.store.snapshot()
            for name in os.listdir(d.settings.data_dir):
                mode = os.stat(os.path.join(d.settings.data_dir, name)).st_mode & 0o777
                self.assertEqual(mode, 0o600, name)


class TestSafeByDefault(unittest.TestCase):
    """Safe by default against the operator's browser and other local processes:
    each attack replayed as a request, with its refusal, each followed by a normal
    task that must still be delivered."""

    def setUp(self):
        self.errors = ErrorRecords()
        logging.getLogger("poussetaches").addHandler(self.errors)
        self.addCleanup(logging.getLogger("poussetaches").removeHandler, self.errors)

    def still_works(self, d, rx, path="/after"):
        before = len([g for g in rx.got if g["path"] == path])
        status, _, _ = call(d.url, "POST", "/", {"url": rx.url(path)})
        self.assertEqual(status, 201)
        rx.wait_for(before + 1, path=path)
        self.assertEqual(self.errors.records, [])

    def refused(self, answer, status, words=""):
        self.assertEqual(answer[0], status, answer[2])
        self.assertIsInstance(answer[2], dict, answer[2])
        self.assertIn(words, answer[2]["error"])
        self.assertEqual(answer[1]["X-Content-Type-Options"], "nosniff")

    # -- browser-borne requests (CSRF) -------------------------------------------

    def test_cross_site_and_same_site_requests_are_refused(self):
        with receiver() as rx, running_daemon(auth_key="app-secret") as d:
            cron = call(d.url, "POST", "/", {"url": rx.url("/cron"), "schedule": "@daily"})[2]
            evil = rx.url("/stolen")
            form = "application/x-www-form-urlencoded"
            attacks = [
                ("POST", "/", {"Origin": "http://evil.example", "Content-Type": "text/plain"}),
                ("POST", "/", {"Origin": "http://192.168.1.20:8080", "Content-Type": form}),
                ("POST", "/", {"Origin": "null", "Content-Type": "text/plain"}),
                ("POST", "/", {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}),
                ("POST", "/", {"Sec-Fetch-Site": "same-site", "Content-Type": form}),
                ("POST", "/pause", {"Origin": "http://127.0.0.1:8000"}),
                ("POST", "/tasks/%s/run" % cron["id"], {"Origin": "http://localhost:3000"}),
                ("DELETE", "/dead", {"Sec-Fetch-Site": "cross-site"}),
                ("GET", "/waiting", {"Origin": "http://evil.example"}),
            ]
            for method, path, headers in attacks:
                with self.subTest(method=method, path=path, headers=headers):
                    body = json.dumps({"url": evil}).encode() if method == "POST" else None
                    self.refused(call(d.url, method, path, raw=body, headers=headers), 403)
            self.assertFalse(call(d.url, "GET", "/")[2]["paused"])
            self.assertEqual(call(d.url, "GET", "/tasks/" + cron["id"])[2]["url"], rx.url("/cron"))
            self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 1)
            # the dashboard's own calls are same-origin, under either loopback name
            for host in ("127.0.0.1:%d" % d.port, "localhost:%d" % d.port):
                same = {"Host": host, "Origin": "http://" + host, "Sec-Fetch-Site": "same-origin"}
                self.assertEqual(call(d.url, "POST", "/pause", headers=same)[0], 200)
                self.assertEqual(call(d.url, "POST", "/resume", headers=same)[0], 200)
                self.assertEqual(call(d.url, "GET", "/ui", headers={
                    "Host": host, "Sec-Fetch-Site": "none"})[0], 200)
            self.assertEqual([g for g in rx.got if g["path"] == "/stolen"], [])
            self.still_works(d, rx)

    # -- DNS rebinding ---------------------------------------------------------------

    def test_rebinding_host_values_are_refused(self):
        with receiver() as rx, running_daemon() as d:
            call(d.url, "POST", "/", {"url": rx.url("/x"), "delay_s": 60})
            port = d.port
            for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1.nip.io:%d" % port,
                         "localhost.evil.example", "10.0.0.1:%d" % port, "[::2]:%d" % port,
                         "localhost:%d@evil.example" % port, ""):
                with self.subTest(host=host):
                    self.refused(call(d.url, "GET", "/waiting", headers={"Host": host}), 403,
                                 "Host")
                    self.refused(call(d.url, "DELETE", "/dead", headers={"Host": host}), 403)
            for host in ("localhost", "localhost:%d" % port, "LOCALHOST:%d" % port,
                         "127.0.0.1:%d" % port, "127.0.0.2", "[::1]:%d" % port):
                with self.subTest(allowed=host):
                    self.assertEqual(call(d.url, "GET", "/waiting", headers={"Host": host})[0], 200)
            # HTTP/1.1 without Host is a 400; HTTP/1.0 without it is not a browser
            answer = raw_exchange(port, b"GET /waiting HTTP/1.1\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:60])
            self.assertIn(b"Host", answer)
            answer = raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:60])
            self.still_works(d, rx)
        with running_daemon(allow_hosts=["tasks.internal"]) as d:
            self.assertEqual(call(d.url, "GET", "/", headers={"Host": "tasks.internal:7991"})[0], 200)
            self.assertEqual(call(d.url, "GET", "/", headers={"Host": "tasks.internal.evil"})[0], 403)

    def test_rebinding_refused_when_bound_to_every_address(self):
        """Bound to 0.0.0.0 with no API key (the container setup), a page of
        evil.test rebound to us got 201 and read the listings.  IP literals and
        single-label names (a compose service's) are still served."""
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        daemon = pt.Daemon(host="0.0.0.0", port=0, data_dir=os.path.join(tmp, "d"),
                           min_backoff=60, max_backoff=60)
        daemon.start()
        try:
            base, port = "http://127.0.0.1:%d" % daemon.port, daemon.port
            evil = "evil.test:%d" % port
            body = json.dumps({"url": "http://127.0.0.1:9/stolen"}).encode()
            for method, path, headers in (
                    ("POST", "/", {"Host": evil, "Origin": "http://" + evil}),
                    ("GET", "/waiting", {"Host": evil}),      # a same-origin GET: no Origin
                    ("POST", "/pause", {"Host": evil, "Origin": "http://" + evil}),
                    ("GET", "/", {"Host": "127.0.0.1.nip.io:%d" % port}),
                    ("GET", "/", {"Host": "poussetaches.:%d" % port}),
                    ("GET", "/", {"Host": "tasks.internal"})):
                with self.subTest(path=path, headers=headers):
                    status, _, doc = call(base, method, path, raw=body if method == "POST"
                                          else None, headers=headers)
                    self.assertEqual(status, 403, doc)
                    self.assertIn("--allow-host", doc["error"])
            status = call(base, "GET", "/")[2]
            self.assertEqual((status["waiting"], status["paused"]), (0, False))
            # the app by service name (microblog.pub's http://poussetaches:7991, no Origin),
            # by IP, and the dashboard opened by IP address
            for host in ("poussetaches:7991", "poussetaches", "172.18.0.3:7991",
                         "[fd00::3]:7991", "127.0.0.1:%d" % port, "localhost:%d" % port):
                with self.subTest(allowed=host):
                    self.assertEqual(call(base, "POST", "/", raw=body,
                                          headers={"Host": host})[0], 201)
            lan = "192.168.1.5:%d" % port
            same = {"Host": lan, "Origin": "http://" + lan}
            self.assertEqual(call(base, "POST", "/pause", headers=same)[0], 200)
            self.assertTrue(call(base, "GET", "/")[2]["paused"])
            self.assertEqual(call(base, "GET", "/ui", headers={"Host": lan})[0], 200)
        finally:
            daemon.stop()
        # with an API key no page can call it: any name reaches the key check
        keyed = pt.Daemon(host="0.0.0.0", port=0, data_dir=os.path.join(tmp, "k"),
                          api_key="k3y", paused=True)
        keyed.start()
        try:
            base = "http://127.0.0.1:%d" % keyed.port
            host = {"Host": "tasks.example.com"}
            self.assertEqual(call(base, "GET", "/waiting", headers=host)[0], 401)
            self.assertEqual(call(base, "GET", "/waiting", headers=dict(
                host, Authorization="Bearer k3y"))[0], 200)
        finally:
            keyed.stop()

    def test_loopback_names(self):
        for name in ("localhost", "127.0.0.1", "127.1.2.3", "[::1]", "::1"):
            self.assertTrue(pt.is_loopback_name(name), name)
        for name in ("localhost.", "evil.example", "0.0.0.0", "[::]", "10.0.0.1", "", None,
                     "127.0.0.1.evil.example", "[::ffff:8.8.8.8]"):
            self.assertFalse(pt.is_loopback_name(name), name)
        self.assertTrue(pt.Daemon(host="127.0.0.1", port=0, data_dir="unused").settings.loopback_bound)
        self.assertFalse(pt.Daemon(host="0.0.0.0", port=0, data_dir="unused").settings.loopback_bound)

    # -- the app's secret goes only to the app ------------------------------------------

    def test_key_reaches_allowed_urls_only(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        with receiver() as app, receiver() as other:
            # a task stored before the allow list existed: delivered without the key
            with running_daemon(data_dir=data, paused=True) as d:
                old = call(d.url, "POST", "/", {"url": other.url("/old")})[2]["id"]
            with running_daemon(data_dir=data, auth_key="app-secret",
                                allow_urls=[app.url("/app")]) as d:
                for url in (other.url("/x"), app.url("/application-admin"), app.url("/apps"),
                            app.base.replace("127.0.0.1", "localhost") + "/app/x"):
                    with self.subTest(url=url):
                        self.refused(call(d.url, "POST", "/", {"url": url}), 400, "allowed")
                for url in (app.url("/app/../admin"), app.url("/app/%2e%2e/admin")):
                    with self.subTest(url=url):
                        self.refused(call(d.url, "POST", "/", {"url": url}), 400, "segments")
                for url in (app.url("/app"), app.url("/app/"), app.url("/app/x?y=1")):
                    self.assertEqual(call(d.url, "POST", "/", {"url": url})[0], 201, url)
                got = app.wait_for(3)
                self.assertEqual({g["headers"]["Poussetaches-Auth-Key"] for g in got},
                                 {"app-secret"})
                self.assertTrue(all(g["headers"]["webhook-signature"] for g in got))
                old_got = other.wait_for(1, path="/old")[0]
                self.assertIsNone(old_got["headers"]["Poussetaches-Auth-Key"])
                self.assertIsNone(old_got["headers"]["webhook-signature"])
                self.assertEqual(call(d.url, "GET", "/tasks/" + old)[2]["state"], "success")
                self.assertEqual([g["path"] for g in other.got], ["/old"])

    def test_allow_list_matches_origin_and_path_boundary(self):
        cases = [  # (prefix, url, allowed?) - the tricks found, and what must stay allowed
            ("http://127.0.0.1", "http://127.0.0.11:18001/", False),
            ("http://127.0.0.1", "http://127.0.0.1:8000/", False),
            ("http://127.0.0.1", "http://127.0.0.1/x", True),
            ("http://127.0.0.1", "http://127.0.0.1:80/x", True),
            ("http://127.0.0.1:80/", "http://127.0.0.1/x", True),
            ("http://localhost", "http://localhost:18002/", False),
            ("http://localhost", "http://localhost.localdomain/", False),
            ("http://localhost", "http://127.0.0.1/", False),
            ("http://LOCALHOST/", "http://localhost/a", True),
            ("http://localhost/", "https://localhost/a", False),
            ("https://app.example/", "https://app.example:443/a", True),
            ("http://app:8000/app", "http://app:8000/application-admin", False),
            ("http://app:8000/app", "http://app:8000/app", True),
            ("http://app:8000/app", "http://app:8000/app/", True),
            ("http://app:8000/app", "http://app:8000/app/x/y", True),
            ("http://app:8000/app/", "http://app:8000/app/x", True),
            ("http://app:8000/app/", "http://app:8000/apps", False),
            ("http://app:8000/app", "http://app:8000/APP/x", False),
        ]
        for prefix, url, allowed in cases:
            with self.subTest(prefix=prefix, url=url):
                self.assertEqual(pt.AllowList([prefix]).allows(url), allowed)
        for bad in ("ftp://x/", "http://", "http://u:p@host/", "http://host/?q=1", "app/x"):
            with self.subTest(bad=bad), self.assertRaises(pt.ConfigError):
                pt.AllowList([bad])

    def test_userinfo_and_dot_segments_are_refused(self):
        with receiver() as rx, running_daemon() as d:
            for url in ("http://127.0.0.1:18000@127.0.0.11:18001/", "http://user@127.0.0.1/",
                        "http://:pw@127.0.0.1/", "http://127.0.0.1/a/../b", "http://127.0.0.1/."):
                with self.subTest(url=url):
                    self.refused(call(d.url, "POST", "/", {"url": url}), 400, "url")
            self.still_works(d, rx)

    def test_signature_only_and_empty_key(self):
        with receiver() as rx:
            with running_daemon(auth_key="whsec_" + b64(b"k" * 24), signature_only=True) as d:
                call(d.url, "POST", "/", {"url": rx.url("/signed")})
                got = rx.wait_for(1, path="/signed")[0]["headers"]
                self.assertIsNone(got["Poussetaches-Auth-Key"])
                self.assertTrue(got["webhook-signature"].startswith("v1,"))
            # POUSSETACHES_AUTH_KEY="" (compose's default): the header goes, empty
            with running_daemon(auth_key="") as d:
                call(d.url, "POST", "/", {"url": rx.url("/empty")})
                got = rx.wait_for(1, path="/empty")[0]["headers"]
                self.assertEqual(got["Poussetaches-Auth-Key"], "")
                self.assertIsNone(got["webhook-signature"])
            with running_daemon(auth_key=None) as d:
                call(d.url, "POST", "/", {"url": rx.url("/none")})
                self.assertIsNone(rx.wait_for(1, path="/none")[0]["headers"]["Poussetaches-Auth-Key"])

    def test_start_up_warnings(self):
        with self.assertLogs("poussetaches", "WARNING") as logs:
            with running_daemon(auth_key="k"):
                pass
        self.assertTrue(any("--allow-url" in line and "POUSSETACHES_API_KEY" in line
                            for line in logs.output), logs.output)
        self.assertEqual(pt.Daemon(port=0, data_dir="unused", auth_key="k",
                                   allow_urls=["http://app/"]).warnings(), [])
        exposed = pt.Daemon(host="0.0.0.0", port=0, data_dir="unused").warnings()
        self.assertEqual(len(exposed), 1)
        self.assertIn("POUSSETACHES_API_KEY", exposed[0])
        self.assertEqual(pt.Daemon(host="0.0.0.0", port=0, data_dir="unused",
                                   api_key="k").warnings(), [])

    # -- HTTP input --------------------------------------------------------------------

    def test_smuggling_and_content_length_forms(self):
        with receiver() as rx, running_daemon() as d:
            body = json.dumps({"url": rx.url("/smuggled")}).encode()
            second = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            head = b"POST / HTTP/1.1\r\nHost: localhost\r\n"
            cases = [
                head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
                % (5 + len(second), second),
                head + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + second,
                head + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + second,
                head + b"Transfer-Encoding: identity\r\n\r\n" + second,
                head + b"Content-Length: \xc2\xb2\r\n\r\n" + second,  # '\u00b2' in UTF-8
                head + b"Content-Length: \xb2\r\n\r\n" + second,      # '\u00b2' in Latin-1
                head + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n" + second,
                head + b"Content-Length: 1234567890123456\r\n\r\n" + second,
                head + b"Content-Length: +5\r\n\r\n{}   " + second,
                head + b"Content-Length: -1\r\n\r\n" + second,
                head + b"Content-Length: 0x10\r\n\r\n" + second,
                head + b"Content-Length: 5, 5\r\n\r\n{}   " + second,
            ]
            for request in cases:
                with self.subTest(request=request[:90]):
                    answer = raw_exchange(d.port, request)
                    self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
                    self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)  # nothing ran after
                    self.assertIn(b"Connection: close", answer)
                    self.assertIn(b'{"error":', answer)
            self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 0)
            self.still_works(d, rx)

    def test_header_names_and_values_with_cr_lf_nul(self):
        with receiver() as rx, running_daemon() as d:
            for headers in ({"X-Injected\n": "1"}, {"X-Injected\r\n": "1"}, {"X-A\x00": "1"},
                            {"X-A": "b\x00c"}, {"X-A": "b\rc"}, {"X-A": "b\r"}, {"X-A": "b\n"},
                            {"\nX-A": "1"}, {"X-A:": "1"}, {"X A": "1"}):
                with self.subTest(headers=headers):
                    self.refused(call(d.url, "POST", "/", {"url": rx.url("/h"),
                                                           "headers": headers}), 400, "headers")
            # the same characters in the request's own head
            for line in (b"X-A: b\rc", b"X-A: b\x00c", b"X-A\x00: b", b"X-A\r: b"):
                with self.subTest(line=line):
                    answer = raw_exchange(d.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                                          + line + b"\r\n\r\n")
                    self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
            self.assertEqual(rx.got, [])
            self.still_works(d, rx)

    def test_request_head_over_64_kib(self):
        with receiver() as rx, running_daemon() as d:
            for head in (b"".join(b"X-%d: %s\r\n" % (i, b"a" * 2000) for i in range(40)),
                         b"X-Big: " + b"a" * 66000 + b"\r\n",
                         b"X-Many: 1\r\n" * 101):
                answer = raw_exchange(d.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                                      + head + b"\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:80])
                self.assertIn(b'{"error":', answer)
            # just under the limit is served
            head = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(60))
            answer = raw_exchange(d.port, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: "
                                  b"close\r\n" + head + b"\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:80])
            self.still_works(d, rx)

    def test_max_connections(self):
        with receiver() as rx, running_daemon(max_connections=4) as d:
            idle = [socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
                    for _ in range(4)]
            try:
                # every place is held by an idle connection: one is closed for a newcomer
                self.assertEqual(call(d.url, "GET", "/")[0], 200)
                closed = 0
                for s in idle:
                    s.settimeout(0.05)
                    try:
                        closed += s.recv(1) == b""
                    except socket.timeout:
                        pass
                    except ConnectionResetError:
                        closed += 1
                self.assertGreaterEqual(closed, 1)
            finally:
                for s in idle:
                    s.close()
            # four busy connections (a body that is slow to come): a fifth client waits...
            busy = []
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
                s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
                busy.append(s)
            wait_until(lambda: d.server._active == 4, what="four busy connections", poll=0.02)
            answers = []
            late = threading.Thread(target=lambda: answers.append(call(d.url, "GET", "/")))
            late.start()
            late.join(0.5)
            self.assertEqual(answers, [])
            # ... and is served once one of them closes
            busy.pop().close()
            late.join(WAIT)
            self.assertFalse(late.is_alive())
            self.assertEqual(answers[0][0], 200)
            for s in busy:
                s.close()
            self.still_works(d, rx)

    def test_slowloris_does_not_keep_health_checks_out(self):
        """300 sockets that send a request line and stop held every place for a
        minute; /healthz (no key needed) got no answer, so an orchestrator would
        restart a healthy daemon.  Now a head must come within head_timeout, and
        a stalled head is closed first when places run short."""
        with running_daemon(api_key="k", max_connections=256) as d:
            stalled = []
            try:
                for _ in range(300):
                    s = socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
                    s.sendall(b"GET / HTTP/1.1\r\n")
                    stalled.append(s)
                for _ in range(3):
                    started = time.monotonic()
                    status = call(d.url, "GET", "/healthz", timeout=10)[0]
                    self.assertEqual(status, 200)
                    self.assertLess(time.monotonic() - started, 3.0)
                self.assertLessEqual(len(d.server._by_address.get("127.0.0.1", ())),
                                     pt.DEFAULT_MAX_PER_ADDRESS)
            finally:
                for s in stalled:
                    s.close()

    def test_a_dripped_head_is_cut_at_the_head_deadline(self):
        with running_daemon(head_timeout=0.5) as d:
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                started, ended = time.monotonic(), False
                while time.monotonic() - started < 10:
                    try:
                        s.sendall(b"X")  # a byte of a header line now and then
                        s.settimeout(0.2)
                        if s.recv(1) == b"":
                            ended = True
                            break
                    except socket.timeout:
                        continue
                    except OSError:
                        ended = True
                        break
                self.assertTrue(ended)
                self.assertLess(time.monotonic() - started, 5.0)
            self.assertEqual(call(d.url, "GET", "/")[0], 200)  # a whole head in time is served

    def test_connections_per_client_address(self):
        with running_daemon(max_per_address=3) as d:
            busy = []
            try:
                for _ in range(3):  # three busy connections: a body slow to come
                    s = socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
                    s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
                    busy.append(s)
                # busy: their heads read (a head still coming may be closed for a newcomer)
                wait_until(lambda: d.server._active == 3 and not d.server._state,
                           what="three busy connections", poll=0.02)
                status, headers, doc = call(d.url, "GET", "/")  # a fourth from 127.0.0.1
                self.assertEqual((status, headers["Retry-After"]), (503, "1"))
                self.assertIn("too many connections", doc["error"])
                # another address is served: one client cannot keep the others out
                other = http.client.HTTPConnection("127.0.0.1", d.port, timeout=WAIT,
                                                   source_address=("127.0.0.2", 0))
                try:
                    other.request("GET", "/healthz", headers={"Host": "localhost"})
                    self.assertEqual(other.getresponse().status, 200)
                finally:
                    other.close()
                busy.pop().close()
                wait_until(lambda: d.server._active <= 2, what="a place freed", poll=0.02)
                self.assertEqual(call(d.url, "GET", "/")[0], 200)
            finally:
                for s in busy:
                    s.close()

    # -- quotas and numbers ---------------------------------------------------------------

    def test_quotas_507_then_accepted_after_drain(self):
        with receiver() as rx, running_daemon(paused=True, max_waiting=3,
                                              max_stored_bytes=1000) as d:
            for i in range(3):
                self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/q")})[0], 201)
            self.refused(call(d.url, "POST", "/", {"url": rx.url("/q")}), 507, "--max-waiting")
            call(d.url, "POST", "/resume")
            rx.wait_for(3, path="/q")
            wait_until(lambda: call(d.url, "GET", "/")[2]["waiting"] == 0, what="drained")
            call(d.url, "POST", "/pause")
            big = b64(b"x" * 600)
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/b"), "payload": big})[0], 201)
            self.refused(call(d.url, "POST", "/", {"url": rx.url("/b"), "payload": big}), 507,
                         "--max-stored-bytes")
            self.assertEqual(call(d.url, "GET", "/")[2]["waiting"], 1)
            call(d.url, "POST", "/resume")
            rx.wait_for(1, path="/b")
            wait_until(lambda: call(d.url, "GET", "/")[2]["waiting"] == 0, what="drained")
            self.assertEqual(d.store.waiting_bytes, 0)
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/b"), "payload": big})[0], 201)
            self.still_works(d, rx)

    def test_non_finite_numbers_are_refused(self):
        with receiver() as rx, running_daemon() as d:
            url = json.dumps(rx.url("/n"))
            for text in ('{"url": %s, "json": 1e999}', '{"url": %s, "json": -1e999}',
                         '{"url": %s, "json": {"a": [1, 2e400]}}', '{"url": %s, "json": NaN}',
                         '{"url": %s, "json": Infinity}', '{"url": %s, "delay_s": 1e999}'):
                with self.subTest(text=text):
                    self.refused(call(d.url, "POST", "/", raw=(text % url).encode()), 400)
            self.assertEqual(rx.got, [])
            self.still_works(d, rx)

    # -- data at rest ------------------------------------------------------------------

    def data_dir(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        os.mkdir(data, 0o700)
        target = os.path.join(tmp, "precious")
        with open(target, "wb") as f:
            f.write(b"do not touch\n")
        return data, target

    def test_symlinks_and_loose_modes_refuse_to_start(self):
        for name in ("lock", "journal.000001", "snapshot.json", "snapshot.json.tmp"):
            with self.subTest(name=name):
                data, target = self.data_dir()
                os.symlink(target, os.path.join(data, name))
                with self.assertRaises(pt.ConfigError) as ctx:
                    pt.Daemon(host="127.0.0.1", port=0, data_dir=data).start()
                self.assertIn("symbolic link", str(ctx.exception))
                with open(target, "rb") as f:
                    self.assertEqual(f.read(), b"do not touch\n")
        for mode in (0o770, 0o707, 0o777):
            with self.subTest(mode=oct(mode)):
                data, _ = self.data_dir()
                os.chmod(data, mode)
                with self.assertRaises(pt.ConfigError) as ctx:
                    pt.Daemon(host="127.0.0.1", port=0, data_dir=data).start()
                self.assertIn("chmod 700", str(ctx.exception))
                self.assertEqual(os.listdir(data), [])

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "giving the data dir to another user needs root")
    def test_data_dir_of_another_user_refuses_to_start(self):
        data, _ = self.data_dir()
        os.chown(data, 12345, 12345)
        with self.assertRaises(pt.ConfigError) as ctx:
            pt.Daemon(host="127.0.0.1", port=0, data_dir=data).start()
        self.assertIn("chown", str(ctx.exception))
        self.assertEqual(os.listdir(data), [])

    def test_symlink_planted_later_fails_safely(self):
        data, target = self.data_dir()
        with receiver() as rx, running_daemon(data_dir=data) as d:
            self.assertEqual(call(d.url, "POST", "/", {"url": rx.url("/a")})[0], 201)
            os.symlink(target, d.store.journal.path(d.store.journal.seq + 1))
            with self.assertRaises((OSError, pt.PersistError)):
                d.store.snapshot()  # rotates into the planted name: refused
            self.assertGreaterEqual(d.store.journal.errors, 1)
            # the persister moves on to the next journal file: enqueues work again
            wait_until(lambda: call(d.url, "POST", "/", {"url": rx.url("/c")})[0] == 201,
                       what="recovery")
            with open(target, "rb") as f:
                self.assertEqual(f.read(), b"do not touch\n")
            self.errors.records = []  # the journal errors above were logged on purpose
            self.still_works(d, rx)

    # -- answers -----------------------------------------------------------------------

    def test_headers_on_every_answer_and_healthz_without_key(self):
        with running_daemon(api_key="k") as d:
            auth = {"Authorization": "Bearer k"}
            for method, path, headers, status in (
                    ("GET", "/", auth, 200), ("GET", "/nope", auth, 404), ("DELETE", "/", auth, 405),
                    ("GET", "/", {}, 401), ("GET", "/", {"Origin": "http://e.example"}, 403),
                    ("POST", "/", auth, 400), ("GET", "/metrics", auth, 200),
                    ("GET", "/healthz", {}, 200), ("GET", "/waiting", auth, 200)):
                with self.subTest(path=path, status=status):
                    answer = call(d.url, method, path, headers=headers)
                    self.assertEqual(answer[0], status)
                    self.assertEqual(answer[1]["X-Content-Type-Options"], "nosniff")
            status, headers, doc = call(d.url, "GET", "/healthz")
            self.assertEqual((status, doc), (200, {"ok": True}))
            status, headers, _ = call(d.url, "GET", "/ui", headers=auth)
            self.assertIn("frame-ancestors 'none'", headers["Content-Security-Policy"])
            self.assertEqual(headers["X-Frame-Options"], "DENY")

    @unittest.skipUnless(socket.has_ipv6, "this Python has no IPv6")
    def test_ipv6_loopback(self):
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            self.skipTest("no IPv6 loopback on this machine")
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        daemon = pt.Daemon(host="::1", port=0, data_dir=os.path.join(tmp, "d"))
        daemon.start()
        try:
            self.assertTrue(daemon.settings.loopback_bound)
            conn = http.client.HTTPConnection("::1", daemon.port, timeout=WAIT)
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        finally:
            daemon.stop()


# --------------------------------------------------------------------------
# Client: PousseTaches, the async client, task functions and their endpoint, testing
# --------------------------------------------------------------------------


class TestClient(unittest.TestCase):
    """The PousseTaches client against a real daemon."""

    def setUp(self):
        self.rx = Receiver()
        self.addCleanup(self.rx.close)
        self.ctx = running_daemon(auth_key="whsec_" + b64(b"k" * 24), max_tries=1)
        self.d = self.ctx.__enter__()
        self.addCleanup(self.ctx.__exit__, None, None, None)
        self.client = pt.PousseTaches(self.d.url, self.rx.base, auth_key="whsec_" + b64(b"k" * 24))
        self.addCleanup(self.client.close)

    def test_push_and_parse_like_the_original(self):
        task_id = self.client.push({"note": "hi", "n": [1, 2]}, "/tasks/note")
        self.assertRegex(task_id, r"^[0-9a-f]{32}$")
        got = self.rx.wait_for(1)[0]
        headers = {k: v for k, v in got["headers"].items()}
        for request in (None, FakeFlaskRequest(got["headers"], got["body"]),
                        FakeDjangoRequest(headers, got["body"])):
            with self.subTest(request=type(request).__name__):
                if request is None:
                    env = self.client.parse(headers=headers, body=got["body"])
                else:
                    env = self.client.parse(request)
                self.assertEqual(env.payload, {"note": "hi", "n": [1, 2]})
                self.assertEqual(env.tries, 1)
                self.assertEqual(env.req_id, got["json"]["req_id"])
                self.assertEqual(env.task_id, task_id)

    def test_parse_rejects_bad_key_signature_and_body(self):
        self.client.push({"a": 1}, "/t")
        got = self.rx.wait_for(1)[0]
        headers = dict(got["headers"].items())
        # the signature alone is enough
        only_sig = {k: v for k, v in headers.items() if k.lower() != "poussetaches-auth-key"}
        self.assertEqual(self.client.parse(headers=only_sig, body=got["body"]).payload, {"a": 1})
        cases = {
            "tampered body": (only_sig, got["body"].replace(b'"tries": 1', b'"tries": 2')),
            "wrong key": (dict(headers, **{"Poussetaches-Auth-Key": "nope",
                                           "webhook-signature": "v1,AAAA"}), got["body"]),
            "nothing": ({}, got["body"]),
        }
        for name, (hdrs, body) in cases.items():
            with self.subTest(name), self.assertRaises(pt.AuthError):
                self.client.parse(headers=hdrs, body=body)
        with self.assertRaises(pt.AuthError) as ctx:
            self.client.parse(headers=only_sig, body=got["body"], now=time.time() + 3600)
        self.assertIn("timestamp", str(ctx.exception))
        with self.assertRaises(pt.InvalidEnvelope):
            self.client.parse(headers=headers, body=b'{"x": 1}')
        # no key on the app's side: every delivery is refused, saying how to fix it,
        # unless the app says insecure=True (which warns once, when made)
        no_key = pt.PousseTaches(self.d.url, auth_key="")
        for hdrs in ({}, headers):
            with self.assertRaises(pt.AuthError) as ctx:
                no_key.parse(headers=hdrs, body=got["body"])
            self.assertIn("set POUSSETACHES_AUTH_KEY", str(ctx.exception))
        with self.assertLogs("poussetaches", "WARNING") as logs:
            open_client = pt.PousseTaches(self.d.url, auth_key="", insecure=True)
        self.assertIn("insecure=True", logs.output[0])
        self.assertEqual(open_client.parse(headers={}, body=got["body"]).payload, {"a": 1})
        no_key.auth_key = self.client.auth_key  # set as on the original client
        self.assertEqual(no_key.parse(headers=headers, body=got["body"]).payload, {"a": 1})

    def test_listings_as_the_original_objects(self):
        task_id = self.client.push({"later": True}, "/later", delay=5)
        cron_id = self.client.push({"c": 1}, "/cron", schedule="0 3 * * *")
        waiting = {t.task_id: t for t in self.client.get_waiting()}
        self.assertEqual(set(waiting), {task_id, cron_id})
        t = waiting[task_id]
        self.assertEqual((t.payload, t.expected, t.schedule, t.tries, t.url),
                         ({"later": True}, 200, "", 0, self.rx.url("/later")))
        self.assertIsInstance(t.next_run, datetime)
        self.assertAlmostEqual(t.next_run.timestamp(), time.time() + 300, delta=10)
        self.assertEqual([c.task_id for c in self.client.get_cron()], [cron_id])
        self.assertEqual(self.client.get_success(), [])
        self.assertEqual(self.client.get_dead(), [])
        self.rx.answers["/fail"] = [(500, b"bad thing")]
        failing = self.client.push({}, "/fail")
        wait_until(lambda: self.client.get_dead(), what="dead")
        dead = self.client.get_dead()[0]
        self.assertEqual((dead.task_id, dead.last_error_status_code, dead.last_error_body),
                         (failing, 500, "bad thing"))

    def test_extra_fields_and_calls(self):
        task_id = self.client.push({}, "/x", delay_s=600, idempotency_key="once",
                                   headers={"X-A": "b"}, max_tries=3)
        self.assertEqual(self.client.push({}, "/x", delay_s=600, idempotency_key="once"), task_id)
        task = self.client.get_task(task_id)
        self.assertEqual((task.state, task.raw["max_tries"]), ("waiting", 3))
        self.client.pause()
        self.assertTrue(self.client.status()["paused"])
        self.client.resume()
        self.client.run(task_id)
        self.rx.wait_for(1, path="/x")
        wait_until(lambda: self.client.get_task(task_id).state == "success", what="success")
        self.assertEqual(self.client.cancel(task_id)["state"], "success")
        with self.assertRaises(pt.ClientError) as ctx:
            self.client.get_task(task_id)
        self.assertEqual(ctx.exception.status, 404)
        self.assertEqual(self.client.retry_dead(url_prefix="http://nowhere/"), 0)

    def test_keeps_its_connection_alive(self):
        self.client.push({}, "/a", delay_s=60)
        sock = self.client._local.conn.sock
        for _ in range(5):
            self.client.push({}, "/a", delay_s=60)
        self.assertIs(self.client._local.conn.sock, sock)

    def test_errors(self):
        with self.assertRaises(pt.ClientError) as ctx:
            self.client.push({}, "", schedule="bogus")  # base_url + "" is a valid URL
        self.assertEqual(ctx.exception.status, 400)
        self.assertIn("invalid cron spec", str(ctx.exception))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_url = "http://127.0.0.1:%d" % s.getsockname()[1]
        s.close()
        with self.assertRaises(pt.DaemonUnavailable):
            pt.PousseTaches(dead_url, "http://app").push({}, "/x")
        with self.assertRaises(ValueError):
            pt.PousseTaches("ftp://x")


class TestAsyncClient(unittest.TestCase):
    """AsyncPousseTaches against a real daemon, from one loop or several."""

    def test_async_client_under_asyncio_run(self):
        import asyncio
        key = "whsec_" + b64(b"a" * 24)
        with receiver() as rx, running_daemon(auth_key=key, paused=True) as d:
            async def main():
                client = pt.AsyncPousseTaches(d.url, rx.base, auth_key=key)
                try:
                    one = await client.push({"n": 1}, "/a", queue="q1", priority=5)
                    many = await client.push_many([{"payload": {"n": i}, "path": "/m"}
                                                   for i in range(1200)])
                    twin = await client.push({}, "/c", schedule="@daily")
                    again = await client.push({}, "/c", schedule="@daily")
                    waiting = await client.get_waiting()  # streamed: chunked answer
                    cron = await client.get_cron()
                    task = await client.get_task(one[:8])
                    status = await client.status()
                    await client.resume()
                    with self.assertRaises(pt.ClientError) as ctx:
                        await client.push({}, "/x", priority=1000)
                    return one, many, twin, again, waiting, cron, task, status, ctx.exception
                finally:
                    await client.close()
            one, many, twin, again, waiting, cron, task, status, error = asyncio.run(main())
            self.assertEqual(len(many), 1200)
            self.assertEqual(len(set(many)), 1200)
            self.assertEqual(twin, again)
            self.assertEqual(len(waiting), 1202)
            self.assertEqual([c.task_id for c in cron], [twin])
            self.assertEqual((task.task_id, task.raw["queue"], task.raw["priority"]),
                             (one, "q1", 5))
            self.assertTrue(status["paused"])
            self.assertEqual(error.status, 400)
            got = rx.wait_for(1, path="/a")[0]
            envelope = pt.AsyncPousseTaches(d.url, auth_key=key).parse(
                headers=dict(got["headers"].items()), body=got["body"])
            self.assertEqual(envelope.payload, {"n": 1})

    def test_one_client_serves_every_event_loop(self):
        """Made once at import, as an app does, and used from two asyncio.run in a
        row, then from two loops at once in two threads: a connection per loop
        (one shared connection failed with "attached to a different loop")."""
        import asyncio
        with running_daemon(paused=True) as d:
            client = pt.AsyncPousseTaches(d.url, "http://127.0.0.1:9")

            async def work(n):
                ids = [await client.push({"n": i}, "/t") for i in range(n)]
                status = await client.status()
                await client.close()
                return ids, status["waiting"]

            def use(n):
                return asyncio.run(asyncio.wait_for(work(n), WAIT))
            first, _ = use(3)
            second, _ = use(3)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                both = list(pool.map(use, (20, 20)))
            ids = first + second + both[0][0] + both[1][0]
            self.assertEqual(len(set(ids)), 46)
            self.assertEqual(call(d.url, "GET", "/")[2]["waiting"], 46)

    def test_a_call_cancelled_mid_exchange_leaves_no_answer_behind(self):
        """A cancelled call left its answer unread on the kept-alive connection: the
        next call on that loop read it as its own (a push could return another id)."""
        import asyncio

        class Slow(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path == "/slow":
                    time.sleep(0.5)
                body = json.dumps({"answer_to": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        server = QuietServer(("127.0.0.1", 0), Slow)
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        client = pt.AsyncPousseTaches("http://127.0.0.1:%d" % server.server_port)

        async def main():
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(client.request("GET", "/slow"), 0.1)
            return await asyncio.wait_for(client.request("GET", "/fast"), WAIT)
        self.assertEqual(asyncio.run(main()), {"answer_to": "/fast"})

    def test_the_sync_client_keeps_one_finalizer_a_thread(self):
        import weakref
        with running_daemon(paused=True) as d:
            client = pt.PousseTaches(d.url)
            before = len(weakref.finalize._registry)
            for _ in range(50):
                client.status()
                client.close()
            self.assertLessEqual(len(weakref.finalize._registry) - before, 1)
            # a local write error is the caller's, not "cannot reach poussetaches"

            class Full(io.RawIOBase):
                def write(self, data):
                    raise OSError(28, "No space left on device")
            with self.assertRaises(OSError) as ctx:
                client.download("/backup", Full())
            self.assertNotIsInstance(ctx.exception, pt.PousseTachesError)
            client.close()

    def test_a_bad_answer_head_is_refused(self):
        """The async client reads an answer's head with the sync client's strict
        reader: a header line without a colon, a head past 64 KiB, no status."""
        import asyncio
        answers = [b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
                   b"nonsense\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"]
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def serve():
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(answer)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client = pt.AsyncPousseTaches("http://127.0.0.1:%d" % listener.getsockname()[1])

        async def main():
            errors = []
            for _ in answers:
                with self.assertRaises(pt.DaemonUnavailable) as ctx:
                    await asyncio.wait_for(client.status(), WAIT)
                errors.append(str(ctx.exception))
            return errors
        errors = asyncio.run(main())
        server.join(WAIT)
        self.assertIn("bad header line", errors[0])
        self.assertIn("larger than", errors[1])
        self.assertIn("not an HTTP answer", errors[2])
        self.assertIn("conflicting Content-Length", errors[3])

    def test_async_client_has_every_call_of_the_sync_one(self):
        """SPEC 7: the same methods, coroutines wherever there is I/O.  The sync
        client, against the same daemon, is the oracle for each answer."""
        import asyncio
        import inspect
        public = lambda cls: {name for name, value in inspect.getmembers(cls, callable)
                              if not name.startswith("_")}
        self.assertEqual(public(pt.PousseTaches) - public(pt.AsyncPousseTaches), set())
        gone = "http://127.0.0.1:9"  # discard: refused, so max_tries=1 makes them dead
        with running_daemon(max_tries=1) as d:
            sync = pt.PousseTaches(d.url, gone)
            self.addCleanup(sync.close)
            dead = [sync.push({}, "/one"), sync.push({}, "/two"), sync.push({}, "/two")]
            wait_until(lambda: sync.listing("dead")["total"] == 3, what="three dead tasks")

            async def main():
                client = pt.AsyncPousseTaches(d.url, gone)
                calls = {}
                try:
                    for name in public(pt.AsyncPousseTaches) - {"parse", "request", "close"}:
                        self.assertTrue(inspect.iscoroutinefunction(getattr(client, name))
                                        or name in vars(pt._ApiCalls)
                                        or name in vars(pt._AppSide), name)
                    calls["pause"] = await client.pause()
                    calls["set_queue"] = await client.set_queue("mail", rate=5, concurrency=2)
                    calls["pause_queue"] = await client.pause_queue("mail")
                    calls["ids"] = await client.batch([{"url": gone + "/b", "queue": "mail"}] * 3)
                    calls["enqueue"] = await client.enqueue({"url": gone + "/e", "queue": "mail"})
                    calls["listing"] = await client.listing("waiting", limit=2, queue="mail")
                    calls["queue"] = await client.queue("mail")
                    calls["queues"] = await client.queues()
                    # the oracle, at the same moment (a blocking call: fine in a test)
                    calls["oracle"] = (sync.listing("waiting", limit=2, queue="mail"),
                                       sync.queues())
                    calls["retry_dead"] = await client.retry_dead(gone + "/one")
                    calls["purge_dead"] = await client.purge_dead()
                    calls["preview"] = await client.preview_cron("@daily", 3)
                    await client.push({}, "/c", schedule="@hourly")
                    calls["delete_cron"] = await client.delete_cron()
                    calls["resume_queue"] = await client.resume_queue("mail")
                    await client.set_queue("spare", rate=1)
                    calls["delete_queue"] = await client.delete_queue("spare")
                    calls["run"] = await client.run(calls["ids"][0], max_tries=7)
                    calls["cancel"] = await client.cancel(calls["ids"][1])
                    with self.assertRaises(pt.ClientError) as ctx:
                        await client.get_task(calls["ids"][1])
                    calls["missing"] = ctx.exception.status
                    return calls
                finally:
                    await client.close()

            calls = asyncio.run(main())
            self.assertTrue(calls["pause"]["paused"])
            self.assertEqual(calls["set_queue"]["settings"], {"rate": 5, "concurrency": 2})
            self.assertTrue(calls["pause_queue"]["settings"]["paused"])
            ageless = lambda queues: [dict(q, oldest_due_age_s=None) for q in queues]
            self.assertEqual((calls["listing"], ageless(calls["queues"])),
                             (calls["oracle"][0], ageless(calls["oracle"][1])))
            self.assertEqual(calls["listing"]["total"], 4)
            self.assertEqual(sync.get_task(calls["enqueue"]["id"]).raw["queue"], "mail")
            self.assertEqual((calls["queue"]["name"], calls["queue"]["waiting"]), ("mail", 4))
            self.assertEqual((calls["retry_dead"], calls["purge_dead"]), (1, 2))
            self.assertEqual(sync.get_task(dead[0]).raw["state"], "waiting")
            self.assertEqual(calls["preview"], sync.preview_cron("@daily", 3))
            self.assertEqual((calls["delete_cron"], sync.get_cron()), (1, []))
            self.assertFalse(calls["resume_queue"]["settings"].get("paused"))
            self.assertEqual(calls["delete_queue"]["deleted"], "spare")
            self.assertEqual((calls["run"].task_id, calls["run"].raw["max_tries"]),
                             (calls["ids"][0], 7))
            self.assertEqual(calls["missing"], 404)

    def test_push_many_sync(self):
        with running_daemon(paused=True) as d:
            client = pt.PousseTaches(d.url, "http://127.0.0.1:9")
            self.addCleanup(client.close)
            ids = client.push_many([{"payload": i, "path": "/p", "idempotency_key": "k%d" % (i % 3)}
                                    for i in range(1200)])
            self.assertEqual(len(ids), 1200)
            self.assertEqual(len(set(ids)), 3)  # three keys: the rest are twins
            with self.assertRaises(pt.ClientError) as ctx:
                client.push_many([{"payload": 1, "path": "/p"}, {"payload": 1, "path": "/p",
                                                                  "max_tries": 0}])
            self.assertIn("tasks[1]", str(ctx.exception))


class TestTaskFunctions(unittest.TestCase):
    """Task functions against a real daemon, their endpoint in a real WSGI server."""

    def setUp(self):
        self.calls = []
        self.app = pt.PousseTaches(auth_key=KEY)
        app = self.app

        @app.task(name="notes.add")
        def add(text, *, n=1, tags=()):
            ctx = pt.current_task()
            self.calls.append(("add", text, n, tags, ctx and (ctx.task_id, ctx.tries,
                                                              ctx.queue, ctx.name)))
            return n + 1

        @app.task(name="later")
        def later():
            raise pt.Retry("the mail server said 421", after=120)

        @app.task(name="refuse")
        def refuse(why):
            raise pt.Reject(why)

        @app.task(name="crash", max_tries=2)
        def crash():
            self.calls.append(("crash", pt.current_task().tries))
            raise ValueError("caf\u00e9 \u2603 is closed")

        self.add, self.later, self.refuse, self.crash = add, later, refuse, crash
        self.ctx = contextlib.ExitStack()
        self.addCleanup(self.ctx.close)
        base = self.ctx.enter_context(serving_wsgi(app.wsgi()))
        self.d = self.ctx.enter_context(running_daemon(auth_key=KEY, allow_urls=[base + "/"],
                                                       max_backoff=3600))
        app._point_at(self.d.url)
        app.base_url = base
        self.addCleanup(app.close)

    def state(self, task_id):
        return call(self.d.url, "GET", "/tasks/" + task_id)[2]

    def settled(self, task_id, tries=1):
        return wait_until(lambda: (lambda t: t if t["tries"] >= tries and
                                   t["state"] != "waiting" or t["tries"] > tries else None)(
            self.state(task_id)), what="task %s tried" % task_id)

    def test_a_push_calls_the_function_with_its_arguments(self):
        task_id = self.add.push("h\u00e9llo \u2603", n=41, tags=["a", "b"])
        done = self.settled(task_id)
        self.assertEqual(done["state"], "success")
        self.assertEqual(self.calls, [("add", "h\u00e9llo \u2603", 41, ["a", "b"],
                                       (task_id, 1, "default", "notes.add"))])
        self.assertEqual(done["url"], self.app.base_url + "/_tasks/notes.add")
        self.assertEqual(json.loads(base64.b64decode(done["payload"])),
                         {"task": "notes.add", "args": ["h\u00e9llo \u2603"],
                          "kwargs": {"n": 41, "tags": ["a", "b"]}})
        # still a plain function, outside any delivery
        self.assertEqual(self.add("direct"), 2)
        self.assertIsNone(self.calls[-1][-1])
        self.assertEqual((self.add.__name__, self.add.name, repr(self.add)),
                         ("add", "notes.add", "<task notes.add>"))

    def test_options_push_many_and_a_named_schedule(self):
        queued = self.add.options(queue="notes", priority=5, delay_s=3600)
        task_id = queued.push("x")
        task = self.state(task_id)
        self.assertEqual((task["queue"], task["priority"], task["state"]),
                         ("notes", 5, "waiting"))
        self.assertGreater(task["next_run"], time.time_ns() + 3000 * 10 ** 9)
        self.assertEqual(self.add.defaults, {})  # options() made a copy
        ids = self.add.push_many([("one",), {"text": "two", "n": 2}, ("three",)])
        self.assertEqual(len(set(ids)), 3)
        for task_id in ids:
            self.assertEqual(self.settled(task_id)["state"], "success")
        self.assertEqual(sorted(c[1:3] for c in self.calls),
                         [("one", 1), ("three", 1), ("two", 2)])
        # one non-JSON argument anywhere: TypeError before anything is sent
        before = call(self.d.url, "GET", "/")[2]
        with self.assertRaises(TypeError) as ctx:
            self.add.push_many([("ok",), (object(),)])
        self.assertIn("must be JSON", str(ctx.exception))
        for bad in (object(), float("nan"), {1j: 1}):
            with self.subTest(bad=bad), self.assertRaises(TypeError):
                self.add.push(bad)
        self.assertEqual(call(self.d.url, "GET", "/")[2], before)
        # a named cron; scheduling it again with another spec replaces it
        cron_id = self.add.schedule("nightly-notes", "0 3 * * *", "cron")
        self.assertEqual(self.add.schedule("nightly-notes", "0 4 * * *", "cron"), cron_id)
        crons = call(self.d.url, "GET", "/cron")[2]["tasks"]
        self.assertEqual([(c["id"], c["schedule"], c["name"]) for c in crons],
                         [(cron_id, "0 4 * * *", "nightly-notes")])

    def test_retry_honours_retry_after(self):
        task_id = self.later.push()
        task = wait_until(lambda: (lambda t: t if t["tries"] == 1 else None)(
            self.state(task_id)), what="first attempt")
        self.assertEqual((task["state"], task["last_error_status_code"]), ("waiting", 503))
        self.assertEqual(base64.b64decode(task["last_error_body"]),
                         b"Retry: the mail server said 421")
        # min_backoff is 50 ms: only the Retry-After of 120 s can put it 2 minutes out
        self.assertGreater(task["next_run"], time.time_ns() + 100 * 10 ** 9)

    def test_a_task_asking_for_later_is_not_the_app_down(self):
        """Five 503s in a row open an origin's circuit; five Retry raised by task
        functions are the app answering, and hold none of its other tasks."""
        ids = [self.later.push() for _ in range(6)]
        wait_until(lambda: all(self.state(i)["tries"] == 1 for i in ids), what="six Retry")
        self.assertEqual(call(self.d.url, "GET", "/")[2]["open_breakers"], [])
        task_id = self.add.push("still served")
        self.assertEqual(self.settled(task_id)["state"], "success")

    def test_reject_is_dead_at_once_with_its_reason(self):
        task_id = self.refuse.push("no such user: 42")
        task = self.settled(task_id)
        self.assertEqual((task["state"], task["tries"], task["last_error_status_code"]),
                         ("dead", 1, 410))
        self.assertEqual(base64.b64decode(task["last_error_body"]).decode(),
                         "Reject: no such user: 42")

    def test_an_exception_is_retried_with_its_text_and_traceback_logged(self):
        with self.assertLogs("poussetaches", "ERROR") as logs:
            task_id = self.crash.push()
            task = self.settled(task_id, tries=2)
        self.assertEqual((task["state"], task["tries"], task["last_error_status_code"]),
                         ("dead", 2, 500))
        self.assertEqual(base64.b64decode(task["last_error_body"]).decode(),
                         "ValueError: caf\u00e9 \u2603 is closed")
        self.assertEqual([c for c in self.calls if c[0] == "crash"], [("crash", 1), ("crash", 2)])
        failures = [r for r in logs.records if r.getMessage().startswith("task crash (")]
        self.assertEqual(len(failures), 2, logs.output)
        self.assertIsInstance(failures[0].exc_info[1], ValueError)  # the traceback goes along
        # the CLI's show prints the text, not an HTML page
        out = subprocess.run([sys.executable, os.path.join(HERE, "poussetaches.py"), "--url",
                              self.d.url, "show", task_id], capture_output=True, text=True,
                             timeout=WAIT)
        self.assertIn("ValueError: caf\u00e9 \u2603 is closed", out.stdout)

    def test_an_unknown_name_is_a_404_naming_the_known_ones_and_retried(self):
        other = pt.PousseTaches(self.d.url, self.app.base_url, auth_key=KEY)
        self.addCleanup(other.close)
        ghost = other.task(name="ghost", max_tries=2)(lambda: None)
        task_id = ghost.push()
        task = self.settled(task_id, tries=2)
        self.assertEqual((task["state"], task["tries"], task["last_error_status_code"]),
                         ("dead", 2, 404))  # retried: a deploy may be half done
        text = base64.b64decode(task["last_error_body"]).decode()
        self.assertIn("'ghost'", text)
        for name in ("crash", "later", "notes.add", "refuse"):
            self.assertIn(name, text)

    def test_bad_credentials_or_envelope_never_call_the_function(self):
        endpoint = self.app.base_url + "/_tasks/notes.add"
        good = envelope_of({"task": "notes.add", "args": ["x"], "kwargs": {}})
        stale = int(time.time()) - 3600
        cases = {
            "no key": (403, {}, good),
            "wrong key": (403, {"Poussetaches-Auth-Key": "nope"}, good),
            "forged signature": (403, signed_headers("whsec_" + b64(b"x" * 24), good), good),
            "tampered body": (403, signed_headers(KEY, good),
                              good.replace(b'"tries": 1', b'"tries": 2')),
            "old signature": (403, signed_headers(KEY, good, stamp=stale), good),
            "unknown name, no key": (403, {}, good),
            "not an envelope": (400, {"Poussetaches-Auth-Key": KEY}, b'{"x": 1}'),
            "not JSON": (400, {"Poussetaches-Auth-Key": KEY}, b"\xff\xfe"),
            "payload not a call": (400, {"Poussetaches-Auth-Key": KEY}, envelope_of([1, 2])),
            "args not a list": (400, {"Poussetaches-Auth-Key": KEY},
                                envelope_of({"args": "x", "kwargs": {}})),
        }
        for name, (status, headers, body) in cases.items():
            with self.subTest(name):
                url = endpoint.replace("notes.add", "ghost") if "unknown" in name else endpoint
                got = call(self.app.base_url, "POST", url[len(self.app.base_url):], raw=body,
                           headers=headers)
                self.assertEqual(got[0], status, got)
                self.assertIn(b"text/plain", got[1]["Content-Type"].encode())
        got = call(self.app.base_url, "GET", "/_tasks/notes.add")
        self.assertEqual((got[0], got[1]["Allow"]), (405, "POST"))
        got = call(self.app.base_url, "POST", "/_tasks/notes.add", raw=b"x" * 10,
                   headers={"Content-Length": str(64 << 20), "Poussetaches-Auth-Key": KEY})
        self.assertEqual(got[0], 413)
        self.assertEqual(self.calls, [])
        # the right key, or a good signature alone, does call it
        for headers in ({"Poussetaches-Auth-Key": KEY}, signed_headers(KEY, good)):
            self.assertEqual(call(self.app.base_url, "POST", "/_tasks/notes.add", raw=good,
                                  headers=headers)[0], 200)
        self.assertEqual(len(self.calls), 2)

    def test_a_signed_delivery_is_bound_to_its_task_and_id(self):
        """An attacker's pass: a captured signed delivery, sent again to another
        task's path with a forged Poussetaches-Task-ID header, ran that task under
        the forged id (the signature covered the body, not the target)."""
        signed = pt.PousseTaches(auth_key=KEY)
        ran = []
        signed.task(name="newsletter")(lambda who: ran.append(("newsletter", who,
                                                              pt.current_task().task_id)))
        signed.task(name="delete_account")(lambda who: ran.append(("delete", who)))
        body = envelope_of({"task": "newsletter", "args": ["42"], "kwargs": {}})
        headers = dict(signed_headers(KEY, body, task_id="real-id"),
                       **{"Poussetaches-Task-ID": "forged-id"})
        with serving_wsgi(signed.wsgi()) as base:
            replayed = call(base, "POST", "/_tasks/delete_account", raw=body, headers=headers)
            self.assertEqual(replayed[0], 403)
            self.assertIn(b"for task 'newsletter', not 'delete_account'", replayed[2])
            self.assertEqual(call(base, "POST", "/_tasks/newsletter", raw=body,
                                  headers=headers)[0], 200)
        self.assertEqual(ran, [("newsletter", "42", "real-id")])  # the signed id

    def test_what_can_be_refused_is_refused_before_the_body(self):
        """A POST announcing 32 MiB without credentials was read whole first: eight
        such connections grew the app by 288 MiB."""
        with serving_wsgi(self.app.wsgi()) as base:
            port = int(base.rsplit(":", 1)[1])
            for head, status in ((b"POST /_tasks/notes.add HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 33554000\r\n\r\n", b" 403 "),
                                 (b"POST /_tasks/notes.add HTTP/1.1\r\nHost: x\r\n"
                                  b"webhook-id: a\r\nwebhook-signature: v1,x\r\n"
                                  b"webhook-timestamp: 1\r\nContent-Length: 33554000\r\n\r\n",
                                  b" 403 "),
                                 (b"GET /_tasks/notes.add HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 33554000\r\n\r\n", b" 405 ")):
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                    sock.sendall(head)  # and no body: the answer must come anyway
                    self.assertIn(status, sock.recv(200).split(b"\r\n")[0] + b" ")
        # hostile JSON after the key: a 400, not the framework's 500
        deep = b'{"payload": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        with serving_wsgi(self.app.wsgi()) as base:
            self.assertEqual(call(base, "POST", "/_tasks/notes.add", raw=deep,
                                  headers={"Poussetaches-Auth-Key": KEY})[0], 400)
        self.assertEqual(self.calls, [])

    def test_keys_are_checked_when_given(self):
        """A loosely decoded whsec_ key ("whsec_!?") was an empty HMAC key, which
        anyone can sign with; a list set through auth_key failed every delivery."""
        for bad in ("whsec_!@#$%^&*()-?", "whsec_", "whsec_====", "whsec_AAAA", "whsec_abc",
                    b"bytes-key", 42):
            with self.subTest(key=bad):
                with self.assertRaises(pt.ConfigError):
                    pt.PousseTaches(auth_key=bad)
                if isinstance(bad, str):
                    with self.assertRaises(pt.ConfigError) as ctx:
                        pt.Daemon(port=0, data_dir="unused", auth_key=bad)
                    self.assertIn("POUSSETACHES_AUTH_KEY", str(ctx.exception))
        client = pt.PousseTaches(auth_key=KEY)
        client.auth_key = ["k1", "k2", ""]
        self.assertEqual(client.auth_keys, ("k1", "k2"))
        with self.assertRaises(pt.ConfigError):
            client.auth_key = ["k1", "whsec_AAAA"]
        with self.assertRaises(pt.ConfigError):
            pt.Daemon(port=0, data_dir="unused", max_backoff=float("inf"))

    def test_with_no_key_the_endpoint_refuses_unless_insecure(self):
        bare = pt.PousseTaches("http://127.0.0.1:9", auth_key="")
        ran = []
        bare.task(name="t")(lambda: ran.append(1))
        with self.assertLogs("poussetaches", "WARNING"):
            loose = pt.PousseTaches("http://127.0.0.1:9", auth_key="", insecure=True)
        loose.task(name="t")(lambda: ran.append(2))
        body = envelope_of({"task": "t", "args": [], "kwargs": {}})
        with serving_wsgi(bare.wsgi()) as base:
            status, _, text = call(base, "POST", "/_tasks/t", raw=body)
        self.assertEqual(status, 403)
        self.assertIn(b"set POUSSETACHES_AUTH_KEY to the same secret for the daemon and the app",
                      text)
        with serving_wsgi(loose.wsgi()) as base:
            self.assertEqual(call(base, "POST", "/_tasks/t", raw=body)[0], 200)
        self.assertEqual(ran, [2])

    def test_wrapping_an_app_passes_other_paths_through(self):
        def inner(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"app " + environ["PATH_INFO"].encode()]
        with serving_wsgi(self.app.wsgi(inner)) as base:
            for path in ("/", "/_tasks", "/_tasksx/notes.add", "/about"):
                self.assertEqual(call(base, "POST", path, raw=b"")[2], b"app " + path.encode())
            body = envelope_of({"task": "notes.add", "args": ["w"], "kwargs": {}})
            self.assertEqual(call(base, "POST", "/_tasks/notes.add", raw=body,
                                  headers={"Poussetaches-Auth-Key": KEY})[0], 200)
        self.assertEqual(self.calls[0][1], "w")

    def test_task_names_and_options_are_checked_when_declared(self):
        app = pt.PousseTaches(auth_key=KEY)

        def nested():
            return app.task(lambda: None)
        with self.assertRaises(ValueError) as ctx:
            nested()  # test_poussetaches...<locals>.<lambda>: not a URL segment
        self.assertIn("pass name=", str(ctx.exception))
        app.task(name="dup")(lambda: None)
        with self.assertRaises(ValueError):
            app.task(name="dup")(print)
        with self.assertRaises(TypeError) as ctx:
            app.task(name="x", retries=3)
        self.assertIn("delay_s, eta, queue", str(ctx.exception))
        with self.assertRaises(ValueError) as ctx:
            app.task(name="x", queue="Mail Queue")
        self.assertEqual(str(ctx.exception), pt.ENQUEUE["queue"].message)
        with self.assertRaises(ValueError):
            self.add.options(max_tries=0)
        with self.assertRaises(pt.ConfigError):
            pt.PousseTaches(auth_key=KEY).task(name="y")(print).push()  # no base_url
        with self.assertRaises(ValueError):
            pt.Retry(after=-1)
        with self.assertRaises(pt.ConfigError):
            pt.PousseTaches(tasks_path="tasks/")


class TestTaskEndpointAsgi(unittest.TestCase):
    """The ASGI endpoint, driven by an asyncio harness: scope, receive, send."""

    def setUp(self):
        self.app = pt.PousseTaches(auth_key=KEY)
        self.calls = []

        @self.app.task(name="a.ok")
        async def ok(x):
            await asyncio_sleep0()
            self.calls.append(("ok", x, pt.current_task().task_id))

        @self.app.task(name="s.ok")
        def sync_ok(x):
            self.calls.append(("sync", x, pt.current_task().name, threading.current_thread()
                               is not threading.main_thread()))

        @self.app.task(name="a.retry")
        async def retry():
            raise pt.Retry("busy", after=2.5)

        @self.app.task(name="a.reject")
        async def reject():
            raise pt.Reject("gone")

        @self.app.task(name="a.crash")
        async def crash():
            raise KeyError("k")

    def run_asgi(self, endpoint, method, path, body=b"", headers=(), pieces=1):
        import asyncio

        async def main():
            sent = []
            chunks = [body[i::pieces] for i in range(0)] or [
                body[len(body) * i // pieces:len(body) * (i + 1) // pieces] for i in range(pieces)]
            events = [{"type": "http.request", "body": c, "more_body": i < pieces - 1}
                      for i, c in enumerate(chunks)]

            async def receive():
                return events.pop(0)

            async def send(event):
                sent.append(event)
            scope = {"type": "http", "method": method, "path": path, "root_path": "",
                     "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
            await endpoint(scope, receive, send)
            return sent
        sent = asyncio.run(main())
        start, body_event = sent
        return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
                body_event["body"])

    def deliver(self, name, args=(), endpoint=None, pieces=1):
        body = envelope_of({"task": name, "args": list(args), "kwargs": {}})
        headers = list(signed_headers(KEY, body, task_id="id-" + name).items())
        headers.append(("Poussetaches-Task-ID", "id-" + name))
        return self.run_asgi(endpoint or self.app.asgi(), "POST", "/_tasks/" + name, body,
                             headers, pieces)

    def test_outcomes(self):
        self.assertEqual(self.deliver("a.ok", ["x"], pieces=3)[0], 200)
        self.assertEqual(self.deliver("s.ok", ["y"])[0], 200)
        self.assertEqual(self.calls, [("ok", "x", "id-a.ok"), ("sync", "y", "s.ok", True)])
        status, headers, body = self.deliver("a.retry")
        self.assertEqual((status, headers["retry-after"], body), (503, "3", b"Retry: busy"))
        self.assertEqual(self.deliver("a.reject")[::2], (410, b"Reject: gone"))
        with self.assertLogs("poussetaches", "ERROR"):
            self.assertEqual(self.deliver("a.crash")[::2], (500, b"KeyError: 'k'"))
        status, _, body = self.deliver("nope")
        self.assertEqual(status, 404)
        self.assertIn(b"a.ok, a.reject, a.retry, s.ok", body)
        # credentials first: the function is not called
        body = envelope_of({"task": "a.ok", "args": ["z"], "kwargs": {}})
        self.assertEqual(self.run_asgi(self.app.asgi(), "POST", "/_tasks/a.ok", body)[0], 403)
        self.assertEqual(self.run_asgi(self.app.asgi(), "GET", "/_tasks/a.ok")[0], 405)
        self.assertEqual(len(self.calls), 2)

    def test_wrapping_an_app_and_lifespan(self):
        import asyncio
        seen = []

        async def inner(scope, receive, send):
            seen.append(scope.get("path", scope["type"]))
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        wrapped = self.app.asgi(inner)
        self.assertEqual(self.run_asgi(wrapped, "POST", "/other")[0], 204)
        self.assertEqual(self.deliver("a.ok", ["w"], endpoint=wrapped)[0], 200)
        self.assertEqual(seen, ["/other"])

        async def lifespan(endpoint):
            events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
            sent = []

            async def receive():
                return events.pop(0)

            async def send(event):
                sent.append(event["type"])
            await endpoint({"type": "lifespan"}, receive, send)
            return sent
        self.assertEqual(asyncio.run(lifespan(self.app.asgi())),
                         ["lifespan.startup.complete", "lifespan.shutdown.complete"])
        asyncio.run(lifespan(wrapped))
        self.assertEqual(seen[-1], "lifespan")


class TestTaskEndpointDetails(unittest.TestCase):
    """What a real deployment met: decorated async functions, root_path, chunked
    bodies, a framework's context, names under ``python app.py``, loops that end."""

    def test_decorated_async_functions_are_awaited_everywhere(self):
        import asyncio
        import functools
        app = pt.PousseTaches(auth_key=KEY)
        ran = []

        def logged(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
            return wrapper

        @app.task(name="deco")
        @logged
        async def deco(x):
            await asyncio.sleep(0)
            ran.append(x)
        app.task(name="bare")(lambda x: deco.fn(x))  # no functools.wraps: said so
        body = envelope_of({"task": "deco", "args": ["wsgi"], "kwargs": {}})
        with serving_wsgi(app.wsgi()) as base:
            self.assertEqual(call(base, "POST", "/_tasks/deco", raw=body,
                                  headers={"Poussetaches-Auth-Key": KEY})[0], 200)
            with self.assertLogs("poussetaches", "ERROR"):
                status, _, text = call(base, "POST", "/_tasks/bare", raw=envelope_of(
                    {"task": "bare", "args": ["wsgi"], "kwargs": {}}),
                                       headers={"Poussetaches-Auth-Key": KEY})
        self.assertEqual(status, 500)
        self.assertIn(b"make it async def", text)
        harness = TestTaskEndpointAsgi()
        harness.app = app
        self.assertEqual(harness.deliver("deco", ["asgi"])[0], 200)
        with self.assertLogs("poussetaches", "ERROR"):
            self.assertEqual(harness.deliver("bare", ["no"])[0], 500)
        app.eager = True
        deco.push("eager")
        self.assertEqual(ran, ["wsgi", "asgi", "eager"])

    def test_root_path_and_chunked_bodies(self):
        app = pt.PousseTaches(auth_key=KEY)
        ran = []
        app.task(name="t")(lambda x: ran.append(x))
        harness = TestTaskEndpointAsgi()
        harness.app = app
        body = envelope_of({"task": "t", "args": ["behind /api"], "kwargs": {}})

        async def inner(scope, receive, send):
            raise AssertionError("a delivery reached the app: %r" % scope["path"])
        wrapped = app.asgi(inner)
        for root, path in (("/api", "/api/_tasks/t"), ("/api", "/_tasks/t"), ("", "/_tasks/t")):
            import asyncio

            async def main():
                events = [{"type": "http.request", "body": body}]
                sent = []

                async def receive():
                    return events.pop(0)

                async def send(event):
                    sent.append(event)
                await wrapped({"type": "http", "method": "POST", "path": path,
                               "root_path": root,
                               "headers": [(b"poussetaches-auth-key", KEY.encode())]},
                              receive, send)
                return sent[0]["status"]
            self.assertEqual(asyncio.run(main()), 200, (root, path))
        # a chunked body under a WSGI server that says where the input ends
        endpoint = app.wsgi()
        answers = []
        for terminated in (True, False):
            environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/_tasks/t",
                       "HTTP_TRANSFER_ENCODING": "chunked", "HTTP_POUSSETACHES_AUTH_KEY": KEY,
                       "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": terminated}
            endpoint(environ, lambda status, headers: answers.append(status))
        self.assertEqual(answers, ["200 OK", "400 Bad Request"])
        self.assertEqual(ran, ["behind /api"] * 4)

    def test_task_context_wraps_every_run(self):
        import asyncio
        events = []

        @contextlib.contextmanager
        def app_context():
            events.append("enter")
            yield
            events.append("exit")
        app = pt.PousseTaches(auth_key=KEY, task_context=app_context)

        @app.task(name="s")
        def sync_task():
            events.append("sync")

        @app.task(name="a")
        async def async_task():
            await asyncio.sleep(0)
            events.append("async")
        harness = TestTaskEndpointAsgi()
        harness.app = app
        with serving_wsgi(app.wsgi()) as base:
            for name in ("s", "a"):
                call(base, "POST", "/_tasks/" + name, raw=envelope_of(
                    {"task": name, "args": [], "kwargs": {}}),
                     headers={"Poussetaches-Auth-Key": KEY})
        harness.deliver("s")
        harness.deliver("a")
        app.eager = True
        sync_task.push()
        self.assertEqual(events, ["enter", "sync", "exit", "enter", "async", "exit"] * 2
                         + ["enter", "sync", "exit"])

    def test_default_names_do_not_depend_on_how_the_file_runs(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.mkdir(os.path.join(tmp, "shop"))
        for path in ("shop/__init__.py", "other.py"):
            open(os.path.join(tmp, path), "w").close()
        source = ("import poussetaches\npt = poussetaches.PousseTaches()\n"
                  "@pt.task\ndef ship(order):\n    pass\nprint(ship.name)\n")
        for path in ("app.py", "shop/tasks.py"):
            with open(os.path.join(tmp, path), "w") as f:
                f.write(source)
        env = dict(os.environ, PYTHONPATH=HERE)
        names = []
        for args in (["app.py"], ["-c", "import app"], ["-m", "shop.tasks"],
                     ["-c", "import shop.tasks"]):
            out = subprocess.run([sys.executable] + args, cwd=tmp, env=env, capture_output=True,
                                 text=True, timeout=WAIT)
            names.append(out.stdout.strip() or out.stderr)
        self.assertEqual(names, ["app.ship", "app.ship", "shop.tasks.ship", "shop.tasks.ship"])

    def test_an_endpoint_without_a_key_warns_when_made(self):
        app = pt.PousseTaches(auth_key="")
        with self.assertLogs("poussetaches", "WARNING") as logs:
            app.wsgi()
            app.asgi()
        self.assertEqual(len(logs.output), 2)
        self.assertIn("refuse every delivery", logs.output[0])

    def test_an_async_client_keeps_no_loop_that_has_ended(self):
        """Each asyncio.run's connection is closed as that loop ends: the client
        kept every loop and a socket each (a connection per loop, never freed)."""
        import asyncio
        import gc

        def sockets():
            return sum(os.readlink("/proc/self/fd/" + fd).startswith("socket:")
                       for fd in os.listdir("/proc/self/fd") if os.path.exists(
                           "/proc/self/fd/" + fd))
        with running_daemon(paused=True) as d:
            client = pt.AsyncPousseTaches(d.url)
            asyncio.run(client.status())
            gc.collect()
            before = sockets()
            for _ in range(10):
                asyncio.run(asyncio.wait_for(client.status(), WAIT))
            gc.collect()
            self.assertEqual(client._loops, {})
            self.assertLessEqual(sockets(), before)


class TestEager(unittest.TestCase):
    """Eager mode: pushes run in-process, through the same JSON round trip."""

    def setUp(self):
        self.app = pt.PousseTaches("http://127.0.0.1:9", "http://app", auth_key=KEY)
        self.app.eager = True
        self.runs = []

    def test_arguments_round_trip_through_json(self):
        @self.app.task(name="t")
        def t(*args, **kwargs):
            self.runs.append((args, kwargs, pt.current_task().tries))
            return "ignored"
        task_id = t.push((1, 2), {3: "three"}, flag=True, nothing=None)
        self.assertRegex(task_id, r"^[0-9a-f]{32}$")
        # what the endpoint would get: tuples are lists, keys are strings
        self.assertEqual(self.runs, [(([1, 2], {"3": "three"}), {"flag": True, "nothing": None},
                                      1)])
        with self.assertRaises(TypeError):
            t.push(b"bytes")
        self.assertEqual(len(self.runs), 1)

    def test_exceptions_propagate_retry_reruns_reject_is_recorded(self):
        @self.app.task(name="flaky", max_tries=3)
        def flaky(n):
            tries = pt.current_task().tries
            self.runs.append(tries)
            if tries < n:
                raise pt.Retry("not yet")

        @self.app.task(name="bad")
        def bad():
            raise pt.Reject("no")

        @self.app.task(name="boom")
        def boom():
            raise ZeroDivisionError("x")
        flaky.push(3)
        self.assertEqual((self.runs, self.app.dead), ([1, 2, 3], []))
        self.runs.clear()
        flaky.push(5)
        self.assertEqual(self.runs, [1, 2, 3])
        bad.push()
        self.assertEqual([(c.task.name, c.reason) for c in self.app.dead],
                         [("flaky", "Retry: not yet"), ("bad", "no")])
        with self.assertRaises(ZeroDivisionError):
            boom.push()

    def test_delayed_eta_and_cron_pushes_are_kept(self):
        @self.app.task(name="t")
        def t(x):
            self.runs.append(x)
        t.options(delay_s=60).push("later")
        t.options(eta="2030-01-01T00:00:00Z").push("eta")
        t.schedule("every-hour", "@every 1h", "cron")
        t.schedule("every-hour", "@every 2h", "cron2")  # replaces the first
        t.options(delay_s=0).push("now")
        self.assertEqual(self.runs, ["now"])
        self.assertEqual([c.args for c in self.app.pending], [["later"], ["eta"], ["cron2"]])
        cron = self.app.pending[-1]
        cron.run()
        self.assertEqual(self.runs[-1], "cron2")
        self.assertIn(cron, self.app.pending)  # a cron stays
        self.assertEqual(self.app.run_pending(), 2)
        self.assertEqual(self.runs, ["now", "cron2", "later", "eta"])
        self.assertEqual(self.app.pending, [cron])

    def test_async_tasks_sync_and_async_clients(self):
        import asyncio

        @self.app.task(name="a")
        async def a(x):
            await asyncio.sleep(0)
            self.runs.append(("a", x, pt.current_task().name))
        a.push(1)  # from sync code: in a loop of its own
        aio = pt.AsyncPousseTaches("http://127.0.0.1:9", "http://app", auth_key=KEY, eager=True)

        @aio.task(name="b", max_tries=2)
        async def b(x):
            self.runs.append(("b", x))
            raise pt.Retry()

        async def main():
            task_id = await b.push(2)
            with self.assertRaises(RuntimeError):
                a.push(3)  # a sync client's async task, inside a running loop
            return task_id
        asyncio.run(main())
        self.assertEqual(self.runs, [("a", 1, "a"), ("b", 2), ("b", 2)])
        self.assertEqual([c.reason for c in aio.dead], ["Retry: "])


class TestTestingDaemon(unittest.TestCase):
    """testing_daemon: an app's end-to-end test in a few lines, and drain()."""

    def test_drain_sees_the_end_of_an_attempt_whose_task_was_cancelled(self):
        with receiver() as rx, running_daemon() as d:
            rx.answers["/slow"] = [(200, b"", {}, 1.0)]
            task = call(d.url, "POST", "/", {"url": rx.url("/slow")})[2]["id"]
            wait_until(lambda: d.store.in_flight() == 1, poll=0.01, what="the attempt")
            self.assertEqual(call(d.url, "DELETE", "/tasks/" + task)[0], 200)
            started = time.monotonic()
            d.drain(timeout=10)
            self.assertLess(time.monotonic() - started, 5)  # not the time-out

    def test_drain_waits_for_retries_and_the_client_comes_back(self):
        app = pt.PousseTaches("http://127.0.0.1:9", "http://app.invalid", auth_key="mine")
        app.eager = True
        done = []

        @app.task(name="flaky")
        def flaky(n):
            if pt.current_task().tries < n:
                raise pt.Retry("again", after=0)
            done.append(n)
        with pt.testing_daemon(app) as daemon:
            self.assertFalse(app.eager)
            ids = [flaky.push(n) for n in (1, 3, 5)]
            daemon.drain()
            self.assertEqual(sorted(done), [1, 3, 5])
            self.assertEqual([app.get_task(i).tries for i in ids], [1, 3, 5])
            # a paused daemon: drain gives up, saying what is left
            app.pause()
            flaky.push(1)
            with self.assertRaises(TimeoutError) as ctx:
                daemon.drain(timeout=0.3)
            self.assertIn("due", str(ctx.exception))
            app.resume()
            daemon.drain()
            self.assertEqual(len(done), 4)
            data_dir = daemon.settings.data_dir
        self.assertFalse(os.path.exists(data_dir))
        self.assertEqual((app.api_url, app.base_url, app.auth_keys, app.eager),
                         ("http://127.0.0.1:9", "http://app.invalid", ("mine",), True))

    def test_a_whole_wsgi_app_with_its_own_route(self):
        app = pt.PousseTaches()
        outbox = []

        @app.task(name="send_welcome")
        def send_welcome(to):
            outbox.append(to)

        def web(environ, start_response):  # the app's own route pushes the task
            send_welcome.push(environ["QUERY_STRING"])
            start_response("202 Accepted", [("Content-Type", "text/plain")])
            return [b"queued"]
        with pt.testing_daemon(app, app=app.wsgi(web), workers=1) as daemon:
            self.assertEqual(call(app.base_url, "GET", "/signup?ada")[0], 202)
            daemon.drain()
        self.assertEqual(outbox, ["ada"])


class TestKeyRotation(unittest.TestCase):
    """The steps of a key rotation, with a restart of the daemon at each, and no
    failed delivery: the daemon signs with its current and its next key."""

    def test_rotation_steps_fail_no_delivery(self):
        old, new = "whsec_" + b64(b"o" * 24), "whsec_" + b64(b"n" * 24)
        steps = [  # (daemon's key, daemon's next key, the app's keys)
            (old, None, [old]),
            (old, new, [old]),        # 1. the daemon gets the next key
            (old, new, [old, new]),   # 2. the app accepts both
            (new, old, [old, new]),   # 3. the daemon swaps
            (new, None, [new]),       # 4. the old key goes, on both sides
        ]
        for signature_only in (False, True):
            app = pt.PousseTaches(auth_key=[old])
            ran = []
            app.task(name="t")(lambda step: ran.append(step))
            tmp = tempfile.mkdtemp(prefix="pt-test-")
            self.addCleanup(shutil.rmtree, tmp, True)
            with serving_wsgi(app.wsgi()) as base:
                app.base_url = base
                for step, (key, next_key, app_keys) in enumerate(steps):
                    with self.subTest(signature_only=signature_only, step=step), \
                            running_daemon(data_dir=tmp, auth_key=key, next_auth_key=next_key,
                                           allow_urls=[base + "/"],
                                           signature_only=signature_only) as d:
                        app.auth_keys = tuple(app_keys)  # the app's deploy
                        app._point_at(d.url)
                        task_id = app.tasks["t"].push(step)
                        wait_until(lambda: app.get_task(task_id).state == "success",
                                   what="step %d delivered" % step)
                        self.assertEqual(app.get_task(task_id).tries, 1)
                        app.close()
            self.assertEqual(ran, list(range(len(steps))))
        # an app that has only the new key, during the rotation: the signature carries it
        lone = pt.PousseTaches(auth_key=new)
        delivery = pt.Delivery(old, allow_list=pt.AllowList(["http://x/"]), next_auth_key=new)
        request = delivery.request(pt.Task("tid", "http://x/t", b"{}"), 1, "r")
        headers = dict(request.header_items())
        self.assertEqual(len(headers["Webhook-signature"].split()), 2)
        self.assertEqual(headers["Poussetaches-auth-key"], old)
        self.assertEqual(lone.parse(headers=headers, body=request.data).payload, {})
        with self.assertRaises(pt.AuthError):
            pt.PousseTaches(auth_key="third").parse(headers=headers, body=request.data)

    def test_the_daemon_takes_the_next_key_from_its_environment(self):
        with receiver() as rx:
            env = dict(os.environ, POUSSETACHES_AUTH_KEY="cur", POUSSETACHES_NEXT_AUTH_KEY="nxt")
            tmp = tempfile.mkdtemp(prefix="pt-test-")
            self.addCleanup(shutil.rmtree, tmp, True)
            daemon = DaemonProcess(tmp, "--allow-url", rx.base + "/", env=env)
            try:
                client = pt.PousseTaches(daemon.url, rx.base, auth_key=["cur"])
                client.push({}, "/t")
                got = rx.wait_for(1)[0]
                client.close()
                signatures = got["headers"]["webhook-signature"].split()
                stamp = int(got["headers"]["webhook-timestamp"])
                task_id = got["headers"]["webhook-id"]
                self.assertEqual(signatures, [pt.sign(k, task_id, stamp, got["body"])
                                              for k in ("cur", "nxt")])
                self.assertEqual(got["headers"]["Poussetaches-Auth-Key"], "cur")
                self.assertEqual(client.parse(headers=got["headers"], body=got["body"]).payload,
                                 {})
            finally:
                self.assertEqual(daemon.terminate(), 0)
        env = dict(os.environ, POUSSETACHES_NEXT_AUTH_KEY="nxt")
        env.pop("POUSSETACHES_AUTH_KEY", None)
        out = subprocess.run([sys.executable, os.path.join(HERE, "poussetaches.py"), "--port",
                              "0", "--data-dir", tmp], env=env, capture_output=True, text=True,
                             timeout=WAIT)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("POUSSETACHES_NEXT_AUTH_KEY needs POUSSETACHES_AUTH_KEY", out.stderr)


# --------------------------------------------------------------------------
# Daemon settings and the CLI
# --------------------------------------------------------------------------


class TestSettings(unittest.TestCase):
    """The daemon's settings: declared once, checked at construction."""

    def test_every_option_is_declared_once_for_every_consumer(self):
        """OPTIONS drives the Daemon's keywords, the range checks, serve's flags and
        the environment: each flag is in serve --help, each default passes its own
        check, an out-of-range value is refused naming the flag, and a setting
        nobody declared is a TypeError."""
        help_text = " ".join(subprocess.run(  # one line per word: argparse wraps lines
            [sys.executable, pt.__file__, "serve", "--help"], capture_output=True,
            text=True).stdout.split())
        pt.Settings.checked()  # every default passes its own check
        for option in pt.OPTIONS:
            if option.flag:
                self.assertIn(option.flag + " ", help_text)
                if option.env:
                    self.assertIn("env " + option.env, help_text)
        with self.assertRaises(pt.ConfigError) as ctx:
            pt.Settings.checked(max_connections=0)
        self.assertEqual(str(ctx.exception), "--max-connections must be 1-100000, not 0")
        with self.assertRaises(pt.ConfigError) as ctx:
            pt.Settings.checked(head_timeout=601)
        self.assertEqual(str(ctx.exception),
                         "head_timeout must be > 0 and <= 600 seconds, not 601")
        # no infinity, nor a rate whose next token is past any clock (each one once
        # killed a thread: the persister, the stop, or every worker)
        for name, value in (("grace", float("inf")), ("snapshot_interval", float("inf")),
                            ("rate", 1e-300), ("timeout", float("nan")), ("burst", 1e300)):
            self.assertRaises(pt.ConfigError, pt.Settings.checked, **{name: value})
        self.assertRaises(pt.ConfigError, pt.Settings.checked, workers="4")  # not a number
        self.assertRaises(pt.ConfigError, pt.Settings.checked, workers=True)
        self.assertRaises(TypeError, pt.Daemon, wokers=4)
        # serve: flags over the environment, lists from comma-separated variables
        env = {"POUSSETACHES_WORKERS": "7", "POUSSETACHES_ALLOWED_URLS": "http://a/, http://b/",
               "POUSSETACHES_AUTH_KEY": "", "POUSSETACHES_API_KEY": ""}
        with mock.patch.dict(os.environ, env):
            values = pt._serve_settings(pt.build_parser().parse_args(["serve", "--rate", "3"]))
        self.assertEqual((values["workers"], values["rate"], values["allow_urls"],
                          values["auth_key"], values["api_key"]),
                         (7, 3.0, ["http://a/", "http://b/"], "", None))
        with mock.patch.dict(os.environ, {"POUSSETACHES_RATE": "0"}):  # 0: unlimited
            values = pt._serve_settings(pt.build_parser().parse_args(["serve", "--burst", "0"]))
        self.assertEqual((values["rate"], values["burst"]), (None, None))
        pt.Settings.checked(**values)
        self.assertEqual(set(values) - {o.name for o in pt.OPTIONS}, set())

    def test_bad_config_is_refused(self):
        for kwargs in ({"workers": 0}, {"fsync": "sometimes"}, {"allow_urls": ["ftp://x"]},
                       {"max_tries": 0}, {"rate": -1}, {"min_backoff": 5, "max_backoff": 1},
                       {"max_per_address": 0}, {"head_timeout": 0}, {"keep_dead": -1},
                       {"max_dead_bytes": -1}, {"max_success_bytes": -1}):
            with self.subTest(**kwargs), self.assertRaises(pt.ConfigError):
                pt.Daemon(port=0, data_dir="unused", **kwargs)


class TestCli(unittest.TestCase):
    """The poussetaches command: each command, its output and its errors."""

    def test_push_takes_every_enqueue_field(self):
        """Each enqueue field is a push flag (its Param's), or one of the few a flag
        cannot be as is: the URL (an argument), the payload (--json, --payload-file),
        the headers (--header) and the original's delay in minutes.  Every flag
        sets its field on the task the daemon stores."""
        flags = {p.name for p in pt.ENQUEUE_PARAMS if p.description}
        self.assertEqual({p.name for p in pt.ENQUEUE_PARAMS} - flags,
                         {"url", "payload", "json", "headers", "delay"})
        values = {"expected": "204", "max_tries": "3", "timeout_s": "2.5", "queue": "mail",
                  "priority": "7", "ordering_key": "k", "idempotency_key": "i-1",
                  "delay_s": "3600"}
        self.assertLessEqual(set(values), flags)
        with running_daemon(paused=True) as d:
            args = ["push", "http://127.0.0.1:9/x", "--print-task", "--url", d.url]
            for name, value in values.items():
                args += ["--" + name.replace("_", "-"), value]
            code, out, err = self.run_cli(*args)
            self.assertEqual((code, err), (0, ""))
            task = call(d.url, "GET", "/tasks/" + json.loads(out)["id"])[2]
            for name, value in values.items():
                if name != "delay_s":
                    self.assertEqual(str(task[name]), value, name)
            self.assertGreater(task["next_run"], time.time_ns() + 3000 * NS)
            code, out, err = self.run_cli("push", "http://127.0.0.1:9/c", "--url", d.url,
                                          "--schedule", "@daily", "--name", "nightly",
                                          "--print-task")
            self.assertEqual((json.loads(out)["name"], json.loads(out)["schedule"]),
                             ("nightly", "@daily"))
            code, out, err = self.run_cli("push", "http://127.0.0.1:9/x", "--url", d.url,
                                          "--delay-s", "5", "--eta", "1999999999")
            self.assertEqual(code, 2)
            self.assertIn("argument --eta: not allowed with argument --delay-s", err)

    def run_cli(self, *args, env=None):
        """``poussetaches ARGS`` as the console script runs it (main() with the
        environment, stdout and stderr of a process): (exit status, out, err).
        ``serve`` runs in a real subprocess, as it takes over logging and signals."""
        if args and args[0] == "serve":
            full_env = dict(os.environ, **(env or {}))
            proc = subprocess.run([sys.executable, os.path.join(HERE, "poussetaches.py")]
                                  + list(args), capture_output=True, timeout=WAIT, env=full_env)
            return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        try:
            os.environ.update(env or {})
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = pt.main(list(args))
                except SystemExit as exc:  # argparse: --help, usage errors
                    code = exc.code
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return code, out.getvalue(), err.getvalue()

    def test_an_answer_not_from_a_daemon_is_one_line_saying_so(self):
        """push --url given the app's URL posted to the app and printed its HTML page."""
        with receiver() as rx:
            rx.answers["/"] = [(404, b"<!doctype html><title>Not Found</title>" * 20)]
            for answer in ((404, b"<html>nope</html>"), (200, b"<html>home</html>"),
                           (200, b"")):
                rx.answers["/"] = [answer]
                code, out, err = self.run_cli("--url", rx.base, "push", "http://app:8000/t")
                self.assertEqual((code, out), (1, ""))
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertIn("is not from a poussetaches daemon: check its URL", err)
                with self.assertRaises(pt.ClientError) as ctx:
                    pt.PousseTaches(rx.base, "http://app").get_task("abcdef")
                if answer[1]:
                    self.assertIn("not from a poussetaches daemon", str(ctx.exception))

    def test_backup_of_a_live_daemon_restores_as_it_was(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        with receiver() as rx, running_daemon(max_tries=1) as d:
            rx.answers["/fail"] = [(500, b"no")]
            client = pt.PousseTaches(d.url, rx.base)
            self.addCleanup(client.close)
            client.set_queue("mail", rate=3, concurrency=2)
            ok, bad = client.push({"a": 1}, "/ok"), client.push({"b": 2}, "/fail")
            wait_until(lambda: client.status()["success"] == 1 and client.status()["dead"] == 1,
                       what="a success and a dead task")
            client.push({"c": 3}, "/later", delay_s=3600, queue="mail", ordering_key="k")
            client.push({}, "/nightly", schedule="0 3 * * *", name="nightly")
            tables = lambda c: {t: sorted(json.dumps(x, sort_keys=True) for x in
                                          c.listing(t)["tasks"]) for t in
                                ("waiting", "cron", "success", "dead")}
            before, queues = tables(client), client.queues()
            os.mkdir(os.path.join(tmp, "b"), 0o755)  # made empty beforehand, open to all
            code, out, err = self.run_cli("--url", d.url, "backup", os.path.join(tmp, "b"))
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(tmp, "b", "snapshot.json"))
                                          .st_mode), 0o600)
            self.assertIn("4 tasks backed up in %s" % os.path.join(tmp, "b"), out)
            self.assertEqual(os.listdir(os.path.join(tmp, "b")), ["snapshot.json"])
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(tmp, "b")).st_mode), 0o700)
            code, _, err = self.run_cli("--url", d.url, "backup", os.path.join(tmp, "b"))
            self.assertEqual(code, 1)
            self.assertIn("is not empty", err)
        with running_daemon(data_dir=os.path.join(tmp, "b"), paused=True) as restored:
            again = pt.PousseTaches(restored.url, rx.base)
            self.addCleanup(again.close)
            self.assertEqual(tables(again), before)
            self.assertEqual([dict(q, oldest_due_age_s=0) for q in again.queues()],
                             [dict(q, oldest_due_age_s=0) for q in queues])
            self.assertEqual((again.get_task(ok).state, again.get_task(bad).state),
                             ("success", "dead"))

    def test_a_backup_is_taken_at_one_moment(self):
        """Batches are all or nothing: a backup taken while they come holds each
        whole or not at all (a copy by luck of timing would cut some)."""
        with running_daemon(paused=True, fsync="never") as d:
            client = pt.PousseTaches(d.url, "http://127.0.0.1:9")
            self.addCleanup(client.close)
            stop = threading.Event()

            def enqueue():
                feeder = pt.PousseTaches(d.url, "http://127.0.0.1:9")
                n = 0
                while not stop.is_set():
                    feeder.push_many([{"payload": {"batch": n}, "path": "/b"}] * 50)
                    n += 1
                feeder.close()
            thread = threading.Thread(target=enqueue)
            thread.start()
            try:
                wait_until(lambda: client.status()["waiting"] >= 200, what="batches", poll=0.01)
                backups = []
                for _ in range(3):
                    out = io.BytesIO()
                    client.download("/backup", out)
                    backups.append(json.loads(out.getvalue()))
            finally:
                stop.set()
                thread.join(WAIT)
        at = pt.TASK_NAMES.index("payload")
        for doc in backups:
            sizes = collections.Counter(json.loads(base64.b64decode(row[at]))["batch"]
                                        for row in doc["waiting"])
            self.assertGreater(len(sizes), 3)
            self.assertEqual(set(sizes.values()), {50}, sizes)

    def test_recipes_are_filled_in_from_the_flags(self):
        flags = ["--allow-url", "http://127.0.0.1:8000/", "--grace", "25", "--workers", "8"]
        code, unit, err = self.run_cli("recipe", "systemd", *flags)
        self.assertEqual(code, 0)
        self.assertEqual(sys.executable.startswith(("/home/", "/root/")),
                         "which the unit hides (ProtectHome=yes)" in err)
        self.assertIn("ExecStart=%s %s serve --data-dir /var/lib/poussetaches %s\n" % (
            sys.executable, os.path.join(HERE, "poussetaches.py"), " ".join(flags)), unit)
        self.assertIn("TimeoutStopSec=45\n", unit)  # past --grace
        self.assertIn("IPAddressAllow=localhost\n", unit)  # every allowed URL is local
        code, remote, _ = self.run_cli("recipe", "systemd", "--allow-url", "http://app:8000/")
        self.assertNotIn("IPAddress", remote)
        self.assertNotIn("IPAddress", self.run_cli("recipe", "systemd")[1])  # any URL allowed
        code, escaped, _ = self.run_cli("recipe", "systemd", "--allow-url",
                                        "http://127.0.0.1:8000/%7Ejobs/")
        self.assertIn("--allow-url http://127.0.0.1:8000/%%7Ejobs/\n", escaped)  # a specifier
        tool = shutil.which("systemd-analyze")
        if tool:  # the unit as systemd reads it, and its exposure
            tmp = tempfile.mkdtemp(prefix="pt-test-")
            self.addCleanup(shutil.rmtree, tmp, True)
            path = os.path.join(tmp, "poussetaches.service")
            for text in (escaped, unit):
                with open(path, "w") as f:
                    f.write(text)
                verify = subprocess.run([tool, "verify", path], capture_output=True, text=True,
                                        timeout=60)
                self.assertEqual((verify.returncode, verify.stderr), (0, ""))
            security = subprocess.run([tool, "security", "--offline=yes", path],
                                      capture_output=True, text=True, timeout=60)
            exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)",
                                       security.stdout).group(1))
            self.assertLessEqual(exposure, 2.0, security.stdout[-2000:])
        code, dockerfile, _ = self.run_cli("recipe", "docker", *flags)
        cmd = [line for line in dockerfile.splitlines() if line.startswith("CMD [")]
        self.assertEqual(json.loads(cmd[0][4:]), ["python3", "/app/poussetaches.py", "serve",
                                                  "--host", "0.0.0.0"] + flags)
        self.assertIn("USER 10001:10001\n", dockerfile)
        dockerfile = self.run_cli("recipe", "docker", "--port", "8080")[1]
        self.assertIn("EXPOSE 8080\n", dockerfile)
        self.assertIn("http://127.0.0.1:8080/healthz", dockerfile)
        code, compose, _ = self.run_cli("recipe", "compose", *flags)
        grace = re.search(r"stop_grace_period: (\d+)s", compose)
        self.assertGreater(int(grace.group(1)), 25)
        command = re.search(r"    command: (\[.*\])", compose).group(1)
        self.assertEqual(json.loads(command)[-len(flags):], flags)
        self.assertIn("chown -R 10001:10001 /app/poussetaches_data", compose)  # root's too
        self.assertIn("condition: service_completed_successfully", compose)
        # flags are checked as serve checks them; no --allow-url is said
        self.assertEqual(self.run_cli("recipe", "docker", "--workrs", "8")[0], 2)
        for kind in ("systemd", "docker", "compose"):
            self.assertEqual(self.run_cli("recipe", kind, "--data-dir", "/x")[0], 2)
            self.assertEqual(self.run_cli("recipe", kind, "--host=0.0.0.0")[0], 2)
        code, _, err = self.run_cli("recipe", "docker")
        self.assertEqual(code, 0)
        self.assertIn("no --allow-url given", err)

    def test_status_and_help_are_for_people(self):
        """status printed breakers as a Python repr with nanosecond times, queue show
        raw JSON; help texts said what a value must be, and pause offered a table."""
        with receiver() as rx, running_daemon(paused=True) as d:
            breakers = d.dispatcher.breakers
            for _ in range(5):  # an origin down: its circuit opens
                breakers.record("http://app.example:8000", True)
            code, out, _ = self.run_cli("--url", d.url, "status")
            self.assertEqual(code, 0)
            self.assertRegex(out, r"daemon: +poussetaches [\d.]+, dispatching paused\n")
            self.assertIn("tasks:     0 waiting, 0 cron, 0 in flight, 0 success, 0 dead\n", out)
            self.assertRegex(out, r"circuits: +http://app\.example:8000 open, next probe in "
                                  r"\d+\.\d s\n")
            self.assertNotIn("{", out)
            self.assertEqual(self.run_cli("--url", d.url, "resume")[1], "dispatching running\n")
            code, out, _ = self.run_cli("--url", d.url, "status", "--json")
            self.assertEqual(json.loads(out)["open_breakers"], ["http://app.example:8000"])
        code, out, _ = self.run_cli("queue", "set", "--help")
        self.assertIn("attempts per second at most", out)
        self.assertNotIn("must be", out)
        code, out, _ = self.run_cli("pause", "--help")
        self.assertIn("instead of a line", out)
        self.assertNotIn("table", out)

    def test_ls_shows_success_and_dead_the_latest_first(self):
        with receiver() as rx, running_daemon() as d:
            client = pt.PousseTaches(d.url, rx.base)
            self.addCleanup(client.close)
            ids = []
            for n in range(5):  # one after another: each runs after the one before
                ids.append(client.push({"n": n}, "/ok"))
                wait_until(lambda: client.status()["success"] == n + 1, what="success")
            code, out, _ = self.run_cli("--url", d.url, "ls", "success", "--limit", "3")
            self.assertEqual(code, 0)
            lines = out.splitlines()
            self.assertIn("LAST RUN", lines[0])
            self.assertEqual([line.split()[0] for line in lines[1:4]],
                             [task_id[:12] for task_id in ids[::-1][:3]])
            self.assertEqual(lines[-1], "3 of 5 success tasks, the latest first")
            code, out, _ = self.run_cli("--url", d.url, "ls", "success", "--order", "asc")
            self.assertEqual(out.splitlines()[1].split()[0], ids[0][:12])
            self.assertTrue(out.endswith("5 of 5 success tasks, the earliest first\n"))
            # the dashboard asks for the latest first in success and dead, and says so
            html = call(d.url, "GET", "/ui")[2].decode()
            self.assertIn('(done?"&order=desc":table==="waiting"?"&cron=false":"")', html)
            self.assertIn(", the latest first", html)
            # a success, or a cron whose last run succeeded, shows a status, not an error
            self.assertIn('const fine=done||(t.tries>0&&!t.last_error_body&&'
                          't.last_error_status_code===(t.expected||200))', html)
            self.assertIn('"class":fine?"ok":last?"bad":"mute"', html)
            # at phone width the queues are a line each, above the tasks (no 850 px of cards)
            narrow = html[html.index("@media (max-width:700px)"):]
            self.assertIn("#queues tr{display:flex;flex-wrap:wrap", narrow)
            self.assertIn("#queues td[data-label=Settings],#queues td[data-label=Due]"
                          "{display:none}", narrow)

    def test_commands_against_a_daemon(self):
        with receiver() as rx, running_daemon(max_tries=1, paused=True) as d:
            env = {"POUSSETACHES_URL": d.url}
            code, out, err = self.run_cli("push", rx.url("/cli"), "--json", '{"a": 1}',
                                          "--header", "X-From: cli", env=env)
            self.assertEqual((code, err), (0, ""))
            task_id = out.strip()
            self.assertRegex(task_id, r"^[0-9a-f]{32}$")
            code, out, _ = self.run_cli("ls", "waiting", env=env)
            self.assertEqual(code, 0)
            self.assertIn(task_id[:12], out)
            self.assertIn("1 of 1 waiting tasks", out)
            self.assertTrue(out.startswith("ID"))
            code, out, _ = self.run_cli("ls", "waiting", "--json", env=env)
            self.assertEqual(json.loads(out)["tasks"][0]["id"], task_id)
            code, out, _ = self.run_cli("show", task_id[:12], env=env)
            self.assertIn("state:", out)
            self.assertIn('payload:                {"a":1}', out)
            code, out, _ = self.run_cli("status", "--json", env=env)
            self.assertIs(json.loads(out)["paused"], True)
            self.assertEqual(self.run_cli("resume", env=env)[0], 0)
            got = rx.wait_for(1, path="/cli")[0]
            self.assertEqual(got["headers"]["X-From"], "cli")
            self.assertEqual(self.run_cli("pause", env=env)[0], 0)
            code, out, _ = self.run_cli("push", rx.url("/file"), "--delay-s", "3600",
                                        "--payload-file", __file__, "--print-task", env=env)
            later = json.loads(out)
            self.assertEqual(base64.b64decode(later["payload"])[:3], b'"""')
            code, out, _ = self.run_cli("run", later["id"], env=env)
            self.assertIn("queued to run now", out)
            code, out, _ = self.run_cli("cancel", later["id"], env=env)
            self.assertIn("deleted (it was waiting)", out)
            code, out, _ = self.run_cli("retry-dead", "--url", d.url)
            self.assertEqual((code, out), (0, "0 dead tasks requeued\n"))

    def test_errors_are_one_line_without_traceback(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % s.getsockname()[1]
        s.close()
        code, out, err = self.run_cli("status", env={"POUSSETACHES_URL": url})
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("cannot reach poussetaches", err)
        with running_daemon() as d:
            for args in (["show", "f" * 32], ["push", "ftp://x"], ["push", "http://x/", "--json", "{"]):
                with self.subTest(args=args):
                    code, out, err = self.run_cli(*args, env={"POUSSETACHES_URL": d.url})
                    self.assertEqual(code, 1)
                    self.assertEqual(len(err.strip().splitlines()), 1, err)
                    self.assertNotIn("Traceback", err)
                    self.assertTrue(err.startswith("poussetaches: error: "))

    def test_help_everywhere_and_module_entry(self):
        for command in ("serve", "push", "ls", "show", "run", "cancel", "retry-dead", "pause",
                        "resume", "status"):
            with self.subTest(command=command):
                code, out, _ = self.run_cli(command, "--help")
                self.assertEqual(code, 0)
                self.assertIn("usage: poussetaches " + command, out)
        proc = subprocess.run([sys.executable, "-m", "poussetaches", "--version"], cwd=HERE,
                              capture_output=True, timeout=WAIT)
        self.assertEqual(proc.stdout.decode().strip(), "poussetaches " + pt.__version__)

    def test_queue_commands(self):
        run_cli = TestCli.run_cli
        with running_daemon(paused=True) as d:
            env = {"POUSSETACHES_URL": d.url}
            code, out, err = run_cli(self, "push", "http://127.0.0.1:9/m", "--queue", "mail",
                                     "--ordering-key", "u1", "--priority", "7", env=env)
            self.assertEqual((code, err), (0, ""))
            task = call(d.url, "GET", "/tasks/" + out.strip())[2]
            self.assertEqual((task["queue"], task["ordering_key"], task["priority"]),
                             ("mail", "u1", 7))
            lines = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
            self.addCleanup(os.unlink, lines.name)
            with lines:
                for i in range(3):
                    lines.write(json.dumps({"url": "http://127.0.0.1:9/f/%d" % i,
                                            "queue": "mail"}) + "\n")
            code, out, err = run_cli(self, "push", "--from-file", lines.name, env=env)
            self.assertEqual((code, len(out.split())), (0, 3))
            code, out, _ = run_cli(self, "ls", "waiting", "--queue", "mail", "-q", "/f/", env=env)
            self.assertIn("3 of 3 waiting tasks", out)
            self.assertEqual(run_cli(self, "queue", "set", "mail", "--rate", "2",
                                     "--concurrency", "1", env=env)[0], 0)
            code, out, _ = run_cli(self, "queue", "show", "mail", env=env)
            self.assertIn("settings:  rate 2.0, concurrency 1\n", out)
            self.assertIn("tasks:     4 waiting, 0 cron, 4 due, 0 in flight\n", out)
            code, out, _ = run_cli(self, "queue", "set", "mail", "--rate", "default", env=env)
            self.assertIn("settings:  concurrency 1\n", out)  # unlimited again
            code, _, err = run_cli(self, "queue", "set", "mail", "--rate", "fast", env=env)
            self.assertEqual(code, 2)
            self.assertIn("invalid float value: 'fast'", err)
            self.assertEqual(run_cli(self, "queue", "set", "mail", "--rate", "2", env=env)[0], 0)
            self.assertEqual(run_cli(self, "queue", "pause", "mail", env=env)[0], 0)
            code, out, _ = run_cli(self, "queue", "ls", env=env)
            self.assertTrue(out.startswith("QUEUE"))
            self.assertIn("paused=True", out)
            code, out, err = run_cli(self, "queue", "rm", "mail", env=env)
            self.assertEqual(code, 1)
            self.assertIn("409", err)
            self.assertEqual(len(err.splitlines()), 1)
            code, _, err = run_cli(self, "push", env=env)
            self.assertEqual((code, err), (1, "poussetaches: error: push needs a URL (or "
                                               "--from-file FILE)\n"))

    def test_cli_commands_and_errors(self):
        with receiver() as rx, running_daemon(paused=True) as d:
            hostport = d.url[len("http://"):]
            for env, args in (({}, ["status", "--url", hostport]),
                              ({}, ["--url", hostport, "status"]),   # before the command too
                              ({}, ["--url=" + hostport, "status"]),
                              ({"POUSSETACHES_URL": "127.0.0.1:1"},
                               ["--url", hostport, "status"]),       # the flag beats the env
                              ({"POUSSETACHES_URL": hostport}, ["status"]),
                              ({"POUSSETACHES_URL": "localhost:%d" % d.port}, ["status"])):
                with self.subTest(env=env, args=args):
                    code, out, err = self.run_cli(*args, env=env)
                    self.assertEqual((code, err), (0, ""))
                    self.assertIn("dispatching paused", out)
            for value in ("notaurl:x", "ftp://x", "http://"):
                with self.subTest(url=value):
                    code, out, err = self.run_cli("status", "--url", value)
                    self.assertEqual((code, out), (1, ""))
                    self.assertEqual(err, "poussetaches: error: the daemon's URL must look like "
                                          "http://127.0.0.1:7991 or 127.0.0.1:7991, got %r\n" % value)
            env = {"POUSSETACHES_URL": d.url}
            code, out, err = self.run_cli("push", rx.url("/e"), "--eta", "2030-01-02T03:04:05Z",
                                          "--print-task", env=env)
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(json.loads(out)["next_run"], ts("2030-01-02T03:04:05+00:00"))
            code, out, _ = self.run_cli("push", rx.url("/c"), "--schedule", "@daily", env=env)
            cron = out.strip()
            self.assertEqual(self.run_cli("cron", "rm", cron[:12], env=env),
                             (0, "cron task %s removed\n" % cron, ""))
            self.run_cli("push", rx.url("/c"), "--schedule", "@daily", env=env)
            self.run_cli("push", rx.url("/c2"), "--schedule", "@hourly", env=env)
            self.assertEqual(self.run_cli("cron", "rm", "--all", env=env),
                             (0, "2 cron tasks removed\n", ""))
            year = datetime.now(UTC).year + 1
            self.assertEqual(self.run_cli("cron", "preview", "CRON_TZ=UTC 0 0 1 1 *", "-n", "1",
                                          env=env),
                             (0, "%d-01-01T00:00:00+00:00\n" % year, ""))
            code, out, err = self.run_cli("cron", "preview", "0 0 \u00b2 * *", env=env)
            self.assertEqual((code, out), (1, ""))
            self.assertEqual(len(err.splitlines()), 1)
            rx.answers["/x"] = [(500, b"")]
            call(d.url, "POST", "/", {"url": rx.url("/x"), "max_tries": 1})
            call(d.url, "POST", "/resume")
            wait_until(lambda: call(d.url, "GET", "/dead")[2]["total"] == 1, what="dead")
            self.assertEqual(self.run_cli("dead", "purge", env=env),
                             (0, "1 dead tasks purged\n", ""))
            for command in (["dead", "purge"], ["cron", "rm"], ["cron", "preview"]):
                code, out, _ = self.run_cli(*command, "--help")
                self.assertEqual(code, 0)
                self.assertIn("usage: poussetaches " + " ".join(command), out)
            # a port clash names the address and what to do
            code, out, err = self.run_cli("serve", "--host", "127.0.0.1", "--port", str(d.port),
                                          "--data-dir", os.path.join(d.settings.data_dir, "other"))
            self.assertEqual(code, 1)
            self.assertIn("cannot listen on 127.0.0.1:%d" % d.port, err)
            self.assertIn("another --port", err)
            self.assertNotIn("Traceback", err)
            # the port comes first: a daemon that cannot listen makes no data dir
            self.assertFalse(os.path.exists(os.path.join(d.settings.data_dir, "other")))
            self.assertNotIn("recovered", err)

    def test_wrong_key_says_does_not_match(self):
        client = pt.PousseTaches("http://127.0.0.1:1", auth_key="right")
        body = b'{"payload": "", "tries": 1, "req_id": "x"}'
        with self.assertRaises(pt.AuthError) as ctx:
            client.parse(headers={"Poussetaches-Auth-Key": "wrong"}, body=body)
        self.assertIn("does not match", str(ctx.exception))
        with self.assertRaises(pt.AuthError) as ctx:
            client.parse(headers={}, body=body)
        self.assertIn("neither", str(ctx.exception))


# --------------------------------------------------------------------------
# Observability: logs, health, metrics, OpenAPI, the dashboard
# --------------------------------------------------------------------------


class TestObservability(unittest.TestCase):
    """What an operator watches: logs, health, metrics, OpenAPI, the dashboard."""

    def test_metrics(self):
        with receiver() as rx, running_daemon() as d:
            rx.answers["/bad"] = [(500, b"")]
            call(d.url, "POST", "/", {"url": rx.url("/ok")})
            call(d.url, "POST", "/", {"url": rx.url("/later"), "delay_s": 600})
            call(d.url, "POST", "/", {"url": rx.url("/bad"), "max_tries": 1})
            wait_until(lambda: call(d.url, "GET", "/dead")[2]["total"] == 1, what="dead")
            wait_until(lambda: call(d.url, "GET", "/success")[2]["total"] == 1, what="success")
            status, headers, text = call(d.url, "GET", "/metrics")
            self.assertEqual(status, 200)
            self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
            types, samples = parse_prometheus(text.decode())
        m = lambda name, **labels: samples[("poussetaches_" + name, tuple(sorted(labels.items())))]
        self.assertEqual(m("tasks", table="waiting"), 1)
        self.assertEqual(m("tasks", table="success"), 1)
        self.assertEqual(m("tasks", table="dead"), 1)
        self.assertEqual(m("attempts_total", outcome="success"), 1)
        self.assertEqual(m("attempts_total", outcome="failure"), 1)
        self.assertEqual(m("enqueued_total"), 3)
        self.assertEqual(m("dead_total"), 1)
        self.assertEqual((m("journal_errors_total"), m("healthy"), m("in_flight")), (0, 1, 0))
        self.assertEqual(m("open_circuit_breakers"), 0)
        self.assertEqual(types["poussetaches_attempt_duration_seconds"], "histogram")
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items()
                         if k[0] == "poussetaches_attempt_duration_seconds_bucket")
        counts = [v for _, v in buckets]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(buckets[-1], (float("inf"), 2))
        self.assertEqual(m("attempt_duration_seconds_count"), 2)

    def test_openapi_matches_the_server(self):
        with running_daemon() as d:
            status, _, doc = call(d.url, "GET", "/openapi.json")
            self.assertEqual(status, 200)
            self.assertEqual(doc["openapi"], "3.1.0")
            served = {(r.method, r.pattern) for r in pt.Api.ROUTES}
            documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
            self.assertEqual(served, documented)
            for route in pt.Api.ROUTES:
                op = doc["paths"][route.pattern][route.method.lower()]
                always = (400, 403) if route.handler == "healthz" else (400, 401, 403)
                self.assertEqual(set(op["responses"]), {str(c) for c in route.statuses + always})
                names = {p["name"] for p in op.get("parameters", ())}
                expected = {n for n, _, _ in route.params} | set(
                    re.findall(r"\{(\w+)\}", route.pattern))
                if route.handler == "enqueue":
                    expected.add("Idempotency-Key")
                self.assertEqual(names, expected, route)
            # the answers with a schema of their own carry its properties, no others
            schemas = doc["components"]["schemas"]
            self.assertEqual(call(d.url, "PUT", "/queues/mail", {"rate": 5})[0], 200)
            queue = call(d.url, "GET", "/queues/mail")[2]
            self.assertEqual(set(queue), set(schemas["Queue"]["properties"]))
            self.assertLessEqual(set(queue["settings"]), set(schemas["QueueSettings"]["properties"]))
            self.assertEqual(set(call(d.url, "GET", "/queues")[2]),
                             set(schemas["QueueList"]["properties"]))
            batch = call(d.url, "POST", "/batch", {"tasks": [{"url": "http://127.0.0.1:9/b"}]})[2]
            self.assertLessEqual(set(batch["tasks"][0]), set(
                schemas["BatchAnswer"]["properties"]["tasks"]["items"]["properties"]))
            error = call(d.url, "POST", "/batch", {"tasks": [{"url": "http://127.0.0.1:9/b"}, 1]})
            self.assertEqual((error[0], error[2]), (400, {
                "error": "tasks[1]: a task must be a JSON object", "index": 1, "field": "tasks"}))
            self.assertEqual(set(error[2]), set(schemas["Error"]["properties"]))
            self.assertEqual(set(call(d.url, "DELETE", "/queues/mail")[2]),
                             set(schemas["QueueDeleted"]["properties"]))
            # and against the live server: undocumented methods are 405 with the
            # documented ones in Allow; documented ones answer a documented status
            for path, ops in doc["paths"].items():
                concrete = path.replace("{id}", "0" * 32).replace("{name}", "some-queue")
                allowed = sorted(m.upper() for m in ops)
                for method in ("GET", "POST", "DELETE", "PUT", "PATCH"):
                    with self.subTest(path=path, method=method):
                        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
                        status, headers, _ = call(d.url, method, concrete, raw=body)
                        if method.lower() in ops:
                            self.assertIn(str(status), ops[method.lower()]["responses"])
                        else:
                            self.assertEqual(status, 405)
                            self.assertEqual(sorted(headers["Allow"].split(", ")), allowed)

    def test_openapi_says_what_the_server_checks(self):
        """Points where schemathesis found the document and the daemon apart:
        each documented bound or pattern is checked against a live answer."""
        with running_daemon(allow_urls=["http://127.0.0.1:9/t"], api_key="k") as d:
            auth = {"Authorization": "Bearer k"}
            doc = call(d.url, "GET", "/openapi.json", headers=auth)[2]
            self.assertNotIn({}, doc["security"])  # a key is needed: anonymous is not a way in
            waiting = {p["name"]: p for p in doc["paths"]["/waiting"]["get"]["parameters"]}
            self.assertEqual((waiting["offset"]["schema"]["maximum"],
                              waiting["limit"]["schema"]["maximum"]), (10 ** 9, 100000))
            self.assertEqual(call(d.url, "GET", "/waiting?offset=1000000000", headers=auth)[0], 200)
            self.assertEqual(call(d.url, "GET", "/waiting?limit=100001", headers=auth)[0], 400)
            listing = call(d.url, "GET", "/waiting", headers=auth)[2]
            self.assertIsNone(listing["limit"])
            self.assertIn("null", doc["components"]["schemas"]["TaskList"]["properties"]
                          ["limit"]["type"])
            preview = doc["paths"]["/cron/preview"]["get"]["parameters"]
            self.assertTrue([p for p in preview if p["name"] == "schedule"][0]["required"])
            queue = [p for p in doc["paths"]["/queues/{name}"]["put"]["parameters"]][0]
            self.assertEqual(queue["schema"]["pattern"], "^[a-z0-9_-]{1,64}$")
            enqueue = doc["components"]["schemas"]["EnqueueRequest"]["properties"]
            url = re.compile(enqueue["url"]["pattern"])
            for target, fits in (("http://127.0.0.1:9/t", True), ("http://127.0.0.1:9/t/x", True),
                                 ("http://127.0.0.1:9/tx", False), ("http://127.0.0.1:9/", False)):
                self.assertEqual(bool(url.search(target)), fits, target)
                status = call(d.url, "POST", "/", {"url": target}, headers=auth)[0]
                self.assertEqual(status, 201 if fits else 400, target)
            # integral floats are integers in JSON Schema: taken, and stored as ints
            status, _, task = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/t",
                                                        "priority": 3.0, "max_tries": 2.0},
                                   headers=auth)
            self.assertEqual((status, task["priority"], task["max_tries"]), (201, 3, 2))
            self.assertIsInstance(task["priority"], int)
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/t",
                                                       "priority": 3.5}, headers=auth)[0], 400)
            # a too short id prefix names no task: 404, with the hint
            status, _, error = call(d.url, "GET", "/tasks/abc", headers=auth)
            self.assertEqual((status, "at least 6" in error["error"]), (404, True))

    def test_dashboard_is_self_contained(self):
        import html.parser

        class Collect(html.parser.HTMLParser):
            def __init__(self):
                super().__init__()
                self.tags, self.ids, self.scripts = [], set(), []

            def handle_starttag(self, tag, attrs):
                attrs = dict(attrs)
                self.tags.append((tag, attrs))
                if "id" in attrs:
                    self.ids.add(attrs["id"])

            def handle_data(self, data):
                if self.tags and self.tags[-1][0] == "script":
                    self.scripts.append(data)

        with running_daemon(api_key="k") as d:
            status, headers, _ = call(d.url, "GET", "/ui")
            self.assertEqual(status, 401)
            self.assertIn("Basic", headers["WWW-Authenticate"])  # the browser prompts
            status, headers, page = call(d.url, "GET", "/ui",
                                         headers={"Authorization": "Basic " + b64(b":k")})
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        text = page.decode()
        parser = Collect()
        parser.feed(text)
        self.assertEqual(parser.tags[0][0], "html")
        # "Retry dead" is a per-tab action: the actions bar holds it
        self.assertLessEqual({"counts", "rows", "tabs", "toggle", "actions", "prev", "next",
                              "page"}, parser.ids)
        self.assertIn(("meta", {"name": "viewport",
                                "content": "width=device-width, initial-scale=1"}), parser.tags)
        for tag, attrs in parser.tags:  # nothing loaded from elsewhere
            self.assertNotIn("src", attrs, tag)
            self.assertFalse(tag == "link" and "href" in attrs, attrs)
        self.assertNotRegex(text, r"https?://")
        script = "".join(parser.scripts)
        for needle in ('"/pause"', '"/resume"', '"/dead/retry"', '"/tasks/"', "setInterval",
                       "attempts", "offset", "@media", 'act("DELETE","/dead")', "t.held",
                       '"held: "', "t.headers", "pretty(t.payload)", 'table==="dead"',
                       '"/queues"', '"&q="', "oldest_due_age_s",
                       # the hash drives the tab: /ui#dead then #waiting (Back too) switches
                       'addEventListener("hashchange"', "TABLES.includes(h)"):
            self.assertIn(needle, script + text, needle)

    @unittest.skipIf(shutil.which("node") is None, "node is not installed to check the script")
    def test_dashboard_script_parses(self):
        # a Python string escape once broke the script: check it with a real JS parser
        page = pt.DASHBOARD_HTML
        script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
        with tempfile.NamedTemporaryFile("w", suffix=".js", delete=False) as f:
            f.write(script)
        self.addCleanup(os.unlink, f.name)
        proc = subprocess.run(["node", "--check", f.name], capture_output=True, timeout=WAIT)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode())

    def test_every_event_of_a_daemon_s_life_is_structured_in_json(self):
        """SPEC 6: with --log-json, start, pause/resume (all, or a queue), breakers
        and stop are events with fields, not messages wrapped in "event": "log"."""
        with self.assertLogs("poussetaches", "INFO") as logs:
            with running_daemon() as d:
                for path in ("/pause", "/resume", "/queues/mail/pause", "/queues/mail/resume"):
                    self.assertEqual(call(d.url, "POST", path)[0], 200)
            breakers = pt.Breakers(pt.DueQueue())
            for _ in range(pt.BREAKER_THRESHOLD):
                breakers.record("http://a:80", True)
            breakers.record("http://a:80", False)
        self.assertEqual([r.getMessage() for r in logs.records if not hasattr(r, "event")], [])
        docs = [json.loads(pt.JSONFormatter().format(r)) for r in logs.records]
        self.assertEqual([(doc["event"], doc.get("queue")) for doc in docs], [
            ("recovered", None), ("start", None), ("pause", None), ("resume", None),
            ("pause", "mail"), ("resume", "mail"), ("stopping", None), ("stop", None),
            ("breaker_open", None), ("breaker_close", None)])
        self.assertEqual((docs[1]["url"], docs[1]["count"]), (d.url, d.dispatcher.workers))
        self.assertEqual((docs[0]["count"], docs[-2]["origin"], docs[-2]["count"]),
                         (0, "http://a:80", pt.BREAKER_THRESHOLD))

    def test_log_json(self):
        record = logging.LogRecord("poussetaches", logging.WARNING, __file__, 1,
                                   "task %s attempt %d -> %s", ("abc", 2, 500), None)
        doc = json.loads(pt.JSONFormatter().format(record))
        self.assertEqual((doc["level"], doc["message"]), ("WARNING", "task abc attempt 2 -> 500"))

    def test_queue_metrics(self):
        with receiver() as rx, running_daemon() as d:
            call(d.url, "POST", "/queues/held/pause")
            call(d.url, "POST", "/", {"url": rx.url("/h"), "queue": "held"})
            call(d.url, "POST", "/", {"url": rx.url("/m"), "queue": "mail"})
            rx.wait_for(1, path="/m")
            # a queue without tasks or settings of its own is forgotten (30,000 one-task
            # queues would otherwise stay in every answer of /queues and /metrics)
            wait_until(lambda: call(d.url, "GET", "/queues/mail")[0] == 404, what="mail gone")
            _, _, text = call(d.url, "GET", "/metrics")
            types, samples = parse_prometheus(text.decode())
            m = lambda name, **labels: samples[("poussetaches_" + name,
                                                tuple(sorted(labels.items())))]
            self.assertEqual((m("queue_waiting", queue="held"), m("queue_due", queue="held")),
                             (1, 1))
            self.assertNotIn(("poussetaches_queue_waiting", (("queue", "mail"),)), samples)
            self.assertEqual(m("queue_attempts_total", queue="mail", outcome="success"), 1)
            self.assertEqual(m("queue_in_flight", queue="held"), 0)
            self.assertGreaterEqual(m("queue_oldest_due_age_seconds", queue="held"), 0)
            self.assertEqual(types["poussetaches_queue_attempts_total"], "counter")

    def test_delivery_logs_at_info_with_fields(self):
        logger = logging.getLogger("poussetaches")
        with receiver() as rx, running_daemon(min_backoff=5.0, max_backoff=5.0) as d:
            rx.answers["/bad"] = [(500, b"Traceback...\nKeyError: 'user'")]
            rx.answers["/gone"] = [(410, b"")]
            with self.assertLogs("poussetaches", "INFO") as logs:
                ok = call(d.url, "POST", "/", {"url": rx.url("/ok")})[2]["id"]
                bad = call(d.url, "POST", "/", {"url": rx.url("/bad"), "queue": "mail"})[2]["id"]
                gone = call(d.url, "POST", "/", {"url": rx.url("/gone"), "queue": "mail"})[2]["id"]
                rx.wait_for(1, path="/ok")
                rx.wait_for(1, path="/bad")
                wait_until(lambda: call(d.url, "GET", "/tasks/" + bad)[2]["tries"] == 1
                           and call(d.url, "GET", "/tasks/" + ok)[2]["state"] == "success"
                           and call(d.url, "GET", "/tasks/" + gone)[2]["state"] == "dead",
                           what="the three outcomes")
                # each line follows its outcome: wait for the lines themselves
                wait_until(lambda: {ok, bad, gone} <= {
                    getattr(r, "task_id", None) for r in logs.records
                    if getattr(r, "event", "") == "delivery"} and any(
                    getattr(r, "event", "") == "dead" for r in logs.records),
                    what="the log lines", poll=0.05)
        dead = [r for r in logs.records if getattr(r, "event", "") == "dead"]
        self.assertEqual([(r.task_id, r.queue, r.status) for r in dead], [(gone, "mail", 410)])
        records = {r.task_id: r for r in logs.records if getattr(r, "event", "") == "delivery"}
        self.assertEqual(records[ok].levelno, logging.INFO)
        self.assertIn(rx.url("/ok"), records[ok].getMessage())
        self.assertEqual((records[ok].status, records[ok].url, records[ok].queue),
                         (200, rx.url("/ok"), "default"))
        self.assertIn("(queue mail)", records[bad].getMessage())  # SPEC 6: the queue, too
        failed = records[bad]
        self.assertEqual(failed.levelno, logging.WARNING)
        self.assertIn("KeyError: 'user'", failed.getMessage())
        self.assertIn("next attempt at", failed.getMessage())
        doc = json.loads(pt.JSONFormatter().format(failed))
        self.assertRegex(doc["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertRegex(doc["next_run"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual((doc["level"], doc["event"], doc["task_id"], doc["queue"], doc["url"],
                          doc["status"], doc["attempt"]),
                         ("WARNING", "delivery", bad, "mail", rx.url("/bad"), 500, 1))
        self.assertIsInstance(doc["duration_ms"], float)
        self.assertIn("KeyError", doc["error"])
        next_run = datetime.fromisoformat(doc["next_run"].replace("Z", "+00:00")).timestamp()
        self.assertAlmostEqual(next_run, time.time() + 5, delta=3)
        self.assertIs(logger.propagate, False)

    def test_loading_line_before_recovery(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        with running_daemon(data_dir=data, paused=True) as d:
            call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/x"})
        with self.assertLogs("poussetaches", "INFO") as logs:
            with running_daemon(data_dir=data, paused=True):
                pass
        loading = [i for i, m in enumerate(logs.output) if "loading snapshot.json" in m]
        recovered = [i for i, m in enumerate(logs.output) if "recovered 1 waiting" in m]
        self.assertTrue(loading and recovered and loading[0] < recovered[0], logs.output)

    def test_healthz(self):
        broken = threading.Event()

        class BrokenFS(pt.FileSystem):
            def open(self, path, flags, mode=0o777):
                if broken.is_set():
                    raise OSError(28, "No space left on device")
                return os.open(path, flags, mode)

        with running_daemon(api_key="k", fs=BrokenFS()) as d:
            self.assertEqual(call(d.url, "GET", "/healthz")[:3:2], (200, {"ok": True}))
            self.assertEqual(call(d.url, "GET", "/metrics")[0], 401)
            broken.set()
            d.store.journal._close_quietly()
            auth = {"Authorization": "Bearer k"}
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/"},
                                  headers=auth)[0], 503)
            status, _, doc = call(d.url, "GET", "/healthz")
            self.assertEqual((status, doc["ok"]), (503, False))
            self.assertNotIn("127.0.0.1:1", json.dumps(doc))
            broken.clear()
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:1/",
                                                       "delay_s": 60}, headers=auth)[0], 201)
            self.assertEqual(call(d.url, "GET", "/healthz")[0], 200)

    def test_metrics_for_alerts(self):
        shift = [0]  # the daemon's clock runs ahead by this many ns
        clock = lambda: time.time_ns() + shift[0]
        with receiver() as rx, running_daemon(paused=True, clock=clock) as d:
            call(d.url, "POST", "/", {"url": rx.url("/a")})
            call(d.url, "POST", "/", {"url": rx.url("/c"), "schedule": "@every 1h"})
            shift[0] = 5 * 10 ** 9  # five seconds later, the one-off task is still not run
            _, _, text = call(d.url, "GET", "/metrics")
            types, samples = parse_prometheus(text.decode())
            m = lambda name, **labels: samples[("poussetaches_" + name,
                                                tuple(sorted(labels.items())))]
            self.assertGreaterEqual(m("oldest_due_age_seconds"), 4.9)
            self.assertLess(m("oldest_due_age_seconds"), 6.0)
            self.assertEqual((m("tasks", table="waiting"), m("tasks", table="cron")), (1, 1))
            # one meaning of "waiting" (one-off tasks), crons apart, in every view; the
            # original's GET /waiting still lists both
            status = call(d.url, "GET", "/")[2]
            queues = call(d.url, "GET", "/queues")[2]["queues"]
            self.assertEqual((status["waiting"], status["cron"]),
                             (m("tasks", table="waiting"), m("tasks", table="cron")))
            self.assertEqual((sum(q["waiting"] for q in queues), sum(q["cron"] for q in queues)),
                             (1, 1))
            self.assertEqual(sum(m("queue_waiting", queue=q["name"]) for q in queues), 1)
            self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 2)
            self.assertEqual([call(d.url, "GET", "/waiting?cron=" + c)[2]["total"]
                              for c in ("false", "true")], [1, 1])
            self.assertEqual(call(d.url, "GET", "/waiting?cron=yes")[0], 400)
            code, out, _ = TestCli.run_cli(self, "--url", d.url, "ls", "waiting")
            self.assertTrue(out.endswith("1 of 1 waiting tasks, the soonest first\n"), out)
            code, out, _ = TestCli.run_cli(self, "--url", d.url, "status")
            self.assertIn("tasks:     1 waiting, 1 cron,", out)
            self.assertEqual(m("build_info", version=pt.__version__,
                               python=sys.version.split()[0]), 1)
            call(d.url, "POST", "/resume")
            rx.wait_for(1, path="/a")
            wait_until(lambda: call(d.url, "GET", "/success")[2]["total"], what="success")
            _, _, text = call(d.url, "GET", "/metrics")
            types, samples = parse_prometheus(text.decode())
            origin = pt.origin_of(rx.url())
            self.assertEqual(m("origin_attempts_total", origin=origin, outcome="success"), 1)
            self.assertEqual(m("oldest_due_age_seconds"), 0)
            self.assertEqual(types["poussetaches_origin_attempts_total"], "counter")

    def test_status_shows_breakers_for_the_dashboard(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d/down" % s.getsockname()[1]
        s.close()
        with running_daemon(max_tries=50) as d:
            for _ in range(6):
                call(d.url, "POST", "/", {"url": url})
            doc = wait_until(lambda: call(d.url, "GET", "/")[2]["breakers"], what="a breaker")
            self.assertEqual(doc[0]["origin"], pt.origin_of(url))
            self.assertGreater(doc[0]["next_probe"], time.time_ns() - 10 ** 9)


# --------------------------------------------------------------------------
# The drop-in: the original's data directory, its client, its defaults
# --------------------------------------------------------------------------


class TestDropIn(unittest.TestCase):
    """The drop-in: a microblog.pub instance moves over from the original daemon,
    with its data directory, its client and its defaults."""

    def test_migration_keeps_crons_and_counts_what_it_holds(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "poussetaches_data")
        s, now = 10 ** 9, time.time_ns()
        with receiver() as rx:
            app = rx.base
            # the hourly cleanup has run: its schedule in waiting/ (overdue by a second,
            # so it runs as soon as dispatch starts), its last run in success/
            slot = now - now % s - s
            cleanup, sched = original_file(app + "/task/cleanup", b"{}", schedule="@every 1h",
                                           next_run=slot, last_run=slot - 3600 * s)
            _, last = original_file(app + "/task/cleanup", b"{}", schedule="@every 1h",
                                    next_run=slot - 3600 * s, tries=2,
                                    last_run=slot - 3600 * s + 150 * 10 ** 6,
                                    last_error_body=b"connection refused",
                                    last_error_status_code=-1)
            # a cron the original dropped from waiting/ at a restart: only success/ has it
            dropped, only_run = original_file(app + "/task/refresh", b"{}", schedule="@every 1h",
                                              next_run=now - 1800 * s, tries=1,
                                              last_run=now - 1800 * s)
            # a dead task with a multi-byte traceback, a mid-retry one, a plain one
            trace = ("Traceback (most recent call last):\n  \u00e9\u00e8 \u2713\n"
                     "ValueError: caf\u00e9 \u2603\n").encode()
            dead_id, dead = original_file(app + "/task/process", b'{"iri": "x"}', tries=11,
                                          next_run=now - 60 * s, last_run=now - 60 * s,
                                          last_error_body=trace, last_error_status_code=500)
            retry_id, retry = original_file(app + "/task/send", b'{"to": 1}', tries=3,
                                            next_run=now + 3600 * s, last_run=now - 16 * s,
                                            last_error_body=b"Post http://web:5005/task/send: "
                                            b"dial tcp: connect: connection refused",
                                            last_error_status_code=-1)
            plain_id, plain = original_file(app + "/task/plain", None, next_run=now + 7200 * s)
            done_id, done = original_file(app + "/task/done", b"[]", tries=1,
                                          next_run=now - 99 * s, last_run=now - 99 * s)
            files = [("waiting", (cleanup, sched)), ("success", (cleanup, last)),
                     ("success", (dropped, only_run)), ("dead", (dead_id, dead)),
                     ("waiting", (retry_id, retry)), ("waiting", (plain_id, plain)),
                     ("success", (done_id, done))]
            write_original(data, files)
            before = {(f, i): d for f, (i, d) in files}
            os.chmod(data, 0o755)  # the original's folder mode: not writable by others
            with self.assertLogs("poussetaches", "INFO") as logs:
                with running_daemon(data_dir=data, paused=True) as d:
                    tables = {t: call(d.url, "GET", "/" + t)[2] for t in
                              ("waiting", "success", "dead", "cron")}
            line = [m for m in logs.output if "imported" in m]
            self.assertEqual(len(line), 1, logs.output)
            counts = {t: tables[t]["total"] for t in tables}
            self.assertEqual(counts, {"waiting": 4, "cron": 2, "success": 3, "dead": 1})
            self.assertIn("4 waiting (2 cron, 1 of them restored from their last run), "
                          "3 success, 1 dead", line[0])
            self.migration_line = line[0]
            cron = {t["id"]: t for t in tables["cron"]["tasks"]}
            self.assertEqual(set(cron), {cleanup, dropped})
            self.assertEqual(cron[cleanup]["next_run"], slot)
            self.assertGreater(cron[dropped]["next_run"], now)  # restored: computed from now
            runs = {t["cron_id"]: t for t in tables["success"]["tasks"] if t["cron_id"]}
            self.assertEqual(set(runs), {cleanup, dropped})
            self.assertNotIn(runs[cleanup]["id"], (cleanup, dropped))
            self.assertEqual(runs[cleanup]["tries"], 2)
            for table in tables.values():
                for doc in table["tasks"]:
                    expand_like_the_original(doc)  # the admin page parses every entry
            dead_doc = tables["dead"]["tasks"][0]
            self.assertEqual(base64.b64decode(dead_doc["last_error_body"]), trace)
            # the app starts and re-registers its cron, exactly as the original client does
            with running_daemon(data_dir=data) as d:
                status, headers, _ = original_push(d.url, app + "/task/cleanup", {},
                                                   schedule="@every 1h")
                self.assertIn(status, (200, 201))
                self.assertEqual(headers["Poussetaches-Task-ID"], cleanup)
                self.assertEqual(call(d.url, "GET", "/cron")[2]["total"], 2)
                self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 4)
                # the overdue cleanup runs; its schedule goes on an hour later
                got = rx.wait_for(1, path="/task/cleanup")
                self.assertEqual(got[0]["json"]["payload"], b64(b"{}"))
                after = wait_until(lambda: call(d.url, "GET", "/tasks/" + cleanup)[2]
                                   if call(d.url, "GET", "/tasks/" + cleanup)[2]["next_run"]
                                   > now + 3000 * s else None, what="the next cleanup")
                self.assertEqual(after["schedule"], "@every 1h")
                self.assertEqual(after["state"], "waiting")
            # the old folders are untouched
            for (folder, task_id), data_bytes in before.items():
                with open(os.path.join(data, folder, task_id), "rb") as f:
                    self.assertEqual(f.read(), data_bytes)

    def test_a_run_record_never_stops_a_schedule(self):
        # success/<id> under the cron's own id, no schedule anywhere: the re-post creates it
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        with running_daemon(data_dir=data, paused=True) as d:
            url = "http://127.0.0.1:1/task/cleanup"
            task_id = hashlib.sha1(url.encode() + b"{}" + b"@every 1h").hexdigest()
            record = pt.Task(task_id, url, b"{}", tries=1)
            with d.store._lock:
                ticket = d.store._put("success", record)
            ticket.wait()
            status, headers, _ = original_push(d.url, url, {}, schedule="@every 1h")
            self.assertEqual((status, headers["Poussetaches-Task-ID"]), (201, task_id))
            self.assertEqual(call(d.url, "GET", "/cron")[2]["total"], 1)

    def test_listing_without_limit_returns_every_task(self):
        with running_daemon(paused=True, fsync="never") as d:
            client = pt.PousseTaches(d.url, "http://127.0.0.1:1")
            self.addCleanup(client.close)
            for i in range(1500):
                client.push({"n": i}, "/t/%d" % i, delay_s=(1500 - i) * 0.1 + 60)
            for path in ("/waiting", "/waiting?offset=10"):
                status, headers, doc = call(d.url, "GET", path)
                self.assertEqual(status, 200)
                self.assertEqual(headers["Transfer-Encoding"], "chunked")
                tasks = [expand_like_the_original(t) for t in doc["tasks"]]
                self.assertEqual(doc["total"], 1500)
                self.assertEqual(len(tasks), 1500 if path == "/waiting" else 1490)
                self.assertEqual([t["next_run"] for t in tasks], sorted(t["next_run"] for t in tasks))
            self.assertEqual({t["payload"]["n"] for t in
                              (expand_like_the_original(t) for t in doc["tasks"])},
                             set(range(1490)))
            self.assertEqual(len(client.get_waiting()), 1500)
            self.assertEqual(len(call(d.url, "GET", "/waiting?limit=100")[2]["tasks"]), 100)
            # the latest first, on request: streamed in pieces, or paged, or filtered
            everything = [t["id"] for t in call(d.url, "GET", "/waiting")[2]["tasks"]]
            latest = [t["id"] for t in call(d.url, "GET", "/waiting?order=desc")[2]["tasks"]]
            self.assertEqual(latest, everything[::-1])
            pages = [t["id"] for offset in range(0, 1500, 600) for t in call(
                d.url, "GET", "/waiting?order=desc&limit=600&offset=%d" % offset)[2]["tasks"]]
            self.assertEqual(pages, latest)
            matching = [t["id"] for t in call(d.url, "GET", "/waiting?order=desc&offset=2&q=/t/1")[
                2]["tasks"]]
            ones = {t["id"] for t in call(d.url, "GET", "/waiting?q=/t/1")[2]["tasks"]}
            self.assertEqual(matching, [i for i in latest if i in ones][2:])
            status, _, doc = call(d.url, "GET", "/waiting?order=newest")
            self.assertEqual((status, doc["error"]), (400, "order must be asc or desc, not 'newest'"))
            # HTTP/1.0 gets the same without chunks, closed at the end
            answer = raw_exchange(d.port, b"GET /cron HTTP/1.0\r\n\r\n")
            self.assertTrue(answer.endswith(b'"tasks":[]}\n'), answer[-60:])

    def test_a_payload_wrapped_by_base64_is_taken_as_the_original_took_it(self):
        """Go's decoder skips CR and LF, so the original took a payload from `base64`
        (76-column lines), as shell scripts make them; MIME encoding is the oracle."""
        data = bytes(range(256)) * 3
        with running_daemon(paused=True) as d:
            for text in (base64.encodebytes(data).decode(),
                         base64.encodebytes(data).decode().replace("\n", "\r\n")):
                status, _, doc = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/x",
                                                           "payload": text})
                self.assertEqual(status, 201, doc)
                self.assertEqual(base64.b64decode(doc["payload"]), data)
            status, _, doc = call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/x",
                                                       "payload": "YWJj\n!"})
            self.assertEqual((status, doc["field"]), (400, "payload"))

    def test_original_defaults(self):
        d = pt.Daemon(port=0, data_dir="unused")
        self.assertEqual((pt.DEFAULT_TIMEOUT, pt.DEFAULT_MAX_TRIES, pt.DEFAULT_MAX_BODY),
                         (600.0, 11, 16 << 20))
        self.assertEqual(d._delivery.timeout, 600.0)
        with receiver() as rx, running_daemon(min_backoff=0.001, max_backoff=0.01) as d:
            rx.answers["/fail"] = [(500, b"no")]
            task_id = call(d.url, "POST", "/", {"url": rx.url("/fail")})[2]["id"]
            dead = wait_until(lambda: call(d.url, "GET", "/tasks/" + task_id)[2]
                              if call(d.url, "GET", "/tasks/" + task_id)[2]["state"] == "dead"
                              else None, what="dead")
            self.assertEqual((dead["tries"], len(rx.wait_for(11, path="/fail"))), (11, 11))
            # 10 MB of payload is accepted and delivered; 17 MB is a 413
            big = os.urandom(10 * 10 ** 6)
            status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/big"), "payload": b64(big)})
            self.assertEqual(status, 201)
            got = rx.wait_for(1, path="/big")[0]
            self.assertEqual(base64.b64decode(got["json"]["payload"]), big)
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                          % (17 * 10 ** 6) + b"x" * 65536)
                answer = s.recv(4096)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:40])
            self.assertIn(b"--max-body", answer)

    def test_a_long_task_runs_once(self):
        # the original had no time-out; ours is 600 s: a handler slower than the
        # old 30 s is delivered once (scaled: 2 s against a 3 s time-out here,
        # the real 35 s against the default in the stress set)
        slow, limit = (35, None) if STRESS else (1.0, 1.5)
        with receiver() as rx, running_daemon() as d:
            rx.answers["/slow"] = [(200, b"", {}, slow)]
            body = {"url": rx.url("/slow")}
            if limit:
                body["timeout_s"] = limit
            task_id = call(d.url, "POST", "/", body)[2]["id"]
            done = wait_until(lambda: call(d.url, "GET", "/tasks/" + task_id)[2]
                              if call(d.url, "GET", "/tasks/" + task_id)[2]["state"] == "success"
                              else None, timeout=slow + WAIT, what="success")
            self.assertEqual((done["tries"], done["last_error_status_code"]), (1, 200))
            self.assertEqual(len(rx.got), 1)

    def test_error_body_head_and_tail_at_utf8_boundaries(self):
        # 20 KB of two- and three-byte characters; the useful line is the last one
        text = ("Traceback (most recent call last):\n" + "\u00e9\u20ac" * 4000
                + "\nValueError: the useful line \u2603\n")
        body = text.encode()
        self.assertGreater(len(body), 20000)
        stored = pt.clip_error_body(body)
        self.assertLessEqual(len(stored), 16 * 1024 + 40)
        decoded = stored.decode("utf-8")  # strict, as the original client decodes it
        self.assertTrue(decoded.endswith("ValueError: the useful line \u2603\n"))
        self.assertTrue(decoded.startswith("Traceback (most recent call last):\n"))
        self.assertIn("bytes cut ...]", decoded)
        head, _, tail = stored.partition(b"\n[...")
        self.assertTrue(body.startswith(head) and body.endswith(tail.partition(b"]\n")[2]))
        for n in range(16 * 1024 - 8, 16 * 1024 + 16):  # every cut point near the limit
            for unit in ("\u00e9", "\u20ac", "\U0001f600"):
                sample = (unit * n).encode()[:n + 3]
                sample = sample[:len(sample) - len(sample) % len(unit.encode())]
                sample.decode()
                pt.clip_error_body(sample).decode("utf-8")
        self.assertEqual(pt.clip_error_body(b"short"), b"short")
        # an answer cut by the 64 KiB read may end inside a character: the stored body
        # ends before it, as the stdlib's incremental decoder (the oracle) stops there
        import codecs
        mixed = "a\u00e9\u20ac\U0001f600".encode()
        for n in range(len(mixed) * 3 + 1):
            for size in (n, 40000 + n):
                cut = (mixed * (size // len(mixed) + 1))[:size]
                whole = codecs.getincrementaldecoder("utf-8")().decode(cut, final=False)
                if size < 16 * 1024:
                    self.assertEqual(pt.clip_error_body(cut), whole.encode(), n)
                else:
                    stored = pt.clip_error_body(cut).decode("utf-8")
                    self.assertTrue(whole.endswith(stored.rpartition(" bytes cut ...]\n")[2]))
        with receiver() as rx, running_daemon(max_tries=1) as d:
            rx.answers["/trace"] = [(500, body)]
            task_id = call(d.url, "POST", "/", {"url": rx.url("/trace")})[2]["id"]
            dead = wait_until(lambda: call(d.url, "GET", "/dead")[2]["tasks"], what="dead")[0]
            self.assertEqual(dead["id"], task_id)
            self.assertEqual(expand_like_the_original(dead)["last_error_body"], decoded)

    def test_success_shows_the_success(self):
        with receiver() as rx, running_daemon() as d:
            rx.answers["/flaky"] = [(503, b"down"), (200, b"")]
            task_id = call(d.url, "POST", "/", {"url": rx.url("/flaky")})[2]["id"]
            done = wait_until(lambda: call(d.url, "GET", "/tasks/" + task_id)[2]
                              if call(d.url, "GET", "/tasks/" + task_id)[2]["state"] == "success"
                              else None, what="success")
            self.assertEqual((done["last_error_status_code"], done["last_error_body"]), (200, None))
            self.assertEqual([a["status"] for a in done["attempts"]], [503, 200])
            self.assertEqual(done["attempts"][0]["error"], "down")

    def test_imported_tasks_are_checked_like_enqueues(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        with receiver() as rx:
            smuggle = "b\r\n\r\n" + "POST /comments HTTP/1.1\r\nHost: app\r\nContent-Length: 120\r\n\r\n"
            files = [("waiting", original_file(rx.url("/task"), task_id="steal")),
                     ("waiting", original_file(rx.url("/task?x HTTP/1.1\r\nX-Injected: yes"),
                                               task_id="crlfurl")),
                     ("waiting", original_file(rx.url("/task"), task_id="..%2fdead")),
                     ("waiting", original_file("javascript:alert(1)", task_id="js")),
                     ("waiting", original_file(rx.url("/good"), task_id="good"))]
            write_original(data, files)
            for task_id, headers in (("steal", {"X-A": smuggle}), ("evilhost", {"Host": "evil"})):
                path = os.path.join(data, "waiting", task_id)
                doc = json.loads(original_file(rx.url("/task"), task_id=task_id)[1])
                doc["headers"] = headers
                with open(path, "w") as f:
                    json.dump(doc, f)
            # each field checked as an enqueue checks it: these crashed every start
            # (an unhashable queue) or retried for ever (a negative time-out)
            bad_fields = {"badqueue": {"queue": ["BAD"]}, "pathqueue": {"queue": "Q Q/../x"},
                          "negtimeout": {"timeout_s": -5}, "notries": {"max_tries": 0},
                          "bigprio": {"priority": 10 ** 6}, "negtries": {"tries": -5},
                          "strtime": {"next_run": "soon"}, "badkey": {"ordering_key": 7},
                          "badattempts": {"attempts": [1, 2]}, "hugetime": {"created": 1e30},
                          "badexpected": {"expected": 99}}
            for task_id, fields in bad_fields.items():
                path = os.path.join(data, "waiting", task_id)
                doc = json.loads(original_file(rx.url("/task"), task_id=task_id)[1])
                doc.update(fields)
                with open(path, "w") as f:
                    json.dump(doc, f)
            with open(os.path.join(data, "dead", "notjson"), "w") as f:
                f.write("[1, 2")
            os.mkfifo(os.path.join(data, "waiting", "fifo"))  # must not hang the start
            with self.assertLogs("poussetaches", "WARNING") as logs:
                with running_daemon(data_dir=data, auth_key="s3cr3t",
                                    allow_urls=[rx.url("/task"), rx.url("/good")]) as d:
                    rx.wait_for(1, path="/good")
                    self.assertEqual(call(d.url, "GET", "/waiting")[2]["total"], 0)
                    names = [q["name"] for q in call(d.url, "GET", "/queues")[2]["queues"]]
                    self.assertEqual(names, ["default"])
            skipped = [m for m in logs.output if "import: skipped" in m]
            self.assertEqual(len(skipped), 7 + len(bad_fields), logs.output)
            for task_id in bad_fields:
                line = [m for m in skipped if "waiting/%s:" % task_id in m]
                self.assertEqual(len(line), 1, task_id)
                self.assertIn("moved to import-rejected/waiting/" + task_id, line[0])
            self.assertEqual([g["path"] for g in rx.got], ["/good"])
            rejected = os.path.join(data, "import-rejected")
            self.assertEqual(sorted(os.listdir(os.path.join(rejected, "waiting"))),
                             sorted(["steal", "crlfurl", "..%2fdead", "js", "evilhost", "fifo"]
                                    + list(bad_fields)))
            self.assertEqual(os.listdir(os.path.join(rejected, "dead")), ["notjson"])
            self.assertEqual(os.listdir(os.path.join(data, "waiting")), ["good"])


# --------------------------------------------------------------------------
# Reliability: stops, crashes, faults, bad input, load (POUSSETACHES_STRESS=1: longer)
# --------------------------------------------------------------------------


class TestCrash(unittest.TestCase):
    """Stops and crashes of a real daemon process, and what they leave."""

    def test_recovery_does_not_keep_a_heap_the_size_of_the_journal(self):
        """A daemon recovered from its journal held a heap about 2.5 times the
        journal (the file, its lines and every record were in memory at once,
        and the tasks built meanwhile kept the freed memory from going back):
        a 117 MB journal of churn took RSS from 76 to 294 MB.  Records are
        now read and applied one at a time."""
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        data, empty = os.path.join(tmp, "d"), os.path.join(tmp, "e")
        os.mkdir(data, 0o700)
        payload = bytes(random.Random(SEED).getrandbits(8) for _ in range(2000))
        with open(os.path.join(data, "journal.000000"), "wb") as f:
            for i in range(12000):  # tasks that came and went; the last 200 stay
                task = pt.Task("%032x" % i, "http://127.0.0.1:9/x", payload, next_run=NS)
                data_put = b'{"op":"put","table":"waiting","task":%s}' % pt.encode_task(task)
                f.write(b"%08x %s\n" % (binascii.crc32(data_put), data_put))
                if i < 11800:
                    data_del = pt._compact({"op": "del", "id": task.id}).encode()
                    f.write(b"%08x %s\n" % (binascii.crc32(data_del), data_del))
            journal = f.tell()

        def rss(process):
            with open("/proc/%d/status" % process.proc.pid) as status:
                return int([line for line in status if line.startswith("VmRSS")][0]
                           .split()[1]) * 1024

        fresh = DaemonProcess(empty, "--paused")
        try:
            baseline = rss(fresh)
        finally:
            fresh.terminate()
        recovered = DaemonProcess(data, "--paused")
        try:
            self.assertEqual(call(recovered.url, "GET", "/")[2]["waiting"], 200)
            grown = rss(recovered) - baseline
        finally:
            recovered.terminate()
        self.assertLess(grown, journal / 4, "RSS grew by %.1f MB over a fresh daemon's after "
                        "recovering a %.1f MB journal" % (grown / 1e6, journal / 1e6))
        print("\n  [figures] recovery of a %.1f MB journal: RSS %.1f MB above a fresh "
              "daemon's" % (journal / 1e6, grown / 1e6), file=sys.stderr)

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pt-crash-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, "data")

    def test_sigkill_keeps_every_acknowledged_task(self):
        with receiver() as rx:
            daemon = DaemonProcess(self.data, "--paused")
            acked = set()
            try:
                def client(n):
                    for i in range(n):
                        status, headers, _ = call(daemon.url, "POST", "/",
                                                  {"url": rx.url("/t"), "delay_s": 0})
                        if status == 201:
                            acked.add(headers["Poussetaches-Task-ID"])
                threads = [threading.Thread(target=client, args=(25,)) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(WAIT)
            finally:
                daemon.kill()
            self.assertEqual(len(acked), 100)
            again = DaemonProcess(self.data, "--paused")
            try:
                _, _, doc = call(again.url, "GET", "/waiting?limit=1000")
                self.assertEqual({t["id"] for t in doc["tasks"]}, acked)
                call(again.url, "POST", "/resume")
                rx.wait_for(100)
                self.assertEqual(again.terminate(), 0)
            finally:
                if again.proc.poll() is None:
                    again.kill()
            self.assertTrue(any("stopped" in line for line in again.lines))

    def test_sigterm_stops_gracefully_with_a_snapshot(self):
        with receiver() as rx:
            daemon = DaemonProcess(self.data, "--paused")
            call(daemon.url, "POST", "/", {"url": rx.url()})
            self.assertEqual(daemon.terminate(), 0)
        with open(os.path.join(self.data, "snapshot.json")) as f:
            self.assertEqual(len(json.load(f)["waiting"]), 1)
        self.assertEqual(os.stat(self.data).st_mode & 0o777, 0o700)

    def test_sigterm_while_starting_is_a_clean_stop(self):
        """A service manager may stop the daemon as soon as it starts: a SIGTERM
        sent at the recovery line (inside start, before "serving on") is a clean
        stop, exit 0, not death by the signal."""
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "poussetaches.py"),
                                 "--port", "0", "--data-dir", self.data],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.addCleanup(proc.stderr.close)
        lines = []
        for line in proc.stderr:
            lines.append(line.decode())
            if "recovered" in lines[-1]:
                proc.send_signal(signal.SIGTERM)
                break
        lines += [line.decode() for line in proc.stderr]
        self.assertEqual(proc.wait(WAIT), 0, "".join(lines))
        self.assertIn("stopped", lines[-1])

    def test_second_process_refused_with_clear_message(self):
        first = DaemonProcess(self.data)
        try:
            proc = subprocess.run([sys.executable, os.path.join(HERE, "poussetaches.py"),
                                   "--port", "0", "--data-dir", self.data],
                                  capture_output=True, timeout=WAIT)
            self.assertEqual(proc.returncode, 1)
            self.assertIn(b"another poussetaches (pid %d)" % first.proc.pid, proc.stderr)
        finally:
            first.terminate()

    def test_a_stop_ends_even_when_the_disk_refuses_its_last_record(self):
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        with receiver() as rx:
            rx.answers["/slow"] = [(200, b"", {}, 3.0)]
            with self.assertLogs("poussetaches", "ERROR") as logs:
                with running_daemon(data_dir=tmp, grace=0.2) as d:
                    call(d.url, "POST", "/", {"url": rx.url("/slow")})
                    wait_until(lambda: d.store.in_flight() == 1, what="under way", poll=0.01)

                    def refused(*args):
                        raise pt.PersistError("cannot write the journal: No space left")
                    d.store.note_interrupted = refused
            self.assertIn("could not record the interrupted attempt", "\n".join(logs.output))
            with running_daemon(data_dir=tmp, paused=True) as d:  # the lock was released
                self.assertEqual(call(d.url, "GET", "/")[2]["waiting"], 1)

    def test_an_attempt_cut_off_by_a_stop_is_recorded(self):
        """A SIGTERM during a 15 s task left no trace of that attempt: after the
        restart, attempts listed only the second run."""
        tmp = tempfile.mkdtemp(prefix="pt-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        with receiver() as rx:
            rx.answers["/slow"] = [(200, b"", {}, 3.0)]
            with self.assertLogs("poussetaches", "WARNING"):
                with running_daemon(data_dir=tmp, grace=0.3) as d:
                    task_id = call(d.url, "POST", "/", {"url": rx.url("/slow")})[2]["id"]
                    wait_until(lambda: d.store.in_flight() == 1, what="the attempt under way",
                               poll=0.01)
            with running_daemon(data_dir=tmp, paused=True) as d:
                task = call(d.url, "GET", "/tasks/" + task_id)[2]
        self.assertEqual((task["state"], task["tries"], len(task["attempts"])), ("waiting", 0, 1))
        attempt = task["attempts"][0]
        self.assertEqual(attempt["status"], -1)
        self.assertIn("interrupted", attempt["error"])
        self.assertGreaterEqual(attempt["duration_ms"], 250)


class TestReliability(unittest.TestCase):
    """Crashes, faults, bad input and load, at stress sizes under POUSSETACHES_STRESS=1."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pt-rel-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, "data")

    # -- kill -9 ---------------------------------------------------------------

    def test_kill9_loop_loses_nothing(self):
        kills = 30 if STRESS else 3
        workers = 4
        rng = random.Random(SEED)
        acked, lock = set(), threading.Lock()
        current = {"url": None}
        up, stop = threading.Event(), threading.Event()
        rx = Receiver()
        self.addCleanup(rx.close)

        def client():
            while not stop.is_set():
                if not up.wait(0.5):
                    continue
                try:
                    status, headers, _ = call(current["url"], "POST", "/",
                                              {"url": rx.url("/k")}, timeout=5)
                except (OSError, http.client.HTTPException):
                    continue  # the daemon died under us: this one was not acknowledged
                if status == 201:
                    with lock:
                        acked.add(headers["Poussetaches-Task-ID"])

        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        moments = []
        try:
            for _ in range(kills):
                daemon = DaemonProcess(self.data, "--workers", str(workers))
                current["url"] = daemon.url
                up.set()
                moment = rng.uniform(0.05, 0.6)
                moments.append(round(moment, 3))
                stop.wait(moment)  # let it work, then kill it at this moment
                up.clear()
                daemon.kill()
            final = DaemonProcess(self.data, "--workers", str(workers))
            current["url"] = final.url
            up.set()
            stop.wait(0.3)
        finally:
            stop.set()
            for t in clients:
                t.join(WAIT)
        try:
            wait_until(lambda: acked <= {g["headers"]["Poussetaches-Task-ID"] for g in rx.got},
                       timeout=60, what="every acknowledged task delivered", changes=rx.changes)
            # the daemon is another process: its last outcomes can only be asked for
            wait_until(lambda: call(final.url, "GET", "/waiting")[2]["total"] == 0,
                       what="every outcome recorded", poll=0.05)
        finally:
            final.terminate()
        counts = {}
        for g in rx.got:
            task_id = g["headers"]["Poussetaches-Task-ID"]
            counts[task_id] = counts.get(task_id, 0) + 1
        lost = acked - set(counts)
        duplicates = sum(n - 1 for n in counts.values())
        report("kill -9 loop: seed %d, %d kills at %s s, %d acknowledged, %d lost, "
               "%d duplicates" % (SEED, kills, moments, len(acked), len(lost), duplicates))
        self.assertEqual(lost, set())
        self.assertLessEqual(duplicates, kills * workers)
        self.assertGreater(len(acked), kills * 10)

    # -- torn and corrupt journals ----------------------------------------------

    def journal_with(self, n):
        store = pt.Store(self.data if os.path.isdir(self.data) else self._mk(), pt.DueQueue())
        store.start()
        ids = []
        for i in range(n):
            task = pt.Task(pt.new_id(), "http://127.0.0.1:9/%d" % i, b"payload %d" % i)
            store.add(task)
            ids.append(task.id)
        store.close()
        path = [os.path.join(self.data, f) for f in os.listdir(self.data)
                if f.startswith("journal")][0]
        with open(path, "rb") as f:
            return path, f.read(), ids

    def _mk(self):
        os.makedirs(self.data)
        return self.data

    def test_torn_journal_at_every_offset_of_its_last_record(self):
        path, data, ids = self.journal_with(5)
        start = data.rstrip(b"\n").rfind(b"\n") + 1  # the last record
        offsets = range(start, len(data))
        for cut in offsets:
            with open(path, "wb") as f:
                f.write(data[:cut])
            with self.assertLogs("poussetaches", "WARNING") if cut > start else \
                    contextlib.nullcontext():
                store = pt.Store(self.data, pt.DueQueue())
            self.assertEqual(store.counts()["waiting"], 4, cut)
            self.assertEqual(store.recovery["torn_records"], int(cut > start), cut)
            self.assertEqual(store.recovery["corrupt_records"], 0, cut)
            for snap in os.listdir(self.data):  # recovery wrote nothing yet
                self.assertTrue(snap.startswith("journal") or snap == "lock", snap)
        report("torn journal: %d cut offsets of the last record, all recovered" % len(offsets))
        # and the real daemon starts on such a journal
        with open(path, "wb") as f:
            f.write(data[:start + 7])
        daemon = DaemonProcess(self.data, "--paused")
        try:
            self.assertEqual(call(daemon.url, "GET", "/waiting")[2]["total"], 4)
        finally:
            daemon.terminate()
        self.assertTrue(any("torn record" in line for line in daemon.lines))

    def test_corrupt_records_elsewhere_are_skipped(self):
        path, data, ids = self.journal_with(30)
        lines = data.split(b"\n")[:-1]
        rng = random.Random(SEED)
        for victim in range(len(lines) - 1):
            line = bytearray(lines[victim])
            pos = rng.randrange(len(line))
            line[pos] = (line[pos] + rng.randrange(1, 256)) % 256
            broken = lines[:victim] + [bytes(line)] + lines[victim + 1:]
            with open(path, "wb") as f:
                f.write(b"\n".join(broken) + b"\n")
            with self.assertLogs("poussetaches", "WARNING") as logs:
                store = pt.Store(self.data, pt.DueQueue())
            kept = {i for i in ids if store.get(i)[1] is not None}
            self.assertEqual(kept, set(ids) - {ids[victim]}, victim)
            self.assertGreaterEqual(store.recovery["corrupt_records"], 1)
            self.assertTrue(any("corrupt" in line for line in logs.output))
        report("corrupt journal: %d single-byte flips, every intact record kept" % (len(lines) - 1))

    # -- crash inside a snapshot ----------------------------------------------------

    def test_crash_at_each_step_of_a_snapshot(self):
        points = ["snapshot-before-write", "snapshot-after-write", "snapshot-after-fsync",
                  "snapshot-after-replace", "snapshot-after-dir-fsync",
                  "snapshot-before-journal-delete"]
        if not STRESS:  # each point costs three processes: the default run takes one in three
            points = points[::3] + points[-1:]  # before the write, after the replace, the last
        for point in points:
            with self.subTest(point=point):
                data = os.path.join(self.dir, point)
                with receiver() as rx:
                    first = DaemonProcess(data, "--paused")
                    acked = {call(first.url, "POST", "/", {"url": rx.url("/%d" % i)})[2]["id"]
                             for i in range(5)}
                    self.assertEqual(first.terminate(), 0)  # an old, complete snapshot
                    env = dict(os.environ, POUSSETACHES_FAULT=point)
                    second = DaemonProcess(data, "--paused", "--snapshot-interval", "0.2", env=env)
                    for i in range(5):
                        status, _, doc = call(second.url, "POST", "/", {"url": rx.url("/n%d" % i)})
                        acked.add(doc["id"])
                    self.assertEqual(second.proc.wait(WAIT), -signal.SIGKILL)
                    second._reap()
                    third = DaemonProcess(data, "--paused")
                    try:
                        _, _, doc = call(third.url, "GET", "/waiting")
                        self.assertEqual({t["id"] for t in doc["tasks"]}, acked)
                    finally:
                        self.assertEqual(third.terminate(), 0)
                    self.assertFalse(os.path.exists(os.path.join(data, "snapshot.json.tmp")))
        report("snapshot crash points: %d, each restart found every task" % len(points))

    # -- power loss -------------------------------------------------------------------

    def power_loss_run(self, fsync, snapshots=True):
        os.makedirs(self.data, exist_ok=True)
        fs = ForgetfulFS()
        store = pt.Store(self.data, pt.DueQueue(), fsync=fsync, fs=fs)
        store.start()
        acked, deleted = set(), set()
        for i in range(130):  # the last 10 only in a journal file made after the last snapshot
            task = pt.Task(pt.new_id(), "http://127.0.0.1:9/%d" % i, b"p")
            store.add(task)
            acked.add(task.id)
            if snapshots and i % 40 == 39:
                store.snapshot()
            if i % 25 == 24:
                victim = sorted(acked)[0]
                store.delete(victim)
                acked.discard(victim)
                deleted.add(victim)
        fs.power_loss()
        recovered = pt.Store(self.data, pt.DueQueue())
        present = {i for i in acked | deleted if recovered.get(i)[1] is not None}
        return acked, deleted, present

    def test_power_loss_keeps_every_fsynced_task(self):
        acked, deleted, present = self.power_loss_run(fsync=True)
        self.assertEqual(present, acked)
        report("power loss (--fsync always): %d acknowledged, %d present after, %d deleted "
               "stay deleted" % (len(acked), len(present & acked), len(deleted - present)))

    def test_power_loss_before_any_snapshot(self):
        # the journal file a fresh start creates must itself survive
        acked, _, present = self.power_loss_run(fsync=True, snapshots=False)
        self.assertEqual(present, acked)

    def test_power_loss_layer_does_forget_without_fsync(self):
        # the same run with --fsync never loses tasks: the layer is not a no-op
        acked, _, present = self.power_loss_run(fsync=False)
        self.assertLess(len(present), len(acked))

    # -- disk full ----------------------------------------------------------------------

    def test_disk_full_503_then_recovers(self):
        mount = os.path.join(self.dir, "small")
        os.makedirs(mount)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", mount],
                              capture_output=True)
        if proc.returncode != 0:
            self.skipTest("cannot mount a tmpfs here (%s); test_disk_error_gives_503_and_recovers "
                          "covers ENOSPC by injection" % proc.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mount], capture_output=True)
        data = os.path.join(mount, "data")
        acked = set()
        with receiver() as rx:
            with running_daemon(data_dir=data, paused=True, snapshot_interval=3600) as d:
                for i in range(20):
                    acked.add(call(d.url, "POST", "/", {"url": rx.url("/%d" % i)})[2]["id"])
                filler = os.path.join(mount, "filler")
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    while True:
                        os.write(fd, b"\0" * 4096)
                except OSError:
                    pass
                finally:
                    os.close(fd)
                refused = 0
                for i in range(20):
                    status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/full"),
                                                               "json": "x" * 2000})
                    self.assertIn(status, (201, 503), doc)
                    if status == 201:
                        acked.add(doc["id"])  # it fitted in a last free block
                    else:
                        refused += 1
                        self.assertIn("No space left", doc["error"])
                self.assertGreater(refused, 0)
                self.assertIs(call(d.url, "GET", "/")[2]["healthy"], False)
                os.unlink(filler)  # healthy again by itself, with no enqueue to show it
                wait_until(lambda: call(d.url, "GET", "/healthz")[0] == 200,
                           what="healthy with the space back")
                status, _, doc = call(d.url, "POST", "/", {"url": rx.url("/after")})
                self.assertEqual(status, 201)
                acked.add(doc["id"])
                self.assertIs(call(d.url, "GET", "/")[2]["healthy"], True)
            with running_daemon(data_dir=data, paused=True) as d:
                _, _, doc = call(d.url, "GET", "/waiting")
                self.assertEqual({t["id"] for t in doc["tasks"]}, acked)
        report("disk full (512 KiB tmpfs): %d enqueues refused with 503, %d acknowledged "
               "all back after restart" % (refused, len(acked)))

    # -- a misbehaving app ------------------------------------------------------------

    def test_misbehaving_app(self):
        app = RawApp()
        self.addCleanup(app.close)
        before = rss_bytes()
        with receiver() as rx, running_daemon(max_tries=1, timeout=0.5, workers=2) as d:
            started = time.monotonic()
            ids = {}
            for path in ("/hang", "/reset", "/garbage", "/huge", "/redirect", "/drip",
                         "/drip-body", "/huge-utf8"):
                ids[path] = call(d.url, "POST", "/", {"url": app.base + path})[2]["id"]
            def dead():
                return {t["id"]: t for t in call(d.url, "GET", "/dead")[2]["tasks"]}
            wait_until(lambda: len(dead()) == 8, what="eight dead tasks")
            elapsed = time.monotonic() - started
            tasks = dead()
            status = {p: tasks[i]["last_error_status_code"] for p, i in ids.items()}
            self.assertEqual(status, {"/hang": -1, "/reset": -1, "/garbage": -1, "/huge": 500,
                                      "/redirect": 302, "/drip": -1, "/drip-body": -1,
                                      "/huge-utf8": 500})
            body = lambda p: base64.b64decode(tasks[ids[p]]["last_error_body"])
            self.assertIn(b"timed out", body("/hang"))
            self.assertIn(b"timed out", body("/drip"))
            # a 200 whose body is still coming at the time-out is no answer (SPEC 3)
            self.assertIn(b"timed out while reading the answer (its status line said 200)",
                          body("/drip-body"))
            self.assertTrue(body("/huge-utf8").decode("utf-8").endswith("\u20ac"))
            self.assertIn(b"BadStatusLine", body("/garbage"))
            self.assertEqual(body("/huge"), b"z" * 8192 + b"\n[... 49152 bytes cut ...]\n"
                             + b"z" * 8192)
            self.assertNotIn("/internal", app.paths)
            self.assertLess(elapsed, 6.0)  # 2 workers, 0.5 s deadlines: never stuck
            # the workers are free: a normal task is delivered at once
            call(d.url, "POST", "/", {"url": rx.url("/fine")})
            rx.wait_for(1, path="/fine")
        self.assertLess(app.sent_bytes, 50 * 1024 * 1024)  # it stopped reading the 100 MB
        self.assertLess(rss_bytes() - before, 30 * 1024 * 1024)

    # -- misbehaving clients ------------------------------------------------------------

    def test_64_clients_at_once(self):
        with receiver() as rx, running_daemon(paused=True) as d:
            barrier = threading.Barrier(64)
            results = []

            def one():
                barrier.wait(WAIT)
                try:
                    results.append(call(d.url, "POST", "/", {"url": rx.url()})[0])
                except OSError as exc:
                    results.append(repr(exc))

            threads = [threading.Thread(target=one) for _ in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            self.assertEqual(results, [201] * 64)

    def test_slow_and_short_clients(self):
        with running_daemon(paused=True, request_timeout=1.0) as d:
            slow = socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
            self.addCleanup(slow.close)
            started = time.monotonic()
            request = b"GET /waiting HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 100
            cut_off = None
            for byte in request:  # one byte every 50 ms: never a whole request
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    cut_off = time.monotonic() - started
                    break
                if byte == request[20]:
                    # others are served while it drips
                    self.assertEqual(call(d.url, "GET", "/")[0], 200)
                slow.settimeout(0.05)
                try:
                    if slow.recv(1024) == b"":
                        cut_off = time.monotonic() - started
                        break
                except socket.timeout:
                    pass
            self.assertIsNotNone(cut_off, "the slow client was never cut off")
            self.assertLess(cut_off, 3.0)
            # a body shorter than its Content-Length: 408 when it stalls ...
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"url\":")
                answer = s.recv(4096)
            self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer[:60])
            self.assertIn(b'"error"', answer)
            # ... 400 when the client closes its side
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"url\":")
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(4096)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:60])
            self.assertIn(b"ended after 7 of 100 bytes", answer)
            self.assertEqual(call(d.url, "POST", "/", {"url": "http://127.0.0.1:9/"})[0], 201)

    # -- fuzz -----------------------------------------------------------------------------

    def fuzz_request(self, rng, target):
        def text(n=12):
            alphabet = "abcXYZ019 -_./%?&=:@\u00e9\u2603\x00\x7f{}[]\"'\\"
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(n)))

        def value(depth=0):
            kind = rng.randrange(8 if depth < 3 else 6)
            if kind == 6:
                return [value(depth + 1) for _ in range(rng.randrange(4))]
            if kind == 7:
                return {text(5): value(depth + 1) for _ in range(rng.randrange(4))}
            return (None, rng.random() < 0.5, rng.randrange(-10 ** 12, 10 ** 12),
                    rng.uniform(-1e9, 1e9), text(), 10 ** rng.randrange(30))[kind]

        method = rng.choice(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS",
                             "FOO", "get"])
        path = rng.choice(["/", "/waiting", "/success", "/dead", "/cron", "/pause", "/resume",
                           "/tasks/" + pt.new_id(), "/tasks/", "/tasks/x/run", "/dead/retry",
                           "/cron/preview", "/metrics", "/openapi.json", "/ui",
                           "/" + urllib_quote(text()), "/tasks/" + urllib_quote(text())])
        if rng.random() < 0.3:
            path += "?" + "&".join("%s=%s" % (urllib_quote(rng.choice(
                ["limit", "offset", "schedule", "n", "url_prefix", text(4)])), urllib_quote(text()))
                                   for _ in range(rng.randrange(1, 4)))
        if rng.random() < 0.5:  # half the cases aim at validation: POST / with a body
            method, path = "POST", "/"
        body = None
        shape = rng.randrange(4)
        if shape == 1:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        elif shape == 2:
            body = json.dumps(value()).encode()
        elif shape == 3:
            task = {"url": target, "payload": b64(b"x"), "expected": 200, "schedule": "",
                    "delay": 0}
            for _ in range(rng.randrange(1, 4)):
                task[rng.choice(list(pt.ENQUEUE) + [text(6)])] = value()
            body = json.dumps(task).encode()
        headers = {}
        for _ in range(rng.randrange(3)):
            name = rng.choice(["Content-Type", "Idempotency-Key", "Authorization", "X-Fuzz",
                               "Accept"])
            headers[name] = "".join(rng.choice("abcXYZ019 -_/;=:,") for _ in range(rng.randrange(30)))
        return method, path, body, headers

    def test_fuzz(self):
        cases = 50000 if STRESS else 1000
        rng = random.Random(SEED)
        with receiver() as rx, running_daemon(allow_urls=[rx.url("/")], max_tries=1) as d:
            conn = None
            statuses = {}
            for n in range(cases):
                method, path, body, headers = self.fuzz_request(rng, rx.url("/fuzz"))
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=WAIT)
                try:
                    conn.request(method, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.fail("case %d (%s %s %r): dropped connection: %r"
                              % (n, method, path, (body or b"")[:100], exc))
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                self.assertLess(resp.status, 500, (n, method, path, body, data[:300]))
                if resp.status >= 400 and method != "HEAD":
                    self.assertIsInstance(json.loads(data)["error"], str)
                if resp.will_close:
                    conn.close()
                    conn = None
            if conn is not None:
                conn.close()
            call(d.url, "POST", "/resume")
            status, _, _ = call(d.url, "POST", "/", {"url": rx.url("/after-fuzz")})
            self.assertEqual(status, 201)
            rx.wait_for(1, path="/after-fuzz")
        report("fuzz: seed %d, %d cases, statuses %s, no 5xx, no dropped connection"
               % (SEED, cases, dict(sorted(statuses.items()))))

    # -- load and soak ----------------------------------------------------------------------

    def test_load_delivered_exactly_once(self):
        total, clients = (20000, 32) if STRESS else (1000, 8)
        rx = Receiver()
        self.addCleanup(rx.close)
        daemon = DaemonProcess(self.data, "--workers", "4")
        try:
            acked, lock = [], threading.Lock()

            def client(n):
                c = pt.PousseTaches(daemon.url, rx.base)
                try:
                    for _ in range(n):
                        task_id = c.push({}, "/load")
                        with lock:
                            acked.append(task_id)
                finally:
                    c.close()

            started = time.monotonic()
            threads = [threading.Thread(target=client, args=(total // clients,))
                       for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            enqueued = time.monotonic() - started
            rx.wait_for(total, timeout=120)
            delivered = time.monotonic() - started
            counts = {}
            for g in rx.got:
                task_id = g["headers"]["Poussetaches-Task-ID"]
                counts[task_id] = counts.get(task_id, 0) + 1
        finally:
            daemon.terminate()
        self.assertEqual(len(acked), total)
        self.assertEqual(set(counts), set(acked))
        self.assertEqual(set(counts.values()), {1})
        report("load: %d tasks from %d clients, enqueued in %.1f s, all delivered exactly once "
               "in %.1f s" % (total, clients, enqueued, delivered))

    @unittest.skipUnless(STRESS, "a 4-minute mixed run with kills: POUSSETACHES_STRESS=1")
    def test_mixed_soak_with_kills_memory_flat(self):
        """The attacker's long run in small: three queues, ordering keys, batches,
        named crons, answers 200, 500, 410 and slow, four kill -9s after the first third.  With
        the caps on every table and a recovery that streams its journal,
        resident memory in the last third stays within 25 % of the first third
        (it grew 47 %, and a recovered daemon held far more than a steady one),
        and every acknowledged task that its app accepts is delivered."""
        # the first third runs without a kill: the steady state that the last
        # third, after kills and recoveries, is held to
        duration, kill_at = 240.0, [90.0, 130.0, 170.0, 210.0]
        rng = random.Random(SEED)
        rx = Receiver()
        self.addCleanup(rx.close)
        rx.answers["/fail"] = [(500, b"Traceback ...\nValueError: no")]
        rx.answers["/gone"] = [(410, b"")]
        rx.answers["/slow"] = [(200, b"", {}, 0.2)]
        # caps the tables reach in the first third: what stays after is the steady state
        args = ("--workers", "4", "--max-tries", "3", "--snapshot-interval", "90",
                "--keep-dead", "500", "--keep-success", "1000")
        daemon = DaemonProcess(self.data, *args)
        for name in ("a", "b", "c"):
            call(daemon.url, "POST", "/", {"url": rx.url("/cron"), "schedule": "@every 1s",
                                           "name": "soak-" + name})
        acked, pushed, kills, samples = set(), 0, 0, []
        started = time.monotonic()
        up_since, next_sample = started, started
        pace = threading.Event()
        try:
            while time.monotonic() - started < duration:
                now = time.monotonic()
                if kill_at and now - started >= kill_at[0]:
                    kill_at.pop(0)
                    daemon.kill()
                    kills += 1
                    daemon = DaemonProcess(self.data, *args)
                    up_since = time.monotonic()
                if now >= next_sample:
                    if now - up_since >= 10:  # a settled process, recovered or not
                        samples.append((now - started, rss_bytes(daemon.proc.pid)))
                    next_sample = now + 5
                roll = rng.random()
                path = ("/ok" if roll < 0.86 else "/fail" if roll < 0.94 else
                        "/gone" if roll < 0.98 else "/slow")
                pushed += 1
                if pushed % 25 == 0:  # a batch of 50 to the bulk queue
                    body = {"tasks": [{"url": rx.url("/ok"), "queue": "bulk",
                                       "json": {"n": pushed, "i": i}} for i in range(50)]}
                    route = "/batch"
                else:
                    body = {"url": rx.url(path), "queue": rng.choice(("mail", "feeds")),
                            "json": {"n": pushed, "pad": "x" * rng.randint(10, 4000)}}
                    if rng.random() < 0.3:
                        body["ordering_key"] = "k%d" % rng.randint(0, 6)
                    route = "/"
                try:
                    status, headers, doc = call(daemon.url, "POST", route, body, timeout=10)
                except (OSError, http.client.HTTPException):
                    continue  # not acknowledged
                if status in (200, 201) and route == "/batch":
                    acked.update(t["id"] for t in doc["tasks"])
                elif status in (200, 201) and path in ("/ok", "/slow"):
                    acked.add(doc["id"])
                pace.wait(0.005)

            def delivered():
                return {g["headers"]["Poussetaches-Task-ID"] for g in rx.got}
            try:
                wait_until(lambda: acked <= delivered(), timeout=180,
                           what="every acknowledged task delivered", changes=rx.changes)
            except AssertionError:
                missing = sorted(acked - delivered())
                states = collections.Counter(
                    str(call(daemon.url, "GET", "/tasks/" + task_id)[2].get("state"))
                    for task_id in missing[:200])
                raise AssertionError("%d acknowledged tasks not delivered; states of the "
                                     "first 200: %s; daemon: %s" % (
                                         len(missing), dict(states),
                                         call(daemon.url, "GET", "/")[2])) from None
        finally:
            daemon.terminate()
        third = duration / 3
        first = [r for t, r in samples if t < third]
        last = [r for t, r in samples if t >= 2 * third]
        report("mixed soak: %d pushes (%d acknowledged to answer 200), %d kills, %d requests "
               "received; RSS first third %.1f-%.1f MiB, last third %.1f-%.1f MiB"
               % (pushed, len(acked), kills, len(rx.got), min(first) / 2 ** 20,
                  max(first) / 2 ** 20, min(last) / 2 ** 20, max(last) / 2 ** 20))
        self.assertEqual(kills, 4)
        self.assertLessEqual(max(last), max(first) * 1.25)

    @unittest.skipUnless(STRESS, "the 5-minute soak runs with POUSSETACHES_STRESS=1")
    def test_soak_memory_and_threads_flat(self):
        rx = Receiver()
        self.addCleanup(rx.close)
        daemon = DaemonProcess(self.data, "--workers", "4")
        pid = daemon.proc.pid
        samples = []
        try:
            client = pt.PousseTaches(daemon.url, rx.base)
            stop_at = time.monotonic() + 300
            next_sample = time.monotonic()
            pushed = 0
            pace = threading.Event()
            while time.monotonic() < stop_at:
                for _ in range(20):
                    client.push({"n": pushed}, "/soak")
                    pushed += 1
                pace.wait(0.05)  # ~400 tasks a second
                if time.monotonic() >= next_sample:
                    samples.append((rss_bytes(pid), thread_count(pid)))
                    next_sample += 10
            rx.wait_for(pushed, timeout=60)
            client.close()
        finally:
            daemon.terminate()
        warm = samples[6:]  # after the first minute: the success table is full by then
        rss = [r for r, _ in warm]
        threads = [t for _, t in warm]
        report("soak: %d tasks in 300 s; RSS after warm-up %.1f-%.1f MiB; threads %d-%d"
               % (pushed, min(rss) / 2 ** 20, max(rss) / 2 ** 20, min(threads), max(threads)))
        self.assertLess(max(rss), min(rss) * 1.25 + 4 * 2 ** 20)
        self.assertLessEqual(max(threads), min(threads) + 8)


if __name__ == "__main__":
    unittest.main()
