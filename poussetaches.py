#!/usr/bin/env python3
"""poussetaches: an HTTP push task queue that runs beside a small web app.

The app POSTs a task (a URL of its own and an opaque payload) to the daemon;
the daemon keeps it on disk and POSTs it back to that URL until the app
answers with the expected status, retrying with exponential backoff, then
parks it in a dead-letter table.  Cron tasks too.  One file, stdlib only,
a drop-in replacement for the Go poussetaches 0.0.2.

Run it::

    python3 poussetaches.py            # serves on 127.0.0.1:7991, ./poussetaches_data
    python3 poussetaches.py --help

The main HTTP calls (JSON in, JSON out; every error is {"error": "..."}); every
call, with its parameters and answers, is in ``GET /openapi.json``:

    GET    /                      status: paused, in_flight, table counts
    POST   /                      enqueue {"url", "payload", "expected", "schedule", "delay", ...}
    GET    /waiting|success|dead|cron   {"tasks": [...], "total": n}, by next_run
    DELETE /cron                  remove every cron task
    POST   /pause, /resume        stop / restart dispatching
    GET    /tasks/<id>            one task and its state
    DELETE /tasks/<id>            cancel a task or drop a record
    POST   /tasks/<id>/run        run a waiting task now, or redrive a dead one
    POST   /dead/retry            requeue dead tasks (?url_prefix=)
    DELETE /dead                  purge the dead table
    GET    /cron/preview          ?schedule=SPEC&n=5: the next run times
    GET    /queues, PUT /queues/<name>   queues and their settings
    GET    /backup                a copy of every table, as a snapshot
    GET    /healthz, /metrics, /ui   health, Prometheus metrics, the dashboard

The app's side is the PousseTaches class: a function decorated with
``@pt.task`` is pushed with ``.push(*args)``, and ``pt.wsgi()`` or
``pt.asgi()``, mounted in the app, is the endpoint that runs it.

Threads: one ThreadingHTTPServer (a thread per connection) validates and
stores tasks, each request appending its journal record and fsyncing it with
whatever else is queued (group commit); N worker threads take due tasks from
a due-time priority queue and deliver them with urllib over kept-alive
connections; one persister thread writes the tables to a snapshot.
"""

__version__ = "1.0.0"

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import contextvars
import email.utils
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
import wsgiref.simple_server
from datetime import datetime, timedelta, timezone

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    ssl = None

try:
    import zoneinfo
except ImportError:  # pragma: no cover - Python < 3.9
    zoneinfo = None

logger = logging.getLogger("poussetaches")

# Locks, and the one order in which they may nest (nothing takes them the other
# way, and no I/O happens under any of them but the journal's own write):
#   Store._snapshot_lock -> Store._lock -> DueQueue.mutex
#   Breakers._lock -> DueQueue.mutex
# Journal._write_lock is taken with no other lock held; Stats._lock,
# Dispatcher._rng_lock and _Server._slots nest with nothing.


# --------------------------------------------------------------------------
# Constants and defaults
# --------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7991
DEFAULT_DATA_DIR = "./poussetaches_data"
DEFAULT_WORKERS = 4
DEFAULT_MAX_TRIES = 11             # the original's: dead after its 11th attempt
DEFAULT_MIN_BACKOFF = 1.0          # seconds; attempt k waits min * 4**(k-1)
DEFAULT_MAX_BACKOFF = 86400.0      # seconds
DEFAULT_TIMEOUT = 600.0            # seconds per delivery attempt (the original had none)
DEFAULT_KEEP_SUCCESS = 1000
DEFAULT_MAX_SUCCESS_BYTES = 64 << 20  # payload and error bytes of the success records kept
DEFAULT_KEEP_DEAD = 100_000        # dead records kept; past it (or the bytes), the oldest go
DEFAULT_MAX_DEAD_BYTES = 256 << 20
DEFAULT_MAX_BODY = 16 << 20        # bytes of an API request body
DEFAULT_MAX_CONNECTIONS = 256      # API connections served at once
DEFAULT_MAX_PER_ADDRESS = 64       # ... of them from one client address
DEFAULT_HEAD_TIMEOUT = 5.0         # seconds for a request's head, once its first line came
DEFAULT_MAX_WAITING = 1_000_000    # waiting tasks, past which enqueue is a 507
DEFAULT_MAX_STORED_BYTES = 1 << 30  # decoded payload bytes in the waiting table, ditto
LIST_PIECE = 500                   # tasks serialised per hold of the store lock
MAX_LIST_LIMIT = 100_000
DEFAULT_SNAPSHOT_INTERVAL = 60.0   # seconds between snapshots
SNAPSHOT_AFTER_RECORDS = 100_000   # ... or after this many journal records
DEFAULT_GRACE = 10.0               # seconds for in-flight attempts at stop
DEFAULT_REQUEST_TIMEOUT = 60.0     # seconds for an API request, idle keep-alive included
DEFAULT_QUEUE = "default"          # the queue of a task that names none
MAX_BATCH = 1000                   # tasks in one POST /batch: one journal write, one fsync

JITTER = 0.30                      # +/- 30 % on every backoff
CLOCK_CHECK = 1.0                  # seconds between looks at the wall clock while waiting
RESPONSE_READ_LIMIT = 64 * 1024    # bytes of a delivery answer we read
ERROR_BODY_LIMIT = 16 * 1024       # bytes of it we keep: its first and last halves
ATTEMPTS_KEPT = 10
ATTEMPT_ERROR_LIMIT = 200          # chars of error text per attempt record
CRON_HORIZON_YEARS = 5
MAX_FIRST_RUN_S = 10 * 366 * 86400  # a first run more than ~10 years ahead is a 400
MAX_NS = (1 << 63) - 1             # Go's largest duration; the last representable run time

TABLES = ("waiting", "success", "dead")
SNAPSHOT_NAME = "snapshot.json"
JOURNAL_PREFIX = "journal."
LOCK_NAME = "lock"
FORMAT_NAME = "format"             # the data directory's format, in a line of its own
FORMAT_VERSION = 2                 # snapshot.json version 2 and its journal.<n> files
IMPORT_REJECTED = "import-rejected"  # where the original's files that fail the checks go

USER_AGENT = "poussetaches/" + __version__
# the plain log line; its time in UTC (time.gmtime), as --log-json's
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
RESERVED_HEADERS = ("host", "content-length", "transfer-encoding", "connection")
MAX_HEAD = 64 * 1024               # bytes of an API request's line and headers together
DEFAULT_TASKS_PATH = "/_tasks"     # where an app mounts its task endpoint
MAX_DELIVERY_BODY = 32 << 20       # bytes the task endpoint reads: a 16 MiB payload in base64


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------

class PousseTachesError(Exception):
    """Root of every error this module raises on purpose."""


class CronError(PousseTachesError, ValueError):
    """A cron spec that cannot be parsed or never fires; the message says why."""


class PersistError(PousseTachesError):
    """The journal could not be written: the disk is full or read-only."""


class QuotaError(PousseTachesError):
    """The waiting table is full (--max-waiting, --max-stored-bytes): deliver or raise them."""


class LockedError(PousseTachesError):
    """Another daemon holds the data directory; stop it or use another --data-dir."""


class ConfigError(PousseTachesError, ValueError):
    """A configuration value is out of range; the message names the option."""


class ClientError(PousseTachesError):
    """The daemon refused a call; ``status`` is its HTTP status, the message its error."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class DaemonUnavailable(ClientError):
    """No daemon answers at the API URL: start it, or set POUSSETACHES_URL."""


class AuthError(PousseTachesError):
    """A task request without poussetaches' auth key or a valid signature."""


class InvalidEnvelope(PousseTachesError):
    """A task request whose body is not poussetaches' envelope."""


class Retry(PousseTachesError):
    """Raised by a task function: try it again, ``after`` seconds from now at the
    earliest (the endpoint answers 503 with Retry-After)."""

    def __init__(self, reason="", after=None):
        super().__init__(reason)
        if after is not None and not (isinstance(after, (int, float)) and 0 <= after < 1e10):
            raise ValueError("Retry(after=...) is a number of seconds, at least 0")
        self.after = after


class Reject(PousseTachesError):
    """Raised by a task function: give up now; the task goes dead with the reason (410)."""


