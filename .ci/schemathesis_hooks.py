"""Schemathesis 4.x hooks for .ci/oracle_schemathesis.sh (loaded through the
SCHEMATHESIS_HOOKS environment variable).

/openapi.json describes every rule of the API that JSON Schema can express.  A
few rules of poussetaches.py's Api it cannot: they tie two fields together, or
depend on the clock or on what the daemon already stores.  Schemathesis would
generate "positive" (schema-valid) requests that break them, the daemon would
rightly answer 400, and `positive_data_acceptance` would report it.

So this module REPAIRS positive cases only, each repair mirroring one daemon
rule (commented with it), and changes nothing else:

* negative cases (case.meta.generation.mode negative) are never touched: they
  still carry their invalid data and the daemon must still refuse them;
* a repair only drops an optional field, sets a nullable field to null, swaps
  two values or replaces a value by one that passes the same rule, so the case
  stays valid against the document (schemathesis keeps it positive);
* a value these rules cannot judge is left alone: a rule that JSON Schema CAN
  express (a bound, a pattern, a format) is the document's job, and a daemon
  that mishandles it must still be reported.

Rules left to the document on purpose (static, expressible): delay <= 5270400
(MAX_FIRST_RUN_S // 60), eta >= 0 and its RFC 3339 pattern, expected 0 or
100-599, the payload's base64, the url allow-list, header names and values,
the query bounds, schedule required and non-empty on /cron/preview.
"""

import math
import os
import sys
import threading
import time
import zlib

import schemathesis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import poussetaches  # noqa: E402  (the repo root's daemon: its own cron parser and limits)

# A repair log, for whoever tunes these hooks: ST_HOOKS_LOG=/path appends one
# line per repair (operation, rule).  Off by default.
_LOG = os.environ.get("ST_HOOKS_LOG")
_LOG_LOCK = threading.Lock()


def _note(case, rule):
    if _LOG:
        with _LOG_LOCK, open(_LOG, "a") as f:
            f.write("%s %s: %s\n" % (case.operation.method.upper(), case.operation.path, rule))


def _positive(case):
    """Only positive cases are repaired: a negative one must keep its invalid data."""
    meta = case.meta
    return meta is None or meta.generation.mode.is_positive


def _given(value):
    """Api._first_run counts a delay, delay_s or eta as given when it is truthy."""
    return bool(value)


# A first run may be at most MAX_FIRST_RUN_S ahead; keep a day of margin for the
# time between generation and the request (and Hypothesis' replays).
_MARGIN_S = 86400

# Valid cron specs, all matching often (several grammars the daemon accepts),
# used in place of a generated string that is no cron spec.
_GOOD_SCHEDULES = ("* * * * *", "*/5 * * * *", "0 9 * * 1-5", "30 2 1 * *", "@daily",
                   "@hourly", "@every 90s", "*/10 * * * * *", "15 4 * JAN-JUN MON")
for _spec in _GOOD_SCHEDULES:  # fail at load, not in the middle of a run
    poussetaches.CronSpec(_spec, None)


def _cron_ok(schedule, from_ns):
    """Api.cron_spec + Api.new_task: a spec CronSpec parses (in the daemon's zone:
    none given to the oracle's daemon, so local time, as here) that matches a
    time within CRON_HORIZON_YEARS of now and of the task's first run.  Only a
    CronError (the daemon's 400) counts as invalid: any other exception is left
    for the daemon to meet (a 500 there is a real failure)."""
    try:
        spec = poussetaches.CronSpec(schedule, None)
    except poussetaches.CronError:
        return False
    except Exception:
        return True
    try:
        return (spec.next_after(time.time_ns()) is not None
                and spec.next_after(from_ns - 1) is not None)
    except Exception:
        return True


def _good_schedule(bad):
    """A valid spec in place of ``bad``, varied (by the bad string's hash)."""
    return _GOOD_SCHEDULES[zlib.crc32(str(bad).encode("utf-8", "surrogatepass"))
                           % len(_GOOD_SCHEDULES)]


def _eta_seconds(eta):
    """eta as Unix seconds the way Api._first_run reads it; None if unreadable
    (a bad type or format is the document's business)."""
    if isinstance(eta, bool):
        return None
    if isinstance(eta, (int, float)):
        return eta if math.isfinite(eta) else None
    if isinstance(eta, str):
        try:
            return poussetaches.parse_rfc3339(eta)
        except (ValueError, OverflowError):
            return None
    return None