class HTTPError(PousseTachesError):
    """An API answer other than success: raised anywhere, turned into JSON once."""

    def __init__(self, status, message, headers=None, field=None, index=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.field = field           # the body field at fault, when there is one
        self.index = index           # ... and the task's place in a batch


# --------------------------------------------------------------------------
# The task model
# --------------------------------------------------------------------------

def new_id(nbytes=16):
    """Random lowercase hex id from os.urandom: 32 chars, a task's."""
    return binascii.hexlify(os.urandom(nbytes)).decode()


def cron_id(url, payload, schedule):
    """The original's dedup id: sha1 of url + raw payload bytes + schedule."""
    return hashlib.sha1(url.encode() + payload + schedule.encode()).hexdigest()


def b64(data):
    return base64.b64encode(data).decode("ascii")


def iso_utc(t_ns, timespec="seconds"):
    """Unix ns as ISO 8601 in UTC: 2026-11-28T09:00:00Z."""
    when = datetime.fromtimestamp(t_ns / 1e9, timezone.utc)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


# every pattern is used with fullmatch (a "$" would match before a final newline)
_TASK_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")   # an RFC 9110 token


# Every field an enqueue takes, declared once: the API checks bodies with these
# Params, /openapi.json serves their schemas, and an imported task is checked
# with them too.

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    """An int (any size) or a finite float; not a bool."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


_JSON_TYPES = {"string": lambda v: isinstance(v, str),
               "integer": lambda v: _is_int(v) or isinstance(v, float) and v.is_integer(),
               "number": lambda v: _is_number(v), "object": lambda v: isinstance(v, dict),
               "boolean": lambda v: isinstance(v, bool)}


def schema_check(schema):
    """``fits(value)``: does a value fit ``schema``, of the subset of JSON schema
    the Params use (type, range, length, pattern, an object's values)?  The
    schema is read once, here, not at every enqueue."""
    kinds = schema.get("type")
    kinds = [_JSON_TYPES[k] for k in ([kinds] if isinstance(kinds, str) else kinds or ())]
    of_type = kinds[0] if len(kinds) == 1 else lambda v: not kinds or any(k(v) for k in kinds)
    low, high = schema.get("minimum"), schema.get("maximum")
    shortest, longest = schema.get("minLength", 0), schema.get("maxLength")
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None
    most = schema.get("maxProperties")
    inner = (schema_check(schema["additionalProperties"]) if "additionalProperties" in schema
             else None)

    def fits(value):
        if not of_type(value):
            return False
        if isinstance(value, bool):
            return True
        if isinstance(value, (int, float)):  # finite: parse_json refuses NaN and infinities
            return (low is None or low <= value) and (high is None or value <= high)
        if isinstance(value, str):
            return (shortest <= len(value) and (longest is None or len(value) <= longest)
                    and (pattern is None or pattern.fullmatch(value) is not None))
        if isinstance(value, dict):
            return ((most is None or len(value) <= most)
                    and (inner is None or all(inner(item) for item in value.values())))
        return True
    return fits


class Param(collections.namedtuple("Param", "name schema message description metavar")):
    """One field an enqueue body accepts, declared once: its JSON schema (served in
    /openapi.json, and checked here: type, range, length), the 400 message for
    a value that does not fit, and what it is: an enqueue field with a
    ``description`` is a flag of ``poussetaches push`` (``--name-with-dashes
    METAVAR``), typed by its schema.  null is the same as absent, for every
    field."""

    def __new__(cls, name, schema, message, description=None, metavar=None):
        param = super().__new__(cls, name, schema, message, description, metavar)
        param.fits = schema_check(schema)
        return param


ENQUEUE_PARAMS = (
    Param("url", {"type": "string", "format": "uri", "maxLength": 4096},
          "url must be an absolute http:// or https:// URL of at most 4096 characters"),
    Param("payload", {"type": "string", "contentEncoding": "base64"},
          "payload must be a base64 string"),
    Param("json", {}, "json may be any JSON value"),
    Param("expected", {"type": "integer", "minimum": 0, "maximum": 599},
          "expected must be an HTTP status from 100 to 599 (or 0 for 200)",
          "the status that means done (default 200)", "STATUS"),
    Param("schedule", {"type": "string", "maxLength": 256},
          "schedule must be a cron spec string of at most 256 characters",
          "a cron spec: a recurring task", "SPEC"),
    Param("delay", {"type": "integer", "minimum": 0},
          "delay must be a whole, non-negative number of minutes"),
    Param("delay_s", {"type": "number", "minimum": 0, "maximum": MAX_FIRST_RUN_S},
          "delay_s must be a number of seconds from 0 to 10 years",
          "seconds before the first run", "S"),
    Param("eta", {"type": ["number", "string"]},
          "eta must be Unix seconds or an RFC 3339 time with an offset, such as "
          "2026-01-31T09:00:00Z", "not before this time: RFC 3339 with an offset "
          "(2030-01-01T09:00:00Z) or Unix seconds", "TIME"),
    Param("max_tries", {"type": "integer", "minimum": 1, "maximum": 100},
          "max_tries must be a whole number from 1 to 100", "attempts before dead", "N"),
    Param("timeout_s", {"type": "number", "minimum": 0.1, "maximum": 3600},
          "timeout_s must be a number of seconds from 0.1 to 3600",
          "seconds an attempt may take", "S"),
    Param("headers", {"type": "object", "maxProperties": 64,
                      "additionalProperties": {"type": "string", "maxLength": 8192}},
          "headers must be an object of at most 64 strings"),
    Param("idempotency_key", {"type": "string", "minLength": 1, "maxLength": 200},
          "idempotency_key must be a string of 1 to 200 characters",
          "enqueue at most once per key", "K"),
    Param("queue", {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
          "queue must be 1 to 64 of a-z, 0-9, _ and -", "the queue (default: %s)"
          % DEFAULT_QUEUE, "NAME"),
    Param("priority", {"type": "integer", "minimum": -100, "maximum": 100},
          "priority must be a whole number from -100 to 100 (higher runs first)",
          "-100 to 100: higher runs first", "N"),
    Param("ordering_key", {"type": "string", "minLength": 1, "maxLength": 200},
          "ordering_key must be a string of 1 to 200 characters",
          "tasks of one key run one at a time, in order", "K"),
    Param("name", {"type": "string", "minLength": 1, "maxLength": 200},
          "name must be a string of 1 to 200 characters, on a task with a schedule",
          "a named cron: a new schedule replaces the old one"),
)
ENQUEUE = {param.name: param for param in ENQUEUE_PARAMS}
TASK_OPTIONS = ("delay_s", "eta", "queue", "priority", "ordering_key", "idempotency_key",
                "max_tries", "timeout_s")   # the ENQUEUE fields a task function's push sets
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,199}")  # a task function's, in its URL

# the limits of a URL and of headers are their Params'
_URL_MOST = ENQUEUE["url"].schema["maxLength"]
_HEADERS = ENQUEUE["headers"].schema
_HEADER_MOST = _HEADERS["additionalProperties"]["maxLength"]
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]{0,%d}" % _HEADER_MOST)  # RFC 9110 chars


def url_problem(url):
    r"""What is wrong with a task URL, as the end of a sentence, or None.

    An absolute http(s) URL of at most 4096 ASCII characters, without spaces
    or control characters, user info (``user@host``), ``.``/``..`` segments,
    or separators a server might see that the allow list did not (``\``,
    ``;``, ``%2F``, ``%5C``, and any of these or a dot encoded twice).
    """
    if not isinstance(url, str) or not url or len(url) > _URL_MOST:
        return ENQUEUE["url"].message[len("url "):]
    return _url_text_problem(url)


@functools.lru_cache(maxsize=1024)  # an app posts to a few URLs: 2 % of an enqueue
def _url_text_problem(url):
    if re.search(r"[\x00-\x20\x7f]", url):
        return "must not contain spaces or control characters"
    if not url.isascii():
        return "must be ASCII: percent-encode the path and use the punycode form of the host"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return "is not a valid URL: %s" % exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    if "@" in parts.netloc:
        return "must not carry a user name or password (user@host)"
    if "\\" in parts.path or ";" in parts.path:
        return ("must not have \\ or ; in its path: some frameworks and proxies read them as "
                "separators, which would route the task outside an allowed prefix")
    for segment in parts.path.split("/"):
        decoded = segment
        for _ in range(3):  # what a proxy that decodes twice, then the app, would see
            decoded = urllib.parse.unquote(decoded)
        if decoded in (".", ".."):
            return "must not have . or .. path segments, encoded or not"
        if any(c in decoded for c in "/\\;"):
            return ("must not have an encoded / \\ or ; (such as %2F or %5C) in its path: a "
                    "framework or proxy that decodes it would route the task elsewhere")
    return None


def headers_problem(headers):
    """What is wrong with a task's extra headers, or None: at most 64, token
    names, values of RFC 9110 field characters (no CR, LF, NUL or other
    control), none of those poussetaches sets itself."""
    if not isinstance(headers, dict) or len(headers) > _HEADERS["maxProperties"]:
        return ENQUEUE["headers"].message[len("headers "):]
    for name, text in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            return "%r is not a valid header name" % str(name)[:100]
        lower = name.lower().replace("_", "-")  # WSGI servers read _ as - (HTTP_ keys)
        if lower in RESERVED_HEADERS or lower.startswith(("poussetaches-", "webhook-")):
            return "%s is set by poussetaches and cannot be given" % name
        if not isinstance(text, str) or not _FIELD_VALUE.fullmatch(text):
            return ("the value of %s must be at most %d characters of Latin-1 text without "
                    "control characters (what HTTP headers carry)" % (name, _HEADER_MOST))
    return None


QUEUE_PARAMS = (  # a queue's settings; a task's own fields override them, they the flags
    Param("rate", {"type": "number", "minimum": 0.001, "maximum": 1000000},
          "rate must be a positive number of attempts per second",
          "attempts per second at most"),
    Param("burst", {"type": "number", "minimum": 1, "maximum": 1000000},
          "burst must be a number of attempts, at least 1",
          "attempts that may go at once after a quiet spell (default: the rate, or 1)"),
    Param("concurrency", {"type": "integer", "minimum": 1, "maximum": 100000},
          "concurrency must be a whole number of attempts at once, at least 1",
          "attempts under way at once at most"),
    Param("max_tries", ENQUEUE["max_tries"].schema, ENQUEUE["max_tries"].message,
          "attempts before a task goes dead"),
    Param("min_backoff", {"type": "number", "minimum": 0.001, "maximum": 31536000},
          "min_backoff must be a positive number of seconds",
          "seconds before the first retry; each next one waits 4 times longer"),
    Param("max_backoff", {"type": "number", "minimum": 0.001, "maximum": 31536000},
          "max_backoff must be a positive number of seconds",
          "seconds between two attempts at most"),
    Param("timeout_s", ENQUEUE["timeout_s"].schema, ENQUEUE["timeout_s"].message,
          "seconds an attempt may take"),
    Param("paused", {"type": "boolean"}, "paused must be true or false",
          "whether the queue holds its tasks"),
)
QUEUE = {param.name: param for param in QUEUE_PARAMS}
RUN_OVERRIDES = ("url", "payload", "json", "headers", "max_tries")  # POST /tasks/<id>/run


def named_cron_id(name):
    """A named cron's id: from its name alone, so a new schedule replaces the old."""
    return hashlib.sha1(b"name:" + name.encode()).hexdigest()


def _record_bytes(task):
    """What a success or dead record weighs against its table's byte cap."""
    return len(task.payload) + len(task.last_error_body or b"")


def _differs(old, new):
    """Does a re-posted named cron change what it runs or how (any field an
    enqueue sets, but its name and idempotency key)?"""
    return any(getattr(old, name) != getattr(new, name) for name in ENQUEUED_FIELDS
               if name not in ("name", "idempotency_key"))


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode  # shared, stateless


def encode_task(task):
    """A task's JSON form as compact bytes (journal records and API answers):
    ``_compact(task.to_json())``, in one string format (_compile_encoder)."""
    return _ENCODE(task).encode()


class Field(collections.namedtuple("Field", "name kind default show")):
    """One stored field of a task, declared once.

    ``kind`` says its JSON form: ``string``, ``integer``, ``number``,
    ``time`` (integer Unix ns), ``bytes`` (standard base64; the task holds
    bytes), ``object`` or ``list``.  A field whose default is None is
    nullable.  ``show``: the CLI's ``show`` prints it.  The task's slots, its
    JSON and snapshot-row forms, its copy, the client's view, the OpenAPI
    schema and ``show`` all derive from TASK_FIELDS.
    """


# the original's fields first, in its order, then ours
TASK_FIELDS = (
    Field("id", "string", "", True),
    Field("url", "string", "", True),
    Field("payload", "bytes", b"", False),
    Field("expected", "integer", 200, True),
    Field("schedule", "string", "", True),
    Field("next_scheduled_run", "time", 0, False),
    Field("next_run", "time", 0, True),
    Field("tries", "integer", 0, True),
    Field("last_run", "time", 0, True),
    Field("last_error_body", "bytes", None, False),
    Field("last_error_status_code", "integer", 0, True),
    Field("created", "time", 0, False),
    Field("max_tries", "integer", None, True),
    Field("timeout_s", "number", None, True),
    Field("headers", "object", None, True),
    Field("idempotency_key", "string", None, True),
    Field("cron_id", "string", None, True),
    Field("queue", "string", DEFAULT_QUEUE, True),
    Field("priority", "integer", 0, True),
    Field("ordering_key", "string", None, True),
    Field("name", "string", None, True),
    Field("seq", "integer", 0, False),   # enqueue order: an ordering key's tasks run by it
    Field("attempts", "list", None, False),
)
TASK_NAMES = tuple(f.name for f in TASK_FIELDS)
ENQUEUED_FIELDS = tuple(name for name in TASK_NAMES if name in ENQUEUE)  # what a body sets


def imported_task_problem(task):
    """What makes a task from the original's files unfit to keep, or None: every
    field checked as an enqueue checks it (the original checked nothing, so its
    files may hold anything that reached its API), and the stored ones for type
    and range, so that a bad file can never break a start or a later call."""
    if not _TASK_ID.fullmatch(task.id):
        return "the id %r is not 1-64 letters, digits, - or _" % task.id[:80]
    problem = url_problem(task.url)
    if problem:
        return "url " + problem
    for name in _IMPORT_CHECKED:
        value = getattr(task, name)
        if value is not None and not ENQUEUE[name].fits(value):
            return ENQUEUE[name].message
    if task.headers is not None and headers_problem(task.headers):
        return "headers: " + headers_problem(task.headers)
    if not 100 <= task.expected <= 599:
        return "expected must be an HTTP status from 100 to 599"
    for name in ("next_scheduled_run", "next_run", "last_run", "created", "tries", "seq",
                 "last_error_status_code"):
        value = getattr(task, name)
        if not _is_int(value) or not -1 <= value <= MAX_NS:  # -1: a time-out's status
            return "%s must be a whole number up to %d" % (name, MAX_NS)
    if task.cron_id is not None and not (isinstance(task.cron_id, str)
                                         and _TASK_ID.fullmatch(task.cron_id)):
        return "cron_id must be a task id"
    if len(task.attempts) > ATTEMPTS_KEPT or not all(isinstance(a, dict) for a in task.attempts):
        return "attempts must be a list of at most %d objects" % ATTEMPTS_KEPT
    return None


_IMPORT_CHECKED = tuple(f.name for f in TASK_FIELDS
                        if f.name in ENQUEUE and f.name != "url" and f.kind != "bytes")


class Task:
    """One task and everything the tables keep about it (TASK_FIELDS).

    Mutated only by the Store, under its lock, or on a detached copy.
    ``version`` changes whenever the task is rescheduled, cancelled or
    redriven, so that stale entries of the due-time queue are recognised and
    skipped; ``order_key`` is its place in the Store's ordered index.
    """

    __slots__ = TASK_NAMES + ("version", "order_key")
    _BYTES = tuple(f.name for f in TASK_FIELDS if f.kind == "bytes")

    def __init__(self, id, url, payload=b"", expected=200, schedule="", **fields):
        if not fields.keys() <= _TASK_NAME_SET:
            raise TypeError("unknown task fields: %s" % ", ".join(sorted(
                set(fields) - _TASK_NAME_SET)))
        row = [id, url, payload, expected, schedule] + _DEFAULT_ROW[5:]
        for name, value in fields.items():
            row[_FIELD_AT[name]] = value
        _SET_ROW(self, row)
        if not self.next_scheduled_run:
            self.next_scheduled_run = self.next_run
        if self.attempts is None:
            self.attempts = []
        self.version = 0
        self.order_key = None

    def __repr__(self):
        return "<Task %s %s tries=%d>" % (self.id, self.url, self.tries)

    def to_row(self):
        """The task as a list of TASK_NAMES' values (a snapshot's rows), bytes in base64."""
        row = list(_GET_ROW(self))
        for i in _BYTES_AT:
            if row[i] is not None:
                row[i] = b64(row[i])
        return row

    def to_json(self):
        """The task's JSON form: the original's keys first, then ours."""
        doc = dict(zip(TASK_NAMES, self.to_row()))
        doc["attempts"] = list(self.attempts)  # a list the caller may keep past the lock
        return doc

    @classmethod
    def from_row(cls, row):
        """The inverse of to_row (fast: a restart builds every task this way)."""
        task = cls.__new__(cls)
        _SET_ROW(task, row)
        for name in cls._BYTES:
            value = getattr(task, name)
            if value is not None:
                setattr(task, name, base64.b64decode(value))
        task.version = 0
        task.order_key = None
        return task

    @classmethod
    def from_json(cls, d):
        """Build a task from its JSON form (ours, or the original's files: missing
        keys take their defaults, a null where the original wrote one too).

        Raises KeyError, TypeError or ValueError on a malformed record.
        """
        task = cls(str(d["id"]), str(d["url"]))
        for field in TASK_FIELDS[2:]:
            value = d.get(field.name)
            if field.kind == "bytes":
                value = base64.b64decode(value) if value is not None else field.default
            elif field.kind in ("integer", "time") and field.default is not None:
                value = int(value or field.default)  # the original writes 0 or null for none
            elif field.kind == "list":
                value = list(value or [])
            elif field.kind == "string" and field.default is not None:
                value = value or field.default
            setattr(task, field.name, value)
        if not task.next_scheduled_run:
            task.next_scheduled_run = task.next_run
        return task

    def copy(self, **changes):
        """A detached copy: for a delivery, or a cron run's success/dead record."""
        twin = Task.__new__(Task)
        _SET_ROW(twin, _GET_ROW(self))
        twin.version, twin.order_key = self.version, self.order_key
        twin.attempts = list(self.attempts)
        if self.headers is not None:
            twin.headers = dict(self.headers)
        for name, value in changes.items():
            setattr(twin, name, value)
        return twin


_BYTES_AT = tuple(i for i, f in enumerate(TASK_FIELDS) if f.kind == "bytes")
_TASK_NAME_SET = frozenset(TASK_NAMES)
_FIELD_AT = {name: i for i, name in enumerate(TASK_NAMES)}
_DEFAULT_ROW = [f.default for f in TASK_FIELDS]
_GET_ROW = operator.attrgetter(*TASK_NAMES)  # every field's value, in one C call


def _compile_row_setter(names):
    """``f(task, row)`` setting the fields ``names`` from a row in one unpacking.
    A restart builds every task with it, and every enqueue: a setattr loop
    costs 2.8 times as much (0.75 against 2.1 µs a task), and 3 % more
    instructions an enqueue (bench_poussetaches.py --instructions)."""
    namespace = {}
    exec("def set_row(task, row):\n    (%s,) = row\n"
         % ", ".join("task." + name for name in names), namespace)
    return namespace["set_row"]


_SET_ROW = _compile_row_setter(TASK_NAMES)


def _compile_encoder(fields):
    """``f(task)``: the text of ``_compact(task.to_json())``, each field encoded by its
    kind in one string format; a value of an unexpected type goes through the
    JSON encoder.  Every stored task is encoded for the journal: without it an
    enqueue costs 11 % more instructions (bench_poussetaches.py --instructions),
    and an encode 4 times as long (2.1 against 8.1 µs)."""
    values = []
    for f in fields:
        v = "task." + f.name
        if f.kind == "string":
            value = "_str(%s) if %s.__class__ is str" % (v, v)
        elif f.kind in ("integer", "time"):
            value = "%s if %s.__class__ is int" % (v, v)
        elif f.kind == "bytes":
            value = '\'"\' + b64(%s) + \'"\' if %s.__class__ is bytes' % (v, v)
        else:
            value = "'[]' if %s == []" % v
        values.append("('null' if %s is None else %s else _json(%s))" % (v, value, v))
    template = "{%s}" % ",".join('"%s":%%s' % f.name for f in fields)
    namespace = {"_str": json.encoder.encode_basestring_ascii, "_json": _compact, "b64": b64}
    exec("def encode(task):\n    return %r %% (\n        %s,)"
         % (template, ",\n        ".join(values)), namespace)
    return namespace["encode"]


_ENCODE = _compile_encoder(TASK_FIELDS)


# --------------------------------------------------------------------------
# Cron: parsing and "next time after t"
# --------------------------------------------------------------------------

_MONTHS = {n: i for i, n in enumerate(
    "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_DAYS = {n: i for i, n in enumerate("sun mon tue wed thu fri sat".split())}
_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *", "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_DURATION_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
                   "s": 10 ** 9, "m": 60 * 10 ** 9, "h": 3600 * 10 ** 9}
# [0-9], never \d: only ASCII digits are numbers (\d also matches '\u0663' and the like)
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
# name, low, high, names
_CRON_FIELDS = (
    ("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
    ("day of month", 1, 31, None), ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


def parse_duration(text):
    """Go's time.ParseDuration, in integer ns ("90s", "1h30m", "1.5h", "0").

    As Go does it: the whole part of each number exactly, its fraction as
    ``fraction * (unit / scale)``, an optional sign; CronError for a negative
    duration, past MAX_NS, or for anything that is not that grammar.
    """
    body = text[1:] if text[:1] in ("-", "+") else text
    if body == "0":
        return 0
    total, pos = 0, 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None or match.group(1) == "" and not match.group(2):
            raise CronError("invalid duration %r: use Go syntax such as 90s, 5m or 1h30m" % text)
        whole, fraction, unit = match.groups()
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0") * scale
        if fraction:
            digits = fraction[:18]  # Go stops reading digits that cannot matter
            value += int(int(digits) * (scale / 10 ** len(digits)))
        total += value
        if total > MAX_NS:
            raise CronError("duration %r is longer than Go's maximum, 2562047h47m16.854775807s"
                            % text)
        pos = match.end()
    if not body:
        raise CronError("invalid duration %r: use Go syntax such as 90s, 5m or 1h30m" % text)
    if text.startswith("-") and total:
        raise CronError("duration %r is negative" % text)
    return total


def _parse_cron_field(text, name, lo, hi, names):
    """One cron field into a sorted tuple of allowed values."""
    def value(word):
        word = word.lower()
        if names and word in names:
            return names[word]
        if not re.fullmatch("[0-9]{1,9}", word):  # ASCII digits only: int() takes '\u0663'
            raise CronError("%s field: %r is not a number%s" % (
                name, word, " or a name" if names else ""))
        number = int(word)
        if not lo <= number <= hi:
            raise CronError("%s field: %d is out of range %d-%d" % (name, number, lo, hi))
        return number

    values = set()
    for part in text.split(","):
        if not part:
            raise CronError("%s field %r has an empty list item" % (name, text))
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not re.fullmatch("[0-9]{1,9}", step_text) or int(step_text) == 0:
                raise CronError("%s field: step %r must be a positive number" % (name, step_text))
            step = int(step_text)
        if span in ("*", "?"):
            start, end = lo, hi
        elif "-" in span:
            first, _, last = span.partition("-")
            start, end = value(first), value(last)
            if start > end:
                raise CronError("%s field: range %s goes backwards" % (name, span))
        else:
            start = value(span)
            end = hi if slash else start
            if slash and name == "day of week":
                if start == 7:  # Vixie cron: Sunday alone; croniter: 0/step, or Sunday in a list
                    raise CronError("day of week field: %s is read differently by each cron; "
                                    "write 0/%s for every %s day from Sunday, or 7 for Sundays"
                                    % (part, step_text, step_text))
                end = min(end, 6)  # N/step ends on Saturday: 7 would be a second Sunday
        values.update(range(start, end + 1, step))
    if name == "day of week" and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values))


class CronSpec:
    """A parsed cron spec; immutable.  ``next_after(t)`` gives the next run.

    Grammars: 5 fields (minute hour day-of-month month day-of-week), 6 fields
    (seconds first), the @descriptors, and ``@every <Go duration>``; an
    optional ``CRON_TZ=<zone> `` prefix, otherwise ``tz`` (None: local time).
    A wall time skipped by a DST change does not run; a repeated one runs once,
    at its first instant.
    """

    def __init__(self, spec, tz=None):
        self.spec = spec
        self.tz = tz
        self.every_ns = None
        text = spec.strip()
        if text.startswith("CRON_TZ=") or text.startswith("TZ="):
            zone, _, text = text.partition("=")[2].partition(" ")
            self.tz = _load_zone(zone)
            text = text.strip()
        if not text:
            raise CronError("empty cron spec")
        if text.startswith("@every"):
            if not text.startswith("@every "):
                raise CronError("@every needs a space before its duration: @every 1h")
            self.every_ns = parse_duration(text[len("@every "):].strip())
            if self.every_ns < 10 ** 9:
                raise CronError("@every needs at least 1s, got %r" % text[7:].strip())
            return
        if text.startswith("@"):
            if text.lower() not in _DESCRIPTORS:
                raise CronError("unknown descriptor %r: use one of %s or @every <duration>"
                                % (text, ", ".join(sorted(_DESCRIPTORS))))
            text = _DESCRIPTORS[text.lower()]
        fields = text.split()
        if len(fields) not in (5, 6):
            raise CronError("expected 5 fields (minute hour day month weekday) or 6 "
                            "(seconds first), got %d in %r" % (len(fields), text))
        six = len(fields) == 6
        if not six:
            fields.insert(0, "0")
        metas = _CRON_FIELDS if not six else _CRON_FIELDS[:5] + (("day of week", 0, 6, _DAYS),)
        parsed = [_parse_cron_field(f, *meta) for f, meta in zip(fields, metas)]
        (self.seconds, self.minutes, self.hours, self.days,
         self.months, self.weekdays) = parsed
        self._day_set = frozenset(self.days)
        self._weekday_set = frozenset(self.weekdays)
        if six:
            # the original's library: the day fields are AND-ed when any list item
            # of either starts with * or ?, OR-ed otherwise
            items = fields[3].split(",") + fields[5].split(",")
            self._days_or = not any(item[:1] in ("*", "?") for item in items)
        else:
            # Vixie cron: OR-ed when both are restricted, judged by each field's first character
            self._days_or = fields[3][0] not in "*?" and fields[5][0] not in "*?"

    def __repr__(self):
        return "CronSpec(%r)" % self.spec

    def _day_matches(self, day):
        dom = day.day in self._day_set
        dow = (day.weekday() + 1) % 7 in self._weekday_set
        return (dom or dow) if self._days_or else (dom and dow)

    def next_after(self, t_ns):
        """First run time strictly after ``t_ns`` (Unix ns); None if there is none
        within 5 years, or if it does not fit in a signed 64-bit count of ns."""
        if self.every_ns is not None:
            following = t_ns + self.every_ns
            return following if following <= MAX_NS else None
        t = t_ns // 10 ** 9
        wall = _wall(t, self.tz) + timedelta(seconds=1)
        horizon = wall.year + CRON_HORIZON_YEARS + 1
        while wall.year < horizon:
            if wall.month not in self.months:
                i = bisect.bisect_left(self.months, wall.month)
                year = wall.year + (i == len(self.months))
                wall = datetime(year, self.months[i % len(self.months)], 1)
                continue
            if not self._day_matches(wall):
                wall = datetime(wall.year, wall.month, wall.day) + timedelta(days=1)
                continue
            nxt = _next_in(self.hours, wall.hour)
            if nxt is None:
                wall = datetime(wall.year, wall.month, wall.day) + timedelta(days=1)
                continue
            if nxt != wall.hour:
                wall = wall.replace(hour=nxt, minute=0, second=0)
            nxt = _next_in(self.minutes, wall.minute)
            if nxt is None:
                wall = wall.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if nxt != wall.minute:
                wall = wall.replace(minute=nxt, second=0)
            nxt = _next_in(self.seconds, wall.second)
            if nxt is None:
                wall = wall.replace(second=0) + timedelta(minutes=1)
                continue
            wall = wall.replace(second=nxt)
            instant = _instant(wall, self.tz)
            if instant is not None and instant > t:
                return instant * 10 ** 9 if instant * 10 ** 9 <= MAX_NS else None
            wall += timedelta(seconds=1)  # skipped by DST, or the repeated hour's second pass
        return None

    def preview(self, t_ns, n):
        """The next ``n`` run times after ``t_ns``, as Unix ns."""
        out = []
        for _ in range(n):
            t_ns = self.next_after(t_ns)
            if t_ns is None:
                break
            out.append(t_ns)
        return out


def _next_in(values, current):
    """Smallest allowed value >= current, or None."""
    i = bisect.bisect_left(values, current)
    return values[i] if i < len(values) else None


def _load_zone(name):
    if zoneinfo is None:
        raise CronError("CRON_TZ needs Python's zoneinfo module")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CronError("unknown time zone %r in CRON_TZ (an IANA name such as "
                        "Europe/Paris)" % name) from None


def _wall(t, tz):
    """Unix seconds -> naive wall-clock datetime in tz (None: local time)."""
    return datetime.fromtimestamp(t, tz).replace(tzinfo=None)


def _instant(wall, tz):
    """Naive wall time in tz -> Unix seconds at its first occurrence, or None if skipped."""
    t = int(wall.replace(tzinfo=tz, fold=0).timestamp())
    return t if _wall(t, tz) == wall else None


# --------------------------------------------------------------------------
# Storage: tables, journal, snapshot, recovery
# --------------------------------------------------------------------------

# every data file is opened without following a symlink planted in its place
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class FileSystem:
    """The file operations storage makes, in one place.

    The default is the OS.  Tests substitute a layer that forgets every
    write not followed by fsync (a power loss), or that fails like a full disk.
    """

    open = staticmethod(os.open)
    write = staticmethod(os.write)
    fsync = staticmethod(os.fsync)
    close = staticmethod(os.close)
    ftruncate = staticmethod(os.ftruncate)
    replace = staticmethod(os.replace)
    unlink = staticmethod(os.unlink)

    def fsync_dir(self, path):
        """fsync a directory, so that a rename or new file in it survives power loss."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_all(self, fd, data):
        view = memoryview(data)
        while view:
            view = view[self.write(fd, view):]


def fault_point(name):
    """Crash here (SIGKILL) when the environment says POUSSETACHES_FAULT=name.

    Test-only: the crash tests use it to stop the process between the steps
    of a snapshot.  Off unless that variable names this point.
    """
    if os.environ.get("POUSSETACHES_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Ticket:
    """One journal record on its way to disk; ``wait()`` returns once it is written."""

    __slots__ = ("journal", "data", "seq", "error", "body")

    def __init__(self, journal, data, body=None):
        self.journal = journal
        self.data = data
        self.body = body       # a put record's task JSON, reused for the API's answer
        self.seq = 0           # its place in the journal's order (0: refused)
        self.error = None

    def wait(self):
        """Block until the record is on disk (fsync'ed in fsync mode), writing it
        ourselves unless another thread has; raise PersistError if it cannot be."""
        self.journal.flush(self)
        if self.error is not None:
            raise PersistError(self.error)


errno_stopping = 125  # ECANCELED: the code given to records refused at shutdown
_ROTATE = object()  # the data of a rotation marker: start a new journal file here


class Journal:
    """The append-only journal, written with group commit.

    ``append()`` queues an encoded record and returns a Ticket.  It does no
    I/O and takes no lock: its callers hold the Store's lock, which orders
    the records (and the deque hands them to the writer safely).  Outside the
    lock, ``ticket.wait()`` gets it on disk: the thread that takes the write
    lock writes every record queued at that moment with one ``write`` and
    one ``fsync``; the threads queued behind it find their records synced
    and return.  That is group commit without a writer thread, so an
    enqueue costs no thread handoff.  ``flush()`` writes without fsync, for
    records nobody waits for (a delivery's outcome: losing one costs one
    more delivery, and the next fsync covers it anyway).  A failed write is
    cut back off the file so that later records never follow a torn one.

    Lines: ``<crc32 of json, 8 hex> <json>\\n``.  Files: journal.<seq>.
    """

    def __init__(self, directory, seq, fsync=True, on_error=None, fs=None):
        self.directory = directory
        self.fsync = fsync
        self.seq = seq
        self.errors = 0              # write/fsync failures, for /metrics and GET /
        self.healthy = True
        self.records = 0             # records written since the last rotation
        self.commits = 0             # write (+ fsync) batches: group commit at work
        self._on_error = on_error
        self.fs = fs or FileSystem()
        self._write_lock = threading.Lock()  # held by the one thread writing (and fsyncing)
        self._pending = collections.deque()  # appended under the Store's lock, popped here
        self._closed = False
        self._queued = 0             # seq of the last queued record (under the Store's lock)
        self._written = 0            # seq of the last record written (under _write_lock)
        self._synced = 0             # ... and fsync'ed (under _write_lock)
        self._fd = None              # used under _write_lock only
        self._size = 0

    def path(self, seq=None):
        return os.path.join(self.directory, "%s%06d" % (JOURNAL_PREFIX, self.seq if seq is None else seq))

    def start(self):
        self._open()

    def append(self, record):
        """Queue one record (a dict); return its Ticket.  Order is call order."""
        data = _compact(record).encode()
        return self._queue(b"%08x %s\n" % (binascii.crc32(data), data))

    def put(self, table, body):
        """Queue "the task ``body`` (its JSON, bytes) now lives in ``table``"."""
        data = b'{"op":"put","table":"%s","task":%s}' % (table.encode(), body)
        return self._queue(b"%08x %s\n" % (binascii.crc32(data), data), body)

    def rotate(self):
        """Queue a switch to a new journal file; return (new seq, Ticket)."""
        self.seq += 1
        return self.seq, self._queue(_ROTATE)

    def _queue(self, data, body=None):
        ticket = Ticket(self, data, body)
        if self._closed:
            ticket.error = "the daemon is stopping"
        else:
            self._queued += 1
            ticket.seq = self._queued
            self._pending.append(ticket)
        return ticket

    def _drain(self):
        batch = []
        try:
            while True:
                batch.append(self._pending.popleft())
        except IndexError:
            return batch

    def durable(self, ticket):
        """Is the ticket's record written and, in fsync mode, fsync'ed?"""
        synced = self._synced  # first: an error is set before _synced can pass the ticket
        return ticket.seq <= synced and ticket.error is None

    def write(self, ticket):
        """Write (no fsync) the queued records up to ``ticket``, unless a thread did."""
        if ticket.error is None and ticket.seq > self._written:  # read unlocked: it only grows
            self.flush()

    def flush(self, ticket=None, wait=True):
        """Write every queued record.  With a ticket, also make the journal durable
        up to it (fsync in fsync mode), unless a thread before us did.

        ``wait=False`` (a delivery's outcome): while another thread writes,
        return at once.  That thread writes our record: every writer looks at
        the queue again after releasing the lock, and writes what came
        meanwhile (for a few rounds at most: under a steady stream of records,
        the next writer is never far).
        """
        if ticket is not None and (ticket.error or ticket.seq <= self._synced):
            return  # read without the lock: _synced only grows, and the lock re-checks
        for _ in range(4):
            if not self._write_lock.acquire(blocking=wait):
                return
            try:
                if ticket is None or not (ticket.error or ticket.seq <= self._synced):
                    batch = self._drain()  # else a thread before us synced it with its own
                    if batch:
                        self._write(batch)
                    if ticket is not None and ticket.error is None and ticket.seq > self._synced:
                        self._sync(ticket)
            finally:
                self._write_lock.release()
            if not self._pending:
                return
            ticket, wait = None, False  # queued while we wrote: ours to write, unless taken

    def _sync(self, ticket):
        if self.fsync and self._fd is not None:
            try:
                self.fs.fsync(self._fd)
            except OSError as exc:
                ticket.error = "cannot fsync the journal: %s" % (exc.strerror or exc)
                self.errors += 1
                self.healthy = False
                if self._on_error is not None:
                    self._on_error()
                return
        self._synced = self._written

    def close(self):
        """Write what is queued, refuse what comes later, close the file."""
        with self._write_lock:
            self._closed = True
            batch = self._drain()
            if batch:
                self._write(batch)
            self._close_quietly()

    def _write(self, batch):
        """Write a batch (under _write_lock): records in groups, rotations between them."""
        group = []
        for ticket in batch:
            if ticket.data is _ROTATE:
                self._commit(group)
                group = []
                self._switch(ticket)
            else:
                group.append(ticket)
        self._commit(group)

    def _open(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NOFOLLOW
        created = not os.path.exists(self.path())
        self._fd = self.fs.open(self.path(), flags, 0o600)
        self._size = os.fstat(self._fd).st_size
        self.records = 0
        if created and self.fsync:
            # fsync of the file alone does not make its name durable (fsync(2))
            self.fs.fsync_dir(self.directory)

    def _commit(self, group):
        if not group:
            return
        data = b"".join(t.data for t in group)
        error = None
        try:
            if self._fd is None:
                if self._closed:  # a record that raced the shutdown
                    raise OSError(errno_stopping, "the daemon is stopping")
                self._open()
            self.fs.write_all(self._fd, data)
            self._size += len(data)
            self.records += len(group)
            self.commits += 1
            self._written = group[-1].seq
            if not self.fsync:
                self._synced = self._written  # written is all that fsync mode "never" waits for
            if not self.healthy:
                logger.warning("journal writes succeed again", extra={"event": "journal_ok"})
            self.healthy = True
        except OSError as exc:
            error = "cannot write the journal: %s" % (exc.strerror or exc)
            self._fail(exc)
        if error is not None:
            for ticket in group:
                ticket.error = error

    def _fail(self, exc):
        self.errors += 1
        if self.healthy:
            logger.error("journal write failed: %s", exc,
                         extra={"event": "journal_error", "error": str(exc)})
        self.healthy = False
        try:  # cut the partial write off, so the next record starts on a fresh line
            self.fs.ftruncate(self._fd, self._size)
        except (OSError, TypeError):
            self._close_quietly()
        if self._on_error is not None:
            self._on_error()

    def _switch(self, ticket):
        try:
            if self.fsync and self._fd is not None and self._written > self._synced:
                self.fs.fsync(self._fd)  # its waiters will fsync the new file, not this one
                self._synced = self._written
            self._close_quietly()
            self._open()
        except OSError as exc:
            ticket.error = "cannot start a new journal: %s" % (exc.strerror or exc)
            self._fail(exc)
        self._written = ticket.seq

    def _close_quietly(self):
        if self._fd is not None:
            try:
                self.fs.close(self._fd)
            except OSError:
                pass
            self._fd = None


def read_private(path):
    """A data file's bytes, never through a symlink (OSError ELOOP if it is one)."""
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as f:
        return f.read()


def read_journal(path, stats):
    """The records of one journal file, one at a time, as they are read.

    A line whose checksum or JSON fails is corrupt: skipped, counted in
    ``stats["corrupt_records"]``, logged.  A last line without its newline is
    a torn write: dropped with a warning, counted in ``stats["torn_records"]``.
    One line at a time, never the whole file: a recovery must not leave the
    heap the size of its journal (the records would be freed, but the tasks
    built meanwhile stay scattered among them).
    """
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                logger.warning("journal %s ends with a torn record (%d bytes); dropped",
                               os.path.basename(path), len(line))
                stats["torn_records"] += 1
                return
            crc, _, body = line[:-1].partition(b" ")
            try:
                if int(crc, 16) != binascii.crc32(body):
                    raise ValueError("checksum mismatch")
                record = json.loads(body)
            except ValueError:
                stats["corrupt_records"] += 1
                logger.warning("journal %s line %d is corrupt; skipped",
                               os.path.basename(path), number)
                continue
            yield record


class SortedKeys:
    """Keys in order, as sorted blocks of at most 2 x LOAD keys (the layout of
    the sortedcontainers package): add and discard cost O(log n + LOAD), and a
    page at any offset is read in order without sorting the table."""

    LOAD = 500

    def __init__(self):
        self._blocks = []   # sorted lists, each non-empty; all of block i < block i+1
        self._maxes = []    # the last key of each block
        self._len = 0

    def __len__(self):
        return self._len

    def __iter__(self):
        for block in self._blocks:
            yield from block

    def add(self, key):
        if not self._blocks:
            self._blocks.append([key])
            self._maxes.append(key)
        else:
            i = bisect.bisect_left(self._maxes, key)
            if i == len(self._maxes):
                i -= 1
                self._blocks[i].append(key)
                self._maxes[i] = key
            else:
                bisect.insort(self._blocks[i], key)
            block = self._blocks[i]
            if len(block) > 2 * self.LOAD:
                self._blocks.insert(i + 1, block[self.LOAD:])
                del block[self.LOAD:]
                self._maxes.insert(i, block[-1])
        self._len += 1

    def discard(self, key):
        i = bisect.bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return
        block = self._blocks[i]
        j = bisect.bisect_left(block, key)
        if j == len(block) or block[j] != key:
            return
        del block[j]
        self._len -= 1
        if not block:
            del self._blocks[i]
            del self._maxes[i]
        elif j == len(block):
            self._maxes[i] = block[-1]

    def rank(self, key):
        """How many keys are smaller than ``key``."""
        i = bisect.bisect_left(self._maxes, key)
        return sum(len(block) for block in self._blocks[:i]) + (
            bisect.bisect_left(self._blocks[i], key) if i < len(self._blocks) else 0)

    def first(self):
        """The smallest key, or None."""
        return self._blocks[0][0] if self._blocks else None

    def after(self, key, limit):
        """The keys greater than ``key``, at most ``limit`` of them."""
        out = []
        i = bisect.bisect_right(self._maxes, key)
        if i < len(self._blocks):
            block = self._blocks[i]
            out.extend(block[bisect.bisect_right(block, key):][:limit])
            for block in self._blocks[i + 1:]:
                if len(out) >= limit:
                    break
                out.extend(block[:limit - len(out)])
        return out

    def page(self, offset, limit, reverse=False):
        """The keys from position ``offset``, at most ``limit`` of them; with
        ``reverse``, from the end: the largest first."""
        out = []
        for block in reversed(self._blocks) if reverse else self._blocks:
            if len(out) >= limit:
                break
            if offset >= len(block):
                offset -= len(block)
                continue
            if reverse:
                end = len(block) - offset
                out.extend(reversed(block[max(0, end - (limit - len(out))):end]))
            else:
                out.extend(block[offset:offset + limit - len(out)])
            offset = 0
        return out

    def before(self, key, limit):
        """The keys smaller than ``key``, the largest first, at most ``limit`` of them."""
        i = bisect.bisect_left(self._maxes, key)  # blocks before i hold only smaller keys
        out = []
        if i < len(self._blocks):
            block = self._blocks[i]
            out.extend(reversed(block[max(0, bisect.bisect_left(block, key) - limit):
                                      bisect.bisect_left(block, key)]))
        for block in reversed(self._blocks[:i]):
            if len(out) >= limit:
                break
            out.extend(reversed(block[max(0, len(block) - (limit - len(out))):]))
        return out


class Store:
    """The task tables, their journal and snapshots; the one owner of task state.

    Tables: ``waiting`` (pending tasks, cron included), ``success`` and
    ``dead``, each of these two capped in records and in payload and error
    bytes (``caps``): past a cap the oldest records go, counted in
    ``dropped``.  An id lives in at most one table.  Every
    change is one journal record: ``{"op": "put", "table": T, "task": {...}}``
    (the task now lives in T, nowhere else) or ``{"op": "del", "id": I}``.

    ``_lock`` guards the tables, the indexes and every Task's fields.  No I/O
    happens under it: records are queued on the journal, and callers
    that must answer only once the record is durable wait on the Ticket after
    releasing the lock.  A new task goes on ``due`` (the DueQueue) once its
    record is written, while the fsync runs (a kill -9 cannot lose it then,
    and the answer still waits for the fsync); a retry at once (were its
    record lost, the attempt would only be repeated).
    """

    def __init__(self, directory, due, fsync=True, keep_success=DEFAULT_KEEP_SUCCESS,
                 clock=time.time_ns, fs=None, on_dirty=None, on_change=None,
                 quota=(DEFAULT_MAX_WAITING, DEFAULT_MAX_STORED_BYTES), cron_tz=None,
                 caps=None):
        self.directory = directory
        self.cron_tz = cron_tz           # for schedules restored by the import
        self.max_waiting, self.max_stored_bytes = quota
        self.waiting_bytes = 0           # decoded payload bytes in the waiting table
        self.due = due
        # table -> (records, bytes) kept at most
        self.caps = dict(caps or {"success": (keep_success, DEFAULT_MAX_SUCCESS_BYTES),
                                  "dead": (DEFAULT_KEEP_DEAD, DEFAULT_MAX_DEAD_BYTES)})
        self.table_bytes = {"success": 0, "dead": 0}  # their payload and error bytes
        self.dropped = collections.Counter()  # (table, "records" | "bytes") -> records dropped
        self._warned = 0.0               # monotonic time of the last "dropped" warning
        self.clock = clock
        self.fsync = fsync
        self.recovery = {}
        self._lock = threading.Lock()
        self._tables = {"waiting": {}, "success": collections.OrderedDict(), "dead": {}}
        # each table by (next_run, id), and "cron": the waiting tasks with a schedule
        # each table by (next_run, id); "cron" and "once": the waiting tasks with a
        # schedule and without one
        self._order = {name: SortedKeys() for name in TABLES + ("cron", "once")}
        self._idempotency = {}        # idempotency key -> task id
        self._queues = {DEFAULT_QUEUE: {}}  # queue name -> its settings (QUEUE_PARAMS), persisted
        self._by_queue = {}           # queue name -> SortedKeys of its waiting tasks' order keys
        self._keys = {}               # (queue, ordering key) -> SortedKeys of (seq, id) waiting
        self._seq = 0                 # the last enqueue sequence number given
        self._heads = {}              # (queue, ordering key) -> id of the head last scheduled
        self._released = set()        # ordering keys whose head may have changed
        self._inflight = {}           # task id -> version being attempted
        self._pending = {}            # task id -> Ticket of an enqueue not yet durable
        self._dirty = threading.Event()  # a journal write failed: snapshot soon
        self._on_dirty = on_dirty        # called when _dirty is set (wakes the persister)
        self._on_change = on_change or (lambda: None)  # after each change, outside the lock
        self._snapshot_lock = threading.Lock()  # one snapshot at a time
        self.snapshot_errors = 0
        self.snapshots = 0               # written since start, for /metrics
        self.enqueued = 0                # tasks created by add(), for /metrics
        self.fs = fs or FileSystem()
        seq = self._recover()
        self.journal = Journal(directory, seq, fsync=fsync, on_error=self._mark_dirty,
                               fs=self.fs)

    # -- start-up ----------------------------------------------------------

    def _journal_files(self):
        found = []
        for name in os.listdir(self.directory):
            if name.startswith(JOURNAL_PREFIX) and name[len(JOURNAL_PREFIX):].isdigit():
                found.append((int(name[len(JOURNAL_PREFIX):]), name))
        return sorted(found)

    def _recover(self):
        """Load snapshot + journal; return the seq of the journal file to write next."""
        started = time.monotonic()
        stats = {"snapshot_tasks": 0, "journal_records": 0, "corrupt_records": 0,
                 "torn_records": 0, "imported": 0}
        first_seq = 0
        path = os.path.join(self.directory, SNAPSHOT_NAME)
        sizes = [os.path.getsize(os.path.join(self.directory, name))
                 for _, name in self._journal_files()]
        if os.path.exists(path) or sizes:
            logger.info("loading %s and %d journal files (%.1f MB)...",
                        SNAPSHOT_NAME if os.path.exists(path) else "no snapshot", len(sizes),
                        (sum(sizes) + (os.path.getsize(path) if os.path.exists(path) else 0))
                        / 1e6, extra={"event": "loading"})
        if os.path.exists(path + ".tmp"):  # a snapshot interrupted by a crash
            logger.warning("removing %s.tmp left by an interrupted snapshot", SNAPSHOT_NAME)
            os.unlink(path + ".tmp")
        if os.path.exists(path):
            try:
                doc = json.loads(read_private(path))
                first_seq = int(doc.get("journal", 0))
                fields = tuple(doc.get("fields") or ())
                if fields == TASK_NAMES:
                    build = Task.from_row
                elif fields:  # rows of another field order (another version)
                    build = lambda row: Task.from_json(dict(zip(fields, row)))
                else:         # version 1: one object per task
                    build = Task.from_json
                self._queues.update(doc.get("queues") or {})
                for table in TABLES:
                    for item in doc.get(table, ()):
                        self._place(table, build(item), fresh=True)
                        stats["snapshot_tasks"] += 1
            except (ValueError, KeyError, TypeError) as exc:
                raise PousseTachesError(
                    "%s is unreadable (%s); move it aside to start from the journal alone"
                    % (path, exc)) from None
        files = self._journal_files()
        for seq, name in files:
            if seq < first_seq:
                continue
            if os.path.getsize(os.path.join(self.directory, name)) == 0:
                os.unlink(os.path.join(self.directory, name))  # nothing to lose
                continue
            for record in read_journal(os.path.join(self.directory, name), stats):
                try:
                    self._apply(record)
                    stats["journal_records"] += 1
                except (KeyError, TypeError, ValueError):
                    stats["corrupt_records"] += 1
        if not files and not os.path.exists(path):
            stats["imported"] = self._import_original()
        if stats["journal_records"] or stats["corrupt_records"] or stats["torn_records"]:
            self._dirty.set()  # compact the replayed journal into a snapshot soon
        self._trim("success")
        self._trim("dead")
        for name in [name for name in self._queues if name not in self._by_queue]:
            self._forget_queue(name)
        self.recovery = stats
        logger.info(
            "recovered %d waiting, %d success, %d dead tasks in %.3fs "
            "(snapshot %d tasks, journal %d records, %d corrupt, %d torn)",
            len(self._tables["waiting"]), len(self._tables["success"]),
            len(self._tables["dead"]), time.monotonic() - started,
            stats["snapshot_tasks"], stats["journal_records"],
            stats["corrupt_records"], stats["torn_records"],
            extra={"event": "recovered", "count": sum(map(len, self._tables.values())),
                   "duration_ms": round((time.monotonic() - started) * 1000, 1)})
        return max([s for s, _ in files] + [first_seq - 1, 0]) + 1

    def _apply(self, record):
        if record["op"] == "put":
            self._place(record["table"], Task.from_json(record["task"]))
        elif record["op"] == "del":
            self._remove(record["id"])
        elif record["op"] == "queue":
            self._queues[str(record["name"])] = dict(record["settings"])
        elif record["op"] == "unqueue":
            self._queues.pop(record["name"], None)
        else:
            raise ValueError("unknown op")

    def _import_original(self):
        """Import an original-layout data dir (waiting/, dead/, success/) once.

        The original keeps a cron task that has run under one id twice: its
        schedule in waiting/ and its last run in success/ (or dead/); and its
        restarts drop cron files from waiting/.  So the waiting/ file is the
        schedule, a success/dead file becomes a run record under a new id
        (``cron_id`` pointing to the schedule), and a schedule-bearing
        success/dead file without a waiting/ twin also restores the schedule,
        next run computed from now.  Returns the number of tasks placed.
        """
        found = {}
        for table in TABLES:
            folder = os.path.join(self.directory, table)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                try:
                    path = os.path.join(folder, name)
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        raise ValueError("not a regular file")
                    task = Task.from_json(json.loads(read_private(path)))
                    problem = imported_task_problem(task)
                    if problem:
                        raise ValueError(problem)
                    if task.schedule:
                        CronSpec(task.schedule, self.cron_tz)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    logger.warning("import: skipped %s/%s: %s; %s", table, name, exc,
                                   self._set_aside(table, name))
                    continue
                found.setdefault(table, []).append(task)
        if not found:
            return 0
        schedules = {t.id for t in found.get("waiting", ()) if t.schedule}
        restored = 0
        for task in found.get("waiting", ()):
            self._place("waiting", task)
        for table in ("success", "dead"):
            for task in found.get(table, ()):
                if task.schedule:
                    if task.id not in schedules:  # restore the schedule the original dropped
                        schedules.add(task.id)
                        restored += 1
                        self._place("waiting", self._restored_schedule(task))
                    task = task.copy(id=new_id(), cron_id=task.id, schedule="")
                self._place(table, task)
        self._trim("success")
        self._trim("dead")
        waiting = self._tables["waiting"]
        logger.info("imported from the original layout in %s: %d waiting (%d cron, %d of "
                    "them restored from their last run), %d success, %d dead; the old folders "
                    "are kept as they were", self.directory, len(waiting), len(self._order["cron"]),
                    restored, len(self._tables["success"]), len(self._tables["dead"]))
        self._dirty.set()  # the persister writes them into a snapshot at once
        return sum(len(table) for table in self._tables.values())

    def _set_aside(self, table, name):
        """Move a file the import skipped to ``import-rejected/<table>/``, where the
        operator finds it; says where it went (or why it stayed)."""
        aside = os.path.join(self.directory, IMPORT_REJECTED, table)
        try:
            os.makedirs(aside, mode=0o700, exist_ok=True)
            os.rename(os.path.join(self.directory, table, name), os.path.join(aside, name))
        except OSError as exc:
            return "left where it is (%s)" % exc
        return "moved to %s" % os.path.join(IMPORT_REJECTED, table, name)

    def _restored_schedule(self, run):
        """The schedule of a cron task whose waiting/ file the original dropped."""
        now = self.clock()
        following = CronSpec(run.schedule, self.cron_tz).next_after(now - 1) or now
        return Task(run.id, run.url, run.payload, run.expected, run.schedule,
                    next_run=following, created=now)

    # -- table primitives (caller holds _lock, or is single-threaded start-up) --

    def _place(self, table, task, fresh=False):
        """File ``task`` in ``table``, out of any other (``fresh``: it is in none)."""
        if not fresh:
            self._remove(task.id)
        self._tables[table][task.id] = task
        task.order_key = key = (task.next_run, task.id)
        self._order[table].add(key)
        if table == "waiting":
            self.waiting_bytes += len(task.payload)
            self._order["cron" if task.schedule else "once"].add(key)
            index = self._by_queue.get(task.queue)
            if index is None:  # the queue's first waiting task
                index = self._by_queue[task.queue] = SortedKeys()
            if task.queue not in self._queues:  # naming a queue creates it
                self._queues[task.queue] = {}
            index.add(key)
            if task.ordering_key is not None:
                self._keys.setdefault((task.queue, task.ordering_key),
                                      SortedKeys()).add((task.seq, task.id))
            self._seq = max(self._seq, task.seq)
        if task.idempotency_key:
            self._idempotency[task.idempotency_key] = task.id
        if table != "waiting":
            self.table_bytes[table] += _record_bytes(task)
            self._trim(table)

    def _remove(self, task_id):
        for name, table in self._tables.items():
            task = table.pop(task_id, None)
            if task is not None:
                self._order[name].discard(task.order_key)
                if name != "waiting":
                    self.table_bytes[name] -= _record_bytes(task)
                if name == "waiting":
                    self.waiting_bytes -= len(task.payload)
                    # as _place filed it
                    self._order["cron" if task.schedule else "once"].discard(task.order_key)
                    self._by_queue[task.queue].discard(task.order_key)
                    if not self._by_queue[task.queue]:
                        self._forget_queue(task.queue)
                    if task.ordering_key is not None:
                        key = (task.queue, task.ordering_key)
                        self._keys[key].discard((task.seq, task.id))
                        if not self._keys[key]:
                            del self._keys[key]
                        self._released.add(key)  # its head may have changed
                if task.idempotency_key and self._idempotency.get(task.idempotency_key) == task_id:
                    del self._idempotency[task.idempotency_key]
                task.version += 1
                return task
        return None

    def _trim(self, name):
        """Drop the oldest records of ``success`` or ``dead`` (the first filed: a
        dict keeps that order) while the table is over one of its caps."""
        table, (most, most_bytes) = self._tables[name], self.caps[name]
        while len(table) > most or (self.table_bytes[name] > most_bytes and table):
            cap = "records" if len(table) > most else "bytes"
            old = self._remove(next(iter(table)))
            self.dropped[name, cap] += 1
            if name == "dead" or cap == "bytes":  # success records past the count: routine
                now = time.monotonic()
                if name == "dead" or now - self._warned >= 60:
                    self._warned = now
                    logger.warning(
                        "%s table over its cap of %s: dropped the oldest record (%s, %s); "
                        "%d dropped so far", name,
                        "%d records" % most if cap == "records" else "%d bytes" % most_bytes,
                        old.id, old.url[:200], sum(n for (t, _), n in self.dropped.items()
                                                   if t == name),
                        extra={"event": "dropped", "task_id": old.id, "queue": old.queue})

    def _forget_queue(self, name):
        """A queue without waiting tasks goes when it has no settings of its own
        either: naming one costs nothing once its tasks are done."""
        self._by_queue.pop(name, None)
        if self._queues.get(name) == {} and name != DEFAULT_QUEUE:
            del self._queues[name]

    def _find(self, task_id):
        for name, table in self._tables.items():
            task = table.get(task_id)
            if task is not None:
                return name, task
        return None, None

    def _put(self, table, task, fresh=False):
        """Place a task and queue its record; returns the Ticket."""
        self._place(table, task, fresh)
        return self.journal.put(table, encode_task(task))

    def _schedule(self, task):
        """Push a waiting task on the due-time queue (its current version); a task
        with an ordering key only when it is its key's head (its turn)."""
        if task.ordering_key is not None:
            key = (task.queue, task.ordering_key)
            fifo = self._keys.get(key)
            if fifo is None or fifo.first()[1] != task.id:
                return  # scheduled when the tasks before it are done
            self._heads[key] = task.id
        self.due.put_task(task.next_run, task.id, task.version, task.queue, task.priority)

    def _release_heads(self):
        """Schedule the new head of every ordering key whose head left (it
        succeeded, went dead, or was cancelled).  Caller holds _lock."""
        for key in self._released:
            fifo = self._keys.get(key)
            if fifo is None:
                self._heads.pop(key, None)
                continue
            head = self._tables["waiting"].get(fifo.first()[1])
            if self._heads.get(key) != head.id and head.id not in self._pending:
                self._schedule(head)
        self._released.clear()

    # -- the API's calls -----------------------------------------------------

    def start(self):
        """Open the journal and put every runnable waiting task on the DueQueue:
        the one-off and cron tasks, and the head of each ordering key."""
        self.journal.start()
        with self._lock:
            for name, settings in self._queues.items():
                self._configure(name, settings)
            heads = {fifo.first()[1] for fifo in self._keys.values()}
            self._heads = {key: fifo.first()[1] for key, fifo in self._keys.items()}
            self.due.put_many((t.next_run, t.id, t.version, t.queue, t.priority)
                              for t in self._tables["waiting"].values()
                              if t.ordering_key is None or t.id in heads)

    def add(self, task):
        """Store one new task durably: ``add_many([task])``'s one answer."""
        return self.add_many([task])[0]

    def add_many(self, tasks):
        """Store new tasks durably, all or nothing, with one journal write and
        one fsync for all of them.

        Returns ``[(task, outcome, its JSON as bytes)]`` in order.  ``outcome``
        is ``created``; ``existing`` when a task with the same id (cron dedup,
        or a named cron unchanged) or idempotency key is there (that task is
        returned); or ``replaced`` for a named cron given a new schedule, URL,
        payload or settings (same id).  Raises QuotaError, or PersistError after
        undoing every change.
        """
        while True:
            with self._lock:
                pending = next((self._pending[i] for i in self._twins(tasks)
                                if i in self._pending), None)
                if pending is None:
                    results, placed, ticket = self._admit(tasks)
                    break
            try:
                pending.wait()  # a twin request is being written: answer after it
            except PersistError:
                pass  # it failed and was undone: try again
        if ticket is None:
            return results
        # Written (not yet fsync'ed), the tasks survive a kill -9: their delivery
        # may start while the fsync runs.  Only the answer waits for the fsync.
        self.journal.write(ticket)
        durable = self.journal.durable(ticket)  # already: fsync off, or another's fsync
        if ticket.error is None:
            with self._lock:
                ready = []
                for task, _ in placed:
                    if self._tables["waiting"].get(task.id) is task:
                        if task.ordering_key is None:
                            ready.append(task)
                        else:
                            self._schedule(task)
                self.due.put_tasks((t.next_run, t.id, t.version, t.queue, t.priority)
                                   for t in ready)
                if durable:
                    self._settled(placed)
                self._release_heads()
        if not durable:
            try:
                ticket.wait()
            except PersistError:
                self._undo(placed)
                raise
            with self._lock:
                self._settled(placed)
                self._release_heads()
        self._on_change()
        return results

    def _settled(self, placed):
        """add_many's tasks are durable: twins need not wait for them any more, and an
        ordering key whose head left meanwhile gets its next head (caller holds _lock)."""
        for task, _ in placed:
            self._pending.pop(task.id, None)  # one id twice: a batch naming a cron twice
            if task.ordering_key is not None:
                self._released.add((task.queue, task.ordering_key))

    def _undo(self, placed):
        """Take back an add_many whose records could not be persisted.  A task
        whose attempt already settled as a retry goes too (same ``seq``); one
        delivered meanwhile stays in ``success``: it ran, as at-least-once allows."""
        with self._lock:
            for task, old in reversed(placed):
                self._pending.pop(task.id, None)
                live = self._tables["waiting"].get(task.id)
                if live is not None and live.seq == task.seq:
                    self._remove(task.id)
                    if old is not None:
                        self._place("waiting", old, fresh=True)
                        self._schedule(old)
                self.enqueued -= old is None
            self._release_heads()

    def _twins(self, tasks):
        """The ids an enqueue of ``tasks`` could find already there (caller holds _lock)."""
        for task in tasks:
            yield self._idempotency.get(task.idempotency_key, task.id)

    def _admit(self, tasks):
        """add_many's work under _lock: (results, [(placed task, replaced one)], last Ticket)."""
        outcomes, new, keys = [], {}, {}   # new: id -> task of this batch; keys: key -> id
        for task in tasks:  # first, what each one is: nothing changes if the quota says no
            existing_id = keys.get(task.idempotency_key) or self._idempotency.get(
                task.idempotency_key, task.id)
            table, existing = self._find(existing_id)
            if task.schedule and existing_id == task.id and table != "waiting":
                existing = None  # a cron's twin is its schedule: a run record is no twin
            if existing is None:
                existing = new.get(existing_id)  # a twin earlier in this batch
            if existing is None:
                new[task.id] = task
                if task.idempotency_key:
                    keys[task.idempotency_key] = task.id
                outcomes.append("created")
            elif task.name is not None and existing.id == task.id and _differs(existing, task):
                outcomes.append("replaced")
            else:
                outcomes.append(existing)
        self._check_quota(len(new), sum(len(t.payload) for t in new.values()))
        results, placed, ticket = [], [], None
        for task, outcome in zip(tasks, outcomes):
            if not isinstance(outcome, str):
                results.append((outcome, "existing", encode_task(outcome)))
                continue
            old = self._tables["waiting"].get(task.id) if outcome == "replaced" else None
            if old is not None:
                task.created = old.created
                # above every version the old one had: its claimed copies and queue
                # entries must not match the replacement
                task.version = old.version + 1
            self._seq += 1
            task.seq = self._seq
            ticket = self._put("waiting", task, fresh=old is None)  # a new id is in no table
            self._pending[task.id] = ticket
            self.enqueued += old is None
            placed.append((task, old))
            results.append((task, outcome, ticket.body))
        return results, placed, ticket

    def _check_quota(self, tasks, size):
        """QuotaError unless ``tasks`` more waiting tasks and ``size`` more payload
        bytes fit under --max-waiting and --max-stored-bytes."""
        if tasks and len(self._tables["waiting"]) + tasks > self.max_waiting:
            raise QuotaError("the waiting table holds %d tasks, the most allowed "
                             "(--max-waiting)" % len(self._tables["waiting"]))
        if size > 0 and self.waiting_bytes + size > self.max_stored_bytes:
            raise QuotaError("the waiting tasks' payloads would pass %d bytes, the most "
                             "allowed (--max-stored-bytes)" % self.max_stored_bytes)

    def get(self, task_id):
        """(state, task JSON) or (None, None)."""
        with self._lock:
            table, task = self._find(task_id)
            return table, (task.to_json() if task is not None else None)

    def oldest_due_age(self, now):
        """Seconds since the earliest waiting task fell due (0.0 if none is due)."""
        with self._lock:
            first = self._order["waiting"].first()
        return max(0.0, (now - first[0]) / 1e9) if first is not None else 0.0

    def counts(self):
        """Tasks per table: ``waiting`` the one-off ones, ``cron`` the schedules."""
        with self._lock:
            out = {name: len(table) for name, table in self._tables.items()}
            out["waiting"], out["cron"] = len(self._order["once"]), len(self._order["cron"])
            return out

    def listing(self, table, limit=None, offset=0, match=None, descending=False):
        """(total, pieces) of a table by next_run, ascending unless ``descending``
        (``cron`` is a view of waiting): how many tasks it holds (that
        ``match(task)``, when given), and an iterator over lists of their JSON,
        from ``offset``, ``limit`` at most.

        Each piece of at most LIST_PIECE tasks is read in one short hold of the
        lock, and the next one resumes after the last key seen, so a listing of
        every task neither stalls enqueues nor holds the whole table in memory.
        A task rescheduled while the listing runs may be left out or appear twice.
        """
        if match is None:
            with self._lock:
                total = len(self._order[table])
        else:  # a first pass counts: filters are for operators, not the hot path
            total = sum(len(piece) for piece in self._pieces(table, None, 0, match, False))
        return total, self._pieces(table, limit, offset, match, True, descending)

    def _pieces(self, table, limit, offset, match, encode, descending=False):
        source = "waiting" if table in ("cron", "once") else table
        remaining = float("inf") if limit is None else limit
        skip = offset if match is not None else 0
        last = None
        while remaining > 0:
            count = LIST_PIECE if match is not None else int(min(LIST_PIECE, remaining))
            with self._lock:
                order, tasks = self._order[table], self._tables[source]
                if last is None:
                    keys = order.page(offset if match is None else 0, count, descending)
                else:
                    keys = (order.before if descending else order.after)(last, count)
                found = [tasks[key[1]] for key in keys if key[1] in tasks]
                if match is not None:
                    found = [task for task in found if match(task)]
                    dropped, skip = min(skip, len(found)), skip - min(skip, len(found))
                    found = found[dropped:][:int(min(len(found), remaining))]
                piece = [task.to_json() for task in found] if encode else found
            if not keys:
                return
            last = keys[-1]
            remaining -= len(found) if match is not None else len(keys)
            yield piece

    def resolve(self, prefix):
        """The ids (at most two) of every table that start with ``prefix``."""
        with self._lock:
            ids = [list(table) for table in self._tables.values()]
        found = []
        for table_ids in ids:  # outside the lock: a copy of the keys is cheap, a scan is not
            found.extend(task_id for task_id in table_ids if task_id.startswith(prefix))
            if len(found) > 1:
                break
        return found[:2]

    def delete(self, task_id):
        """Cancel a waiting task or drop a record; returns the state it had, or None."""
        with self._lock:
            table, task = self._find(task_id)
            if task is None:
                return None
            self._remove(task_id)
            ticket = self.journal.append({"op": "del", "id": task_id})
            self._release_heads()
        ticket.wait()
        self._on_change()
        return table

    def delete_where(self, table, predicate=lambda task: True):
        """Delete every task of a table (or ``cron``) matching predicate; returns the count."""
        with self._lock:
            ids = [key[1] for key in self._order["cron"]] if table == "cron" \
                else list(self._tables[table])
            source = self._tables["waiting" if table == "cron" else table]
            ids = [i for i in ids if predicate(source[i])]
            ticket = None
            for task_id in ids:
                self._remove(task_id)
                ticket = self.journal.append({"op": "del", "id": task_id})
            self._release_heads()
        if ticket is not None:
            ticket.wait()
        self._on_change()
        return len(ids)

    def run_now(self, task_id, changes=None, now=None):
        """Make a waiting task due now, or requeue a dead one with tries reset.

        ``changes`` (already validated) overrides fields first.  Returns the
        task JSON, or None when there is no such waiting or dead task; raises
        QuotaError when the waiting table cannot take it.
        """
        now = self.clock() if now is None else now
        with self._lock:
            table, task = self._find(task_id)
            if task is None or table == "success":
                return None
            size = len((changes or {}).get("payload", task.payload))
            self._check_quota(table == "dead", size - (table == "waiting") * len(task.payload))
            self._remove(task_id)  # out of its table (and the byte count) before the edit
            for name, value in (changes or {}).items():
                setattr(task, name, value)
            if table == "dead":
                task.tries = 0
                self._seq += 1
                task.seq = self._seq  # redriven: after the tasks of its ordering key
            task.next_run = now
            task.version += 1
            ticket = self._put("waiting", task)
            version = task.version
            self._release_heads()
        ticket.wait()
        with self._lock:
            if task.version == version and self._tables["waiting"].get(task_id) is task:
                self._schedule(task)
            view = task.to_json()
        self._on_change()
        return view

    def retry_dead(self, url_prefix="", now=None):
        """Requeue dead tasks (whose URL starts with url_prefix); returns the count."""
        now = self.clock() if now is None else now
        with self._lock:
            chosen = [t for t in self._tables["dead"].values() if t.url.startswith(url_prefix)]
            self._check_quota(len(chosen), sum(len(t.payload) for t in chosen))
            ticket = None
            for task in chosen:
                task.tries = 0
                task.next_run = now
                self._seq += 1
                task.seq = self._seq
                ticket = self._put("waiting", task)
        if ticket is not None:
            ticket.wait()
        with self._lock:
            for task in chosen:
                if self._tables["waiting"].get(task.id) is task:
                    self._schedule(task)
        self._on_change()
        return len(chosen)

    # -- queues -------------------------------------------------------------------

    def _configure(self, name, settings):
        self.due.configure(name, settings.get("paused", False), settings.get("concurrency"),
                           settings.get("rate"), settings.get("burst"))

    def is_in_flight(self, task_id):
        with self._lock:
            return task_id in self._inflight

    def ordering_head(self, queue, key):
        """The id of the task whose turn it is in an ordering key, or None."""
        with self._lock:
            fifo = self._keys.get((queue, key))
            return fifo.first()[1] if fifo else None

    def queue_settings(self, name):
        """A queue's own settings (a copy; {} for the defaults)."""
        with self._lock:
            return dict(self._queues.get(name) or {})

    def queues(self, now, name=None):
        """[{name, settings, waiting, cron, due}] of every queue (or of ``name``; [] if
        unknown): ``waiting`` the one-off tasks, ``cron`` the schedules, ``due`` either."""
        with self._lock:
            names = sorted(self._queues) if name is None else [name] * (name in self._queues)
            return self._queue_rows(now, names)

    def _queue_rows(self, now, names):
        crons = collections.Counter(self._tables["waiting"][key[1]].queue
                                    for key in self._order["cron"])
        out = []
        for queue_name in names:
            index = self._by_queue.get(queue_name) or SortedKeys()
            first = index.first()
            out.append({"name": queue_name, "settings": dict(self._queues[queue_name]),
                        "waiting": len(index) - crons[queue_name],
                        "cron": crons[queue_name], "due": index.rank((now, "~")),
                        "oldest_due_age_s": max(0.0, (now - first[0]) / 1e9)
                        if first is not None and first[0] <= now else 0.0})
        return out

    def set_queue(self, name, changes):
        """Change a queue's settings (creating it), durably; returns its row as
        ``queues`` gives it, at the change (without settings and tasks, a queue
        may be forgotten the moment after)."""
        with self._lock:
            settings = dict(self._queues.get(name) or {}, **changes)
            settings = {key: value for key, value in settings.items() if value is not None}
            self._queues[name] = settings
            ticket = self.journal.append({"op": "queue", "name": name, "settings": settings})
            self._configure(name, settings)
            row = self._queue_rows(self.clock(), [name])[0]
            if not settings and not self._by_queue.get(name):
                self._forget_queue(name)  # as when its last task leaves
        ticket.wait()
        self._on_change()
        return row

    def delete_queue(self, name):
        """Forget a queue: True; False if it holds waiting tasks; None if unknown."""
        with self._lock:
            if name not in self._queues:
                return None
            if self._by_queue.get(name):
                return False
            del self._queues[name]
            self._configure(name, {})
            ticket = self.journal.append({"op": "unqueue", "name": name})
        ticket.wait()
        self._on_change()
        return True

    # -- the workers' calls ---------------------------------------------------

    def note_interrupted(self, task_id, started, duration):
        """Add to a waiting task's ``attempts`` one that a stop cut off (``started``:
        clock ns; ``duration``: s), journaled; the task stays due, as it was."""
        with self._lock:
            task = self._tables["waiting"].get(task_id)
            if task is None:
                return
            task.attempts.append({
                "at": started, "duration_ms": round(duration * 1000, 3), "status": -1,
                "req_id": "", "error": "interrupted: the daemon stopped during the attempt, "
                                      "which the app may have run; it will be made again"})
            del task.attempts[:-ATTEMPTS_KEPT]
            ticket = self.journal.put("waiting", encode_task(task))
        ticket.wait()

    def claim(self, task_id, version):
        """Mark a due task in flight; returns a detached copy to deliver, or None if stale."""
        with self._lock:
            task = self._tables["waiting"].get(task_id)
            if task is None or task.version != version or task_id in self._inflight:
                return None
            self._inflight[task_id] = version
            return task.copy(version=version)

    def release(self, task_id):
        with self._lock:
            self._inflight.pop(task_id, None)
        self._on_change()

    def drain_state(self):
        """(attempts in flight, next_run of the earliest waiting task that is not
        a cron, or None): what Daemon.drain waits on.  O(n)."""
        with self._lock:
            return len(self._inflight), min((task.next_run for task in
                                             self._tables["waiting"].values()
                                             if not task.schedule), default=None)

    def in_flight(self):
        with self._lock:
            return len(self._inflight)

    def health(self):
        """The journal's state: {healthy, errors, commits, records} (records: since
        the last snapshot)."""
        journal = self.journal
        return {"healthy": journal.healthy, "errors": journal.errors,
                "commits": journal.commits, "records": journal.records}

    def settle(self, task, table, records=()):
        """Record an attempt's outcome, decided on the claimed copy ``task``.

        The copy replaces the live task in ``table`` (``waiting``, ``success``
        or ``dead``), with ``records`` (a cron run's ``(table, record)``
        copies), unless a cancel or a redrive changed the live task meanwhile:
        then the copy is dropped and the live task keeps its own schedule.
        Returns the table the task went to, or None.
        """
        with self._lock:
            self._inflight.pop(task.id, None)
            live = self._tables["waiting"].get(task.id)
            if live is None:  # cancelled during the attempt
                table = None
            elif live.version != task.version:
                # redriven during the attempt: its new queue entry may have been
                # skipped while this attempt was in flight, so queue it again
                self._heads.pop((live.queue, live.ordering_key), None)
                self._schedule(live)
                table = None
            else:
                task.version = live.version + 1  # entries of the claimed version are stale
                for record_table, record in records:
                    self._put(record_table, record)
                self._put(table, task)
                if table == "waiting":
                    self._schedule(task)
                self._release_heads()
        if table is not None:
            # nobody waits for these records: at-least-once survives their loss,
            # and the next snapshot has them anyway; but write them now (or let
            # the thread that is writing take them along)
            self.journal.flush(wait=False)
        self._on_change()  # the attempt's end is a change too (drain() waits for it)
        return table

    # -- snapshots ------------------------------------------------------------

    def _mark_dirty(self):
        self._dirty.set()
        if self._on_dirty is not None:
            self._on_dirty()

    def snapshot_wanted(self):
        return self._dirty.is_set() or self.journal.records >= SNAPSHOT_AFTER_RECORDS

    def snapshot(self):
        """Write snapshot.json (temp file, fsync, replace, fsync dir); drop old journals.

        Safe to call from any thread; returns the number of tasks written.
        Raises OSError when the disk refuses (the old snapshot stays valid).
        """
        with self._snapshot_lock:
            self._dirty.clear()
            with self._lock:
                seq, ticket = self.journal.rotate()
                tables = {name: list(table.values()) for name, table in self._tables.items()}
                tables["queues"] = {name: dict(q) for name, q in self._queues.items()}
            ticket.wait()  # every record before the rotation is in the older files
            try:
                count = self._write_snapshot(seq, tables)
            except OSError:
                self.snapshot_errors += 1
                self._dirty.set()  # not _mark_dirty: the persister backs off first
                raise
            fault_point("snapshot-before-journal-delete")
            for old, name in self._journal_files():
                if old < seq:
                    self.fs.unlink(os.path.join(self.directory, name))
            self.snapshots += 1
            if not self.journal.healthy:  # the disk takes writes again: say so at once,
                self.journal.healthy = True  # not at the next enqueue (/healthz, SPEC 4)
                logger.warning("the disk takes writes again (a snapshot was written)",
                               extra={"event": "journal_ok"})
        self._on_change()
        return count

    def _write_snapshot(self, seq, tables):
        """Write the tables to snapshot.json.tmp, fsync, rename over snapshot.json, fsync
        the directory.  A crash at any step leaves the old or the new snapshot whole."""
        path = os.path.join(self.directory, SNAPSHOT_NAME)
        tmp = path + ".tmp"
        fs = self.fs
        count = 0
        fault_point("snapshot-before-write")
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o600)
        try:
            try:
                for piece in self._snapshot_pieces(seq, tables):
                    fs.write_all(fd, piece)
                count = sum(len(tables[name]) for name in TABLES)
                fault_point("snapshot-after-write")
                if self.fsync:
                    fs.fsync(fd)
                fault_point("snapshot-after-fsync")
            finally:
                fs.close(fd)
            fs.replace(tmp, path)
            fault_point("snapshot-after-replace")
            if self.fsync:
                fs.fsync_dir(self.directory)
            fault_point("snapshot-after-dir-fsync")
        except BaseException:
            try:
                fs.unlink(tmp)
            except OSError:
                pass
            raise
        return count

    def _snapshot_pieces(self, seq, tables):
        """A snapshot's bytes in pieces of about 64 KiB: the tables (lists of tasks,
        and ``queues``) and the journal file its recovery goes on from."""
        chunk = ['{"version": 2, "journal": %d, "created": %d, "fields": %s, "queues": %s'
                 % (seq, self.clock(), json.dumps(TASK_NAMES), json.dumps(tables["queues"]))]
        size = count = 0
        for name in TABLES:
            chunk.append(',\n"%s": [' % name)
            sep = "\n"
            for task in tables[name]:
                line = _compact(task.to_row())
                chunk.append(sep)
                chunk.append(line)
                sep = ",\n"
                count += 1
                if count % 100 == 0:
                    # yield the GIL (about every 0.5 ms of work): a request thread
                    # waiting for it would otherwise wait a whole switch interval
                    time.sleep(0)
                size += len(line)
                if size > 1 << 16:
                    yield "".join(chunk).encode()
                    chunk, size = [], 0
            chunk.append("]")
        chunk.append("}\n")
        yield "".join(chunk).encode()

    def backup(self):
        """A copy of the tables, as a snapshot's bytes in pieces: what a daemon
        started on a directory holding it as snapshot.json recovers (no journal
        follows it).  Which tasks it holds is decided at one moment, under the
        lock (a batch is in it whole or not at all); a task changed in place
        after that moment (run now, a redrive) is written as it is then."""
        with self._lock:
            tables = {name: list(table.values()) for name, table in self._tables.items()}
            tables["queues"] = {name: dict(q) for name, q in self._queues.items()}
        return self._snapshot_pieces(0, tables)

    def close(self):
        self.journal.close()


def check_data_dir(path):
    """Make the data directory (0700) or check an existing one: owned by us, not
    writable by group or others, no symlink among our files.  Raises ConfigError."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, 0o700)
    info = os.stat(path)
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise ConfigError(
            "the data directory %s belongs to uid %d, not to uid %d running poussetaches: "
            "give it to this user (chown -R %d %s) or run as its owner"
            % (path, info.st_uid, os.geteuid(), os.geteuid(), path))
    if info.st_mode & 0o022:
        raise ConfigError("the data directory %s is writable by group or others (mode %o): "
                          "chmod 700 %s" % (path, info.st_mode & 0o777, path))
    for name in os.listdir(path):
        if (name in (LOCK_NAME, FORMAT_NAME, SNAPSHOT_NAME, SNAPSHOT_NAME + ".tmp")
                or name.startswith(JOURNAL_PREFIX)) and os.path.islink(os.path.join(path, name)):
            raise ConfigError("%s is a symbolic link: poussetaches never writes through "
                              "links; remove it" % os.path.join(path, name))


def check_format(path):
    """Read the data directory's format (called with its lock held): a newer one
    is refused, naming both versions; an older one is copied aside to
    ``<path>.format-<n>`` before it is upgraded (format 2 is the first that is
    recorded: no step to run yet); ours is recorded.  Raises ConfigError."""
    file = os.path.join(path, FORMAT_NAME)
    try:
        with open(file) as f:
            text = f.read(200).strip()
    except FileNotFoundError:
        text = None  # made before formats were recorded: format 2, as the original's layout
    found = FORMAT_VERSION
    if text is not None:
        match = re.fullmatch(r"poussetaches data format (\d{1,6})", text)
        if match is None:
            raise ConfigError("%s says %r, not 'poussetaches data format N': is %s a "
                              "poussetaches data directory?" % (file, text[:60], path))
        found = int(match.group(1))
    if found > FORMAT_VERSION:
        raise ConfigError("the data directory %s is of format %d, newer than the format %d "
                          "that poussetaches %s reads: run the version that wrote it (or a "
                          "newer one)" % (path, found, FORMAT_VERSION, __version__))
    if found < FORMAT_VERSION:
        aside = "%s.format-%d" % (path.rstrip(os.sep), found)
        if os.path.exists(aside):
            raise ConfigError("%s is to be upgraded after a copy to %s, which exists: move it "
                              "away" % (path, aside))
        shutil.copytree(path, aside, ignore=shutil.ignore_patterns(LOCK_NAME))
        logger.warning("upgrading the data directory %s from format %d to %d; the old one is "
                       "copied to %s", path, found, FORMAT_VERSION, aside,
                       extra={"event": "upgrade"})
    if found != FORMAT_VERSION or text is None:
        tmp = file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o600)
        try:
            os.write(fd, b"poussetaches data format %d\n" % FORMAT_VERSION)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)


class DirLock:
    """An exclusive lock on the data directory (flock on ``lock``), for one daemon only."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.read(fd, 32).decode().strip() or "?"
                finally:
                    os.close(fd)
                raise LockedError(
                    "another poussetaches (pid %s) is using %s; stop it or choose "
                    "another --data-dir" % (holder, os.path.dirname(self.path))) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------
# HTTP plumbing: heads, deadlines, kept-alive connections
# --------------------------------------------------------------------------
# Shared by the three who speak HTTP: the delivery (a client), the API server
# and the PousseTaches client.  Everything here is measured: DeadlineSocket and
# _LeanResponse each buy a clear share of a delivery (their docstrings say it).

class Headers(dict):
    """Request headers by lower-case name; ``get`` is case-insensitive.  A repeated
    header keeps its first value, as email.message does."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


MAX_HEADERS = 100
_CTL = re.compile(r"[\r\n\x00]")                # never inside a header value or request line


_SINGLE = frozenset(("content-length", "host", "origin", "sec-fetch-site"))


def read_head(fp, budget=MAX_HEAD):
    """The header lines of a request or an answer, up to the blank line, as Headers.

    One reader for both directions, strict in both (SPEC 5): at most
    ``budget`` bytes and MAX_HEADERS lines, names are tokens, values carry
    no CR or NUL, and a repeated Content-Length, Host, Origin or Sec-Fetch-Site
    repeats its value (which one would count?).
    Raises HTTPError(431) for too much, HTTPError(400) naming what is wrong.
    """
    headers = {}
    for _ in range(MAX_HEADERS + 1):
        raw = fp.readline(budget + 1)
        budget -= len(raw)
        if budget < 0:
            raise HTTPError(431, "the head is larger than %d bytes" % MAX_HEAD)
        if raw in (b"\r\n", b"\n", b""):
            return Headers(headers)
        name, colon, value = raw.decode("iso-8859-1").partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise HTTPError(400, "bad header line %r" % raw[:100])
        value = value.rstrip("\r\n").strip(" \t")
        if _CTL.search(value):
            raise HTTPError(400, "the value of header %s has CR, LF or NUL in it" % name)
        key = name.lower()
        if key not in headers:
            headers[key] = value
        elif key in _SINGLE and headers[key] != value:
            raise HTTPError(400, "conflicting %s headers" % name)
    raise HTTPError(431, "more than %d headers" % MAX_HEADERS)


class _Deadline:
    """Receives that all end by one ``deadline`` (time.monotonic()), for a socket class.

    A plain socket time-out bounds each receive, so a peer that drips a byte
    at a time holds a thread forever.  This bounds the whole exchange: a
    delivery attempt (over http or https), or one API request.  ``deadline``
    None: no bound.
    """

    deadline = None

    def recv_into(self, buffer, *args, **kwargs):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            if abs((self.gettimeout() or 0.0) - remaining) > 0.01:  # a system call or two
                self.settimeout(remaining)
        return super().recv_into(buffer, *args, **kwargs)


def _addresses(host, port):
    """socket.getaddrinfo(host, port, 0, SOCK_STREAM), without the resolver for an IP literal."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        where = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", where)]
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


class DeadlineSocket(_Deadline, socket.socket):
    """A plain socket under a deadline (see _Deadline).

    On Linux, a connected socket stays in blocking mode and the kernel bounds
    each receive and send (SO_RCVTIMEO, SO_SNDTIMEO): one system call each.
    A socket with a Python time-out polls before every receive and send, and
    each of those calls releases the GIL that the other threads queue on
    (strace counted 53 futex calls per delivery).  Python's own time-outs are
    kept elsewhere, for the connect (a signal interrupting a blocking connect
    leaves it unbounded), and where ``_kernel_timeouts`` is False (the
    client, in apps whose timers and profilers send signals: each one would
    restart a kernel time-out).  ``gettimeout`` gives the time-out set; a
    receive or send past it raises socket.timeout.
    """

    _kernel_timeouts = sys.platform.startswith("linux")
    _timeout = None       # the time-out set, in the kernel's mode (None: Python's own mode)
    _rcv_timeout = None   # SO_RCVTIMEO as last set: a receive sets it to the deadline's
    _send_timeout = None  # SO_SNDTIMEO as last set: sendall sets it to the time left

    def settimeout(self, value):
        self._timeout = None
        if self._kernel_timeouts and value != 0:  # 0: non-blocking, Python's own mode
            try:
                self._set_kernel(socket.SO_RCVTIMEO, value)
                self._set_kernel(socket.SO_SNDTIMEO, value)
            except OSError:  # a struct timeval of another shape (32-bit, 64-bit time_t)
                pass
            else:
                super().settimeout(None)
                self._timeout = self._rcv_timeout = self._send_timeout = value
                return None
        return super().settimeout(value)

    def _set_kernel(self, option, seconds):
        seconds = 0.0 if seconds is None else max(seconds, 0.001)  # 0 would be "never"
        self.setsockopt(socket.SOL_SOCKET, option,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))

    def gettimeout(self):
        return super().gettimeout() if self._timeout is None else self._timeout

    def setblocking(self, flag):
        self.settimeout(None if flag else 0.0)

    def recv_into(self, buffer, *args, **kwargs):
        try:
            if self._timeout is None:  # Python's own time-outs, under _Deadline's bound
                return super().recv_into(buffer, *args, **kwargs)
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out")
                if abs(self._rcv_timeout - remaining) > 0.01:  # the receive's alone: one call
                    self._set_kernel(socket.SO_RCVTIMEO, remaining)
                    self._rcv_timeout = remaining
            return socket.socket.recv_into(self, buffer, *args, **kwargs)
        except BlockingIOError:
            if self._timeout is None:  # non-blocking by choice (settimeout(0))
                raise
            raise socket.timeout("timed out") from None  # the kernel's time-out ran out

    def send(self, data, flags=0):
        try:
            return super().send(data, flags)
        except BlockingIOError:
            if self._timeout is None:
                raise
            raise socket.timeout("timed out") from None

    def sendall(self, data, flags=0):
        """All of ``data`` within the time-out (and the deadline) as a whole, as
        socket.sendall with a Python time-out: SO_SNDTIMEO bounds one send only,
        and a peer that reads slowly makes each send return a little."""
        if self._timeout is None:
            return super().sendall(data, flags)
        end = time.monotonic() + self._timeout
        if self.deadline is not None:
            end = min(end, self.deadline)
        view = memoryview(data).cast("B")
        while view:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            if abs(self._send_timeout - remaining) > 0.01:
                self._set_kernel(socket.SO_SNDTIMEO, remaining)
                self._send_timeout = remaining
            view = view[self.send(view, flags):]
        return None

    @classmethod
    def connect_to(cls, address, timeout, deadline=None, kernel=True):
        """A new connection to ``(host, port)``, as socket.create_connection
        (each address in turn), made in this class: no second socket object.
        ``kernel``: False keeps Python's own time-outs after the connect too."""
        if not isinstance(timeout, (int, float)):  # http.client's "the default" sentinel
            timeout = socket.getdefaulttimeout()
        error = OSError("no address for %s" % address[0])
        for family, kind, proto, _, where in _addresses(*address):
            sock = cls(family, kind, proto)
            try:
                if not kernel:
                    sock._kernel_timeouts = False
                socket.socket.settimeout(sock, timeout)  # Python's for the connect
                sock.connect(where)
                sock.settimeout(timeout)  # then the kernel's, where it may
                sock.deadline = deadline
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    @classmethod
    def adopt(cls, sock, deadline=None):
        """The same connection as ``sock`` (which is detached) under this class."""
        timeout = sock.gettimeout()
        twin = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        twin.settimeout(timeout)
        twin.deadline = deadline
        return twin


if ssl is not None:
    class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
        """A TLS socket under a deadline: ``SSLContext.sslsocket_class`` makes these."""


_STATUS_CODE = re.compile("[0-9]{3}")


class _LeanResponse(http.client.HTTPResponse):
    """http.client's response, whose status line and headers are read here
    rather than through the email package (a sixth of a delivery's CPU)."""

    def begin(self):
        if self.headers is not None:
            return
        while True:
            line = self.fp.readline(MAX_HEAD + 1)
            if not line:
                raise http.client.RemoteDisconnected("Remote end closed connection "
                                                     "without response")
            words = line.decode("iso-8859-1").rstrip("\r\n").split(None, 2)
            if (len(words) < 2 or words[0] not in ("HTTP/1.0", "HTTP/1.1")
                    or not _STATUS_CODE.fullmatch(words[1])):
                raise http.client.BadStatusLine(line[:200])
            try:
                headers = read_head(self.fp, MAX_HEAD - len(line))
            except HTTPError as exc:
                raise http.client.HTTPException("bad answer head: %s" % exc.message) from None
            if words[1] != "100":
                break
        self.version = 10 if words[0] == "HTTP/1.0" else 11
        self.status = self.code = int(words[1])
        self.reason = words[2].strip() if len(words) > 2 else ""
        self.headers = self.msg = headers
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left = None
        connection = headers.get("connection", "").lower()
        self.will_close = "close" in connection or (self.version == 10 and
                                                    "keep-alive" not in connection)
        self.length = None
        length = headers.get("content-length")
        if length and not self.chunked and length.isdigit():
            self.length = int(length)
        if self.status in (204, 304) or self.status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTPConnection whose every exchange ends by the deadline set for it."""

    response_class = _LeanResponse
    deadline = None
    kernel_timeouts = True  # the client's are False: see DeadlineSocket

    def _send_output(self, message_body=None, encode_chunked=False):
        # http.client frames the head, then sends it and the body apart: two
        # writes, two TCP segments for the app to read.  A bytes body joins its head.
        if not isinstance(message_body, bytes) or encode_chunked:
            return super()._send_output(message_body, encode_chunked)
        self._buffer.extend((b"", b""))
        head = b"\r\n".join(self._buffer)
        del self._buffer[:]
        self.send(head + message_body)
        return None

    def set_deadline(self, deadline):
        self.deadline = deadline
        if self.sock is not None:
            self.sock.deadline = deadline

    def connect(self):
        self.sock = DeadlineSocket.connect_to((self.host, self.port), self.timeout,
                                              self.deadline, self.kernel_timeouts)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection
                               if ssl is not None else object):
    """The same over TLS: the handshake and every receive end by the deadline."""

    def connect(self):
        http.client.HTTPConnection.connect(self)
        if self.deadline is not None:  # the client's calls have none: a time-out per receive
            self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
        self.sock.deadline = self.deadline


def tls_context(cafile=None):
    """A verifying client context whose sockets honour a deadline (None without ssl)."""
    if ssl is None:
        return None
    context = ssl.create_default_context(cafile=cafile)
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def exchange(conn, method, path, body, headers, reused):
    """Send one request on an http.client connection; return its answer, head read.

    A kept-alive connection that the server closed while it was idle fails
    at once with a reset: the server never read that request, so it is sent
    again, once, on a new connection.  Every other failure raises (OSError
    or http.client.HTTPException).  The deliveries and the client both go
    through here.
    """
    while True:
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn.getresponse()
        except (ConnectionResetError, BrokenPipeError):  # RemoteDisconnected included
            conn.close()
            if not reused:
                raise
            reused = False
        except BaseException:
            conn.close()  # closes a half-read answer too: its file holds the socket
            raise


class KeepAliveHandler(urllib.request.AbstractHTTPHandler):
    """http:// and https:// for the urllib opener, over kept-alive connections.

    Each worker thread keeps one connection per origin (scheme, host,
    port), so that a delivery costs the app no TCP handshake and no new
    connection.  A connection goes back to the pool only if its answer was
    read whole and the server did not ask to close; it is not reused after
    ``max_idle`` s, below common app-server keep-alive time-outs.  A reused
    connection that the server had closed meanwhile is retried once on a
    fresh one (the server never read that request).  The attempt's time-out
    is one deadline for the whole exchange.
    """

    max_idle = 1.5

    def __init__(self, context=None):
        super().__init__()
        self._context = context or tls_context()
        self._local = threading.local()   # .pool: (scheme, host) -> (connection, idle since)

    # urllib's own preparation of a request (Host, Content-Length), for both schemes
    http_request = https_request = urllib.request.AbstractHTTPHandler.do_request_

    def http_open(self, req):
        return self._open(req, _DeadlineConnection)

    def https_open(self, req):
        if self._context is None:
            raise urllib.error.URLError("this Python has no ssl module: https is unavailable")
        return self._open(req, _DeadlineHTTPSConnection)

    def _open(self, req, connection_class):
        if not req.host:
            raise urllib.error.URLError("no host given")
        origin = (req.type, req.host)
        timeout = req.timeout if isinstance(req.timeout, (int, float)) else DEFAULT_TIMEOUT
        idle = self._local.__dict__.setdefault("pool", {}).pop(origin, None)
        if idle is not None and time.monotonic() - idle[1] > self.max_idle:
            idle[0].close()
            idle = None
        if idle is not None:
            conn = idle[0]
        elif connection_class is _DeadlineConnection:
            conn = connection_class(req.host, timeout=timeout)
        else:
            conn = connection_class(req.host, timeout=timeout, context=self._context)
        conn.set_deadline(time.monotonic() + timeout)
        headers = dict(req.unredirected_hdrs)  # Host and Content-Length, from do_request_
        headers.update(req.headers)
        try:
            response = exchange(conn, req.get_method(), req.selector, req.data, headers,
                                reused=idle is not None)
        except OSError as exc:
            raise urllib.error.URLError(exc) from None
        response.msg = response.reason  # what urllib's own handler sets
        response.connection = conn
        response.origin = origin
        return response

    def release(self, response):
        """Done with an answer: keep its connection if it can carry another request."""
        conn = getattr(response, "connection", None)
        if conn is not None and response.isclosed() and not response.will_close:
            self._local.__dict__.setdefault("pool", {})[response.origin] = (conn, time.monotonic())
            return
        response.close()
        if conn is not None:
            conn.close()

    def close_idle(self):
        """Close the calling thread's idle connections (a worker that stops)."""
        pool = self._local.__dict__.pop("pool", {})
        for conn, _ in pool.values():
            conn.close()


def build_opener(handler):
    """An opener for http and https only: no redirects, proxies, file/ftp/data.
    ``handler`` (a KeepAliveHandler) keeps connections alive for both schemes,
    and the time-out bounds each whole attempt."""
    opener = urllib.request.OpenerDirector()
    opener.add_handler(handler)
    return opener


# --------------------------------------------------------------------------
# Scheduling and delivery: the due-time queue, workers, rate limit
# --------------------------------------------------------------------------

class _Bucket:
    """A token bucket: ``rate`` entries a second, bursts of ``burst`` (clock in ns)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate, self.burst = rate, float(burst if burst else max(1.0, rate))
        self.tokens, self.stamp = self.burst, now

    def ready(self, now):
        """Is a token there now?  (Refills first; a wall clock stepped back refills
        nothing, and takes none away.)"""
        self.tokens = min(self.burst, self.tokens + max(0, now - self.stamp) * self.rate / 1e9)
        self.stamp = now
        return self.tokens >= 1

    def back_at(self):
        """When the next token is back (after a ``ready`` that said no)."""
        return self.stamp + int((1 - self.tokens) / self.rate * 1e9) + 1


class _Gate:
    """One queue's dispatch state inside the DueQueue (guarded by its mutex):
    its ready heap of due entries by priority, and what may hold them."""

    __slots__ = ("ready", "paused", "concurrency", "in_flight", "bucket", "listed")

    def __init__(self):
        self.ready = []          # (-priority, due_ns, seq, entry): due, waiting for a worker
        self.paused = False
        self.concurrency = None  # at most this many entries taken and not done
        self.in_flight = 0
        self.bucket = None       # a _Bucket when the queue has a rate
        self.listed = None       # the ready[0] it is listed under in _runnable, if runnable


class DueQueue(queue.PriorityQueue):
    """The queue.PriorityQueue of scheduled entries that workers consume.

    An entry is ``(due_ns, seq, task_id, version, queue, priority)``.  It waits
    in the due-time heap (``self.queue``) until its time, then moves to its
    queue's ready heap, where the highest priority, then the earliest due, then
    the earliest queued goes first.  ``get`` takes the best ready entry of
    the queues that may run now: not paused, under their concurrency, with a
    rate token (the queue's, and the daemon's ``rate``).  The queues that may
    run are a heap by their best entry (``_runnable``), so choosing one costs
    O(log queues); a held queue keeps its ready heap and is simply not there.
    A queue with nothing queued, nothing taken and no settings is forgotten.

    Waits use the queue's own ``not_empty`` Condition against the next due
    time or the next rate token: a put of a new earliest entry, a resumed
    queue, a freed slot wake one waiter, which recomputes its sleep.  Nothing
    polls, and no worker holds an entry while it waits for anything.  ``seq``
    breaks ties so that ids never compare.  Stale entries (a task cancelled or
    rescheduled since) are the caller's to skip, by comparing versions; the
    caller says ``done(queue)`` for every entry it took, which is also its
    ``task_done``: ``qsize`` and ``empty`` count every entry queued, due or
    not, and ``join`` waits until every entry put was taken and done (an
    entry a circuit breaker holds is out of the queue until put back).  ``hold()`` pauses all dispatch, ``close()`` ends it.
    """

    def __init__(self, clock=time.time_ns, rate=None, burst=None):
        self.clock = clock
        super().__init__()
        self._bucket = _Bucket(rate, burst, clock()) if rate else None  # the daemon's --rate

    # the hooks queue.Queue calls under self.mutex
    def _init(self, maxsize):
        self.queue = []        # the due-time heap; guarded by self.mutex, as everything below
        self._seq = itertools.count()
        self._held = False
        self._closed = False
        self._gates = {}       # queue name -> _Gate
        self._ready = 0        # entries in the gates' ready heaps
        self._runnable = []    # heap of (gate.ready[0], name) of the gates that may run
        self._throttled = []   # heap of (ns when a token is back, queue name)

    def _qsize(self):
        return len(self.queue) + self._ready

    def _put(self, item):
        """``item``: ``(due_ns, task_id, version[, queue, priority])``."""
        if not 3 <= len(item) <= 5:
            raise TypeError("a DueQueue item is (due_ns, task_id, version[, queue, "
                            "priority]); requeue a taken entry with put_entry")
        due_ns, task_id, version, *rest = item
        heapq.heappush(self.queue, (due_ns, next(self._seq), task_id, version) + (
            tuple(rest) + (DEFAULT_QUEUE, 0)[len(rest):]))

    def _pop_best(self, now):
        """The best entry of the best runnable queue, or None (caller holds mutex).
        (queue.Queue's own _get is not used: get waits for due times itself.)"""
        runnable = self._runnable
        while runnable:
            key, name = runnable[0]
            gate = self._gates.get(name)
            if gate is not None and gate.listed is key:
                break
            heapq.heappop(runnable)  # that queue's best entry changed, or it was held
        else:
            return None
        entry = heapq.heappop(gate.ready)[3]
        self._ready -= 1
        gate.in_flight += 1
        if gate.bucket is not None:
            gate.bucket.tokens -= 1
        if self._bucket is not None:
            self._bucket.tokens -= 1
        self._update(name, gate, now)
        return entry

    def _gate(self, name):
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate()
        return gate

    def _update(self, name, gate, now):
        """List the gate in _runnable if it may run now, under its best entry.  A
        rate-limited one without a token is throttled until its next token instead;
        an idle one with default settings is forgotten."""
        runnable = bool(gate.ready) and not gate.paused and (
            gate.concurrency is None or gate.in_flight < gate.concurrency)
        if runnable and gate.bucket is not None and not gate.bucket.ready(now):
            runnable = False
            heapq.heappush(self._throttled, (gate.bucket.back_at(), name))
        if not runnable:
            gate.listed = None
            if not (gate.ready or gate.in_flight or gate.paused or gate.bucket
                    or gate.concurrency is not None):
                del self._gates[name]
        elif gate.listed is not gate.ready[0]:
            gate.listed = gate.ready[0]
            heapq.heappush(self._runnable, (gate.listed, name))

    def configure(self, name, paused=False, concurrency=None, rate=None, burst=None):
        """Set a queue's dispatch settings; the others' waits are woken to see them."""
        with self.mutex:
            gate, now = self._gate(name), self.clock()
            gate.paused, gate.concurrency = bool(paused), concurrency
            if rate is None:
                gate.bucket = None
            elif gate.bucket is None or rate != gate.bucket.rate:
                gate.bucket = _Bucket(rate, burst, now)
            elif burst:
                gate.bucket.burst = float(burst)
            self._update(name, gate, now)
            self.not_empty.notify_all()

    def put_task(self, due_ns, task_id, version, queue=DEFAULT_QUEUE, priority=0):
        """Queue an entry in O(log n).  A sleeping worker is woken only when the
        entry is the new head: the others' waits are still right."""
        with self.mutex:
            wake = not self._held and (not self.queue or due_ns < self.queue[0][0])
            heapq.heappush(self.queue, (due_ns, next(self._seq), task_id, version, queue,
                                        priority))
            self.unfinished_tasks += 1
            if wake:
                self.not_empty.notify()

    def put_tasks(self, entries):
        """put_task for many ``(due_ns, task_id, version, queue, priority)``, under one
        hold of the mutex, waking one worker if the head changed."""
        with self.mutex:
            head = self.queue[0] if self.queue else None
            for due_ns, task_id, version, queue, priority in entries:
                heapq.heappush(self.queue, (due_ns, next(self._seq), task_id, version, queue,
                                            priority))
                self.unfinished_tasks += 1
            if not self._held and self.queue and self.queue[0] is not head:
                self.not_empty.notify()

    def put_entry(self, due_ns, entry):
        """Queue again, due at ``due_ns``, an entry that get gave."""
        self.put_task(due_ns, entry[2], entry[3], entry[4], entry[5])

    def put_many(self, entries):
        """Queue many ``(due_ns, task_id, version, queue, priority)`` at once: O(n)."""
        with self.mutex:
            size = len(self.queue)
            self.queue.extend((due, next(self._seq), task_id, version, queue, priority)
                              for due, task_id, version, queue, priority in entries)
            heapq.heapify(self.queue)
            self.unfinished_tasks += len(self.queue) - size
            if not self._held:
                self.not_empty.notify_all()

    def get(self, block=True, timeout=None):
        """The next entry that may run, as ``queue.Queue.get``: raises queue.Empty
        when none may run within ``timeout`` s (at once if not ``block``), or the
        queue is closed."""
        entry = self._wait(time.monotonic() + timeout if block and timeout is not None
                           else None if block else 0)
        if entry is None:
            raise queue.Empty
        return entry

    def get_due(self):
        """Block until an entry may run; return it, or None once closed."""
        return self._wait(None)

    def _wait(self, deadline):
        with self.not_empty:
            while not self._closed:
                now = self.clock()
                while self.queue and self.queue[0][0] <= now:
                    entry = heapq.heappop(self.queue)
                    gate = self._gate(entry[4])
                    heapq.heappush(gate.ready, (-entry[5], entry[0], entry[1], entry))
                    self._ready += 1
                    if (gate.ready[0] is not gate.listed if gate.listed is not None
                            else len(gate.ready) == 1):  # its best changed, or it may run now
                        self._update(entry[4], gate, now)
                while self._throttled and self._throttled[0][0] <= now:
                    name = heapq.heappop(self._throttled)[1]
                    if name in self._gates:
                        self._update(name, self._gates[name], now)
                limited = self._bucket is not None and not self._bucket.ready(now)
                if not self._held and not limited:
                    entry = self._pop_best(now)
                    if entry is not None:
                        if self._runnable or (self.queue and self.queue[0][0] <= now):
                            self.not_empty.notify()  # more may run: the next worker looks
                        return entry
                times = [heap[0][0] for heap in (self.queue, self._throttled) if heap]
                if limited and not self._held and self._runnable:
                    times.append(self._bucket.back_at())
                wait = None if self._held or not times else max(0, min(times) - now) / 1e9
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                # due times are wall-clock and the wait is not: looking again each
                # CLOCK_CHECK seconds follows a step of the clock (NTP, a VM resumed)
                self.not_empty.wait(None if wait is None else min(wait, CLOCK_CHECK))
            return None

    def done(self, name):
        """An entry of queue ``name`` that get gave is finished (or skipped)."""
        with self.mutex:
            if self.unfinished_tasks <= 0:
                raise ValueError("done() called more times than entries were taken")
            gate = self._gate(name)
            gate.in_flight -= 1
            was = gate.listed is not None
            self._update(name, gate, self.clock())
            if gate.listed is not None and not was and not self._held:
                self.not_empty.notify()
            self.unfinished_tasks -= 1
            if not self.unfinished_tasks:
                self.all_tasks_done.notify_all()

    def queue_stats(self):
        """{queue: (ready entries, in flight)}, for GET /queues and /metrics."""
        with self.mutex:
            return {name: (len(g.ready), g.in_flight) for name, g in self._gates.items()}

    @property
    def held(self):
        with self.mutex:
            return self._held

    def hold(self):
        with self.mutex:
            self._held = True

    def release(self):
        with self.mutex:
            self._held = False
            self.not_empty.notify_all()

    def close(self):
        with self.mutex:
            self._closed = True
            self.not_empty.notify_all()


UNAVAILABLE = frozenset((-1, 429, 502, 503, 504))  # the origin is down, not the task wrong
BREAKER_THRESHOLD = 5        # consecutive unavailable outcomes that open a breaker
BREAKER_FIRST_PROBE = 1.0    # seconds; doubles after each failed probe
BREAKER_MAX_PROBE = 60.0


@functools.lru_cache(maxsize=4096)
def origin_of(url):
    """(scheme, host, port) of a URL: the unit a circuit breaker guards."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return "%s://%s:%s" % (parts.scheme, parts.hostname, port or
                           (443 if parts.scheme == "https" else 80))


def is_loopback_name(name):
    """Is ``name`` (a lowercased host) ``localhost`` or a loopback IP literal?"""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address((name or "").strip("[]")).is_loopback
    except ValueError:
        return False


def is_unrebindable_name(name):
    """Can no DNS-rebinding page reach us under ``name`` (a lowercased host)?  An
    IP literal names no one's domain, and a single-label name (a container's,
    a compose service's, a host's) is not one that public DNS resolves; a
    dotted name may be an attacker's."""
    if not name:
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return "." not in name and "%" not in name


class AllowList:
    """``--allow-url`` prefixes, each an origin plus a path matched at a ``/``.

    ``http://app:8000/task`` allows ``http://app:8000/task`` and ``/task/x``,
    not ``/tasks``, nor another port, scheme or host (hosts are compared as
    written: no name resolution).  Empty: every URL is allowed.  Immutable.
    """

    def __init__(self, prefixes=()):
        self.prefixes = tuple(prefixes)
        self._rules = []
        for prefix in self.prefixes:
            parts = urllib.parse.urlsplit(prefix)
            try:
                parts.port
            except ValueError:
                parts = None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                    or "@" in parts.netloc or parts.query or parts.fragment):
                raise ConfigError("--allow-url %r must be http(s)://host[:port][/path], without "
                                  "user, query or fragment" % prefix)
            self._rules.append((origin_of(prefix), parts.path.rstrip("/")))

    def __bool__(self):
        return bool(self._rules)

    def allows(self, url):
        if not self._rules:
            return True
        origin, path = origin_of(url), urllib.parse.urlsplit(url).path
        return any(origin == rule_origin and (path == rule_path or
                                              path.startswith(rule_path + "/"))
                   for rule_origin, rule_path in self._rules)