def _repair_enqueue_body(case, body, header_key=None):
    """One enqueue body (POST /, or one element of POST /batch), in place."""
    if not isinstance(body, dict):
        return

    # Rule (Api._first_run): delay, delay_s and eta are exclusive ("... are
    # exclusive: send one of them") when more than one is given (truthy): keep
    # the first given of delay, delay_s, eta; drop the others.
    given = [name for name in ("delay", "delay_s", "eta") if _given(body.get(name))]
    for name in given[1:]:
        del body[name]
        _note(case, "delay/delay_s/eta exclusive: dropped %s" % name)

    # Rule (Api._first_run): the first run must be at most MAX_FIRST_RUN_S (10
    # years) ahead of now, and eta must be 0 <= seconds <= 1e11 ("eta is out of
    # range").  A past eta is fine (it runs now).  Only the clock-relative part
    # is repaired: an eta (number or RFC 3339) later than now + 10 years, or an
    # RFC 3339 eta before 1970 (a date-time format cannot say "not before
    # 1970"); a negative number eta is the document's (minimum 0).  delay and
    # delay_s have static bounds: the document's too.
    now_s = time.time()
    if _given(body.get("eta")):
        seconds = _eta_seconds(body["eta"])
        if seconds is not None and (
                seconds > now_s + poussetaches.MAX_FIRST_RUN_S - _MARGIN_S
                or (isinstance(body["eta"], str) and seconds < 0)):
            del body["eta"]
            _note(case, "first run within 10 years (eta, after 1970): dropped eta")

    # Rule (Api.new_task): name is only for cron tasks ("name is for cron tasks:
    # give a schedule too"): a non-null name without a truthy schedule is dropped.
    if body.get("name") is not None and not body.get("schedule"):
        del body["name"]
        _note(case, "name only with a schedule: dropped name")

    # Rule (Api.cron_spec, Api.new_task): a truthy schedule must be a cron spec
    # CronSpec accepts, with a run within CRON_HORIZON_YEARS (of now, and of
    # the task's first run): otherwise replaced by a valid spec.
    schedule = body.get("schedule")
    if isinstance(schedule, str) and schedule:
        start_ns = time.time_ns()
        delay, delay_s = body.get("delay"), body.get("delay_s")
        if _given(delay) and isinstance(delay, (int, float)) and not isinstance(delay, bool):
            start_ns += int(delay * 60 * 10 ** 9)
        elif _given(delay_s) and isinstance(delay_s, (int, float)) and not isinstance(delay_s, bool):
            start_ns += int(delay_s * 1e9)
        elif _given(body.get("eta")):
            seconds = _eta_seconds(body["eta"])
            if seconds is not None and 0 <= seconds <= 1e11:
                start_ns = max(start_ns, int(seconds * 1e9))
        if not _cron_ok(schedule, start_ns):
            body["schedule"] = _good_schedule(schedule)
            _note(case, "schedule a valid cron spec: replaced %r" % schedule[:60])

    # Rule (Api._payload): payload and json are exclusive ("payload and json are
    # exclusive: send one of them"): a non-null payload with a json key (json
    # null is a value: the payload "null").  Keep a non-empty payload, else json.
    if "json" in body and body.get("payload") is not None:
        if isinstance(body["payload"], str) and body["payload"]:
            del body["json"]
            _note(case, "payload/json exclusive: dropped json")
        else:
            del body["payload"]
            _note(case, "payload/json exclusive: dropped payload")

    # Rule (Api.new_task): the Idempotency-Key header and the body's
    # idempotency_key must be equal when both are given ("... differ: give one of
    # them").  The header arrives stripped of spaces and tabs (read_head).  On a
    # difference the header is dropped (any string may be a body key, not every
    # one can be a header).
    if header_key is not None and body.get("idempotency_key") is not None:
        name, value = header_key
        if not isinstance(value, str) or value.strip(" \t") != body["idempotency_key"]:
            del case.headers[name]
            _note(case, "Idempotency-Key header == idempotency_key: dropped the header")


def _idempotency_header(case):
    """(the name as spelled in case.headers, its value) or None."""
    for name in list(case.headers or ()):
        if isinstance(name, str) and name.lower() == "idempotency-key":
            return name, case.headers[name]
    return None