class _Breaker:
    __slots__ = ("open_until", "backoff", "probing", "held")

    def __init__(self, now, backoff):
        self.backoff = backoff
        self.open_until = now + int(backoff * 1e9)
        self.probing = False
        self.held = []       # entries parked while the probe is out


class Breakers:
    """Per-origin circuit breakers, so that an app restart does not burn retries.

    After ``BREAKER_THRESHOLD`` consecutive unavailable outcomes from one
    origin, its tasks are held without spending tries: a held entry goes back
    on the DueQueue at the next probe time.  The first of them to come out
    then is the probe (a real attempt, which counts for its task); the others
    wait for its outcome.  A failed probe doubles the wait (up to
    ``BREAKER_MAX_PROBE`` s); any answer that is not "unavailable" closes the
    breaker and releases everything held.  ``_lock`` guards both dicts.
    """

    def __init__(self, due, clock=time.time_ns, threshold=BREAKER_THRESHOLD):
        self.due = due
        self.clock = clock
        self.threshold = threshold
        self._lock = threading.Lock()
        self._failures = {}   # origin -> consecutive unavailable outcomes
        self._open = {}       # origin -> _Breaker

    def open_origins(self):
        with self._lock:
            return sorted(self._open)

    def describe(self):
        """The open breakers: origin, the next probe's time (ns), whether it is out."""
        with self._lock:
            return [{"origin": origin, "next_probe": breaker.open_until,
                     "probing": breaker.probing}
                    for origin, breaker in sorted(self._open.items())]

    def admit(self, origin, entry):
        """May this entry's attempt go now?  If not, it is parked (and re-queued later)."""
        with self._lock:
            breaker = self._open.get(origin)
            if breaker is None:
                return True
            if not breaker.probing and self.clock() >= breaker.open_until:
                breaker.probing = True
                return True
            if breaker.probing:
                breaker.held.append(entry)
            else:
                self.due.put_entry(breaker.open_until, entry)
            return False

    def record(self, origin, unavailable):
        """Feed one attempt's outcome for ``origin``."""
        with self._lock:
            breaker = self._open.get(origin)
            if not unavailable:
                self._failures.pop(origin, None)
                if breaker is not None:
                    del self._open[origin]
                    logger.info("%s answers again: circuit closed, %d held tasks released",
                                origin, len(breaker.held), extra={
                                    "event": "breaker_close", "origin": origin,
                                    "count": len(breaker.held)})
                    for entry in breaker.held:
                        self.due.put_entry(self.clock(), entry)
                return
            count = self._failures[origin] = self._failures.get(origin, 0) + 1
            now = self.clock()
            if breaker is None:
                if count >= self.threshold:
                    self._open[origin] = _Breaker(now, BREAKER_FIRST_PROBE)
                    logger.warning("%s failed %d times in a row: circuit open, its tasks "
                                   "wait without spending tries", origin, count, extra={
                                       "event": "breaker_open", "origin": origin,
                                       "count": count})
            elif breaker.probing:
                breaker.probing = False
                breaker.backoff = min(breaker.backoff * 2, BREAKER_MAX_PROBE)
                breaker.open_until = now + int(breaker.backoff * 1e9)
                for entry in breaker.held:
                    self.due.put_entry(breaker.open_until, entry)
                breaker.held = []


class Outcome(collections.namedtuple(
        "Outcome", "status body started duration retry_after req_id task_retry",
        defaults=(None, "", False))):
    """What one delivery attempt gave: status (-1 for no answer), body, timing;
    ``task_retry``: the answer is a task function's Retry, not the app down."""

    __slots__ = ()


def parse_retry_after(value, now_s):
    """Retry-After as seconds from now (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,12}", value):  # ASCII digits ("²".isdigit() is True)
        return float(value)
    if re.fullmatch(r"[0-9]+", value):
        return 1e12  # past any back-off: the caller caps it at max_backoff
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_s)


def clip_error_body(body, limit=ERROR_BODY_LIMIT):
    """At most ``limit`` bytes of an error body: its first and last halves (a
    traceback's last line is the useful one) around a marker line, each cut at a
    UTF-8 character boundary, so that a UTF-8 body still decodes.  Its end too:
    the read stops at RESPONSE_READ_LIMIT, maybe inside a character."""
    end = len(body)
    while end > 0 and len(body) - end < 3 and body[end - 1] & 0xC0 == 0x80:
        end -= 1  # back over continuation bytes to the character's first byte
    if end > 0 and body[end - 1] >= 0xC0 and len(body) - end + 1 < (
            2 if body[end - 1] < 0xE0 else 3 if body[end - 1] < 0xF0 else 4):
        body = body[:end - 1]  # that character is cut short: drop it
    if len(body) <= limit:
        return body
    head, tail = limit // 2, len(body) - limit // 2
    while head > 0 and body[head] & 0xC0 == 0x80:       # inside a character: back up
        head -= 1
    while tail < len(body) and body[tail] & 0xC0 == 0x80:
        tail += 1
    return b"%s\n[... %d bytes cut ...]\n%s" % (body[:head], tail - head, body[tail:])


def auth_key_problem(secret):
    """What is wrong with an auth key, or None.  A ``whsec_`` key is the
    Standard Webhooks form: base64 of 24 bytes or more (a loose decoding
    turned "whsec_!?" into an empty HMAC key, which anyone can sign with)."""
    if not isinstance(secret, str):
        return "an auth key is a string, not %s" % type(secret).__name__
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            return "a whsec_ auth key must be whsec_ and base64"
        if len(key) < 24:
            return "a whsec_ auth key must hold 24 bytes or more (it holds %d): make one " \
                   "with whsec_$(head -c 24 /dev/urandom | base64)" % len(key)
    return None


def sign(secret, msg_id, timestamp, body):
    """Standard Webhooks signature: ``v1,`` + base64 HMAC-SHA256 of "id.ts.body"."""
    if secret.startswith("whsec_"):
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    else:
        key = secret.encode()
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return "v1," + b64(mac.digest())


class Delivery:
    """Makes one HTTP attempt of a task; knows nothing of tables or retries."""

    def __init__(self, auth_key=None, timeout=DEFAULT_TIMEOUT, allow_list=None,
                 signature_only=False, clock=time.time_ns, tls=None, next_auth_key=None):
        self.auth_key = auth_key        # None: no key; "" is sent empty, as the original does
        self.next_auth_key = next_auth_key  # during a rotation: signs too, never sent
        self.timeout = timeout
        self.allow_list = allow_list or AllowList()  # the key goes to these URLs only
        self.signature_only = signature_only
        self.clock = clock
        self.http = KeepAliveHandler(tls)   # tls: an SSLContext (default: the system's CAs)
        self.opener = build_opener(self.http)

    def request(self, task, tries, req_id):
        """The urllib Request for attempt number ``tries`` of ``task``."""
        # json.dumps of {"payload", "tries", "req_id"}, formatted: base64 and hex need no escapes
        body = b'{"payload": "%s", "tries": %d, "req_id": "%s"}' % (
            base64.b64encode(task.payload), tries, req_id.encode())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Poussetaches-Task-ID": task.id,
            "Poussetaches-Tries": str(tries),
            "Poussetaches-Req-ID": req_id,
            "Poussetaches-Queue": task.queue,
        }
        if task.headers:
            headers.update(task.headers)
        if self.auth_key is not None and self.allow_list.allows(task.url):
            if not self.signature_only:
                headers["Poussetaches-Auth-Key"] = self.auth_key
            if self.auth_key:
                stamp = self.clock() // 10 ** 9
                headers["webhook-id"] = task.id
                headers["webhook-timestamp"] = str(stamp)
                headers["webhook-signature"] = sign(self.auth_key, task.id, stamp, body)
                if self.next_auth_key:  # Standard Webhooks: space-separated signatures
                    headers["webhook-signature"] += " " + sign(self.next_auth_key, task.id,
                                                               stamp, body)
        return urllib.request.Request(task.url, data=body, headers=headers, method="POST",
                                      origin_req_host=urllib.parse.urlsplit(task.url).hostname)

    def attempt(self, task, timeout=None):
        """POST the task once; return an Outcome.  Never raises for network faults."""
        tries = task.tries + 1
        req_id = "%012x" % random.getrandbits(48)  # unique enough, and no system call
        started = self.clock()
        t0 = time.monotonic()
        retry_after, task_retry = None, False
        try:
            req = self.request(task, tries, req_id)
            response = self.opener.open(req, timeout=task.timeout_s or timeout or self.timeout)
            if response is None:
                raise urllib.error.URLError("unsupported URL scheme")
            try:
                status = response.status
                try:
                    body = response.read(RESPONSE_READ_LIMIT)
                except (OSError, http.client.HTTPException) as exc:
                    # a time-out or a reset before the answer's end: no answer (SPEC 3)
                    body = ("%s: %s while reading the answer (its status line said %d)"
                            % (type(exc).__name__, exc, status)).encode()
                    status = -1
                if status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("Retry-After"),
                                                    started / 1e9)
                    task_retry = response.headers.get("Poussetaches-Outcome") == "retry"
            finally:
                self.http.release(response)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            status = -1
            reason = getattr(exc, "reason", None)
            body = ("%s: %s" % (type(exc).__name__, reason if reason is not None else exc)).encode()
        return Outcome(status, body, started, time.monotonic() - t0, retry_after, req_id,
                       task_retry)


class Stats:
    """The counters and the attempt-duration histogram behind /metrics.

    Written by workers and request threads, read by /metrics; ``_lock``
    guards everything here.
    """

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = collections.Counter()
        self._buckets = [0] * len(self.BUCKETS)
        self._sum = 0.0
        self._count = 0

    def inc(self, name, n=1, key=None):
        """Add ``n`` to counter ``name`` (``key``: one of its labelled series)."""
        with self._lock:
            self._counters[name if key is None else (name, key)] += n

    def attempt(self, result, seconds, origin, queue):
        """Count one attempt (``result``: success, failure or error) in every
        series it belongs to, and its duration in the histogram: one lock hold."""
        i = bisect.bisect_left(self.BUCKETS, seconds)
        counters = self._counters
        with self._lock:
            counters["attempts_" + result] += 1
            counters[("origin_attempts", (origin, result))] += 1
            counters[("queue_attempts", (queue, result))] += 1
            if i < len(self._buckets):
                self._buckets[i] += 1
            self._sum += seconds
            self._count += 1

    def read(self):
        """(counters, cumulative bucket counts, sum, count), copied under the lock."""
        with self._lock:
            counts = list(itertools.accumulate(self._buckets))
            return dict(self._counters), counts, self._sum, self._count


class Dispatcher:
    """The worker threads and the retry policy.

    Each worker takes a due entry from the queue (rate limits are the
    queue's), claims the task from the store (skipping stale entries), makes the
    attempt with no lock held, and hands the outcome to ``Store.settle`` with
    the decision of what comes next (success, retry after backoff, dead, or a
    cron task's next occurrence).
    """

    def __init__(self, store, due, delivery, workers=DEFAULT_WORKERS,
                 max_tries=DEFAULT_MAX_TRIES, min_backoff=DEFAULT_MIN_BACKOFF,
                 max_backoff=DEFAULT_MAX_BACKOFF, on_dead=None,
                 clock=time.time_ns, rng=None, cron_tz=None, stats=None):
        self.store = store
        self.stats = stats or Stats()
        self.due = due
        self.delivery = delivery
        self.workers = workers
        self.max_tries = max_tries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.on_dead = on_dead
        self.clock = clock
        self.cron_tz = cron_tz
        self.rng = rng or random.Random()
        self._rng_lock = threading.Lock()  # random.Random is not documented thread-safe
        self._stopping = threading.Event()
        self._threads = []
        self._under_way = {}  # task id -> (clock ns, monotonic s) of its attempt; guarded by:
        self._under_way_lock = threading.Lock()
        self._specs = {}                     # schedule -> CronSpec; grows with distinct specs
        self.breakers = Breakers(due, clock)

    def start(self):
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, name="poussetaches-worker-%d" % n,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, grace=DEFAULT_GRACE):
        """Stop taking tasks; wait up to ``grace`` s for attempts in flight.  Returns
        the number of workers still busy when the grace period ended."""
        self._stopping.set()
        self.due.close()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._under_way_lock:
            cut = dict(self._under_way)
        for task_id, (started, t0) in cut.items():  # their tasks stay due: say so in them
            try:
                self.store.note_interrupted(task_id, started, time.monotonic() - t0)
            except (PersistError, OSError) as exc:  # the stop goes on: the snapshot has it
                logger.error("could not record the interrupted attempt of %s: %s", task_id, exc)
        return sum(t.is_alive() for t in self._threads)

    def spec(self, schedule):
        spec = self._specs.get(schedule)
        if spec is None:
            spec = self._specs[schedule] = CronSpec(schedule, self.cron_tz)
        return spec

    def backoff(self, tries, retry_after=None, policy=None):
        """Seconds before attempt ``tries + 1``: min * 4**(tries-1), jittered, capped
        (``policy``: the task's queue settings, over the daemon's)."""
        policy = policy or {}
        delay = policy.get("min_backoff", self.min_backoff) * 4.0 ** min(tries - 1, 64)
        with self._rng_lock:
            delay *= self.rng.uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, policy.get("max_backoff", self.max_backoff))

    def _work(self):
        try:
            self._work_loop()
        finally:
            self.delivery.http.close_idle()

    def _work_loop(self):
        while not self._stopping.is_set():
            entry = self.due.get_due()
            if entry is None:
                return
            try:
                self._take(entry)
            except Exception:  # a bug here must not kill the worker
                logger.exception("unexpected error dispatching task %s", entry[2])
            finally:
                self.due.done(entry[4])  # its queue's slot is free again

    def _take(self, entry):
        """Claim and deliver one entry that the DueQueue gave."""
        task_id, version = entry[2], entry[3]
        task = self.store.claim(task_id, version)
        if task is None:
            return  # cancelled, redriven or rescheduled since it was queued
        origin = origin_of(task.url)
        if not self.breakers.admit(origin, entry):
            self.store.release(task_id)
            return
        try:
            self._deliver(task, version, origin)
        except Exception:  # a bug here must not kill the worker or lose the task
            logger.exception("unexpected error delivering task %s", task_id)
            self.store.release(task_id)
            self.due.put_entry(self.clock() + int(self.min_backoff * 1e9), entry)

    def _deliver(self, task, version, origin):
        policy = self.store.queue_settings(task.queue)  # a task's fields > its queue > flags
        with self._under_way_lock:
            self._under_way[task.id] = (self.clock(), time.monotonic())
        try:
            outcome = self.delivery.attempt(task, policy.get("timeout_s"))
        finally:
            with self._under_way_lock:
                del self._under_way[task.id]
        self.breakers.record(origin, outcome.status in UNAVAILABLE and not outcome.task_retry
                             and outcome.status != task.expected)
        ok = outcome.status == task.expected
        result = "success" if ok else "error" if outcome.status < 0 else "failure"
        self.stats.attempt(result, outcome.duration, origin, task.queue)
        buried, next_run, attempt = [], [], task.tries + 1
        table, records = self.decide(task, outcome, buried, next_run, policy)  # on our copy
        table = self.store.settle(task, table, records)
        if table is None:
            buried = []  # cancelled or redriven meanwhile: nothing died
        self._log_outcome(task, attempt, outcome, ok, table, next_run[0] if next_run else None)
        for dead in buried:
            self.stats.inc("dead")
            self._notify_dead(dead)

    def _log_outcome(self, task, attempt, outcome, ok, table, next_run):
        """One INFO line per delivery (WARNING for a failure), with fields for --log-json."""
        fields = {"event": "delivery", "task_id": task.id, "queue": task.queue, "url": task.url,
                  "status": outcome.status, "attempt": attempt,
                  "duration_ms": round(outcome.duration * 1000, 1), "table": table}
        if ok:
            logger.info("task %s (queue %s) delivered to %s: %s in %.1f ms", task.id,
                        task.queue, task.url, outcome.status, outcome.duration * 1000,
                        extra=fields)
            return
        fields["error"] = outcome.body[:ATTEMPT_ERROR_LIMIT].decode("utf-8", "replace")
        if table == "waiting" and next_run is not None:
            fields["next_run"] = next_run
            what = "next attempt at %s (in %.1f s)" % (
                iso_utc(next_run), max(0.0, (next_run - self.clock()) / 1e9))
        else:
            what = "no further attempt" if table else "cancelled meanwhile"
        logger.warning("task %s (queue %s) attempt %d to %s failed: %s in %.1f ms: %s; %s",
                       task.id, task.queue, attempt, task.url, outcome.status,
                       outcome.duration * 1000,
                       fields["error"].replace("\n", " ")[:200], what, extra=fields)

    def decide(self, task, outcome, buried, next_run=None, policy=None):
        """Apply an attempt's outcome to ``task`` (the worker's claimed copy: no lock).

        Returns ``(table, copies)`` for Store.settle; dead records go in
        ``buried``, and the time of the next attempt (if any) in ``next_run``.
        ``policy``: the task's queue settings (max_tries, backoffs).
        """
        policy = policy or {}
        max_tries = task.max_tries or policy.get("max_tries") or self.max_tries
        now = self.clock()
        task.tries += 1
        task.last_run = outcome.started
        error = None if outcome.status == task.expected else outcome.body
        task.attempts.append({
            "at": outcome.started, "duration_ms": round(outcome.duration * 1000, 3),
            "status": outcome.status, "req_id": outcome.req_id,
            "error": None if error is None else
            error[:ATTEMPT_ERROR_LIMIT].decode("utf-8", "replace"),
        })
        del task.attempts[:-ATTEMPTS_KEPT]
        # a success shows the success; the failures before it stay in ``attempts``
        task.last_error_status_code = outcome.status
        task.last_error_body = None if error is None else clip_error_body(error)
        if task.schedule:
            decision = self._decide_cron(task, outcome, error, now, buried, max_tries, policy)
        elif error is None:
            decision = "success", []
        elif outcome.status == 410 or task.tries >= max_tries:
            buried.append(task.to_json())
            decision = "dead", []
        else:
            task.next_run = now + int(
                self.backoff(task.tries, outcome.retry_after, policy) * 1e9)
            decision = "waiting", []
        if next_run is not None and decision[0] == "waiting":
            next_run.append(task.next_run)
        return decision

    def _decide_cron(self, task, outcome, error, now, buried, max_tries, policy):
        """A cron run: success or a spent run leaves a copy; the schedule goes on."""
        occurrence = task.next_scheduled_run
        if occurrence > now:  # run by hand ahead of its time: the occurrence still comes
            following = occurrence
        else:
            following = self.spec(task.schedule).next_after(max(now, occurrence))
        if error is not None and following is not None:
            retry_at = now + int(self.backoff(task.tries, outcome.retry_after, policy) * 1e9)
            if outcome.status != 410 and retry_at < following and task.tries < max_tries:
                task.next_run = retry_at
                return "waiting", []
        record = task.copy(id=new_id(), cron_id=task.id, schedule="", idempotency_key=None)
        copies = [("success" if error is None else "dead", record)]
        if error is not None:
            buried.append(record.to_json())
        if following is None:  # the spec matches nothing any more: park the schedule itself
            buried.append(task.to_json())
            return "dead", copies
        task.tries = 0
        task.attempts = []
        task.next_run = task.next_scheduled_run = following
        return "waiting", copies

    def _notify_dead(self, task_json):
        logger.warning("task %s is dead after %d tries (last status %s)", task_json["id"],
                       task_json["tries"], task_json["last_error_status_code"],
                       extra={"event": "dead", "task_id": task_json["id"],
                              "queue": task_json["queue"], "url": task_json["url"],
                              "status": task_json["last_error_status_code"]})
        if not self.on_dead:
            return
        req = urllib.request.Request(self.on_dead, data=json.dumps(task_json).encode(),
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": USER_AGENT}, method="POST")
        try:
            self.delivery.http.release(self.delivery.opener.open(req, timeout=self.delivery.timeout))
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
            logger.warning("--on-dead notification for %s failed: %s", task_json["id"], exc)


# --------------------------------------------------------------------------
# HTTP API: validation, routes and one error boundary
# --------------------------------------------------------------------------


def checked(doc, names, params=None):
    """The fields ``names`` of a body that are present and not null, each checked
    against its Param (of ENQUEUE, or ``params``); unknown fields and misfits
    are a 400 naming the field."""
    params = params or ENQUEUE
    if not doc.keys() <= (names.keys() if isinstance(names, dict) else frozenset(names)):
        unknown = sorted(set(doc) - set(names))
        raise HTTPError(400, "unknown field(s): %s" % ", ".join(u[:50] for u in unknown[:10]),
                        field=unknown[0][:50])
    values = {}
    for name, value in doc.items():
        if value is not None or name == "json":  # json: null is a value
            if not params[name].fits(value):
                raise HTTPError(400, params[name].message, field=name)
            if isinstance(value, float) and params[name].schema.get("type") == "integer":
                value = int(value)  # 2.0 is an integer in JSON (and JSON Schema)
            values[name] = value
    return values


_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
_REQUEST_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII, as RFC 3986 allows
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]+)(?::[0-9]{1,5})?")


@functools.lru_cache(maxsize=256)  # every API request asks: 1 % of an enqueue
def host_served(value, allowed, loopback):
    """Does ``Host: value`` name this daemon?  ``allowed``: the --allow-host names;
    ``loopback``: is it bound to loopback?  (The rules: Api._check_host.)"""
    match = _HOST.fullmatch(value)
    name = match.group(1).lower() if match else None
    return name in allowed or (is_loopback_name(name) if loopback else
                               not allowed and is_unrebindable_name(name))


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is out of range: JSON numbers must be finite" % text[:40])
    return value


# stateless, shared; NaN, Infinity and numbers like 1e999 are refused
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_json(body):
    """Strict JSON: NaN and Infinity are refused.  Raises HTTPError(400)."""
    try:
        return _STRICT_JSON.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "the body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, "invalid JSON: %s" % exc) from None


def parse_rfc3339(text):
    """RFC 3339 time with an offset (or Z) -> Unix seconds; ValueError otherwise."""
    if not isinstance(text, str) or not re.match(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", text, re.I):
        raise ValueError(text)
    head, frac = text[:19], ""
    rest = text[19:]
    if rest.startswith("."):
        frac, rest = re.match(r"\.(\d+)(.*)$", rest).groups()
    if rest.upper() == "Z":
        rest = "+00:00"
    when = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.strptime(rest, "%z").tzinfo)
    return when.timestamp() + (float("0." + frac) if frac else 0.0)


class Route(collections.namedtuple("Route", "method pattern handler summary statuses params body")):
    """One API call: the router and /openapi.json are both built from these."""

    def __new__(cls, method, pattern, handler, summary, statuses, params=(), body=None):
        return super().__new__(cls, method, pattern, handler, summary, statuses, params, body)


PAGING = (("limit", {"type": "integer", "minimum": 0, "maximum": MAX_LIST_LIMIT},
           "page size, 0-100000 (default: every task, streamed)"),
          ("offset", {"type": "integer", "minimum": 0, "maximum": 10 ** 9},
           "tasks to skip (default 0)"),
          ("queue", "string", "only the tasks of this queue"),
          ("url_prefix", "string", "only the tasks whose URL starts with this"),
          ("q", "string", "only the tasks whose id, URL or idempotency key contains this "
                          "(case-insensitive)"),
          ("order", {"type": "string", "enum": ["asc", "desc"]},
           "by next_run: asc (the default, the original's order) or desc; in success and "
           "dead, next_run is when the last attempt was due, so desc is the latest first"))
WAITING_PAGING = PAGING + (  # GET /waiting is the original's: crons included, unless asked
    ("cron", {"type": "string", "enum": ["true", "false"]},
     "false: only the one-off tasks (what 'waiting' counts everywhere else); true: only the "
     "crons, as GET /cron; absent: both, as the original listed them"),)


class Raw(collections.namedtuple("Raw", "content_type body")):
    """An answer that is not JSON (the metrics text, the dashboard)."""


class Stream(collections.namedtuple("Stream", "content_type pieces")):
    """An answer written as it is made (chunked): ``pieces`` iterates over bytes."""


def _json_list(head, pieces, tail):
    """Bytes of ``head``, the JSON items of ``pieces`` (lists) comma-joined, ``tail``."""
    yield head.encode()
    sep = b""
    for piece in pieces:
        if piece:
            yield sep + b",".join(_compact(item).encode()
                                  for item in piece)
            sep = b","
    yield tail.encode()


class Api:
    """Routes and validation; one error boundary turns exceptions into JSON.

    Holds no state of its own: tables belong to the Store, dispatch to the
    DueQueue.  ``handle()`` is called from the server's request threads.
    """

    ROUTES = (
        Route("GET", "/", "status", "Daemon status: paused, in flight, table counts (waiting: "
              "the one-off tasks; cron: the schedules, counted apart)", (200,)),
        Route("POST", "/", "enqueue", "Enqueue a task (201), or find its twin (200)",
              (200, 201, 400, 413, 503, 507), body="EnqueueRequest"),
        Route("POST", "/batch", "batch", "Enqueue 1 to %d tasks, all or nothing" % MAX_BATCH,
              (201, 400, 413, 503, 507), body="BatchRequest"),
        Route("GET", "/waiting", "list_waiting", "Pending tasks, crons included (the original's "
              "listing) unless ?cron=false, by next_run", (200, 400), WAITING_PAGING),
        Route("GET", "/success", "list_success", "The newest successful tasks", (200, 400),
              PAGING),
        Route("GET", "/dead", "list_dead", "Tasks that spent their tries", (200, 400), PAGING),
        Route("DELETE", "/dead", "purge_dead", "Purge the dead table", (200, 503)),
        Route("POST", "/dead/retry", "retry_dead", "Requeue dead tasks", (200, 503),
              (("url_prefix", "string", "only tasks whose URL starts with this"),)),
        Route("GET", "/cron", "list_cron", "Cron tasks", (200, 400), PAGING),
        Route("DELETE", "/cron", "purge_cron", "Remove every cron task", (200, 503)),
        Route("GET", "/cron/preview", "cron_preview", "The next run times of a cron spec",
              (200, 400), (("schedule", {"type": "string", "minLength": 1, "maxLength": 256,
                                         "required": True}, "the cron spec"),
                           ("n", {"type": "integer", "minimum": 1, "maximum": 100},
                            "how many runs, 1-100 (default 5)"))),
        Route("POST", "/pause", "pause", "Stop dispatching (enqueues still accepted)", (200,)),
        Route("POST", "/resume", "resume", "Resume dispatching", (200,)),
        Route("GET", "/tasks/{id}", "get_task",
              "One task, with its state (an id prefix of 6+ hex characters will do)",
              (200, 400, 404, 409)),
        Route("DELETE", "/tasks/{id}", "delete_task", "Cancel a task or drop its record",
              (200, 400, 404, 409, 503)),
        Route("POST", "/tasks/{id}/run", "run_task",
              "Run a waiting task now, or redrive a dead one (optional overrides)",
              (200, 400, 404, 409, 413, 503, 507), body="RunRequest"),
        Route("GET", "/queues", "list_queues", "Every queue: settings, counts, lag", (200,)),
        Route("GET", "/queues/{name}", "get_queue", "One queue", (200, 404)),
        Route("PUT", "/queues/{name}", "put_queue", "Change a queue's settings (partial)",
              (200, 400, 413, 503), body="QueueSettings"),
        Route("DELETE", "/queues/{name}", "delete_queue", "Remove a queue that holds no task",
              (200, 400, 404, 409, 503)),
        Route("POST", "/queues/{name}/pause", "pause_queue", "Pause one queue", (200, 400, 503)),
        Route("POST", "/queues/{name}/resume", "resume_queue", "Resume one queue",
              (200, 400, 503)),
        Route("GET", "/healthz", "healthz",
              "200 when serving and storage is healthy, else 503; no API key needed",
              (200, 503)),
        Route("GET", "/metrics", "metrics", "Prometheus text exposition format 0.0.4", (200,)),
        Route("GET", "/backup", "backup", "A consistent copy of every table, as a snapshot: "
              "a daemon started on a new directory holding it as snapshot.json restores it "
              "(poussetaches backup DEST does that)", (200,)),
        Route("GET", "/openapi.json", "openapi", "This document", (200,)),
        Route("GET", "/ui", "ui", "The dashboard (HTML)", (200,)),
    )

    def __init__(self, store, due, breakers, stats, settings):
        self.store = store
        self.due = due
        self.breakers = breakers
        self.stats = stats
        self.settings = settings
        self.clock = settings.clock
        self._routes = []
        for route in self.ROUTES:
            regex = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)",
                                      re.escape(route.pattern)) + r"\Z")
            self._routes.append((route.method, regex, getattr(self, route.handler),
                                 tuple(name for name, _, _ in route.params)))

    # -- the boundary ----------------------------------------------------------

    def handle(self, method, target, headers, read_body):
        """Answer one request: returns (status, JSON-able object, extra headers)."""
        try:
            self._check_host(headers)
            self._check_browser(headers)
            if not target.startswith("/") or target.startswith("//"):
                raise HTTPError(400, "the request target must be a path such as /waiting, "
                                "not %r" % target[:100])
            path, _, query = target.partition("?")
            try:
                query = urllib.parse.parse_qs(
                    query, keep_blank_values=True, strict_parsing=False, max_num_fields=50
                ) if query else {}
            except ValueError as exc:
                raise HTTPError(400, "bad query string: %s" % exc) from None
            handler, params, names = self._route(method, path)
            if handler != self.healthz:
                self._check_api_key(headers)
            unknown = query and sorted(set(query) - set(names))
            if unknown:  # a mistyped filter must not widen a purge or a retry to everything
                raise HTTPError(400, "unknown query parameter(s): %s; %s" % (
                    ", ".join(u[:50] for u in unknown[:5]),
                    "use " + ", ".join(names) if names else "this call takes none"))
            return handler(params=params, query=query, headers=headers, read_body=read_body)
        except HTTPError as exc:
            answer = {"error": exc.message}
            if exc.field is not None:
                answer["field"] = exc.field
            if exc.index is not None:
                answer["index"] = exc.index
            return exc.status, answer, exc.headers
        except PersistError as exc:
            logger.error("refused a change that cannot be persisted: %s", exc)
            return 503, {"error": "%s; nothing was stored, retry later" % exc}, {"Retry-After": "1"}
        except QuotaError as exc:
            return 507, {"error": "%s; nothing was stored" % exc}, {"Retry-After": "5"}
        except Exception:
            logger.exception("unexpected error answering %s %s", method, target[:200])
            return 500, {"error": "internal error; see the daemon's log"}, {}

    def _route(self, method, path):
        allowed = []
        for route_method, regex, handler, names in self._routes:
            match = regex.match(path)
            if match:
                if route_method == method:
                    return handler, match.groupdict(), names
                allowed.append(route_method)
        if allowed:
            raise HTTPError(405, "method %s not allowed on %s; use %s"
                            % (method, path, ", ".join(allowed)), {"Allow": ", ".join(allowed)})
        raise HTTPError(404, "no such path: %s" % path[:200])

    def _check_host(self, headers):
        """DNS rebinding: a page of evil.example whose name resolves to our address
        reaches us with ``Host: evil.example``.  Served (SPEC 5): names given
        with ``--allow-host``; besides them, while bound to loopback, loopback
        names; bound elsewhere with no ``--allow-host``, IP literals and
        single-label names (``poussetaches`` in a compose network), or any name
        when an API key is required (no page can send it)."""
        allowed = self.settings.allow_hosts
        loopback = self.settings.loopback_bound
        if not allowed and not loopback and self.settings.api_key:
            return
        value = headers.get("Host")
        if value is None:  # HTTP/1.0 without Host: no browser sends that
            return
        if len(value) <= 300 and host_served(value, allowed, loopback):  # a name, a port
            return
        raise HTTPError(403, "Host %r is not this daemon's name: a DNS-rebinding page? (serve "
                        "other names with --allow-host NAME%s)" % (
                            value[:100], "" if loopback or allowed else
                            "; without it, only IP addresses and names without a dot are "
                            "served, unless POUSSETACHES_API_KEY is set"))

    @staticmethod
    def _check_browser(headers):
        """CSRF: a web page may send us requests through the operator's browser;
        browsers mark them, and only the dashboard's own (same-origin) calls pass."""
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise HTTPError(403, "a %s browser request is refused: web pages cannot drive "
                            "poussetaches" % site[:40])
        origin = headers.get("Origin")
        if origin is not None:
            host = headers.get("Host", "").lower()
            if not host or origin.lower() not in ("http://" + host, "https://" + host):
                raise HTTPError(403, "a request from the web page origin %r is refused: only "
                                "the dashboard's own origin may call the API" % origin[:100])

    def _check_api_key(self, headers):
        key = self.settings.api_key
        if not key:
            return
        given = headers.get("Authorization") or ""
        scheme, _, credentials = given.partition(" ")
        secret = None
        if scheme.lower() == "bearer":
            secret = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                secret = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                secret = None
        if secret is None or not hmac.compare_digest(secret.encode(), key.encode()):
            raise HTTPError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                            {"WWW-Authenticate": 'Basic realm="poussetaches"'})

    @staticmethod
    def _body_json(read_body, required=True):
        body = read_body()
        if not body.strip():
            if required:
                raise HTTPError(400, "the body must be a JSON object")
            return {}
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise HTTPError(400, "the body must be a JSON object, not %s" % type(doc).__name__)
        return doc

    @staticmethod
    def _int_param(query, name, default, lo, hi):
        values = query.get(name)
        if not values:
            return default
        text = values[-1]
        if not re.fullmatch(r"[0-9]{1,10}", text) or not lo <= int(text) <= hi:
            raise HTTPError(400, "%s must be a whole number from %d to %d, got %r"
                            % (name, lo, hi, text[:50]))
        return int(text)

    # -- validation ------------------------------------------------------------

    def check_url(self, url, field="url"):
        problem = url_problem(url)
        if problem is not None:
            raise HTTPError(400, "%s %s" % (field, problem), field=field)
        if not self.settings.allow_urls.allows(url):
            raise HTTPError(400, "%s is outside the allowed URLs (--allow-url %s)"
                            % (field, " ".join(self.settings.allow_urls.prefixes)), field=field)
        return url

    @staticmethod
    def check_headers(value):
        problem = headers_problem(value)
        if problem is not None:
            raise HTTPError(400, "headers: " + problem, field="headers")
        return dict(value)

    @staticmethod
    def _payload(values):
        """The payload bytes of checked ``values``: ``json`` encoded, or ``payload`` decoded."""
        if "json" in values:
            if "payload" in values:
                raise HTTPError(400, "payload and json are exclusive: send one of them",
                                field="json")
            return _compact(values["json"]).encode()
        text = values.get("payload", "")
        if "\n" in text or "\r" in text:  # skipped, as the original's (Go's) decoder did:
            text = text.replace("\r", "").replace("\n", "")  # `base64` wraps at 76 columns
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, "payload is not valid standard base64", field="payload") from None

    def _fields(self, values, names):
        """The task fields ``names`` that checked enqueue ``values`` give: the URL and
        the headers checked, the payload decoded (from ``json`` too), the others
        as sent."""
        fields = {name: values[name] for name in names
                  if name in values and name in _TASK_NAME_SET}  # json: the payload
        if "url" in fields:
            fields["url"] = self.check_url(fields["url"])
        if "headers" in fields:
            fields["headers"] = self.check_headers(fields["headers"])
        if "payload" in names and ("payload" in values or "json" in values):
            fields["payload"] = self._payload(values)
        return fields

    def _first_run(self, values, now):
        """When a task first runs: now, or ``delay`` minutes, ``delay_s`` or ``eta`` later."""
        given = [name for name in ("delay", "delay_s", "eta") if values.get(name)]
        if len(given) > 1:
            raise HTTPError(400, "%s are exclusive: send one of them" % " and ".join(given),
                            field=given[1])
        start = now + values.get("delay", 0) * 60 * 10 ** 9
        if "delay_s" in values:
            start = now + int(values["delay_s"] * 1e9)
        if "eta" in values:
            eta = values["eta"]
            try:
                seconds = eta if _is_number(eta) else parse_rfc3339(eta)
            except (ValueError, OverflowError):
                raise HTTPError(400, ENQUEUE["eta"].message, field="eta") from None
            if not 0 <= seconds <= 1e11:
                raise HTTPError(400, "eta is out of range", field="eta")
            start = max(now, int(seconds * 1e9))
        if start - now > MAX_FIRST_RUN_S * 10 ** 9:
            raise HTTPError(400, "the first run is more than 10 years ahead", field=given[0])
        return start

    def new_task(self, doc, headers, now):
        """Validate an enqueue body; return an unsaved Task.  Raises HTTPError(400)."""
        values = checked(doc, ENQUEUE)
        if "url" not in values:
            raise HTTPError(400, "url is required", field="url")
        fields = self._fields(values, ENQUEUED_FIELDS)
        fields["expected"] = fields.get("expected") or 200
        if fields["expected"] < 100:
            raise HTTPError(400, ENQUEUE["expected"].message, field="expected")
        header = headers.get("Idempotency-Key")
        if header is not None:
            if fields.setdefault("idempotency_key", header) != header:  # which one is meant?
                raise HTTPError(400, "the Idempotency-Key header and the idempotency_key "
                                "field differ: give one of them", field="idempotency_key")
            if not ENQUEUE["idempotency_key"].fits(header):
                raise HTTPError(400, ENQUEUE["idempotency_key"].message,
                                field="idempotency_key")
        task = Task(new_id(), created=now, next_run=self._first_run(values, now), **fields)
        url, payload, schedule = task.url, task.payload, task.schedule
        if task.name is not None and not schedule:
            raise HTTPError(400, "name is for cron tasks: give a schedule too", field="name")
        if schedule:
            spec = self.cron_spec(schedule, "schedule")
            first = spec.next_after(task.next_run - 1)
            if first is None:
                raise HTTPError(400, "schedule %r matches no time in the next %d years"
                                % (schedule, CRON_HORIZON_YEARS), field="schedule")
            task.id = named_cron_id(task.name) if task.name else cron_id(url, payload, schedule)
            task.next_run = task.next_scheduled_run = first
        return task

    def cron_spec(self, schedule, field):
        try:
            spec = CronSpec(schedule, self.settings.cron_tz)
        except CronError as exc:
            raise HTTPError(400, "%s: invalid cron spec %r: %s" % (field, schedule, exc)) from None
        if spec.next_after(self.clock()) is None:
            raise HTTPError(400, "%s %r matches no time in the next %d years"
                            % (field, schedule, CRON_HORIZON_YEARS))
        return spec

    # -- handlers (keyword arguments: params, query, headers, read_body) --------

    def status(self, **_):
        counts = self.store.counts()
        health = self.store.health()
        return 200, {
            "paused": self.due.held,
            "in_flight": self.store.in_flight(),
            "version": __version__,
            "waiting": counts["waiting"], "success": counts["success"],
            "dead": counts["dead"], "cron": counts["cron"],
            "healthy": health["healthy"],
            "journal_errors": health["errors"],
            "open_breakers": self.breakers.open_origins(),
            "breakers": self.breakers.describe(),
        }, {}

    def enqueue(self, headers, read_body, **_):
        doc = self._body_json(read_body)
        task = self.new_task(doc, headers, self.clock())
        task, outcome, body = self.store.add(task)
        if outcome == "created":
            logger.debug("task %s queued for %s%s", task.id, task.url,
                         " (%s)" % task.schedule if task.schedule else "")
        elif outcome == "replaced":  # a named cron given a new schedule, URL or payload
            return 200, dict(json.loads(body), replaced=True), {"Poussetaches-Task-ID": task.id}
        return ((201 if outcome == "created" else 200), Raw("application/json", body + b"\n"),
                {"Poussetaches-Task-ID": task.id})

    def _listing(self, table, query):
        limit = self._int_param(query, "limit", None, 0, MAX_LIST_LIMIT)
        offset = self._int_param(query, "offset", 0, 0, 10 ** 9)
        order = (query.get("order") or ["asc"])[-1]
        if order not in ("asc", "desc"):
            raise HTTPError(400, "order must be asc or desc, not %r" % order[:20])
        match = None
        filters = {name: query[name][-1] for name in ("queue", "url_prefix", "q") if name in query}
        if filters:
            queue_name, prefix = filters.get("queue"), filters.get("url_prefix", "")
            text = filters.get("q", "").lower()
            match = lambda t: ((queue_name is None or t.queue == queue_name)
                               and t.url.startswith(prefix)
                               and (not text or text in t.id or text in t.url.lower()
                                    or text in (t.idempotency_key or "").lower()))
        total, pieces = self.store.listing(table, limit, offset, match, order == "desc")
        if limit is not None and table in ("waiting", "cron", "once"):  # a page says why
            context = self._hold_context()
            pieces = ([dict(task, held=self._held(task, context)) for task in piece]
                      for piece in pieces)
        head = '{"total":%d,"limit":%s,"offset":%d,"tasks":[' % (
            total, "null" if limit is None else limit, offset)
        return 200, Stream("application/json", _json_list(head, pieces, "]}\n")), {}

    def list_waiting(self, query, **_):
        cron = (query.get("cron") or [None])[-1]
        if cron not in (None, "true", "false"):
            raise HTTPError(400, "cron must be true or false, not %r" % cron[:20])
        return self._listing({None: "waiting", "true": "cron", "false": "once"}[cron], query)

    def list_success(self, query, **_):
        return self._listing("success", query)

    def list_dead(self, query, **_):
        return self._listing("dead", query)

    def list_cron(self, query, **_):
        return self._listing("cron", query)

    def purge_cron(self, **_):
        return 200, {"deleted": self.store.delete_where("cron")}, {}

    def purge_dead(self, **_):
        return 200, {"deleted": self.store.delete_where("dead")}, {}

    def retry_dead(self, query, **_):
        prefix = (query.get("url_prefix") or [""])[-1]
        return 200, {"requeued": self.store.retry_dead(prefix)}, {}

    def cron_preview(self, query, **_):
        schedule = (query.get("schedule") or [""])[-1]
        if not schedule:
            raise HTTPError(400, "schedule is required: /cron/preview?schedule=*/5+*+*+*+*")
        n = self._int_param(query, "n", 5, 1, 100)
        spec = self.cron_spec(schedule, "schedule")
        runs = spec.preview(self.clock(), n)
        tz = spec.tz
        return 200, {"schedule": schedule, "next_runs": runs,
                     "next_runs_iso": [datetime.fromtimestamp(r // 10 ** 9, tz).astimezone(tz)
                                       .isoformat() for r in runs]}, {}

    def pause(self, **_):
        self.due.hold()
        logger.info("dispatch paused", extra={"event": "pause"})
        return 200, {"paused": True}, {}

    def resume(self, **_):
        self.due.release()
        logger.info("dispatch resumed", extra={"event": "resume"})
        return 200, {"paused": False}, {}

    def _task_id(self, params):
        """The task id of a path: a whole id, or a unique prefix of 6+ hex characters."""
        task_id = params["id"]
        if not _TASK_ID.fullmatch(task_id):
            raise HTTPError(404, "no task with id %r" % task_id[:80])
        if len(task_id) < 32 and re.fullmatch("[0-9a-f]+", task_id) \
                and self.store.get(task_id)[0] is None:
            if len(task_id) < 6:
                raise HTTPError(404, "no task with id %r (an id prefix needs at least 6 "
                                "characters)" % task_id)
            found = self.store.resolve(task_id)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise HTTPError(409, "%r is the start of several task ids: give more of it"
                                % task_id)
        return task_id

    def batch(self, headers, read_body, **_):
        doc = self._body_json(read_body)
        items = doc.get("tasks")
        if set(doc) != {"tasks"} or not isinstance(items, list) \
                or not 1 <= len(items) <= MAX_BATCH:
            raise HTTPError(400, 'the body must be {"tasks": [1 to %d enqueue bodies]}'
                            % MAX_BATCH, field="tasks")
        now, tasks = self.clock(), []
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise HTTPError(400, "a task must be a JSON object", field="tasks")
                tasks.append(self.new_task(item, {}, now))
            except HTTPError as exc:
                raise HTTPError(400, "tasks[%d]: %s" % (index, exc.message),
                                field=exc.field, index=index) from None
        results = self.store.add_many(tasks)
        return 201, {"tasks": [dict({"id": task.id, "created": outcome == "created"},
                                    **({"replaced": True} if outcome == "replaced" else {}))
                               for task, outcome, _ in results]}, {}

    # -- queues ------------------------------------------------------------------

    def _queue_view(self, name, row=None):
        found = [row] if row else self.store.queues(self.clock(), name)
        if not found:
            raise HTTPError(404, "no queue %r" % name[:80])
        in_flight = self.due.queue_stats().get(name, (0, 0))[1]
        return dict(found[0], in_flight=in_flight)

    @staticmethod
    def _queue_name(params):
        name = params["name"]
        if not ENQUEUE["queue"].fits(name):
            raise HTTPError(400, ENQUEUE["queue"].message, field="queue")
        return name

    def list_queues(self, **_):
        flights = self.due.queue_stats()
        return 200, {"queues": [dict(q, in_flight=flights.get(q["name"], (0, 0))[1])
                                for q in self.store.queues(self.clock())]}, {}

    def get_queue(self, params, **_):
        return 200, self._queue_view(params["name"]), {}

    def put_queue(self, params, read_body, **_):
        name = self._queue_name(params)
        doc = self._body_json(read_body)
        changes = checked(doc, QUEUE, QUEUE)
        changes.update((key, None) for key in doc if doc[key] is None)  # null: the default
        merged = {key: value for key, value in dict(self.store.queue_settings(name), **changes)
                  .items() if value is not None}  # null: the default, which never conflicts
        if merged.get("min_backoff", 0) > merged.get("max_backoff", float("inf")):
            raise HTTPError(400, "min_backoff must not be above max_backoff",
                            field="min_backoff")
        return 200, self._queue_view(name, self.store.set_queue(name, changes)), {}

    def delete_queue(self, params, **_):
        done = self.store.delete_queue(self._queue_name(params))
        if done is None:
            raise HTTPError(404, "no queue %r" % params["name"][:80])
        if not done:
            raise HTTPError(409, "queue %s still holds waiting tasks: cancel or deliver them "
                            "first" % params["name"])
        return 200, {"deleted": params["name"]}, {}

    def pause_queue(self, params, **_):
        row = self.store.set_queue(self._queue_name(params), {"paused": True})
        logger.info("queue %s paused", params["name"],
                    extra={"event": "pause", "queue": params["name"]})
        return 200, self._queue_view(params["name"], row), {}

    def resume_queue(self, params, **_):
        row = self.store.set_queue(self._queue_name(params), {"paused": None})
        logger.info("queue %s resumed", params["name"],
                    extra={"event": "resume", "queue": params["name"]})
        return 200, self._queue_view(params["name"], row), {}

    def get_task(self, params, **_):
        state, view = self.store.get(self._task_id(params))
        if view is None:
            raise HTTPError(404, "no task with id %r" % params["id"])
        view["state"] = state
        view["held"] = self._held(view, self._hold_context()) if state == "waiting" else None
        return 200, view, {}

    def _hold_context(self):
        """What _held compares tasks with, read once for a task or a page of them."""
        return (self.clock(), self.due.held, self.due.queue_stats(),
                {b["origin"]: b for b in self.breakers.describe()}, {})

    def _held(self, task, context):
        """Why a waiting task that is due has not gone, or None (not due yet, or on
        its way): what GET /tasks/<id>, paged listings and the dashboard say."""
        now, paused, stats, breakers, settings_of = context
        if task["next_run"] > now or self.store.is_in_flight(task["id"]):
            return None
        if paused:
            return "dispatching is paused (POST /resume)"
        queue = task["queue"]
        if queue not in settings_of:
            settings_of[queue] = self.store.queue_settings(queue)
        settings = settings_of[queue]
        if settings.get("paused"):
            return "its queue %s is paused" % queue
        if task["ordering_key"] is not None:
            head = self.store.ordering_head(queue, task["ordering_key"])
            if head is not None and head != task["id"]:
                return "its ordering key %r runs task %s first" % (task["ordering_key"], head)
        in_flight = stats.get(queue, (0, 0))[1]
        if settings.get("concurrency") and in_flight >= settings["concurrency"]:
            return "its queue %s is at its concurrency (%d under way)" % (queue, in_flight)
        breaker = breakers.get(origin_of(task["url"]))
        if breaker is not None:
            return "the circuit for %s is open (5 unavailable answers in a row); next probe " \
                   "at %s" % (breaker["origin"], iso_utc(breaker["next_probe"]))
        if settings.get("rate"):
            return "its queue %s is rate limited (%s a second)" % (queue, settings["rate"])
        return None

    def delete_task(self, params, **_):
        task_id = self._task_id(params)
        state = self.store.delete(task_id)
        if state is None:
            raise HTTPError(404, "no task with id %r" % params["id"])
        return 200, {"deleted": task_id, "state": state}, {}

    def run_task(self, params, read_body, **_):
        task_id = self._task_id(params)
        doc = self._body_json(read_body, required=False)
        values = checked(doc, RUN_OVERRIDES)
        # a null headers or max_tries clears the task's own (the daemon's default applies)
        changes = {name: None for name in ("headers", "max_tries") if name in doc}
        changes.update(self._fields(values, RUN_OVERRIDES))
        view = self.store.run_now(task_id, changes)
        if view is None:
            raise HTTPError(404, "no waiting or dead task with id %r" % task_id)
        view["state"] = "waiting"
        return 200, view, {}

    def healthz(self, **_):
        if not self.store.health()["healthy"]:
            return 503, {"ok": False, "error": "the journal cannot be written"}, {}
        return 200, {"ok": True}, {}

    def backup(self, **_):
        return 200, Stream("application/json", self.store.backup()), {
            "Cache-Control": "no-store"}

    def metrics(self, **_):
        counts = self.store.counts()
        counters, buckets, total, count = self.stats.read()
        health = self.store.health()
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append("# HELP poussetaches_%s %s" % (name, help_text))
            lines.append("# TYPE poussetaches_%s %s" % (name, kind))
            for labels, value in samples:
                lines.append("poussetaches_%s%s %s" % (name, labels, repr(float(value))
                                                      if isinstance(value, float) else value))


        metric("build_info", "gauge", "The running version (always 1).",
               [('{version="%s",python="%s"}' % (__version__, sys.version.split()[0]), 1)])
        metric("tasks", "gauge", "Tasks per table; waiting counts one-off tasks, cron the "
                                 "schedules (their sum is every pending task).",
               [('{table="%s"}' % t, counts[t]) for t in ("waiting", "cron", "success", "dead")])
        metric("oldest_due_age_seconds", "gauge",
               "How long the most overdue waiting task has been due (0 if none).",
               [("", self.store.oldest_due_age(self.clock()))])
        metric("in_flight", "gauge", "Delivery attempts under way.",
               [("", self.store.in_flight())])
        metric("paused", "gauge", "1 while dispatch is paused.", [("", int(self.due.held))])
        metric("attempts_total", "counter", "Delivery attempts by outcome.",
               [('{outcome="%s"}' % o, counters.get("attempts_" + o, 0))
                for o in ("success", "failure", "error")])
        samples = [('{le="%s"}' % b, n) for b, n in zip(Stats.BUCKETS, buckets)]
        samples.append(('{le="+Inf"}', count))
        metric("attempt_duration_seconds", "histogram", "Duration of delivery attempts.", [])
        for labels, value in samples:
            lines.append("poussetaches_attempt_duration_seconds_bucket%s %d" % (labels, value))
        lines.append("poussetaches_attempt_duration_seconds_sum %r" % total)
        lines.append("poussetaches_attempt_duration_seconds_count %d" % count)
        queues = self.store.queues(self.clock())
        flights = self.due.queue_stats()
        for name, key, help_text in (
                ("queue_waiting", "waiting", "One-off tasks waiting, per queue."),
                ("queue_cron", "cron", "Cron tasks (schedules), per queue."),
                ("queue_due", "due", "Tasks whose time has come, per queue: one-off or cron, "
                                     "held ones included."),
                ("queue_oldest_due_age_seconds", "oldest_due_age_s",
                 "How long the most overdue task of a queue has been due.")):
            metric(name, "gauge", help_text,
                   [('{queue="%s"}' % q["name"], q[key]) for q in queues])
        metric("queue_in_flight", "gauge", "Attempts under way per queue.",
               [('{queue="%s"}' % q["name"], flights.get(q["name"], (0, 0))[1]) for q in queues])
        metric("queue_attempts_total", "counter", "Delivery attempts by queue and outcome.",
               [('{queue="%s",outcome="%s"}' % key[1], n)
                for key, n in sorted(counters.items(), key=str)
                if isinstance(key, tuple) and key[0] == "queue_attempts"])
        metric("origin_attempts_total", "counter", "Delivery attempts by target origin and outcome.",
               [('{origin="%s",outcome="%s"}' % (_label(key[1][0]), key[1][1]), n)
                for key, n in sorted(counters.items(), key=str)
                if isinstance(key, tuple) and key[0] == "origin_attempts"])
        metric("enqueued_total", "counter", "Tasks created by POST /.",
               [("", self.store.enqueued)])
        metric("dead_total", "counter", "Tasks (and cron runs) moved to dead.",
               [("", counters.get("dead", 0))])
        metric("records_dropped_total", "counter",
               "Success and dead records dropped, oldest first, past a table's cap of "
               "records (--keep-success, --keep-dead) or of bytes.",
               [('{table="%s",cap="%s"}' % (t, c), self.store.dropped[t, c])
                for t in ("success", "dead") for c in ("records", "bytes")])
        metric("table_bytes", "gauge", "Payload (and, for success and dead, error) bytes "
                                       "held per table.",
               [('{table="waiting"}', self.store.waiting_bytes)]
               + [('{table="%s"}' % t, self.store.table_bytes[t]) for t in ("success", "dead")])
        metric("journal_errors_total", "counter", "Journal write or fsync failures.",
               [("", health["errors"])])
        metric("journal_commits_total", "counter", "Journal group commits (write + fsync).",
               [("", health["commits"])])
        metric("snapshots_total", "counter", "Snapshots written since start.",
               [("", self.store.snapshots)])
        metric("snapshot_errors_total", "counter", "Failed snapshots.",
               [("", self.store.snapshot_errors)])
        metric("healthy", "gauge", "0 while the journal cannot be written.",
               [("", int(health["healthy"]))])
        metric("open_circuit_breakers", "gauge", "Origins whose circuit is open.",
               [("", len(self.breakers.open_origins()))])
        text = "\n".join(lines) + "\n"
        return 200, Raw("text/plain; version=0.0.4; charset=utf-8", text.encode()), {}

    def openapi(self, **_):
        return 200, openapi_document(self.ROUTES, self.settings.allow_urls,
                                     bool(self.settings.api_key)), {}

    def ui(self, **_):
        return 200, Raw("text/html; charset=utf-8", DASHBOARD_HTML.encode()), {
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; connect-src 'self'; "
                                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def _label(value):
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_STATUS_TEXT = {200: "OK", 201: "Created", 400: "Bad input (the error names the field)",
                401: "Missing or wrong API key", 404: "No such task or path",
                405: "Wrong method (see Allow)", 408: "The body did not arrive in time",
                409: "An id prefix of several tasks, or a queue that still holds tasks",
                411: "A body without Content-Length",
                413: "Body larger than --max-body",
                403: "A browser-borne (cross-site) request, or a Host that is not this "
                     "daemon's name (DNS rebinding)",
                503: "Cannot persist (disk full or read-only); retry later",
                507: "Quota reached (--max-waiting, --max-stored-bytes); nothing stored"}


_SCHEMA_TYPES = {"string": "string", "integer": "integer", "time": "integer", "number": "number",
                 "bytes": "string", "object": "object", "list": "array"}


def _nullable(schema):
    """A Param's schema with null allowed (null is the same as absent)."""
    kinds = schema.get("type")
    if not schema:
        return schema
    if kinds is None or "anyOf" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return dict(schema, type=(kinds if isinstance(kinds, list) else [kinds]) + ["null"])


def _field_schema(field):
    """The JSON schema of one TASK_FIELDS entry."""
    kind = _SCHEMA_TYPES[field.kind]
    schema = {"type": kind if field.default is not None or field.kind == "list"
              else [kind, "null"]}
    if field.kind == "bytes":
        schema["contentEncoding"] = "base64"
    elif field.kind == "time":
        schema["description"] = "Unix time in nanoseconds"
    elif field.kind == "list":
        schema["items"] = {"type": "object"}
    return schema


# the answers that have a schema of their own in /openapi.json, by handler
ANSWERS = {"list_queues": "QueueList", "get_queue": "Queue", "put_queue": "Queue",
           "pause_queue": "Queue", "resume_queue": "Queue", "delete_queue": "QueueDeleted",
           "batch": "BatchAnswer"}


def _any_case(word):
    """A regex matching ``word`` in any case (JSON Schema's regexes have no flags)."""
    return "".join("[%s%s]" % (c.upper(), c.lower()) if c.isalpha() else re.escape(c)
                   for c in word)


def _url_schema(allow_list):
    """The task URL's schema: what url_problem and the allow list accept, as a
    pattern (narrower than the rules where they cannot be written as one)."""
    path = r"(/[A-Za-z0-9_~!$&'()*+,=:@-]*)*"  # no dot, ;, \ or %: see url_problem
    if allow_list:
        return {"type": "string", "maxLength": 4096, "pattern": "^(%s)%s$" % (
            "|".join(re.escape(prefix.rstrip("/")) for prefix in allow_list.prefixes), path)}
    return {"type": "string", "maxLength": 4096,
            "pattern": r"^https?://[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})*(:[1-9][0-9]{0,3})?%s$"
                       % path}


def _doc_schemas(allow_list):
    """Enqueue fields whose rules go beyond their Param's schema, in JSON Schema."""
    reserved = "^(%s)$|^%s" % ("|".join(_any_case(name) for name in RESERVED_HEADERS),
                               _any_case("poussetaches-"))
    return {
        "url": _url_schema(allow_list),
        "payload": {"type": "string", "contentEncoding": "base64", "pattern":
                    "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"},
        "expected": {"type": "integer", "anyOf": [{"const": 0},
                                                  {"minimum": 100, "maximum": 599}]},
        "delay": dict(ENQUEUE["delay"].schema, maximum=MAX_FIRST_RUN_S // 60),
        # each keyword applies to its own type: numbers, or RFC 3339 strings
        "eta": {"type": ["number", "string"], "minimum": 0, "maximum": 1e11,
                "format": "date-time", "pattern":
                "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}"
                "(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"},
        "headers": {"type": "object", "maxProperties": 64,
                    "propertyNames": {"pattern": "^" + _HEADER_NAME.pattern + "$",
                                      "not": {"pattern": reserved}},
                    "additionalProperties": {"type": "string", "maxLength": 8192,
                                             "pattern": "^[\t\x20-\x7e\x80-\xff]*$"}},
    }


def openapi_document(routes, allow_list=None, api_key=False):
    """The OpenAPI 3.1 document of ``routes``: what /openapi.json serves (task URLs
    as the allow list restricts them; anonymous calls only without an API key)."""
    error = {"$ref": "#/components/schemas/Error"}
    task_id = {"name": "id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^" + _TASK_ID.pattern + "$"},
               "description": "a task id, or a unique prefix of 6 or more of its hex characters"}
    paths = {}
    for route in routes:
        responses = {}
        # every call answers 400 to a bad target or an unknown query parameter
        for code in sorted(set(route.statuses) | {400, 403} |
                           (set() if route.handler == "healthz" else {401})):
            answer = {"description": _STATUS_TEXT[code]}
            if code >= 400:
                answer["content"] = {"application/json": {"schema": error}}
            responses[str(code)] = answer
        if route.handler == "metrics":
            responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif route.handler == "ui":
            responses["200"]["content"] = {"text/html": {"schema": {"type": "string"}}}
        elif route.handler.startswith("list_"):
            responses["200"]["content"] = {"application/json": {
                "schema": {"$ref": "#/components/schemas/TaskList"}}}
        elif route.handler in ANSWERS:
            responses[str(min(route.statuses))]["content"] = {"application/json": {
                "schema": {"$ref": "#/components/schemas/" + ANSWERS[route.handler]}}}
        elif route.handler in ("enqueue", "get_task", "run_task"):
            responses["200"]["content"] = {"application/json": {
                "schema": {"$ref": "#/components/schemas/Task"}}}
            if "201" in responses:
                responses["201"]["content"] = responses["200"]["content"]
                responses["201"]["headers"] = {"Poussetaches-Task-ID": {
                    "schema": {"type": "string"}, "description": "the task id"}}
        else:
            responses[str(min(route.statuses))]["content"] = {
                "application/json": {"schema": {"type": "object"}}}
        operation = {"operationId": route.handler, "summary": route.summary,
                     "responses": responses}
        if route.handler == "healthz":
            operation["security"] = []
        params = []
        for name, kind, text in route.params:
            schema = dict(kind) if isinstance(kind, dict) else {"type": kind}
            params.append({"name": name, "in": "query", "required": schema.pop("required", False),
                           "schema": schema, "description": text})
        for name in re.findall(r"\{(\w+)\}", route.pattern):
            params.insert(0, task_id if name == "id" else
                          {"name": name, "in": "path", "required": True,
                           "schema": ENQUEUE["queue"].schema})
        if route.handler == "enqueue":
            params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": ENQUEUE["idempotency_key"].schema})
        if params:
            operation["parameters"] = params
        if route.body:
            operation["requestBody"] = {
                "required": route.body != "RunRequest",
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/" + route.body}}}}
        paths.setdefault(route.pattern, {})[route.method.lower()] = operation
    integer, string = {"type": "integer"}, {"type": "string"}
    nullable = lambda kind: {"type": [kind, "null"]}
    fields = dict({p.name: p.schema for p in ENQUEUE_PARAMS}, **_doc_schemas(allow_list))
    enqueue = {name: schema if name == "url" else _nullable(schema)
               for name, schema in fields.items()}
    # a payload (null is none) and json (null is a value) together are refused
    both = {"json": {"properties": {"payload": {"type": "null"}}}}
    headers = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "poussetaches", "version": __version__,
                 "description": "An HTTP push task queue: POST a task, get it POSTed back "
                                "until the app answers the expected status.",
                 "license": {"name": "ISC", "identifier": "ISC"}},
        "paths": paths,
        "security": ([] if api_key else [{}]) + [{"bearer": []}, {"basic": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": string,
                                         "field": dict(string, description="the field at fault"),
                                         "index": dict(integer, description="the task at "
                                                       "fault in a batch")}},
                "Queue": {
                    "type": "object",
                    "properties": {"name": string,
                                   "settings": {"$ref": "#/components/schemas/QueueSettings"},
                                   "waiting": dict(integer, description="one-off tasks"),
                                   "cron": dict(integer, description="schedules"),
                                   "due": dict(integer, description="one-off or cron, due"),
                                   "in_flight": integer,
                                   "oldest_due_age_s": {"type": "number"}}},
                "QueueList": {"type": "object", "properties": {"queues": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Queue"}}}},
                "QueueDeleted": {"type": "object", "properties": {"deleted": string}},
                "BatchAnswer": {"type": "object", "properties": {"tasks": {
                    "type": "array", "items": {"type": "object", "properties": {
                        "id": string, "created": {"type": "boolean"},
                        "replaced": {"type": "boolean"}}}}}},
                "EnqueueRequest": {
                    "type": "object", "required": ["url"], "additionalProperties": False,
                    "properties": enqueue,
                    "dependentSchemas": dict(both, name={"anyOf": [
                        {"properties": {"name": {"type": "null"}}},
                        {"required": ["schedule"],
                         "properties": {"schedule": {"type": "string", "minLength": 1}}}]})},
                "RunRequest": {
                    "type": "object", "additionalProperties": False,
                    "properties": {name: enqueue[name] if name != "url" else _nullable(
                        enqueue[name]) for name in RUN_OVERRIDES},
                    "dependentSchemas": both},
                "BatchRequest": {
                    "type": "object", "required": ["tasks"], "additionalProperties": False,
                    "properties": {"tasks": {
                        "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                        "items": {"$ref": "#/components/schemas/EnqueueRequest"}}}},
                "QueueSettings": {
                    "type": "object", "additionalProperties": False,
                    "properties": {p.name: _nullable(p.schema) for p in QUEUE_PARAMS}},
                "Task": {
                    "type": "object",
                    "properties": dict(
                        {f.name: _field_schema(f) for f in TASK_FIELDS},
                        state={"enum": ["waiting", "success", "dead"]},
                        held={"type": ["string", "null"],
                              "description": "GET /tasks/<id>: why a due waiting task has "
                                             "not gone (a paused queue, its ordering key, "
                                             "its queue's concurrency, an open circuit)"})},
                "TaskList": {
                    "type": "object",
                    "properties": {"tasks": {"type": "array",
                                             "items": {"$ref": "#/components/schemas/Task"}},
                                   "total": integer, "limit": nullable("integer"),
                                   "offset": integer}},
            },
        },
    }


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>poussetaches</title>
<style>
:root{--bg:#fafafa;--fg:#1d1d1f;--mute:#6b7280;--line:#e5e7eb;--ok:#15803d;--bad:#b91c1c;--acc:#1d4ed8}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--fg:#e5e7eb;--mute:#9ca3af;--line:#2a2f3a;--acc:#60a5fa}}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;gap:.75rem;align-items:center;padding:.75rem 1rem;border-bottom:1px solid var(--line)}
h1{font-size:1.1rem;margin:0 1rem 0 0}main{padding:1rem;max-width:1400px;margin:auto}
.counts{display:flex;flex-wrap:wrap;gap:.5rem}.count{padding:.25rem .6rem;border:1px solid var(--line);border-radius:1rem}
.count b{font-variant-numeric:tabular-nums}button{font:inherit;padding:.3rem .7rem;border:1px solid var(--line);border-radius:.4rem;background:transparent;color:var(--fg);cursor:pointer}
button:hover{border-color:var(--acc)}nav{display:flex;gap:.25rem;margin:.5rem 0;flex-wrap:wrap}nav button[aria-selected=true]{background:var(--acc);color:#fff}
table{width:100%;border-collapse:collapse}th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mute);font-weight:600}td.url{word-break:break-all}.ok{color:var(--ok)}.bad{color:var(--bad)}.mute{color:var(--mute)}
.pager{display:flex;gap:.5rem;align-items:center;margin:.75rem 0}#err{color:var(--bad)}pre{white-space:pre-wrap;margin:.25rem 0}
@media (max-width:700px){thead{display:none}tr{display:block;border-bottom:1px solid var(--line);padding:.4rem 0}td{display:block;border:0;padding:.1rem .25rem}td:before{content:attr(data-label) ": ";color:var(--mute)}
#queues tr{display:flex;flex-wrap:wrap;align-items:center;gap:0 .5rem;padding:.2rem 0;font-size:.9em}#queues td{display:inline;padding:0}#queues td[data-label=Queue]:before,#queues td[data-label=Actions]:before{content:none}#queues td[data-label=Queue]{font-weight:600}#queues td[data-label=Settings],#queues td[data-label=Due]{display:none}#queues td[data-label=Actions]{margin-left:auto}#queues button{padding:0 .4rem}}
</style></head><body>
<header><h1>poussetaches</h1><div class="counts" id="counts"></div>
<span id="state" class="mute"></span><button id="toggle" type="button">Pause</button>
<span id="err" role="alert"></span></header>
<main><table><thead><tr><th>Queue</th><th>Waiting</th><th>Due</th><th>In flight</th><th>Lag</th><th>Settings</th><th></th></tr></thead>
<tbody id="queues"></tbody></table>
<nav role="tablist" id="tabs"></nav><div id="actions" class="pager"><input id="filter" type="search" placeholder="filter: id, URL or key" aria-label="filter"></div>
<table><thead><tr><th>ID</th><th>URL</th><th id="when">Next run</th><th>Tries</th><th id="last">Last error</th><th></th></tr></thead>
<tbody id="rows"></tbody></table>
<div class="pager"><button id="prev" type="button">Previous</button><span id="page" class="mute"></span>
<button id="next" type="button">Next</button></div></main>
<script>
"use strict";
const TABLES=["waiting","cron","success","dead"],PAGE=50;let table=TABLES.includes(location.hash.slice(1))?location.hash.slice(1):"waiting",offset=0,paused=false,open={};
const $=id=>document.getElementById(id);
function el(tag,attrs,...kids){const e=document.createElement(tag);for(const k in attrs||{})e.setAttribute(k,attrs[k]);
 for(const c of kids)e.append(c instanceof Node?c:document.createTextNode(String(c)));return e}
function when(ns){return ns?new Date(ns/1e6).toLocaleString():"-"}
async function api(method,path){const r=await fetch(path,{method,credentials:"same-origin"});
 const body=await r.json().catch(()=>({}));if(!r.ok)throw new Error(body.error||r.statusText);return body}
function act(method,path){api(method,path).then(refresh).catch(e=>{$("err").textContent=e.message})}
function decode(b){if(!b)return"";try{return new TextDecoder().decode(Uint8Array.from(atob(b),c=>c.charCodeAt(0)))}catch(e){return b}}
function pretty(b){const t=decode(b).slice(0,65536);try{return JSON.stringify(JSON.parse(t),null,2)}catch(e){return t}}
function row(t){const tr=el("tr"),done=table==="success",dead=table==="dead";
 const fine=done||(t.tries>0&&!t.last_error_body&&t.last_error_status_code===(t.expected||200));
 const last=fine?String(t.last_error_status_code||""):t.last_error_status_code?t.last_error_status_code+" "+decode(t.last_error_body).slice(0,80):"";
 const acts=el("td",{"data-label":"Actions"});const details=el("button",{type:"button"},"Details");
 details.onclick=()=>{open[t.id]=!open[t.id];refresh()};acts.append(details," ");
 if(!done){const run=el("button",{type:"button"},dead?"Redrive":"Run now");run.onclick=()=>act("POST","/tasks/"+encodeURIComponent(t.id)+"/run");acts.append(run," ")}
 const del=el("button",{type:"button"},table==="waiting"||table==="cron"?"Cancel":"Delete");
 del.onclick=()=>{if(confirm("Delete task "+t.id+"?"))act("DELETE","/tasks/"+encodeURIComponent(t.id))};acts.append(del);
 const next=done||dead?when(t.last_run):t.held?el("span",{"class":"bad"},when(t.next_run),el("div",{},"held: "+t.held)):when(t.next_run);
 tr.append(el("td",{"data-label":"ID"},t.id.slice(0,12)),el("td",{"data-label":"URL","class":"url"},t.url,t.schedule?el("div",{"class":"mute"},t.schedule):""),
  el("td",{"data-label":done||dead?"Last run":"Next run"},next),el("td",{"data-label":"Tries"},t.tries),
  el("td",{"data-label":dead?"Last error":"Last status","class":fine?"ok":last?"bad":"mute"},last||"-"),acts);
 const out=[tr];if(open[t.id]){const box=el("td",{colspan:"6"});
  box.append(el("div",{"class":"mute"},"id "+t.id+(t.cron_id?"  cron "+t.cron_id:"")+(t.idempotency_key?"  key "+t.idempotency_key:"")));
  box.append(el("div",{"class":"mute"},"payload ("+decode(t.payload).length+" chars)"),el("pre",{},pretty(t.payload)||"(empty)"));
  if(t.headers)box.append(el("div",{"class":"mute"},"headers"),el("pre",{},Object.entries(t.headers).map(h=>h[0]+": "+h[1]).join("\\n")));
  box.append(el("div",{"class":"mute"},"attempts"));
  for(const a of (t.attempts||[]).slice().reverse())box.append(el("pre",{"class":a.error===null?"ok":"bad"},
   when(a.at)+"  "+a.status+"  "+a.duration_ms+" ms"+(a.error?"  "+a.error:"")));
  if(!(t.attempts||[]).length)box.append(el("span",{"class":"mute"},"no attempts yet"));out.push(el("tr",{},box))}
 return out}
function queueRow(q){const p=q.settings.paused,b=el("button",{type:"button"},p?"Resume":"Pause"),c=q.settings.concurrency;
 const why=!q.due?"":paused?"dispatching paused":p?"queue paused":c&&q.in_flight>=c?"at its concurrency":q.settings.rate?"rate limited":"";
 b.onclick=()=>act("POST","/queues/"+encodeURIComponent(q.name)+(p?"/resume":"/pause"));
 return el("tr",{},el("td",{"data-label":"Queue"},q.name),el("td",{"data-label":"Waiting"},q.waiting),el("td",{"data-label":"Due"},q.due),
  el("td",{"data-label":"In flight"},q.in_flight),el("td",{"data-label":"Lag","class":q.oldest_due_age_s>60?"bad":""},q.oldest_due_age_s.toFixed(1)+" s"+(why?" ("+why+")":"")),
  el("td",{"data-label":"Settings","class":p?"bad":"mute"},Object.entries(q.settings).map(e=>e.join("=")).join(" ")||"-"),el("td",{"data-label":"Actions"},b))}
function actions(){const out=[$("filter")];if(table==="dead"){const r=el("button",{type:"button"},"Retry every dead task");
  r.onclick=()=>{if(confirm("Requeue every dead task?"))act("POST","/dead/retry")};
  const p=el("button",{type:"button"},"Purge dead");p.onclick=()=>{if(confirm("Delete every dead task?"))act("DELETE","/dead")};out.push(r,p)}
 return out}
async function refresh(){try{const s=await api("GET","/");paused=s.paused;$("err").textContent="";
 $("counts").replaceChildren(...TABLES.map(n=>el("span",{"class":"count"},n+" ",el("b",{},s[n]))),el("span",{"class":"count"},"in flight ",el("b",{},s.in_flight)));
 $("state").textContent=(s.paused?"paused":"running")+(s.healthy?"":" - DISK ERRORS")+(s.open_breakers.length?" - circuit open: "+s.open_breakers.join(", "):"");
 $("toggle").textContent=s.paused?"Resume":"Pause";
 $("tabs").replaceChildren(...TABLES.map(n=>{const b=el("button",{type:"button",role:"tab","aria-selected":String(n===table)},n);b.onclick=()=>{table=n;offset=0;location.hash=n;refresh()};return b}));
 $("actions").replaceChildren(...actions());
 $("when").textContent=table==="success"||table==="dead"?"Last run":"Next run";$("last").textContent=table==="dead"?"Last error":"Last status";
 $("queues").replaceChildren(...(await api("GET","/queues")).queues.map(queueRow));
 const done=table==="success"||table==="dead",q=$("filter").value.trim(),page=await api("GET","/"+table+"?limit="+PAGE+"&offset="+offset+(done?"&order=desc":table==="waiting"?"&cron=false":"")+(q?"&q="+encodeURIComponent(q):""));
 $("rows").replaceChildren(...page.tasks.flatMap(row));
 $("page").textContent=page.total?(offset+1)+"-"+(offset+page.tasks.length)+" of "+page.total+(done?", the latest first":", the soonest first"):"no tasks";
 $("prev").disabled=offset===0;$("next").disabled=offset+PAGE>=page.total}catch(e){$("err").textContent=e.message}}
window.addEventListener("hashchange",()=>{const h=location.hash.slice(1);if(TABLES.includes(h)&&h!==table){table=h;offset=0;refresh()}});
$("toggle").onclick=()=>act("POST",paused?"/resume":"/pause");
$("filter").oninput=()=>{offset=0;refresh()};
$("prev").onclick=()=>{offset=Math.max(0,offset-PAGE);refresh()};$("next").onclick=()=>{offset+=PAGE;refresh()};
refresh();setInterval(refresh,3000);
</script></body></html>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    """Speaks HTTP/1.1 keep-alive for the Api; every answer is JSON and one write.

    ``parse_request`` is our own: http.server's runs each request's headers
    through the email package, which cost more than the rest of an enqueue.
    """

    protocol_version = "HTTP/1.1"
    server_version = "poussetaches/" + __version__
    sys_version = ""
    wbufsize = -1        # buffered: status line, headers and body leave together
    timeout = 60         # an idle or stalled connection is dropped after this

    def version_string(self):
        return self.server_version

    def parse_request(self):
        """Parse the request line and headers (RFC 9112); False after an error answer.

        Strict on purpose (SPEC 5): the whole head is at most MAX_HEAD bytes,
        header names are tokens, values carry no CR or NUL, Content-Length is
        1-15 ASCII digits, and no Transfer-Encoding is accepted (we implement
        none, and one beside a Content-Length is how requests are smuggled).
        """
        self.command = None
        self.request_version = "HTTP/1.0"  # errors get a status line: we never speak 0.9
        self.close_connection = True
        # the rest of the head must come soon: a client that drips it holds a
        # connection, and is the first closed when connections run short
        self.connection.deadline = min(self.connection.deadline,
                                       time.monotonic() + self.server.head_timeout)
        self.server.reading_head(self.connection)
        self.requestline = line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if not line:
            return False
        words = line.split(" ")  # RFC 9112: exactly one SP between the three parts
        if len(words) != 3 or not _HEADER_NAME.fullmatch(words[0]) or not words[1] \
                or not _REQUEST_TARGET.fullmatch(words[1]):
            self.send_error(400, "bad request line %r" % line[:100])
            return False
        command, path, version = words
        match = re.match(r"^HTTP/([0-9])\.([0-9])\Z", version)
        if match is None:
            self.send_error(400, "bad HTTP version %r" % version[:20])
            return False
        if match.group(1) != "1":
            self.send_error(505, "HTTP/%s.%s is not supported" % match.groups())
            return False
        self.command, self.path, self.request_version = command, path, version
        self.close_connection = version == "HTTP/1.0"
        try:
            self.headers = headers = read_head(self.rfile, MAX_HEAD - len(self.raw_requestline))
        except HTTPError as exc:
            self.send_error(exc.status, exc.message)
            return False
        self.server.busy(self.connection)
        self.connection.deadline = time.monotonic() + self.server.request_timeout  # the body
        if "transfer-encoding" in headers:
            self.send_error(400, "Transfer-Encoding is not supported: send the body with "
                                 "a Content-Length")
            return False
        length = headers.get("content-length")
        if length is not None and not _CONTENT_LENGTH.fullmatch(length):
            self.send_error(400, "Content-Length must be 1 to 15 digits, got %r" % length[:20])
            return False
        if "host" not in headers and version == "HTTP/1.1":
            self.send_error(400, "an HTTP/1.1 request needs a Host header")
            return False
        connection = headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if headers.get("Expect", "").lower() == "100-continue" and version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def setup(self):
        self.timeout = self.server.request_timeout  # each send; receives: the deadline
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        self._body_state = None  # None: not read; "read"; or "skipped"
        # the wait for the request (keep-alive idleness too), its head and its
        # body must all end in request_timeout: a slow client cannot hold on
        self.connection.deadline = time.monotonic() + self.server.request_timeout
        self.server.idle(self.connection)  # closed first when connections run out
        super().handle_one_request()

    def _dispatch(self):
        api = self.server.api
        status, doc, headers = api.handle(self.command, self.path, self.headers, self._read_body)
        if self._body_state is None:  # a body the call did not need, or a refused request's
            length = self.headers.get("Content-Length")
            if length is not None and int(length) <= 65536:
                try:
                    self._read_body()  # drain it: the connection stays usable
                except HTTPError:
                    self._unread_input()
            elif length is not None:
                self._unread_input()
        self.send_json(status, doc, headers)

    def _unread_input(self):
        """Close after answering, and linger: closing with unread input sends a
        reset, which can destroy the answer before the client has read it."""
        self.close_connection = True
        self.connection.linger = True

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def __getattr__(self, name):
        # any other method gets a 405 with Allow (or 404), not http.server's 501
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _read_body(self):
        """The request body; HTTPError for a missing, bad or too large length."""
        length = self.headers.get("Content-Length")  # 1-15 digits: parse_request checked
        if length is None:
            self._body_state = "read"
            return b""
        size = int(length)
        if size > self.server.max_body:
            self._body_state = "skipped"
            self._unread_input()
            raise HTTPError(413, "the body is %d bytes, more than the %d allowed (--max-body)"
                            % (size, self.server.max_body))
        try:
            body = self.rfile.read(size)
        except socket.timeout:
            self._body_state = "skipped"
            self.close_connection = True
            raise HTTPError(408, "the body did not arrive within %.0fs"
                            % self.server.request_timeout) from None
        self._body_state = "read"
        if len(body) != size:
            self.close_connection = True
            raise HTTPError(400, "the body ended after %d of %d bytes" % (len(body), size))
        return body

    def send_json(self, status, doc, headers=None):
        """Write one answer: JSON, Raw bytes, or a Stream (chunked on HTTP/1.1)."""
        stream = isinstance(doc, Stream)
        if isinstance(doc, (Raw, Stream)):
            content_type, body = doc
        else:
            content_type = "application/json"
            body = _compact(doc).encode() + b"\n"
        self.log_request(status, "-" if stream else len(body))
        head = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                "Server: " + self.server_version, "Date: " + self.server.http_date(),
                "Content-Type: " + content_type, "X-Content-Type-Options: nosniff"]
        if not stream:
            head.append("Content-Length: %d" % len(body))
        elif self.request_version == "HTTP/1.1":
            head.append("Transfer-Encoding: chunked")
        else:
            self.close_connection = True  # HTTP/1.0: the end of the body is the close
        head.extend("%s: %s" % item for item in (headers or {}).items())
        if self.close_connection:
            head.append("Connection: close")
        head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD":
            self.wfile.write(head)
        elif not stream:
            self.wfile.write(head + body)  # one write
        else:
            self.wfile.write(head)
            chunked = self.request_version == "HTTP/1.1"
            for piece in body:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, headers too long) as JSON."""
        self.close_connection = True
        self.connection.linger = True  # input may follow: never answer with a reset
        try:
            self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def log_message(self, format, *args):
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    """The API server: a thread per connection, at most ``max_connections`` of
    them, and at most ``max_per_address`` from one client address.

    Each connection is idle (waiting for a request), reading a head (which
    must come within ``head_timeout``) or busy.  Past a cap, the accepting
    thread closes one connection that is not busy, an idle one first, then
    the one whose head has been coming longest, and waits for its thread to
    end (new connections queue in the listen backlog meanwhile): clients
    that open sockets and send nothing, or drip their heads, cannot keep the
    app or a health check out.  A connection over the per-address cap with
    nothing of its address to close is answered 503 and closed.  ``_slots``
    guards ``_active``, ``_state``, ``_by_address`` and ``_closing``; a
    connection's thread notifies it as it ends.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024   # bursts of clients must not see resets

    def __init__(self, address, api, max_body, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 max_connections=DEFAULT_MAX_CONNECTIONS, max_per_address=DEFAULT_MAX_PER_ADDRESS,
                 head_timeout=DEFAULT_HEAD_TIMEOUT):
        self.api = api
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._date = (0, "")
        self._slots = threading.Condition()
        self._active = 0            # connections accepted and not yet closed
        self._state = {}            # their sockets -> (0 idle | 1 head, since); busy: absent
        self._by_address = {}       # client address -> its sockets
        self._address = {}          # socket -> its client address
        self._shut = set()          # sockets shut down whose threads have not ended yet
        self._refused = 0           # connections refused over the per-address cap
        self._refused_logged = -60.0
        self._closing = False
        self._stopped = threading.Event()    # serve_forever() has returned
        self._wake = os.pipe()               # a byte here ends serve_forever's select
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # --host ::1 or --host ::
        super().__init__(address, _Handler)

    def get_request(self):
        with self._slots:
            while self._active >= self.max_connections and not self._closing:
                if not self._shut:
                    self._close_one(self._state)
                self._slots.wait()
        sock, address = super().get_request()
        sock = DeadlineSocket.adopt(sock)
        with self._slots:
            mine = self._by_address.setdefault(address[0], set())
            while len(mine) >= self.max_per_address and not self._closing:
                if not (self._shut & mine or self._close_one(mine)):
                    if not mine:
                        del self._by_address[address[0]]
                    self._refuse(sock, address[0])
                    raise OSError("too many connections from " + address[0])
                self._slots.wait()
            self._active += 1
            mine.add(sock)
            self._address[sock] = address[0]
            self._state[sock] = (0, time.monotonic())
        return sock, address

    def _close_one(self, among):
        """Shut down the idle connection, or the oldest head still coming, of
        ``among`` (its thread's read ends and the thread exits); False if all
        are busy.  The caller holds ``_slots``."""
        candidates = [(self._state[sock], sock) for sock in among if sock in self._state]
        if not candidates:
            return False
        sock = min(candidates, key=lambda c: c[0])[1]
        del self._state[sock]
        self._shut.add(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def _refuse(self, sock, address):
        """Answer 503 and close; a warning at most once a minute (a flood of
        refused connections must not flood the log).  Caller holds ``_slots``."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 60:
            self._refused_logged = now
            logger.warning("refused a connection from %s: it holds %d, the most one address "
                           "may (--max-connections-per-address); %d refused so far",
                           address, self.max_per_address, self._refused,
                           extra={"event": "refused", "origin": address})
        try:
            sock.settimeout(0.5)
            body = b'{"error":"too many connections from your address: close some and retry"}\n'
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        except OSError:
            pass
        sock.close()

    def idle(self, sock):
        with self._slots:
            if sock not in self._shut:
                self._state[sock] = (0, time.monotonic())

    def reading_head(self, sock):
        with self._slots:
            if sock not in self._shut:
                self._state[sock] = (1, time.monotonic())

    def busy(self, sock):
        with self._slots:
            self._state.pop(sock, None)

    def _release(self, sock):
        with self._slots:
            self._active -= 1
            self._state.pop(sock, None)
            self._shut.discard(sock)
            address = self._address.pop(sock, None)
            socks = self._by_address.get(address)
            if socks is not None:
                socks.discard(sock)
                if not socks:
                    del self._by_address[address]
            self._slots.notify()

    def serve_forever(self, poll_interval=None):
        """Accept connections until shutdown().  socketserver's own loop notices
        a shutdown only at its next poll; here a pipe wakes the select at once."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake[0], selectors.EVENT_READ)
                while not self._closing:
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._closing:
                            self._handle_request_noblock()
        finally:
            self._stopped.set()

    def server_close(self):
        super().server_close()
        for fd in self._wake:
            os.close(fd)
        self._wake = ()

    def shutdown(self):
        """Stop serve_forever() (it must be running) and wait until it has."""
        with self._slots:
            self._closing = True
            self._slots.notify_all()
        os.write(self._wake[1], b"x")
        self._stopped.wait()

    def http_date(self):
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        cached = self._date  # (second, text): replaced whole, so read without a lock
        if cached[0] != now:
            cached = self._date = (now, email.utils.formatdate(now, usegmt=True))
        return cached[1]

    def shutdown_request(self, request):
        if getattr(request, "linger", False):
            # a lingering close: stop writing, read what the client still sends
            # (for a second, up to 1 MiB), then close without a reset
            try:
                request.shutdown(socket.SHUT_WR)
                request.settimeout(0.2)
                deadline, drained = time.monotonic() + 1.0, 0
                while drained < 1 << 20 and time.monotonic() < deadline:
                    chunk = request.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass
        super().shutdown_request(request)
        self._release(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            logger.debug("connection from %s dropped: %s", client_address[0], exc)
        else:
            logger.exception("error on a connection from %s", client_address[0])


# --------------------------------------------------------------------------
# Client: the PousseTaches class apps import
# --------------------------------------------------------------------------

class Envelope:
    """What ``PousseTaches.parse`` gives a task handler; inside a task function,
    ``current_task()`` gives the same, with the task's ``name``."""

    __slots__ = ("req_id", "tries", "payload", "task_id", "raw_payload", "queue", "name")

    def __init__(self, req_id, tries, payload, task_id=None, raw_payload=b"", queue=None,
                 name=None):
        self.req_id = req_id
        self.tries = tries
        self.payload = payload
        self.task_id = task_id
        self.raw_payload = raw_payload
        self.queue = queue
        self.name = name

    def __repr__(self):
        return "Envelope(task_id=%r, req_id=%r, tries=%r)" % (self.task_id, self.req_id, self.tries)


# the delivery a task function runs for: a context variable, so each thread
# and each asyncio task sees its own (the decimal module keeps its context so)
_current_task = contextvars.ContextVar("poussetaches_current_task", default=None)


def current_task():
    """The Envelope of the delivery the calling task function runs for (its
    ``task_id``, ``tries``, ``req_id``, ``queue`` and ``name``), or None when
    the function was called directly.  Safe from threads and coroutines."""
    return _current_task.get()


def _task_options(options):
    """Enqueue options of a task function, checked as the daemon will: TypeError
    for an unknown one, ValueError (the daemon's message) for a bad value.
    None means "not set"."""
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise TypeError("unknown task option %s; the options are %s"
                        % (", ".join(unknown), ", ".join(TASK_OPTIONS)))
    for name, value in options.items():
        if value is not None and not ENQUEUE[name].fits(value):
            raise ValueError(ENQUEUE[name].message)
    return options


def _module_name(fn):
    """A function's module name, the same whether its file runs as a script
    (``python app.py``: ``__main__``) or is imported (``gunicorn app:app``)."""
    name = fn.__module__
    main = sys.modules.get("__main__")
    if name == "__main__" and main is not None:
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:          # python -m package.app
            return spec.name
        if getattr(main, "__file__", None):         # python app.py
            return os.path.splitext(os.path.basename(main.__file__))[0]
    return name


def _calls_of(calls):
    """push_many's calls as (args, kwargs): a tuple or list is positional
    arguments, a dict keyword arguments."""
    out = []
    for call in calls:
        if isinstance(call, (tuple, list)):
            out.append((tuple(call), {}))
        elif isinstance(call, dict):
            out.append(((), call))
        else:
            raise TypeError("push_many takes tuples of positional arguments or dicts of "
                            "keyword arguments (a lone dict argument: (d,)), got %r" % (call,))
    return out


class TaskFunction:
    """A function made a task by ``PousseTaches.task``.  Calling it calls the
    function, as before; ``push`` enqueues a call of it, which the daemon
    delivers to the app's task endpoint, which runs it.

    ``name`` is what travels with the task (the last segment of its URL);
    ``defaults`` are the enqueue options (TASK_OPTIONS) of every push.
    """

    def __init__(self, client, fn, name, defaults):
        functools.update_wrapper(self, fn)
        self.client, self.fn, self.name, self.defaults = client, fn, name, defaults
        # through functools.wraps decorators too; the endpoint awaits what a sync one returns
        self.is_async = inspect.iscoroutinefunction(inspect.unwrap(fn))

    def __repr__(self):
        return "<task %s>" % self.name

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def options(self, **options):
        """This task with other enqueue options for the pushes made through it:
        ``send.options(delay_s=60, queue="mail").push(...)``; None unsets one."""
        return TaskFunction(self.client, self.fn, self.name,
                            dict(self.defaults, **_task_options(options)))

    def push(self, *args, **kwargs):
        """Enqueue a call with these arguments, which must be JSON (TypeError here
        if not); returns the task's id (from AsyncPousseTaches, a coroutine of it)."""
        return self.client._push_calls(self, self.defaults, [(args, kwargs)], single=True)

    def push_many(self, calls):
        """Enqueue many calls in one batch call (all or nothing): each a tuple of
        positional arguments or a dict of keyword arguments; returns their ids."""
        return self.client._push_calls(self, self.defaults, _calls_of(calls))

    def schedule(self, name, spec, *args, **kwargs):
        """Register the named cron ``name`` calling this task on ``spec`` (a cron
        spec, or @every 1h); posting it again with another spec replaces it."""
        options = dict(self.defaults, name=name, schedule=spec)
        return self.client._push_calls(self, options, [(args, kwargs)], single=True)


class EagerCall:
    """A push in eager mode, as the task will run: its ``id``, ``task``, the
    ``args`` and ``kwargs`` back from their JSON, the enqueue ``options``,
    and once dead, the ``reason``.  ``run()`` runs it now."""

    __slots__ = ("id", "task", "args", "kwargs", "options", "reason")

    def __init__(self, task, args, kwargs, options):
        self.id, self.task, self.args, self.kwargs = new_id(), task, args, kwargs
        self.options, self.reason = options, None

    def __repr__(self):
        return "EagerCall(%s, args=%r, kwargs=%r)" % (self.task.name, self.args, self.kwargs)

    def run(self):
        """Run it now, as a delivery would (a one-off leaves ``pending``; a cron
        stays); returns the function's result (a coroutine of it in async)."""
        client = self.task.client
        if not self.options.get("schedule") and self in client.pending:
            client.pending.remove(self)
        return client._run_eager(self)


class GetTask:
    """A task from a listing, with the original client's fields, decoded:
    ``task_id`` for ``id``, ``payload`` parsed as JSON (or text), times as
    datetimes, the error body as text; every other field of TASK_FIELDS as
    it is, plus ``state`` and the ``raw`` JSON."""

    FIELDS = ("task_id",) + TASK_NAMES[1:] + ("state", "raw")
    __slots__ = FIELDS

    def __init__(self, **fields):
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))

    def __repr__(self):
        return "GetTask(task_id=%r, url=%r, tries=%r)" % (self.task_id, self.url, self.tries)

    def __eq__(self, other):
        return isinstance(other, GetTask) and self.raw == other.raw

    @classmethod
    def from_json(cls, doc):
        fields = {"task_id": doc["id"], "state": doc.get("state"), "raw": doc}
        for field in TASK_FIELDS[1:]:
            value = doc.get(field.name)
            if field.kind == "bytes" and value is not None:
                value = base64.b64decode(value)
                if field.name == "payload":
                    try:
                        value = json.loads(value)
                    except ValueError:
                        value = value.decode("utf-8", "replace")
                else:
                    value = value.decode("utf-8", "replace")
            elif field.kind == "time":
                value = datetime.fromtimestamp(value / 1e9) if value else None
            fields[field.name] = value
        if fields["next_run"] is None:
            fields["next_run"] = datetime.fromtimestamp(0)
        return cls(**fields)


def _not_the_daemon(status, text):
    """The error for an answer that is not a poussetaches daemon's."""
    return ClientError(status, "the answer (%d, %r) is not from a poussetaches daemon: check "
                               "its URL (--url, POUSSETACHES_URL)" % (status, text[:60]))


def _answer(status, text):
    """The JSON of an API answer; ClientError for a 4xx or 5xx, with its message,
    and for an answer that is not JSON: no daemon of ours sent it."""
    try:
        doc = json.loads(text)
    except ValueError:  # an empty body too: every answer of the daemon is an object
        doc = None
    if not isinstance(doc, dict):
        raise _not_the_daemon(status, text)
    if status >= 400:
        message = doc.get("error") if isinstance(doc, dict) else None
        raise ClientError(status, "the daemon answered %d: %s" % (status, message or "?"))
    return doc


def _env(name, default=None):
    """An environment variable; set but empty counts as unset."""
    value = os.environ.get(name)
    return default if value in (None, "") else value


def api_url_of(text):
    """The daemon's URL from ``http://host:port``, ``host:port`` or a bare host
    (http assumed); ConfigError naming the value when it is none of those."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("the daemon's URL must look like http://127.0.0.1:7991 or "
                          "127.0.0.1:7991, got %r" % text)
    return url



def _header(headers, name):
    """A header from a dict-like of any framework, case-insensitively (Django META too)."""
    value = headers.get(name) if hasattr(headers, "get") else None
    if value is None and hasattr(headers, "get"):
        value = headers.get(name.lower())   # the task endpoint's dict
    if value is None and hasattr(headers, "items"):
        lower = name.lower()
        meta = "HTTP_" + name.upper().replace("-", "_")
        for key, item in headers.items():
            if isinstance(key, str) and (key.lower() == lower or key == meta):
                return item
    return value


def _close_held(holder):
    """A finished thread's connection, closed (its PousseTaches' finalizer)."""
    if holder[0] is not None:
        holder[0].close()


def _run_coroutine(awaitable):
    """Run an async task function from sync code: in a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(awaitable))
    awaitable.close()
    raise RuntimeError("an async task runs eagerly from a running event loop: push it "
                       "with AsyncPousseTaches (await task.push(...)) there")


async def _awaited(awaitable):
    return await awaitable


def _drive(coroutine):
    """Run to its end a coroutine that never suspends: the eager run of a sync
    task, so that one loop of retries serves both kinds of functions."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a task function returned an awaitable: make it async def, or "
                       "keep functools.wraps on the decorator around it")


def _plain(status, text, headers=()):
    """An answer of the task endpoint: (status, extra headers, UTF-8 text)."""
    return status, list(headers), text.encode("utf-8", "replace")


async def _asgi_lifespan(receive, send):
    """Answer an ASGI server's lifespan events: the endpoint has nothing to set up."""
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _ApiCalls:
    """The daemon's calls, written once for both clients: each returns what
    the client's ``_call`` returns, the answer in PousseTaches and a
    coroutine of it in AsyncPousseTaches.  ``then`` makes the answer's JSON
    into what the method returns."""

    def pause(self):
        return self._call("POST", "/pause")

    def resume(self):
        return self._call("POST", "/resume")

    def _get_tasks(self, table):
        """A table's tasks, all of them (as the original's client)."""
        return self._call("GET", "/" + table,
                          then=lambda doc: [GetTask.from_json(t) for t in doc["tasks"]])

    def get_cron(self):
        return self._get_tasks("cron")

    def get_success(self):
        return self._get_tasks("success")

    def get_waiting(self):
        return self._get_tasks("waiting")

    def get_dead(self):
        return self._get_tasks("dead")

    # -- our calls ----------------------------------------------------------------

    def enqueue(self, body):
        """POST an enqueue body as it is (the HTTP API's fields); returns the task's JSON."""
        return self._call("POST", "/", body)

    def listing(self, table, limit=None, offset=0, **filters):
        """A table's JSON answer ({"tasks", "total", ...}), a page of it with ``limit``;
        ``filters``: queue, url_prefix, q (None: not given)."""
        query = {} if limit is None else {"limit": limit, "offset": offset}
        query.update((k, v) for k, v in filters.items() if v is not None)
        return self._call("GET", "/" + table + (
            "?" + urllib.parse.urlencode(query) if query else ""))

    def queues(self):
        return self._call("GET", "/queues", then=operator.itemgetter("queues"))

    def queue(self, name):
        return self._call("GET", "/queues/" + name)

    def set_queue(self, name, **settings):
        """Change some of a queue's settings (None: back to the default)."""
        return self._call("PUT", "/queues/" + name, settings)

    def pause_queue(self, name):
        return self._call("POST", "/queues/%s/pause" % name)

    def resume_queue(self, name):
        return self._call("POST", "/queues/%s/resume" % name)

    def delete_queue(self, name):
        return self._call("DELETE", "/queues/" + name)

    def status(self):
        return self._call("GET", "/")

    def get_task(self, task_id):
        """The task (a GetTask with ``state``); raises ClientError(404) if unknown."""
        return self._call("GET", "/tasks/" + task_id, then=GetTask.from_json)

    def cancel(self, task_id):
        return self._call("DELETE", "/tasks/" + task_id)

    def run(self, task_id, **overrides):
        """Run a waiting task now or redrive a dead one, with optional overrides."""
        return self._call("POST", "/tasks/%s/run" % task_id, overrides or None,
                          then=GetTask.from_json)

    def retry_dead(self, url_prefix=""):
        """Requeue the dead tasks (those whose URL starts with ``url_prefix``); how many."""
        query = "?url_prefix=" + urllib.parse.quote(url_prefix, safe="") if url_prefix else ""
        return self._call("POST", "/dead/retry" + query, then=operator.itemgetter("requeued"))

    def purge_dead(self):
        """Drop every dead task; returns how many."""
        return self._call("DELETE", "/dead", then=operator.itemgetter("deleted"))

    def delete_cron(self, task_id=None):
        """Remove one cron task (by id), or every one; returns how many."""
        if task_id is None:
            return self._call("DELETE", "/cron", then=operator.itemgetter("deleted"))
        return self._call("DELETE", "/tasks/" + task_id, then=lambda doc: 1)

    def preview_cron(self, schedule, n=5):
        """The next ``n`` run times of a spec as ISO strings; ClientError(400) if invalid."""
        query = urllib.parse.urlencode({"schedule": schedule, "n": n})
        return self._call("GET", "/cron/preview?" + query,
                          then=operator.itemgetter("next_runs_iso"))




class _AppSide:
    """The app's side, written once for both clients: the keys ``parse``
    checks, the task functions and the endpoint that runs them (WSGI and
    ASGI), and eager mode for tests.  Each client pushes in its own way
    (``_push_calls``, ``_run_eager``)."""

    def _init_app_side(self, base_url, auth_key, insecure, tasks_path, eager, task_context):
        self.base_url = base_url
        # a callable giving the context manager each task function runs in (Flask:
        # app.app_context), or None
        self.task_context = task_context
        if auth_key is None:
            auth_key = [_env("POUSSETACHES_AUTH_KEY"), _env("POUSSETACHES_NEXT_AUTH_KEY")]
        self.auth_key = auth_key  # checked: any of them authenticates
        self.insecure = insecure
        if insecure and not self.auth_keys:
            logger.warning("insecure=True and no auth key: this app runs every delivery "
                           "anyone sends it; set POUSSETACHES_AUTH_KEY on both sides")
        if not re.fullmatch(r"(/[A-Za-z0-9_.~-]+)+", tasks_path):
            raise ConfigError("tasks_path must look like /_tasks, got %r" % tasks_path)
        self.tasks_path = tasks_path
        self.tasks = {}         # name -> TaskFunction: what the endpoint runs
        self.eager = eager      # tests: pushes of task functions run in-process
        self.pending = []       # eager: EagerCalls delayed, with an eta or a schedule
        self.dead = []          # eager: EagerCalls rejected, or retried max_tries times

    @property
    def auth_key(self):
        """The first key ``parse`` accepts ("" when none), as in the original client;
        setting it sets the only key."""
        return self.auth_keys[0] if self.auth_keys else ""

    @auth_key.setter
    def auth_key(self, keys):
        """A key or a list of keys (None and "" ignored); ConfigError for a bad one."""
        keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
        keys = tuple(key for key in keys if key is not None and key != "")
        for key in keys:
            problem = auth_key_problem(key)
            if problem is not None:
                raise ConfigError(problem)
        self.auth_keys = keys

    # -- checking a delivery -----------------------------------------------------

    def parse(self, request=None, headers=None, body=None, tolerance=300, now=None):
        """Check and decode a task request: a Flask/Werkzeug or Django request, or
        ``headers`` and ``body``.  Returns an Envelope with the decoded payload.

        Raises AuthError unless the request carries one of the auth keys or a
        valid Standard Webhooks signature by one, within ``tolerance`` seconds;
        with no key configured, always, unless the client was made with
        ``insecure=True``.  InvalidEnvelope if the body is not an envelope.
        """
        if request is not None:
            headers = getattr(request, "headers", None) or getattr(request, "META", {})
            if hasattr(request, "get_data"):
                body = request.get_data()
            else:
                body = getattr(request, "body", None)
                if body is None:
                    body = getattr(request, "data", b"")
        headers = headers or {}
        body = body.encode() if isinstance(body, str) else bytes(body or b"")
        signed_id = self._check_auth(headers, body, tolerance, time.time() if now is None else now)
        try:
            envelope = json.loads(body)
            raw = base64.b64decode(envelope["payload"] or "", validate=True)
            tries, req_id = envelope["tries"], envelope["req_id"]
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise InvalidEnvelope("the body is not a poussetaches envelope "
                                  '{"payload", "tries", "req_id"}') from None
        try:
            payload = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            payload = raw
        # a signed delivery's task id is the signed one (the header is not signed)
        task_id = signed_id if signed_id is not None else _header(headers, "Poussetaches-Task-ID")
        return Envelope(req_id, tries, payload, task_id, raw, _header(headers, "Poussetaches-Queue"))

    def _check_auth(self, headers, body, tolerance, now):
        """None when the request carries an auth key, the signed webhook-id when it
        carries a valid signature; AuthError otherwise.  ``body`` None checks all
        but the signature itself: what can be refused before reading a body."""
        if not self.auth_keys:
            if self.insecure:
                return None
            raise AuthError("no auth key is configured, so no delivery is trusted: set "
                            "POUSSETACHES_AUTH_KEY to the same secret for the daemon and the "
                            "app (or pass insecure=True to run unauthenticated deliveries)")
        given = _header(headers, "Poussetaches-Auth-Key")
        if given is not None and any(hmac.compare_digest(str(given).encode(), key.encode())
                                     for key in self.auth_keys):
            return None
        wrong_key = given is not None
        signatures = _header(headers, "webhook-signature")
        msg_id = _header(headers, "webhook-id")
        stamp = _header(headers, "webhook-timestamp")
        if signatures and msg_id and stamp:
            try:
                stamp = int(stamp)
            except ValueError:
                raise AuthError("webhook-timestamp is not a number") from None
            if abs(now - stamp) > tolerance:
                raise AuthError("webhook-timestamp is more than %ds away from now" % tolerance)
            if body is None:
                return msg_id
            expected = [sign(key, msg_id, stamp, body).encode() for key in self.auth_keys]
            for candidate in str(signatures).split():
                if any(hmac.compare_digest(candidate.encode(), one) for one in expected):
                    return msg_id
            raise AuthError("webhook-signature does not match: the daemon and the app do not "
                            "share the same POUSSETACHES_AUTH_KEY")
        if wrong_key:
            raise AuthError("Poussetaches-Auth-Key does not match: the daemon and the app do "
                            "not share the same POUSSETACHES_AUTH_KEY")
        raise AuthError("the request carries neither poussetaches' auth key nor a signature")

    # -- task functions ----------------------------------------------------------

    def task(self, fn=None, *, name=None, **options):
        """Make a function, sync or async, a task: ``@pt.task`` or
        ``@pt.task(name="mail.send", queue="mail", max_tries=5)``.

        The options are TASK_OPTIONS, the enqueue fields of every push.
        ``name`` (default ``module.qualname``) travels with each task: a
        function renamed with ``name=`` set to its old name still gets the
        tasks queued before.  Returns a TaskFunction.
        """
        defaults = _task_options(options)

        def make(fn):
            task_name = name or "%s.%s" % (_module_name(fn), fn.__qualname__)
            if not TASK_NAME.fullmatch(task_name):
                raise ValueError("task name %r must be 1 to 200 of A-Z, a-z, 0-9, _, . and -, "
                                 "starting with a letter or _: pass name=" % task_name)
            known = self.tasks.get(task_name)
            if known is not None and (known.fn.__module__, known.fn.__qualname__) != (
                    fn.__module__, fn.__qualname__):  # the same function reloaded is fine
                raise ValueError("two task functions are named %r: give one a name=" % task_name)
            made = self.tasks[task_name] = TaskFunction(self, fn, task_name, defaults)
            return made
        return make if fn is None else make(fn)

    def _encode_call(self, task, args, kwargs):
        """A call's payload: {"task", "args", "kwargs"} as JSON bytes (the task's name
        inside the signed body: a delivery cannot be replayed to another task);
        TypeError if they are not JSON."""
        try:
            return json.dumps({"task": task.name, "args": args, "kwargs": kwargs},
                              separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError("the arguments of task %s must be JSON (str, int, float, bool, "
                            "None, lists and dicts of them): %s" % (task.name, exc)) from None

    def _call_bodies(self, task, options, calls):
        """The enqueue bodies of calls of ``task`` with ``options``."""
        if not self.base_url:
            raise ConfigError("base_url is not set: PousseTaches(api_url, base_url) needs the "
                              "app's own URL, where the daemon delivers tasks")
        url = self.base_url.rstrip("/") + self.tasks_path + "/" + task.name
        extra = {key: value for key, value in options.items() if value is not None}
        return [dict(extra, url=url, payload=b64(self._encode_call(task, args, kwargs)))
                for args, kwargs in calls]

    def _eager_calls(self, task, options, calls):
        """Eager pushes, through the JSON round trip: (every EagerCall, those to
        run now); the delayed, eta and cron ones are kept in ``pending``."""
        options = {key: value for key, value in options.items() if value is not None}
        made = []
        for args, kwargs in calls:
            call = json.loads(self._encode_call(task, args, kwargs))
            made.append(EagerCall(task, call["args"], call["kwargs"], options))
        if "name" in options:  # a named cron replaces the one of its name
            self.pending[:] = [c for c in self.pending if c.options.get("name") != options["name"]]
        if options.get("delay_s") or "eta" in options or "schedule" in options:
            self.pending.extend(made)
            return made, []
        return made, made

    async def _attempts(self, call):
        """Run an eager call as the deliveries would: Retry runs it again, up to
        its max_tries; Reject, or Retry on the last try, moves it to ``dead``;
        any other exception propagates.  The function's result, or None."""
        max_tries = call.options.get("max_tries") or DEFAULT_MAX_TRIES
        for tries in range(1, max_tries + 1):
            token = _current_task.set(Envelope(
                "eager", tries, {"args": call.args, "kwargs": call.kwargs}, call.id,
                queue=call.options.get("queue", DEFAULT_QUEUE), name=call.task.name))
            try:
                return await self._run_task(call.task, call.args, call.kwargs)
            except Retry as exc:
                call.reason = "Retry: %s" % exc
            except Reject as exc:
                call.reason = str(exc)
                break
            finally:
                _current_task.reset(token)
        self.dead.append(call)
        return None

    async def _run_task(self, task, args, kwargs):
        """Call a task function in ``task_context``: a sync one here (an eager
        run of it never suspends), an async one awaited; the result."""
        with self.task_context() if self.task_context else contextlib.nullcontext():
            result = task.fn(*args, **kwargs)
            return (await result) if inspect.isawaitable(result) else result

    def _run_in_thread(self, task, args, kwargs):
        """A sync task function under the ASGI endpoint, in a worker thread."""
        return _drive(self._run_task(task, args, kwargs))

    def run_pending(self):
        """Eager mode: run every kept one-off call (crons stay kept); how many ran
        (from AsyncPousseTaches, a coroutine of it)."""
        calls = [call for call in self.pending if not call.options.get("schedule")]
        self.pending[:] = [call for call in self.pending if call.options.get("schedule")]
        return self._run_many(calls)

    # -- the endpoint --------------------------------------------------------------

    def _precheck(self, method, headers):
        """Refuse what can be refused before reading a delivery's body (a wrong
        method, no or a wrong key, no signature, a stale one): HTTPError."""
        if method != "POST":
            raise HTTPError(405, "the task endpoint takes POST only", {"Allow": "POST"})
        try:
            self._check_auth(headers, None, 300, time.time())
        except AuthError as exc:
            raise HTTPError(403, str(exc)) from None

    def _admit(self, path, headers, body):
        """Check a delivery to the task endpoint before any task code runs: its
        (task, envelope, args, kwargs); HTTPError for a refusal."""
        try:
            envelope = self.parse(headers=headers, body=body)
        except AuthError as exc:
            raise HTTPError(403, str(exc)) from None
        except InvalidEnvelope as exc:
            raise HTTPError(400, str(exc)) from None
        name = path.rsplit("/", 1)[-1]
        task = self.tasks.get(name)
        if task is None:
            raise HTTPError(404, "no task %r in this app (a deploy under way?); it has %s" % (
                name, ", ".join(sorted(self.tasks)) or "none: is the module defining them "
                "imported before the app serves?"))
        call = envelope.payload
        if not (isinstance(call, dict) and isinstance(call.get("args"), list)
                and isinstance(call.get("kwargs"), dict)):
            raise HTTPError(400, 'the payload of a task function is {"task", "args": [...], '
                                 '"kwargs": {...}}: was it pushed with .push()?')
        if call.get("task") != name:
            raise HTTPError(403, "this delivery is for task %r, not %r"
                            % (str(call.get("task"))[:200], name))
        envelope.name = name
        return task, envelope, call["args"], call["kwargs"]

    def _endpoint_prefix(self):
        """The endpoint's path prefix; a warning now if it is to refuse everything."""
        if not self.auth_keys and not self.insecure:
            logger.warning("the task endpoint has no auth key, so it will refuse every "
                           "delivery: set POUSSETACHES_AUTH_KEY for the app, as for the daemon")
        return self.tasks_path + "/"

    @staticmethod
    def _outcome(envelope, exc):
        """The endpoint's answer when a task function returned (exc None) or raised."""
        if exc is None:
            return _plain(200, "")
        if isinstance(exc, Retry):
            # the header tells the daemon's circuit breaker that the app is up: a
            # task asking for later is not its origin down
            after = [("Poussetaches-Outcome", "retry")] + ([] if exc.after is None else [
                ("Retry-After", str(max(0, math.ceil(exc.after))))])
            return _plain(503, "Retry: %s" % (str(exc) or "asked by the task"), after)
        if isinstance(exc, Reject):
            return _plain(410, "Reject: %s" % (str(exc) or "asked by the task"))
        logger.error("task %s (%s, try %s) failed", envelope.name, envelope.task_id,
                     envelope.tries, exc_info=exc)
        return _plain(500, "%s: %s" % (type(exc).__name__, exc))

    def wsgi(self, app=None):
        """The task endpoint as a WSGI app.  Alone, it takes every path, a task's
        name being the path's last segment: mount it under ``tasks_path``.
        Given ``app``, it wraps it: requests under ``tasks_path`` are
        deliveries, the others go to ``app``.  Flask:
        ``app.wsgi_app = pt.wsgi(app.wsgi_app)``; Django's wsgi.py:
        ``application = pt.wsgi(get_wsgi_application())``.
        """
        prefix = self._endpoint_prefix()

        def endpoint(environ, start_response):
            path = environ.get("PATH_INFO") or "/"
            if app is not None and not path.startswith(prefix):
                return app(environ, start_response)
            try:
                headers = {key[5:].replace("_", "-").lower(): value
                           for key, value in environ.items() if key.startswith("HTTP_")}
                self._precheck(environ.get("REQUEST_METHOD"), headers)
                task, envelope, args, kwargs = self._admit(path, headers, _wsgi_body(environ))
                token = _current_task.set(envelope)
                try:
                    run = self._run_task(task, args, kwargs)
                    _run_coroutine(run) if task.is_async else _drive(run)
                    answer = self._outcome(envelope, None)
                except Exception as exc:  # the function's: a 500 with its text, 503, 410
                    answer = self._outcome(envelope, exc)
                finally:
                    _current_task.reset(token)
            except HTTPError as exc:
                answer = _plain(exc.status, exc.message, exc.headers.items())
            except Exception:  # ours: said plainly, logged, never the framework's page
                logger.exception("the task endpoint failed on %s", path)
                answer = _plain(500, "the task endpoint failed: see the app's log")
            status, extra, data = answer
            start_response("%d %s" % (status, http.client.responses.get(status, "")),
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data)))] + extra)
            return [data]
        return endpoint

    def asgi(self, app=None):
        """The task endpoint as an ASGI app: as ``wsgi``.  FastAPI or Starlette:
        ``app.mount(pt.tasks_path, pt.asgi())``.  An async task function runs
        in the server's loop, a sync one in a thread (``asyncio.to_thread``)."""
        prefix = self._endpoint_prefix()

        async def endpoint(scope, receive, send):
            if app is not None and (scope["type"] != "http" or not _asgi_path(scope).startswith(
                    prefix)):
                return await app(scope, receive, send)
            if scope["type"] == "lifespan":
                return await _asgi_lifespan(receive, send)
            if scope["type"] != "http":
                raise ValueError("the task endpoint serves HTTP only, not %s" % scope["type"])
            try:
                headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                           for name, value in scope["headers"]}
                self._precheck(scope["method"], headers)
                task, envelope, args, kwargs = self._admit(
                    scope["path"], headers, await _asgi_body(receive))
                token = _current_task.set(envelope)  # to_thread copies the context
                try:
                    if task.is_async:
                        await self._run_task(task, args, kwargs)
                    else:
                        await asyncio.to_thread(self._run_in_thread, task, args, kwargs)
                    answer = self._outcome(envelope, None)
                except Exception as exc:
                    answer = self._outcome(envelope, exc)
                finally:
                    _current_task.reset(token)
            except HTTPError as exc:
                answer = _plain(exc.status, exc.message, exc.headers.items())
            except Exception:
                logger.exception("the task endpoint failed on %s", scope["path"])
                answer = _plain(500, "the task endpoint failed: see the app's log")
            status, extra, data = answer
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(data)).encode())] + [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in extra]})
            await send({"type": "http.response.body", "body": data})
        return endpoint