# What the daemon stores of each queue's settings, as its answers showed them:
# Api.put_queue judges min_backoff <= max_backoff on the stored settings merged
# with the change.  Each oracle run is a schemathesis process of its own, with a
# fresh daemon, and --workers 1: this mirror follows that one daemon.
_QUEUES = {}
_QUEUES_LOCK = threading.Lock()


def _remember(view):
    if isinstance(view, dict) and isinstance(view.get("name"), str) \
            and isinstance(view.get("settings"), dict):
        with _QUEUES_LOCK:
            _QUEUES[view["name"]] = dict(view["settings"])


@schemathesis.hook
def after_call(context, case, response):
    """Keep _QUEUES in step with the daemon's queue answers."""
    try:
        if response.status_code != 200:
            return
        method, path = case.operation.method.upper(), case.operation.path
        if path == "/queues" and method == "GET":
            for view in (response.json() or {}).get("queues") or ():
                _remember(view)
        elif path == "/queues/{name}" and method == "DELETE":
            with _QUEUES_LOCK:
                _QUEUES.pop((case.path_parameters or {}).get("name"), None)
        elif path in ("/queues/{name}", "/queues/{name}/pause", "/queues/{name}/resume"):
            _remember(response.json())
    except Exception:  # a malformed answer is for the checks to report, not for this mirror
        pass


def _repair_queue_settings(case):
    # Rule (Api.put_queue): min_backoff must not be above max_backoff, judged on
    # the queue's stored settings merged with the change (null: back to the
    # default, which never conflicts).  Both in the body: swapped; one of them
    # against a stored other: that stored other is reset (null) in the same PUT.
    body = case.body
    if not isinstance(body, dict):
        return
    name = (case.path_parameters or {}).get("name")
    with _QUEUES_LOCK:
        merged = dict(_QUEUES.get(name) or {})
    for key, value in body.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    low, high = merged.get("min_backoff"), merged.get("max_backoff")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) \
            or not low > high:
        return
    if body.get("min_backoff") is not None and body.get("max_backoff") is not None:
        body["min_backoff"], body["max_backoff"] = body["max_backoff"], body["min_backoff"]
        _note(case, "min_backoff <= max_backoff: swapped")
    elif body.get("min_backoff") is not None:
        body["max_backoff"] = None
        _note(case, "min_backoff <= stored max_backoff: reset max_backoff")
    else:
        body["min_backoff"] = None
        _note(case, "stored min_backoff <= max_backoff: reset min_backoff")


def _repair_run_overrides(case):
    # Rule (Api.run_task -> Api._payload): payload and json are exclusive in the
    # overrides of POST /tasks/{id}/run too.
    body = case.body
    if isinstance(body, dict) and "json" in body and body.get("payload") is not None:
        if isinstance(body["payload"], str) and body["payload"]:
            del body["json"]
        else:
            del body["payload"]
        _note(case, "payload/json exclusive (run)")


def _repair_cron_preview(case):
    # Rule (Api.cron_preview -> Api.cron_spec): schedule must be a cron spec
    # CronSpec accepts, with a run within CRON_HORIZON_YEARS.  An absent or
    # empty schedule is left alone: "required, minLength 1" is the document's.
    query = case.query
    if not isinstance(query, dict) or "schedule" not in query:
        return
    value = query["schedule"]
    last = value[-1] if isinstance(value, list) and value else value  # the daemon reads the last
    if isinstance(last, str) and last and not _cron_ok(last, time.time_ns()):
        query["schedule"] = _good_schedule(last)
        _note(case, "schedule a valid cron spec: replaced %r" % last[:60])


@schemathesis.hook
def map_case(context, case):
    """Every repair, on positive cases only, chosen by operation."""
    if not _positive(case):
        return case
    method, path = case.operation.method.upper(), case.operation.path
    if method == "POST" and path == "/":
        _repair_enqueue_body(case, case.body, _idempotency_header(case))
    elif method == "POST" and path == "/batch":
        if isinstance(case.body, dict) and isinstance(case.body.get("tasks"), list):
            for item in case.body["tasks"]:  # a batch's tasks carry no header (Api.batch)
                _repair_enqueue_body(case, item)
    elif method == "PUT" and path == "/queues/{name}":
        _repair_queue_settings(case)
    elif method == "POST" and path == "/tasks/{id}/run":
        _repair_run_overrides(case)
    elif method == "GET" and path == "/cron/preview":
        _repair_cron_preview(case)
    return case