def _wsgi_body(environ):
    """A delivery's body from a WSGI environ; HTTPError 400 or 413.  Without a
    Content-Length (chunked, through a proxy), read to the end where the
    server says the input ends (gunicorn's wsgi.input_terminated)."""
    if not environ.get("CONTENT_LENGTH") and environ.get("wsgi.input_terminated"):
        body = environ["wsgi.input"].read(MAX_DELIVERY_BODY + 1)
        if len(body) > MAX_DELIVERY_BODY:
            raise HTTPError(413, "a delivery is at most %d bytes" % MAX_DELIVERY_BODY)
        return body
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if length < 0:
        raise HTTPError(400, "Content-Length must be a whole number of bytes")
    if length > MAX_DELIVERY_BODY:
        raise HTTPError(413, "a delivery is at most %d bytes" % MAX_DELIVERY_BODY)
    return environ["wsgi.input"].read(length) if length else b""


def _asgi_path(scope):
    """The request's path in the app: without the ``root_path`` it is served under."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root + "/") else path


async def _asgi_body(receive):
    """A delivery's body from ASGI receive events; HTTPError 413 past the limit."""
    chunks, size = [], 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise HTTPError(400, "the client went away")
        chunk = event.get("body") or b""
        size += len(chunk)
        if size > MAX_DELIVERY_BODY:
            raise HTTPError(413, "a delivery is at most %d bytes" % MAX_DELIVERY_BODY)
        chunks.append(chunk)
        if not event.get("more_body"):
            return b"".join(chunks)


class PousseTaches(_ApiCalls, _AppSide):
    """The client apps import, compatible with the original's.

    ``PousseTaches(api_url, base_url)``: the daemon's URL and the app's own
    base URL that task paths are joined to.  Stdlib only; one keep-alive
    connection per thread, so enqueues do not pay a TCP handshake each.
    ``auth_key`` (a key or a list of keys; default: env POUSSETACHES_AUTH_KEY
    and POUSSETACHES_NEXT_AUTH_KEY) is what ``parse`` and the task endpoint
    accept; ``insecure=True`` accepts unauthenticated deliveries when there
    is none.  ``api_key`` (default: env POUSSETACHES_API_KEY) is sent to the
    daemon.  ``tasks_path``: where the task endpoint is mounted in the app.
    ``eager=True`` (or setting ``.eager`` in a test) runs the task
    functions' pushes in-process.
    """

    def __init__(self, api_url=None, base_url="", auth_key=None, api_key=None, timeout=30.0,
                 insecure=False, tasks_path=DEFAULT_TASKS_PATH, eager=False, task_context=None):
        self.api_key = _env("POUSSETACHES_API_KEY") if api_key is None else api_key
        self.timeout = timeout
        self._local = threading.local()
        self._point_at(api_url or _env("POUSSETACHES_URL", "http://%s:%d" % (
            DEFAULT_HOST, DEFAULT_PORT)))
        self._init_app_side(base_url, auth_key, insecure, tasks_path, eager, task_context)

    # -- transport -------------------------------------------------------------

    def _point_at(self, api_url):
        """Talk to the daemon at ``api_url`` from now on."""
        self.api_url = api_url_of(api_url)
        parts = urllib.parse.urlsplit(self.api_url)
        self._https = parts.scheme == "https"
        self._address = (parts.hostname, parts.port or (443 if self._https else 80))
        self._prefix = parts.path.rstrip("/")

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.host, conn.port) != self._address:
            conn.close()  # pointed elsewhere since
            conn = None
        if conn is None:
            # the deliveries' connections (one write per request, the strict head
            # reader), with Python's own time-outs and, over https, http.client's context
            conn = self._local.conn = (_DeadlineHTTPSConnection if self._https
                                       else _DeadlineConnection)(*self._address,
                                                                 timeout=self.timeout)
            conn.kernel_timeouts = False
            holder = getattr(self._local, "holder", None)
            if holder is None:  # once a thread: its connection is closed when it is gone
                holder = self._local.holder = [None]  # (a web server's threads come and go)
                weakref.finalize(threading.current_thread(), _close_held, holder)
            holder[0] = conn
        return conn

    def close(self):
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.holder[0] = None

    def request(self, method, path, body=None, headers=None, parse=True):
        """One API call; returns (status, headers, JSON; None unless ``parse``), the
        headers a case-insensitive mapping (Headers).  Raises ClientError on
        4xx/5xx, DaemonUnavailable when nothing answers."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = self._head(data)
        hdrs.update(headers or {})
        conn = self._connection()
        try:
            response = exchange(conn, method, self._prefix + path, data, hdrs,
                                reused=conn.sock is not None)
            text = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DaemonUnavailable(-1, "cannot reach poussetaches at %s: %s"
                                    % (self.api_url, exc)) from None
        if response.will_close:
            self.close()
        if not parse and response.status < 400:
            return response.status, response.headers, None
        return response.status, response.headers, _answer(response.status, text)

    def _call(self, method, path, body=None, then=None):
        doc = self.request(method, path, body)[2]
        return doc if then is None else then(doc)

    def download(self, path, out):
        """GET ``path`` into the binary file ``out`` in pieces (a backup need not fit
        in memory); returns the bytes written.  Errors as ``request``."""
        conn = self._connection()
        size = 0

        def receive(read):
            try:
                return read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise DaemonUnavailable(-1, "cannot reach poussetaches at %s: %s"
                                        % (self.api_url, exc)) from None
        response = receive(lambda: exchange(conn, "GET", self._prefix + path, None,
                                            self._head(None), reused=conn.sock is not None))
        if response.status >= 400:
            _answer(response.status, receive(response.read))  # raises ClientError
        while True:
            piece = receive(lambda: response.read(1 << 16))
            if not piece:
                break
            out.write(piece)  # a local error (a full disk) is the caller's, as it is
            size += len(piece)
        if response.will_close:
            self.close()
        return size

    def _head(self, body):
        """The request headers of a call with ``body`` (None: no body)."""
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            hdrs["Authorization"] = "Bearer " + self.api_key
        return hdrs

    # -- the original client's methods ------------------------------------------

    def _body(self, payload, path, expected=200, schedule="", delay=0, **extra):
        """The enqueue body of push()'s arguments."""
        body = {"url": self.base_url + path,
                "payload": b64(json.dumps(payload).encode()),
                "expected": expected, "schedule": schedule, "delay": delay}
        body.update(extra)
        return body

    def push(self, payload, path, expected=200, schedule="", delay=0, **extra):
        """Enqueue ``payload`` (JSON-encoded) for ``base_url + path``; return the task id.

        ``extra`` takes the other enqueue fields: delay_s, eta, max_tries,
        timeout_s, headers, idempotency_key, queue, priority, ordering_key, name.
        """
        body = self._body(payload, path, expected, schedule, delay, **extra)
        return self._task_id(*self.request("POST", "/", body, parse=False)[:2])

    @staticmethod
    def _task_id(status, headers):
        """The id an enqueue's answer gives in its header."""
        task_id = headers.get("Poussetaches-Task-ID")
        if task_id is None:
            raise _not_the_daemon(status, b"no Poussetaches-Task-ID header")
        return task_id

    def push_many(self, items):
        """Enqueue many tasks, each a dict of push()'s keyword arguments; returns
        their ids in order.  One call (one fsync) per 1000: each call is all or nothing."""
        return self.batch([self._body(**item) for item in items])

    def batch(self, bodies):
        """POST enqueue bodies as they are, MAX_BATCH per call; returns the ids in order."""
        ids = []
        for start in range(0, len(bodies), MAX_BATCH):
            doc = self.request("POST", "/batch", {"tasks": bodies[start:start + MAX_BATCH]})[2]
            ids.extend(task["id"] for task in doc["tasks"])
        return ids

    # -- task functions' pushes -----------------------------------------------------

    def _push_calls(self, task, options, calls, single=False):
        if self.eager:
            made, now = self._eager_calls(task, options, calls)
            for call in now:
                self._run_eager(call)
            ids = [call.id for call in made]
        else:
            bodies = self._call_bodies(task, options, calls)
            if single:
                return self._task_id(*self.request("POST", "/", bodies[0], parse=False)[:2])
            ids = self.batch(bodies)
        return ids[0] if single else ids

    def _run_eager(self, call):
        coroutine = self._attempts(call)
        return _run_coroutine(coroutine) if call.task.is_async else _drive(coroutine)

    def _run_many(self, calls):
        for call in calls:
            self._run_eager(call)
        return len(calls)


class AsyncPousseTaches(_ApiCalls, _AppSide):
    """PousseTaches for asyncio apps (FastAPI and the like): the same methods,
    coroutines for every call that does I/O (``parse``, ``task``, ``wsgi``
    and ``asgi`` stay plain), over one kept-alive connection per event loop
    that carries one call at a time: create it once, at import, and use it
    from any loop (each ``asyncio.run``, each test's loop).
    """

    def __init__(self, api_url=None, base_url="", auth_key=None, api_key=None, timeout=30.0,
                 insecure=False, tasks_path=DEFAULT_TASKS_PATH, eager=False, task_context=None):
        self._sync = PousseTaches(api_url, base_url, (), api_key, timeout)  # its address
        self.api_url = self._sync.api_url
        self.timeout = timeout
        self._loops = {}  # event loop -> [Lock, streams or None, _keep task], while it runs
        self._init_app_side(base_url, auth_key, insecure, tasks_path, eager, task_context)

    def _point_at(self, api_url):
        self._sync._point_at(api_url)
        self.api_url = self._sync.api_url
        self._loops = {}

    def _here(self):
        """This event loop's [Lock, streams]: a connection belongs to one loop."""
        loop = asyncio.get_running_loop()
        for gone in [other for other in self._loops if other.is_closed()]:
            # closed without its tasks cancelled (not asyncio.run): drop its connection
            streams = self._loops.pop(gone)[1]
            if streams is not None:
                try:
                    streams[1].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError):
                    pass
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = [asyncio.Lock(), None]
            # held here: a loop keeps only weak references to its tasks
            state.append(loop.create_task(self._keep(loop, state)))
        return state

    async def _keep(self, loop, state):
        """Lives as long as its loop runs: asyncio.run cancels it at its end,
        and the loop's connection is closed then, while the loop can still
        close it (a loop closed first would keep it, and itself, forever)."""
        try:
            await loop.create_future()
        finally:
            if self._loops.get(loop) is state:
                del self._loops[loop]
            if state[1] is not None:
                state[1][1].close()
                state[1] = None

    async def close(self):
        """Close this event loop's connection."""
        state = self._here()
        if state[1] is not None:
            state[1][1].close()
            state[1] = None

    async def request(self, method, path, body=None):
        """One API call; returns its JSON.  Raises ClientError on 4xx/5xx,
        DaemonUnavailable when nothing answers (a reset kept-alive connection
        is retried once, as the sync client does)."""
        return _answer(*await self._fetch(method, path, body))

    async def download(self, path, out):
        """GET ``path`` into the binary file ``out``; the bytes written (read whole
        first: for a large backup, the sync client's download streams)."""
        status, text = await self._fetch("GET", path)
        if status >= 400:
            _answer(status, text)
        out.write(text)
        return len(text)

    async def _fetch(self, method, path, body=None):
        """One exchange with the daemon: (status, body bytes)."""
        data = b"" if body is None else json.dumps(body).encode()
        hdrs = self._sync._head(body)
        hdrs.update({"Host": "%s:%d" % self._sync._address, "Content-Length": str(len(data))})
        head = "%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, self._sync._prefix + path, "\r\n".join(
            "%s: %s" % item for item in hdrs.items()))
        state = self._here()
        async with state[0]:
            for reused in (state[1] is not None, False):
                try:
                    if state[1] is None:
                        state[1] = await asyncio.wait_for(asyncio.open_connection(
                            *self._sync._address, ssl=self._sync._https or None,
                            limit=MAX_HEAD), self.timeout)
                    status, close, text = await asyncio.wait_for(
                        self._exchange(state[1], head.encode("latin-1") + data), self.timeout)
                    break
                except (OSError, EOFError, asyncio.TimeoutError, ValueError) as exc:
                    if state[1] is not None:
                        state[1][1].close()
                        state[1] = None
                    if not reused or not isinstance(exc, (ConnectionError, EOFError)):
                        raise DaemonUnavailable(-1, "cannot reach poussetaches at %s: %s"
                                                % (self.api_url, exc or type(exc).__name__)) \
                            from None
                except BaseException:  # cancelled mid-exchange: its answer must not be
                    if state[1] is not None:  # read as the next call's
                        state[1][1].close()
                        state[1] = None
                    raise
            if close:
                state[1][1].close()
                state[1] = None
        return status, text

    @staticmethod
    async def _exchange(streams, data):
        """Write a request, read its answer: (status, must close?, body).  The
        head is read whole, MAX_HEAD bytes at most (the stream's limit), and
        parsed by read_head, as the sync client's is."""
        reader, writer = streams
        writer.write(data)
        await writer.drain()
        try:
            head = io.BytesIO(await reader.readuntil(b"\r\n\r\n"))
            status = int(head.readline().split()[1])
            headers = read_head(head)
        except asyncio.IncompleteReadError:
            raise EOFError("the daemon closed the connection") from None
        except asyncio.LimitOverrunError:
            raise ValueError("the answer's head is larger than %d bytes" % MAX_HEAD) from None
        except (HTTPError, IndexError, ValueError) as exc:
            raise ValueError("not an HTTP answer: %s" % exc) from None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:  # a listing comes in pieces
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            text = b"".join(chunks)
        else:
            text = await reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers.get("connection", "").lower() == "close", text

    def _body(self, *args, **kwargs):
        return PousseTaches._body(self, *args, **kwargs)

    async def push(self, payload, path, expected=200, schedule="", delay=0, **extra):
        body = self._body(payload, path, expected, schedule, delay, **extra)
        return (await self.request("POST", "/", body))["id"]

    async def push_many(self, items):
        return await self.batch([self._body(**item) for item in items])

    async def batch(self, bodies):
        ids = []
        for start in range(0, len(bodies), MAX_BATCH):
            doc = await self.request("POST", "/batch", {"tasks": bodies[start:start + MAX_BATCH]})
            ids.extend(task["id"] for task in doc["tasks"])
        return ids

    async def _call(self, method, path, body=None, then=None):
        doc = await self.request(method, path, body)
        return doc if then is None else then(doc)

    async def _push_calls(self, task, options, calls, single=False):
        if self.eager:
            made, now = self._eager_calls(task, options, calls)
            for call in now:
                await self._attempts(call)
            ids = [call.id for call in made]
        else:
            bodies = self._call_bodies(task, options, calls)
            if single:
                return (await self.request("POST", "/", bodies[0]))["id"]
            ids = await self.batch(bodies)
        return ids[0] if single else ids

    def _run_eager(self, call):
        return self._attempts(call)

    async def _run_many(self, calls):
        for call in calls:
            await self._attempts(call)
        return len(calls)



# --------------------------------------------------------------------------
# Daemon assembly and CLI
# --------------------------------------------------------------------------

class Option(collections.namedtuple("Option",
                                    "name default kind check must help flag env metavar")):
    """One setting of the daemon, declared once.

    ``Daemon(name=value)`` takes it; ``serve`` takes it as ``flag`` (derived
    from the name, "" for none: a secret on a command line shows in ``ps`` to
    every local user) and from ``env``.  ``kind`` converts a flag's or
    variable's text: ``int``, ``float``, ``str``, a tuple of choices, ``bool``
    (a flag without value) or ``list`` (a repeatable flag, comma-separated in
    the variable).  ``check(value)`` says whether a value is allowed, ``must``
    what it must be.  Options without a kind are the embedder's (a clock, a
    file system): no flag, no check.
    """


def _option(name, default, kind=None, check=None, must="", help="", flag=None, env=None,
            metavar=None):
    if flag is None:
        flag = "--" + name.replace("_", "-") if kind is not None else ""
    return Option(name, default, kind, check, must, help, flag, env, metavar)


def _between(low, high):
    return lambda value: low <= value <= high


OPTIONS = (
    _option("host", DEFAULT_HOST, str, help="address to listen on", env="POUSSETACHES_HOST"),
    _option("port", DEFAULT_PORT, int, _between(0, 65535), "0-65535", "port",
            env="POUSSETACHES_PORT"),
    _option("data_dir", DEFAULT_DATA_DIR, str, help="where tasks are kept",
            env="POUSSETACHES_DATA_DIR"),
    _option("workers", DEFAULT_WORKERS, int, _between(1, 256), "1-256", "delivery threads",
            env="POUSSETACHES_WORKERS"),
    _option("rate", None, float, _between(0.001, 1e6),
            "0.001 to 1000000 attempts per second (0: unlimited)",
            "attempts per second, all tasks together; unlimited by default",
            env="POUSSETACHES_RATE"),
    _option("burst", None, float, _between(1, 1e6), "1 to 1000000 (0: the default)",
            "token bucket size for --rate", env="POUSSETACHES_BURST"),
    _option("max_tries", DEFAULT_MAX_TRIES, int, _between(1, 100), "1-100",
            "attempts before a task is dead"),
    _option("min_backoff", DEFAULT_MIN_BACKOFF, float, lambda v: v > 0, "> 0",
            "seconds before the 2nd attempt; x4 each time"),
    _option("max_backoff", DEFAULT_MAX_BACKOFF, float, _between(0, 31536000),
            "at most a year (31536000 s)", "cap on any retry delay, seconds"),
    _option("timeout", DEFAULT_TIMEOUT, float, lambda v: 0 < v <= 3600, "> 0 and <= 3600",
            "seconds per delivery attempt"),
    _option("fsync", "always", ("always", "never"), lambda v: v in ("always", "never"),
            "'always' or 'never'", "fsync the journal before answering 201"),
    _option("keep_success", DEFAULT_KEEP_SUCCESS, int, lambda v: v >= 0, ">= 0",
            "successful tasks kept for inspection"),
    _option("max_success_bytes", DEFAULT_MAX_SUCCESS_BYTES, int, lambda v: v >= 0, ">= 0",
            "payload and error bytes of the success records kept; past it the oldest go",
            metavar="BYTES"),
    _option("keep_dead", DEFAULT_KEEP_DEAD, int, lambda v: v >= 0, ">= 0",
            "dead tasks kept; past it the oldest go, logged", metavar="N"),
    _option("max_dead_bytes", DEFAULT_MAX_DEAD_BYTES, int, lambda v: v >= 0, ">= 0",
            "payload and error bytes of the dead records kept", metavar="BYTES"),
    _option("max_body", DEFAULT_MAX_BODY, int, lambda v: v >= 1024, ">= 1024 bytes",
            "largest API request body in bytes"),
    _option("allow_urls", (), list, None, "", "only accept task URLs with this prefix; "
            "repeatable", flag="--allow-url", env="POUSSETACHES_ALLOWED_URLS", metavar="PREFIX"),
    _option("allow_hosts", (), list,
            lambda v: all(re.fullmatch(r"[0-9A-Za-z._-]+|\[[0-9A-Fa-f:.]+\]", name or "")
                          for name in v),
            "host names (no port, no scheme)", "also answer requests whose Host is NAME "
            "(DNS-rebinding guard); repeatable", flag="--allow-host",
            env="POUSSETACHES_ALLOWED_HOSTS", metavar="NAME"),
    _option("signature_only", False, bool, help="sign deliveries (Standard Webhooks) but never "
            "send the auth key itself in Poussetaches-Auth-Key"),
    _option("max_connections", DEFAULT_MAX_CONNECTIONS, int, _between(1, 100_000), "1-100000",
            "API connections served at once"),
    _option("max_per_address", DEFAULT_MAX_PER_ADDRESS, int, _between(1, 100_000), "1-100000",
            "API connections from one client address at once",
            flag="--max-connections-per-address", metavar="N"),
    _option("max_waiting", DEFAULT_MAX_WAITING, int, lambda v: v >= 1, ">= 1",
            "waiting tasks before enqueue answers 507"),
    _option("max_stored_bytes", DEFAULT_MAX_STORED_BYTES, int, lambda v: v >= 1, ">= 1",
            "payload bytes of waiting tasks before enqueue answers 507"),
    _option("on_dead", None, str, help="POST a task's JSON here when it moves to dead",
            metavar="URL"),
    _option("paused", False, bool, help="start with dispatch paused"),
    _option("snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL, float, lambda v: 0 < v <= 86400,
            "> 0 and <= 86400 seconds",
            "seconds between snapshots of the tables"),
    _option("grace", DEFAULT_GRACE, float, _between(0, 86400), "0-86400 seconds",
            "seconds to let attempts finish at stop"),
    _option("head_timeout", DEFAULT_HEAD_TIMEOUT, float, lambda v: 0 < v <= 600,
            "> 0 and <= 600 seconds", flag=""),
    _option("request_timeout", DEFAULT_REQUEST_TIMEOUT, float, lambda v: 0 < v <= 86400,
            "> 0 and <= 86400 seconds", flag=""),
    # secrets: from the environment only (checked below); an auth key set but empty is
    # sent empty, as the original does
    _option("auth_key", None, str, flag="", env="POUSSETACHES_AUTH_KEY"),
    _option("next_auth_key", None, str, flag="", env="POUSSETACHES_NEXT_AUTH_KEY"),
    _option("api_key", None, str, flag="", env="POUSSETACHES_API_KEY"),
    # the embedder's: tests inject them
    _option("cron_tz", None), _option("clock", time.time_ns), _option("rng", None),
    _option("fs", None), _option("tls", None), _option("on_change", None),
)


class Settings(collections.namedtuple("Settings",
                                      [o.name for o in OPTIONS] + ["loopback_bound"])):
    """The daemon's configuration, checked and frozen: every OPTIONS name.
    ``allow_urls`` is an AllowList and ``allow_hosts`` a frozenset once
    checked; ``loopback_bound``: is ``host`` a loopback name?"""

    @classmethod
    def checked(cls, **values):
        """Settings from keyword values (the others take their defaults); raises
        ConfigError naming the first value out of its range."""
        unknown = set(values) - {option.name for option in OPTIONS}
        if unknown:
            raise TypeError("unknown daemon settings: %s" % ", ".join(sorted(unknown)))
        for option in OPTIONS:
            value = values.setdefault(option.name, option.default)
            if option.check is None or (value is None and option.default is None):
                continue
            number = {int: int, float: (int, float)}.get(option.kind)
            try:
                ok = (number is None or isinstance(value, number) and not isinstance(value, bool)
                      and math.isfinite(value)) and option.check(value)
            except (TypeError, OverflowError):
                ok = False
            if not ok:
                raise ConfigError("%s must be %s, not %s" % (
                    option.flag or option.env or option.name, option.must, repr(value)[:100]))
        if values["min_backoff"] > values["max_backoff"]:
            raise ConfigError("--min-backoff must be <= --max-backoff")
        if values["next_auth_key"] and not values["auth_key"]:
            raise ConfigError("POUSSETACHES_NEXT_AUTH_KEY needs POUSSETACHES_AUTH_KEY: "
                              "the current key")
        for name in ("auth_key", "next_auth_key"):
            problem = auth_key_problem(values[name]) if values[name] else None
            if problem is not None:
                raise ConfigError("POUSSETACHES_%s: %s" % (name.upper(), problem))
        values["allow_urls"] = AllowList(values["allow_urls"])   # raises ConfigError
        values["allow_hosts"] = frozenset(name.lower() for name in values["allow_hosts"])
        values["api_key"] = values["api_key"] or None
        values["next_auth_key"] = values["next_auth_key"] or None
        return cls(loopback_bound=is_loopback_name(values["host"].lower()), **values)


class Daemon:
    """Builds the store, queue, workers and API server from keyword arguments,
    and starts and stops them.  Several may run in one process (tests do).

    ``clock`` (Unix ns) and ``rng`` are injectable; ``port=0`` picks a free
    port (see ``.port`` and ``.url`` after ``start()``).  Use as a context
    manager, or ``start()`` then ``stop()``.
    """

    def __init__(self, **settings):
        self.settings = s = Settings.checked(**settings)   # raises ConfigError
        self.port = s.port  # the port bound, once started
        self.clock = s.clock
        self.due = DueQueue(s.clock, s.rate, s.burst)
        if s.paused:
            self.due.hold()
        self._changed = threading.Condition()  # notified after a change while drain() waits
        self._draining = 0  # drain() calls waiting; written under _changed, read without
        self._delivery = Delivery(s.auth_key, s.timeout, s.allow_urls, s.signature_only,
                                  s.clock, s.tls, s.next_auth_key)
        self._lock = DirLock(s.data_dir)
        self._stopping = threading.Event()
        self._wake = threading.Event()   # the persister: snapshot now
        self._threads = []
        self.stats = Stats()
        self.store = self.dispatcher = self.server = None

    @property
    def url(self):
        host = self.settings.host
        host = host if ":" not in host else "[%s]" % host
        return "http://%s:%d" % (host, self.port)

    def start(self):
        """Bind, lock the data dir, recover, and start every thread.

        The port comes first: a daemon that cannot listen touches no data dir.
        Raises ConfigError if the port is taken, LockedError if another daemon
        holds the directory, OSError if the directory cannot be made.
        """
        s = self.settings
        try:
            server = _Server((s.host, s.port), None, s.max_body, s.request_timeout,
                             s.max_connections, s.max_per_address, s.head_timeout)
        except OSError as exc:
            raise ConfigError("cannot listen on %s:%d: %s (is another poussetaches or "
                              "another program on that port? stop it, or choose another "
                              "--port)" % (s.host, s.port, exc.strerror or exc)) from None
        try:
            check_data_dir(s.data_dir)
            self._lock.acquire()
        except BaseException:
            server.server_close()
            raise
        try:
            check_format(s.data_dir)
        except BaseException:
            server.server_close()
            self._lock.release()
            raise
        try:
            self.store = Store(s.data_dir, self.due, fsync=s.fsync == "always",
                               caps={"success": (s.keep_success, s.max_success_bytes),
                                     "dead": (s.keep_dead, s.max_dead_bytes)},
                               clock=s.clock, fs=s.fs, on_dirty=self._wake.set,
                               on_change=self._changed_hook,
                               quota=(s.max_waiting, s.max_stored_bytes), cron_tz=s.cron_tz)
            self.dispatcher = Dispatcher(
                self.store, self.due, self._delivery, workers=s.workers,
                max_tries=s.max_tries, min_backoff=s.min_backoff, max_backoff=s.max_backoff,
                on_dead=s.on_dead, clock=s.clock, rng=s.rng, cron_tz=s.cron_tz,
                stats=self.stats)
            self.api = server.api = Api(self.store, self.due, self.dispatcher.breakers,
                                        self.stats, s)
        except BaseException:
            server.server_close()
            self._lock.release()
            raise
        self.server = server
        self.port = self.server.server_address[1]
        self.store.start()
        if self.store.snapshot_wanted():
            self._wake.set()
        self.dispatcher.start()
        for target, name in ((self.server.serve_forever, "http"), (self._persist, "persister")):
            thread = threading.Thread(target=target, name="poussetaches-" + name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("poussetaches %s serving on %s with %d workers, data in %s%s",
                    __version__, self.url, s.workers, os.path.abspath(s.data_dir),
                    " (paused)" if self.due.held else "",
                    extra={"event": "start", "url": self.url, "count": s.workers})
        for warning in self.warnings():
            logger.warning("%s", warning, extra={"event": "unsafe_config"})
        return self

    def _changed_hook(self):
        """The store's hook, after each change of its tables: the caller's
        ``on_change``, then drain()'s wake-up."""
        if self.settings.on_change is not None:
            self.settings.on_change()
        if self._draining:  # drain() counts itself in before its first look at the store
            with self._changed:
                self._changed.notify_all()

    def drain(self, timeout=30.0):
        """Block until no attempt is in flight and no one-off task is due within
        the longest back-off (``max_backoff``): after a test pushed, when every
        push has run, retries included.  Crons, and tasks delayed further, stay
        waiting.  TimeoutError after ``timeout`` seconds, saying what is left
        (a paused queue, a task that keeps failing slowly)."""
        horizon = int(self.settings.max_backoff * 1e9)
        deadline = time.monotonic() + timeout
        with self._changed:  # a change between the look and the wait notifies the wait
            self._draining += 1
            try:
                while True:
                    in_flight, first = self.store.drain_state()
                    now = self.clock()
                    if not in_flight and (first is None or first > now + horizon):
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(
                            "drain: still %d attempts in flight and a task due %s after %.0fs "
                            "(a paused queue? a task failing slowly?)" % (
                                in_flight, "none" if first is None else
                                "%.1fs ago" % ((now - first) / 1e9), timeout))
                    self._changed.wait(left)
            finally:
                self._draining -= 1

    def warnings(self):
        """What is unsafe in this configuration, one sentence each."""
        out, s = [], self.settings
        if not s.loopback_bound and not s.api_key:
            out.append("listening on %s without POUSSETACHES_API_KEY: anyone who reaches this "
                       "address can enqueue, read and delete tasks" % s.host)
        if s.auth_key is not None and not s.allow_urls:
            out.append("POUSSETACHES_AUTH_KEY is set but no --allow-url: any local process could "
                       "have the key sent to a URL of its choice; restrict task URLs with "
                       "--allow-url, and require POUSSETACHES_API_KEY for the API")
        return out

    def _persist(self):
        """The persister thread: a snapshot every interval, or sooner when asked."""
        while not self._stopping.is_set():
            # while the journal cannot be written, a snapshot is tried every second:
            # the one that succeeds shows that the disk is back
            health = self.store.health()
            interval = self.settings.snapshot_interval
            self._wake.wait(interval if health["healthy"] else min(interval, 1.0))
            self._wake.clear()
            if self._stopping.is_set():
                return
            if not (self.store.snapshot_wanted() or self.store.health()["records"]):
                continue
            try:
                count = self.store.snapshot()
                logger.debug("snapshot of %d tasks written", count)
            except (OSError, PersistError) as exc:
                logger.error("snapshot failed: %s; will retry", exc,
                             extra={"event": "snapshot_error", "error": str(exc)})
                self._stopping.wait(1.0)  # back off before the next try

    def stop(self):
        """Stop accepting, let attempts in flight finish (up to ``grace`` s), write
        a final snapshot and release the data directory.  Idempotent."""
        if self.server is None or self._stopping.is_set():
            return
        logger.info("stopping: finishing attempts in flight (up to %.0fs)", self.settings.grace,
                    extra={"event": "stopping"})
        self._stopping.set()
        self._wake.set()
        self.server.shutdown()
        self.server.server_close()
        busy = self.dispatcher.stop(self.settings.grace)
        if busy:
            logger.warning("%d attempts still in flight; they stay queued", busy,
                           extra={"event": "stopping", "count": busy})
        for thread in self._threads:
            thread.join()
        try:
            self.store.snapshot()
        except (OSError, PersistError) as exc:
            logger.error("final snapshot failed (the journal still has every change): %s", exc,
                         extra={"event": "snapshot_error", "error": str(exc)})
        self.store.close()
        self._lock.release()
        logger.info("stopped", extra={"event": "stop"})

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


LOG_FIELDS = ("event", "task_id", "queue", "url", "attempt", "status", "duration_ms", "table",
              "next_run", "error", "count", "origin")


class _QuietWSGIHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):
        logger.debug("test app: " + format, *args)


class _TestWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


@contextlib.contextmanager
def testing_daemon(client, app=None, **settings):
    """A daemon for an app's end-to-end tests, in-process; yields it (see
    ``Daemon.drain``).  Everything it makes is gone at the end.

    The daemon listens on 127.0.0.1, port 0, keeps its data in a temp dir
    without fsync, and retries fast (back-off 10 to 50 ms), with a new auth
    key.  ``app`` (a WSGI app; by default ``client.wsgi()``, the task
    endpoint alone) is served on a port of its own.  For the duration,
    ``client`` talks to that daemon, pushes to that app and accepts that key
    (eager mode off); then it is as before.  ``settings``: Daemon keyword
    arguments over these.

        with testing_daemon(pt) as daemon:
            send_mail.push("ada@example.com")
            daemon.drain()
    """
    key = settings.get("auth_key") or "whsec_" + b64(os.urandom(24))
    saved = (client.api_url, client.base_url, client.auth_keys, client.eager)
    client.auth_keys, client.eager = (key,), False  # before the endpoint is made: no warning
    server = _TestWSGIServer(("127.0.0.1", 0), _QuietWSGIHandler)
    data_dir = tempfile.mkdtemp(prefix="poussetaches-test-")
    try:
        server.set_app(client.wsgi() if app is None else app)
        serving = threading.Thread(target=server.serve_forever, name="poussetaches-test-app")
        serving.start()
        base = client.base_url = "http://127.0.0.1:%d" % server.server_port
        options = dict(port=0, data_dir=data_dir, fsync="never", min_backoff=0.01,
                       max_backoff=0.05, allow_urls=[base + "/"])
        options.update(settings, auth_key=key)
        try:
            with Daemon(**options) as daemon:
                client._point_at(daemon.url)
                yield daemon
        finally:
            server.shutdown()
            serving.join()
    finally:
        server.server_close()
        shutil.rmtree(data_dir, ignore_errors=True)
        client._point_at(saved[0])
        client.base_url, client.auth_keys, client.eager = saved[1:]


testing_daemon.__test__ = False  # pytest: a helper, not a test, for all its name


class JSONFormatter(logging.Formatter):
    """One JSON object per log line (``--log-json``): the time in ISO 8601 UTC,
    the level, the event and its fields (LOG_FIELDS), and the message."""

    def format(self, record):
        doc = {"time": iso_utc(int(record.created * 1e9), "milliseconds"),
               "level": record.levelname, "event": getattr(record, "event", "log")}
        for name in LOG_FIELDS[1:]:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if "next_run" in doc:
            doc["next_run"] = iso_utc(doc["next_run"], "milliseconds")
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _add_flag(parser, option):
    """``serve``'s flag for an option: its default from its environment variable
    when set (a text: argparse converts it with ``type``, so a bad value is a
    clean usage error), else the option's."""
    kwargs = {"dest": option.name, "help": option.help}
    if option.metavar:
        kwargs["metavar"] = option.metavar
    env = " (env %s%s)" % (option.env, ", comma-separated" if option.kind is list else "") \
        if option.env else ""
    if option.kind is bool:
        kwargs["action"] = "store_true"
    elif option.kind is list:
        kwargs["action"] = "append"    # the variable is read by serve(): flags replace it
    else:
        if isinstance(option.kind, tuple):
            kwargs["choices"] = option.kind
        else:
            kwargs["type"] = option.kind
        kwargs["default"] = option.default if option.default is None else str(option.default)
        if option.env:
            kwargs["default"] = _env(option.env, kwargs["default"])
        if option.default is not None:
            env = (env[:-1] + "; " if env else " (") + "default %(default)s)"
    kwargs["help"] += env
    parser.add_argument(option.flag, **kwargs)


# the Python type of a push flag, by its Param's JSON type (eta: seconds or an RFC 3339 time)
_PUSH_TYPES = {"integer": int, "number": float, "string": str, str(["number", "string"]):
               lambda text: float(text) if re.fullmatch(r"[0-9]+(\.[0-9]*)?", text) else text}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="poussetaches",
        description="An HTTP push task queue for small web apps. With no command, "
                    "'serve' runs the daemon.")
    # --url before the command too (each client command also takes it after)
    parser.add_argument("--url", dest="top_url", default=None, metavar="URL",
                        help="the daemon's URL, for the client commands (default: env "
                             "POUSSETACHES_URL or http://127.0.0.1:7991)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="Run the daemon (the default)",
                           description="Run the daemon. Flags override environment variables.")
    for option in OPTIONS:
        if option.flag:
            _add_flag(serve, option)
    serve.add_argument("--log-level", default="INFO",
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       type=str.upper, help="default %(default)s")
    serve.add_argument("--log-json", action="store_true", help="one JSON object per log line")

    def client(name, help_text, json_flag=True, parent=sub, prints="a table"):
        cmd = parent.add_parser(name, help=help_text, description=help_text + ". Talks to the "
                             "daemon at --url (env POUSSETACHES_URL), with the API key of "
                             "env POUSSETACHES_API_KEY when set.")
        cmd.add_argument("--url", default=None, help="the daemon's URL (default: env "
                         "POUSSETACHES_URL or http://127.0.0.1:7991)")
        if json_flag:
            cmd.add_argument("--json", dest="as_json", action="store_true",
                             help="print the daemon's JSON answer instead of " + prints)
        return cmd

    push = client("push", "Enqueue a task (or many, --from-file)", json_flag=False)
    push.add_argument("target", metavar="URL", nargs="?",
                      help="the URL poussetaches will POST to")
    push.add_argument("--from-file", metavar="FILE",
                      help="enqueue the JSON lines of FILE (enqueue bodies; - for stdin), "
                           "%d per call, each call all or nothing" % MAX_BATCH)
    body = push.add_mutually_exclusive_group()
    body.add_argument("--json", dest="payload_json", metavar="J",
                      help="the payload, as JSON text")
    body.add_argument("--payload-file", metavar="F", help="the payload, raw bytes of a file")
    when = push.add_mutually_exclusive_group()  # the first run: one of the two
    for param in ENQUEUE_PARAMS:
        if param.description:
            (when if param.name in ("delay_s", "eta") else push).add_argument(
                "--" + param.name.replace("_", "-"), dest=param.name,
                type=_PUSH_TYPES[str(param.schema["type"])], metavar=param.metavar,
                help=param.description)
    push.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                      help="an extra header for the delivery; repeatable")
    push.add_argument("--print-task", action="store_true",
                      help="print the task as JSON instead of only its id")
    ls = client("ls", "List the tasks of a table (waiting: the one-off ones; cron: the "
                      "schedules)")
    ls.add_argument("table", choices=("waiting", "success", "dead", "cron"))
    ls.add_argument("--limit", type=int, default=100, help="default %(default)s")
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--queue", metavar="NAME", help="only the tasks of this queue")
    ls.add_argument("--url-prefix", metavar="P", help="only the tasks whose URL starts with P")
    ls.add_argument("-q", "--search", metavar="TEXT",
                    help="only the tasks whose id, URL or idempotency key contains TEXT")
    ls.add_argument("--order", choices=("asc", "desc"),
                    help="by next run: asc or desc (default: desc for success and dead, "
                         "the latest first; asc for waiting and cron, the soonest first)")
    queue_cmd = sub.add_parser("queue", help="Queues: ls, show, set, pause, resume, rm")
    actions = queue_cmd.add_subparsers(dest="action", metavar="ACTION", required=True)
    client("ls", "List the queues, their counts and lag", parent=actions)
    for action, help_text in (("show", "Show one queue"), ("pause", "Pause one queue"),
                              ("resume", "Resume one queue"), ("rm", "Remove an empty queue")):
        client(action, help_text, parent=actions).add_argument("queue_name", metavar="NAME")
    setq = client("set", "Change a queue's settings (others stay)", parent=actions)
    setq.add_argument("queue_name", metavar="NAME")
    for param in QUEUE_PARAMS:
        if param.name != "paused":
            setq.add_argument("--" + param.name.replace("_", "-"), type=_setting_or_default(
                int if param.schema["type"] == "integer" else float),
                help=param.description + " ('default': the daemon's setting again)")
    for name, help_text in (("show", "Show one task and its attempts"),
                            ("run", "Run a waiting task now, or redrive a dead one"),
                            ("cancel", "Cancel a task, or drop a success/dead record")):
        client(name, help_text).add_argument("task_id", metavar="ID")
    retry = client("retry-dead", "Requeue dead tasks", prints="a line")
    retry.add_argument("--url-prefix", default="", help="only tasks whose URL starts with this")
    client("pause", "Pause dispatching", prints="a line")
    client("resume", "Resume dispatching", prints="a line")
    client("status", "Show the daemon's status")
    backup = client("backup", "Copy a live daemon's tables, consistent at one moment, into "
                    "DEST, a new directory; a daemon started with --data-dir DEST restores "
                    "them", json_flag=False)
    backup.add_argument("dest", metavar="DEST", help="a directory that does not exist yet, "
                                                     "or is empty")
    dead = sub.add_parser("dead", help="Dead tasks: purge")
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    client("purge", "Drop every dead task", parent=actions, prints="a line")
    recipe = sub.add_parser(
        "recipe", help="Print a systemd unit, a Dockerfile or a compose file for the daemon",
        description="Print a deployment file for the daemon, its flags those given after "
                    "KIND (checked as serve checks them): a hardened systemd unit, a "
                    "Dockerfile (the original image's paths and port, as uid 10001), or a "
                    "compose file for that image.")
    recipe.add_argument("kind", choices=("systemd", "docker", "compose"), metavar="KIND",
                        help="systemd, docker or compose")
    recipe.add_argument("flags", nargs=argparse.REMAINDER, metavar="FLAG",
                        help="serve's flags: --allow-url URL, --grace S, --workers N...")
    cron = sub.add_parser("cron", help="Cron tasks: rm, preview")
    actions = cron.add_subparsers(dest="action", metavar="ACTION", required=True)
    rm = client("rm", "Remove a cron task, or every one with --all", parent=actions)
    which = rm.add_mutually_exclusive_group(required=True)
    which.add_argument("task_id", metavar="ID", nargs="?", help="the cron task's id (or prefix)")
    which.add_argument("--all", action="store_true", help="every cron task")
    preview = client("preview", "Show the next run times of a cron spec", parent=actions)
    preview.add_argument("spec", metavar="SPEC", help="the spec, quoted: '*/5 * * * *'")
    preview.add_argument("-n", type=int, default=5, help="how many runs (default %(default)s)")
    return parser


def _setting_or_default(kind):
    """argparse's type for a queue setting: a number, or ``default`` (sent as null)."""
    def parse(text):
        return "default" if text == "default" else kind(text)
    parse.__name__ = kind.__name__  # argparse names it in "invalid float value"
    return parse


def _when(ns):
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S") if ns else "-"


def _print_table(rows, headers, out):
    """Columns sized to their content; the last one cut to the terminal's width."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    room = max(20, shutil.get_terminal_size((120, 24)).columns - sum(widths[:-1]) - 2 * len(widths))
    widths[-1] = min(widths[-1], room)
    for row in [headers] + rows:
        cells = [c.ljust(w) if i < len(row) - 1 else (c if len(c) <= w else c[:w - 1] + "~")
                 for i, (c, w) in enumerate(zip(row, widths))]
        out.write("  ".join(cells).rstrip() + "\n")


def _print_task(doc, out):
    out.write("%-23s %s\n" % ("state:", doc.get("state")))
    if doc.get("held"):
        out.write("%-23s %s\n" % ("held:", doc["held"]))
    for field in TASK_FIELDS:
        value = doc.get(field.name)
        if not field.show or value in (None, "", {}):
            continue
        if field.kind == "time":
            value = _when(value)
        elif field.kind == "object":
            value = ", ".join("%s: %s" % item for item in value.items())
        out.write("%-23s %s\n" % (field.name + ":", value))
    payload = base64.b64decode(doc.get("payload") or "")
    out.write("%-23s %s\n" % ("payload:", payload[:500].decode("utf-8", "replace")))
    if doc.get("last_error_body"):
        text = base64.b64decode(doc["last_error_body"])[:500].decode("utf-8", "replace")
        out.write("%-23s %s\n" % ("last_error_body:", text))
    if doc.get("attempts"):
        out.write("attempts:\n")
        _print_table([[_when(a["at"]), str(a["status"]), "%.1f ms" % a["duration_ms"],
                       (a.get("error") or "").replace("\n", " ")] for a in doc["attempts"]],
                     ["AT", "STATUS", "DURATION", "ERROR"], out)


def run_client(args, out=None):
    """The client commands; returns the exit status.  Errors are one line on stderr."""
    out = out or sys.stdout
    client = None
    try:
        client = PousseTaches(args.url or getattr(args, "top_url", None))
        if args.command == "push" and args.from_file:
            if args.target:
                raise PousseTachesError("give a URL or --from-file, not both")
            for task_id in client.batch(_json_lines(args.from_file)):
                out.write(task_id + "\n")
            return 0
        if args.command == "push":
            if not args.target:
                raise PousseTachesError("push needs a URL (or --from-file FILE)")
            body = {"url": args.target}
            if args.payload_json is not None:
                try:
                    body["json"] = json.loads(args.payload_json)
                except ValueError as exc:
                    raise PousseTachesError("--json is not valid JSON: %s" % exc) from None
            elif args.payload_file:
                with open(args.payload_file, "rb") as f:
                    body["payload"] = b64(f.read())
            body.update((param.name, getattr(args, param.name)) for param in ENQUEUE_PARAMS
                        if param.description and getattr(args, param.name) is not None)
            if args.header:
                body["headers"] = {}
                for line in args.header:
                    name, sep, value = line.partition(":")
                    if not sep:
                        raise PousseTachesError("--header must look like 'Name: value'")
                    body["headers"][name.strip()] = value.strip()
            doc = client.enqueue(body)
            out.write(json.dumps(doc, indent=2) + "\n" if args.print_task else doc["id"] + "\n")
            return 0
        if args.command == "queue":
            return _queue_command(client, args, out)
        if args.command == "backup":
            count = _backup(client, args.dest)
            out.write("%d tasks backed up in %s; to restore them, start a daemon on it:\n"
                      "    python3 poussetaches.py --data-dir %s --paused\n"
                      % (count, args.dest, shlex.quote(args.dest)))
            return 0
        if args.command == "ls":
            order = args.order or ("desc" if args.table in ("success", "dead") else "asc")
            doc = client.listing(args.table, args.limit, args.offset, queue=args.queue,
                                 url_prefix=args.url_prefix, q=args.search, order=order,
                                 cron="false" if args.table == "waiting" else None)
            if args.as_json:
                out.write(json.dumps(doc, indent=2) + "\n")
                return 0
            done = args.table in ("success", "dead")
            rows = [[t["id"][:12], _when(t["last_run" if done else "next_run"]), str(t["tries"]),
                     str(t["last_error_status_code"] or "-"),
                     t["url"] + (" (%s)" % t["schedule"] if t["schedule"] else "")]
                    for t in doc["tasks"]]
            _print_table(rows, ["ID", "LAST RUN" if done else "NEXT RUN", "TRIES", "LAST", "URL"],
                         out)
            shown = len(doc["tasks"])
            out.write("%d of %d %s tasks, %s\n" % (shown, doc["total"], args.table, (
                "the latest first" if order == "desc" else "the earliest first") if done else
                ("the soonest first" if order == "asc" else "the latest first")))
            return 0
        if args.command == "dead":
            out.write("%d dead tasks purged\n" % client.purge_dead())
            return 0
        if args.command == "cron" and args.action == "rm":
            if args.all:
                out.write("%d cron tasks removed\n" % client.delete_cron())
            else:
                doc = client.cancel(args.task_id)  # the daemon resolves an id's start itself
                out.write("cron task %s removed\n" % doc["deleted"])
            return 0
        if args.command == "cron":
            runs = client.preview_cron(args.spec, args.n)
            out.write(json.dumps(runs, indent=2) + "\n" if args.as_json else
                      "".join(run + "\n" for run in runs))
            return 0
        if args.command in ("show", "run", "cancel"):
            call = {"show": client.get_task, "run": client.run, "cancel": client.cancel}
            doc = call[args.command](args.task_id)  # a whole id, or its start (6+ characters)
            doc = doc.raw if isinstance(doc, GetTask) else doc
        elif args.command == "retry-dead":
            doc = {"requeued": client.retry_dead(args.url_prefix)}
        elif args.command == "pause":
            doc = client.pause()
        elif args.command == "resume":
            doc = client.resume()
        else:
            doc = client.status()
        if args.as_json:
            out.write(json.dumps(doc, indent=2) + "\n")
        elif args.command == "show":
            _print_task(doc, out)
        elif args.command == "run":
            out.write("task %s queued to run now\n" % doc["id"])
        elif args.command == "cancel":
            out.write("task %s deleted (it was %s)\n" % (doc["deleted"], doc["state"]))
        elif args.command == "retry-dead":
            out.write("%d dead tasks requeued\n" % doc["requeued"])
        elif args.command in ("pause", "resume"):
            out.write("dispatching %s\n" % ("paused" if doc["paused"] else "running"))
        else:
            _print_status(doc, out)
        return 0
    except BrokenPipeError:  # `poussetaches ls waiting | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (PousseTachesError, OSError) as exc:
        sys.stderr.write("poussetaches: error: %s\n" % exc)
        return 1
    finally:
        if client is not None:
            client.close()


def _json_lines(path):
    """The enqueue bodies of a JSON-lines file (``-``: stdin)."""
    stream = sys.stdin if path == "-" else open(path)
    try:
        bodies = []
        for number, line in enumerate(stream, 1):
            if line.strip():
                try:
                    bodies.append(json.loads(line))
                except ValueError as exc:
                    raise PousseTachesError("%s line %d is not JSON: %s" % (path, number, exc))
        return bodies
    finally:
        if stream is not sys.stdin:
            stream.close()


def _print_status(doc, out):
    """``status`` for people: one line a subject, times as times."""
    now = time.time_ns()
    circuits = ["%s open, %s" % (b["origin"], "a probe under way" if b["probing"] else
                                 "next probe in %.1f s" % max(0, (b["next_probe"] - now) / 1e9))
                for b in doc.get("breakers") or []]
    lines = [("daemon", "poussetaches %s, dispatching %s" % (
                  doc.get("version", "?"), "paused" if doc["paused"] else "running")),
             ("tasks", "%d waiting, %d cron, %d in flight, %d success, %d dead" % (
                 doc["waiting"], doc["cron"], doc["in_flight"], doc["success"], doc["dead"])),
             ("storage", "healthy" if doc["healthy"] else
              "CANNOT WRITE its journal (%d errors): enqueues get 503" % doc["journal_errors"]),
             ("circuits", "; ".join(circuits) or "all closed")]
    for key, value in lines:
        out.write("%-10s %s\n" % (key + ":", value))


def _backup(client, dest):
    """GET /backup into DEST/snapshot.json, DEST new or empty and made 0700, the
    file checked whole before it takes its name; the number of tasks in it."""
    if os.path.isdir(dest) and os.listdir(dest):
        raise PousseTachesError("%s is not empty: a backup goes to a new directory" % dest)
    os.makedirs(dest, mode=0o700, exist_ok=True)
    os.chmod(dest, 0o700)  # payloads and headers: the owner's only, as the data dir
    tmp = os.path.join(dest, SNAPSHOT_NAME + ".tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600),
                       "wb") as f:
            client.download("/backup", f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            try:
                doc = json.load(f)
            except ValueError as exc:
                raise PousseTachesError("the backup is not whole: %s" % exc) from None
        if not isinstance(doc, dict) or doc.get("version") != 2:
            raise PousseTachesError("the daemon's answer is not a snapshot")
        os.replace(tmp, os.path.join(dest, SNAPSHOT_NAME))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return sum(len(doc.get(name) or ()) for name in TABLES)


def _queue_command(client, args, out):
    """``poussetaches queue ls|show|set|pause|resume|rm``."""
    if args.action == "ls":
        queues = client.queues()
        if args.as_json:
            out.write(json.dumps(queues, indent=2) + "\n")
            return 0
        _print_table([[q["name"], str(q["waiting"]), str(q["cron"]), str(q["due"]),
                       str(q["in_flight"]), "%.1f s" % q["oldest_due_age_s"],
                       " ".join("%s=%s" % item for item in sorted(q["settings"].items()))]
                      for q in queues],
                     ["QUEUE", "WAITING", "CRON", "DUE", "IN FLIGHT", "LAG", "SETTINGS"], out)
        return 0
    name = args.queue_name
    if args.action == "rm":
        client.delete_queue(name)
        out.write("queue %s removed\n" % name)
        return 0
    if args.action == "set":
        changes = {p.name: None if getattr(args, p.name) == "default" else getattr(args, p.name)
                   for p in QUEUE_PARAMS if getattr(args, p.name, None) is not None}
        doc = client.set_queue(name, **changes)
    elif args.action in ("pause", "resume"):
        doc = getattr(client, args.action + "_queue")(name)
    else:
        doc = client.queue(name)
    if args.as_json:
        out.write(json.dumps(doc, indent=2) + "\n")
        return 0
    settings = doc["settings"]
    lines = [("queue", doc["name"] + (" (paused)" if settings.get("paused") else "")),
             ("tasks", "%d waiting, %d cron, %d due, %d in flight" % (
                 doc["waiting"], doc["cron"], doc["due"], doc["in_flight"])),
             ("lag", "%.1f s since the oldest due task fell due" % doc["oldest_due_age_s"]),
             ("settings", ", ".join("%s %s" % (name.replace("_", " "), settings[name])
                                    for name in QUEUE if name in settings and name != "paused")
              or "the daemon's")]
    for key, value in lines:
        out.write("%-10s %s\n" % (key + ":", value))
    return 0


def _systemd_recipe(given, flags):
    """A unit hardened to an exposure of about 1 (systemd-analyze security)."""
    command = [sys.executable, os.path.abspath(__file__), "serve", "--data-dir",
               "/var/lib/poussetaches"] + given
    # only when every allowed URL is on this machine (none given: any URL may be a task's)
    local = bool(flags.allow_urls) and all(
        is_loopback_name((urllib.parse.urlsplit(url).hostname or "").lower())
        for url in flags.allow_urls)
    hidden = [path for path in command[:2] if path.startswith(("/home/", "/root/"))]
    if hidden:
        sys.stderr.write("poussetaches: %s is under /home or /root, which the unit hides "
                         "(ProtectHome=yes): install it elsewhere (/usr, /opt)\n" % hidden[0])
    # systemd reads % and $ in ExecStart as its own specifiers and variables
    exec_start = " ".join(shlex.quote(part) for part in command).replace(
        "%", "%%").replace("$", "$$")
    return "\n".join([
        "# /etc/systemd/system/poussetaches.service, from: poussetaches recipe systemd %s"
        % " ".join(shlex.quote(flag) for flag in given),
        "# keys in /etc/poussetaches.env: POUSSETACHES_AUTH_KEY=... POUSSETACHES_API_KEY=...",
        "[Unit]", "Description=poussetaches task queue", "After=network.target", "",
        "[Service]",
        "ExecStart=" + exec_start,
        "EnvironmentFile=-/etc/poussetaches.env",
        "DynamicUser=yes", "StateDirectory=poussetaches", "StateDirectoryMode=0700",
        "UMask=0077", "Restart=on-failure",
        "TimeoutStopSec=%d" % (math.ceil(flags.grace) + 20),  # past --grace: the attempts end
        "NoNewPrivileges=yes", "CapabilityBoundingSet=", "AmbientCapabilities=",
        "PrivateTmp=yes", "PrivateDevices=yes", "PrivateUsers=yes", "PrivateIPC=yes",
        "ProtectSystem=strict", "ProtectHome=yes", "ProtectClock=yes",
        "ProtectControlGroups=yes", "ProtectHostname=yes", "ProtectKernelLogs=yes",
        "ProtectKernelModules=yes", "ProtectKernelTunables=yes", "ProtectProc=invisible",
        "ProcSubset=pid", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes", "RestrictRealtime=yes", "RestrictSUIDSGID=yes",
        "LockPersonality=yes", "MemoryDenyWriteExecute=yes", "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged @resources",
        "RemoveIPC=yes", "DevicePolicy=closed", "KeyringMode=private"]
        # the app and the daemon on this machine: no other address to reach
        + (["IPAddressDeny=any", "IPAddressAllow=localhost"] if local else [])
        + ["", "[Install]", "WantedBy=multi-user.target", ""])


def _docker_recipe(given, flags):
    """A drop-in for the original's image: /app/poussetaches_data, port 7991, uid 10001."""
    return "\n".join([
        "# Dockerfile, from: poussetaches recipe docker %s; beside poussetaches.py"
        % " ".join(shlex.quote(flag) for flag in given),
        "FROM python:3.12-slim", "WORKDIR /app", "COPY poussetaches.py /app/poussetaches.py",
        "RUN useradd --system --uid 10001 --no-create-home poussetaches \\",
        " && mkdir -m 700 /app/poussetaches_data && chown 10001:10001 /app/poussetaches_data",
        "USER 10001:10001", "VOLUME /app/poussetaches_data", "EXPOSE %d" % flags.port,
        "HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \\",
        "  CMD [\"python3\", \"-c\", \"import urllib.request; urllib.request.urlopen("
        "'http://127.0.0.1:%d/healthz', timeout=2)\"]" % flags.port,
        "CMD " + json.dumps(["python3", "/app/poussetaches.py", "serve", "--host", "0.0.0.0"]
                            + given), ""])


def _compose_recipe(given, flags):
    """The daemon's services for a compose file, with its volume made the daemon's
    user's first (a volume of the original's image belongs to root)."""
    command = json.dumps(["python3", "/app/poussetaches.py", "serve", "--host", "0.0.0.0"]
                         + given)
    return "\n".join([
        "# compose.yaml, from: poussetaches recipe compose %s"
        % " ".join(shlex.quote(flag) for flag in given),
        "# the image: poussetaches recipe docker > Dockerfile, beside poussetaches.py; your",
        "# app joins these services, with POUSSETACHES_URL: http://poussetaches:%d" % flags.port,
        "services:",
        "  poussetaches-volume:  # at each start: the volume is the daemon's user's, 0700",
        "    image: poussetaches:local", "    build: .", '    user: "0:0"',
        '    entrypoint: ["sh", "-c", "chown -R 10001:10001 /app/poussetaches_data && '
        'chmod 700 /app/poussetaches_data"]',
        "    volumes:", "      - tasks:/app/poussetaches_data",
        "  poussetaches:", "    image: poussetaches:local",
        "    command: " + command,
        "    environment:",
        "      POUSSETACHES_AUTH_KEY: ${POUSSETACHES_AUTH_KEY}",
        "      POUSSETACHES_API_KEY: ${POUSSETACHES_API_KEY:-}",
        "    volumes:", "      - tasks:/app/poussetaches_data",
        "    depends_on:", "      poussetaches-volume:",
        "        condition: service_completed_successfully",
        "    restart: unless-stopped",
        "    stop_grace_period: %ds  # past --grace, so attempts in flight end"
        % (math.ceil(flags.grace) + 20),
        "volumes:", "  tasks:", ""])


RECIPES = {"systemd": _systemd_recipe, "docker": _docker_recipe, "compose": _compose_recipe}


def _serve_settings(args):
    """Daemon keywords from ``serve``'s flags and the environment (OPTIONS)."""
    values = {}
    for option in OPTIONS:
        if option.flag:
            value = getattr(args, option.name)
            if option.kind is list and value is None:
                value = [part.strip() for part in _env(option.env, "").split(",")
                         if part.strip()]
            elif option.name in ("rate", "burst") and not value:
                value = None  # --rate 0: unlimited, as it always was
            values[option.name] = value
        elif option.env:  # a secret; an auth key set but empty is sent empty (the original)
            values[option.name] = (os.environ.get(option.env) if option.name == "auth_key"
                                   else _env(option.env))
    return values


def serve(args):
    # logging's documented knobs for what no line of ours prints: the caller's
    # frame, process and thread, looked up per record (a delivery logs a line)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    text = logging.Formatter(LOG_FORMAT, LOG_TIME_FORMAT)
    text.converter = time.gmtime  # also spares the time zone lookup of localtime per line
    handler.setFormatter(JSONFormatter() if args.log_json else text)
    logger.addHandler(handler)
    logger.setLevel(args.log_level)
    logger.propagate = False
    # the handlers come first: a SIGTERM during a long recovery, or just after
    # "serving on", is a clean stop, not the default's death by signal
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()  # only a flag: the main thread logs and cleans up

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon = Daemon(**_serve_settings(args))
        daemon.start()
    except (PousseTachesError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    while not stop.wait(3600):
        pass
    daemon.stop()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version") \
            and argv[0].partition("=")[0] != "--url":  # --url: a client command follows
        argv = ["serve"] + argv
    parser = build_parser()
    parser.add_argument("--version", action="version", version="poussetaches " + __version__)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "recipe":
        flags = build_parser().parse_args(["serve"] + args.flags)  # a bad flag: exit 2
        if any(flag.partition("=")[0] in ("--data-dir", "--host") for flag in args.flags):
            parser.error("recipe %s sets --data-dir and --host itself: leave them out"
                         % args.kind)
        if not flags.allow_urls:
            sys.stderr.write("poussetaches: no --allow-url given: add your app's URL, or the "
                             "daemon warns at every start\n")
        sys.stdout.write(RECIPES[args.kind](args.flags, flags))
        return 0
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
