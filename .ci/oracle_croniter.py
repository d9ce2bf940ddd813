#!/usr/bin/env python3
"""Differential test of poussetaches' cron engine against croniter.

Run from the repo root, in a virtualenv holding a pinned croniter:

    $VENV/bin/python .ci/oracle_croniter.py

5,000 seeded random 5-field specs (seed overridable by POUSSETACHES_SEED),
each in a random time zone (DST zones included), given to
``poussetaches.CronSpec`` either as ``CRON_TZ=<zone> <spec>`` or with the
zone as its ``tz`` argument, from a random start time (often near a DST
change); the next 5 runs of ``CronSpec.next_after`` are compared with
croniter's ``get_next`` from an aware start in that zone.

croniter is built with ``implement_cron_bug=True``: that is croniter's
switch for Vixie cron's day rule, the one SPEC section 3 documents (the day
fields are OR-ed unless either field's text starts with ``*``; ``?`` reads as
``*``).  Without it croniter ORs ``*/2`` with a weekday, which no cron does.

A disagreement is allowed only where SPEC section 3 documents poussetaches'
rule and croniter differs, and only when one of the rule functions below
recognises that very case; each is counted by rule name:

  dst-skipped    croniter runs a wall time that a DST change skipped, moved
                 to the end of the gap (whose own wall time does not match);
                 poussetaches does not run it.  rule_dst_skipped checks that
                 croniter's time is a gap's end and that a matching wall
                 time lies inside that gap.
  dst-repeated   croniter runs the second instant of a matching wall time
                 repeated by a DST change, whose first instant is not after
                 the start; poussetaches runs it once, at its first.
  horizon        poussetaches searches 5 years ahead and returns None;
                 croniter finds a run at least 5 years away.
  full-dow-list  croniter reads a day-of-week field that lists every day
                 (``0-6``, ``SUN-SAT``, ``MON-7``...) as ``*``, so ANDs it
                 with the day of month, when the day-of-month text contains a
                 ``*`` anywhere (``1,*/2``), or when the list holds a bare
                 ``*`` item (``MON,*``); SPEC: a field is unrestricted only
                 when its text *starts* with ``*`` or ``?``, so both are
                 restricted and OR-ed: every day.
  full-dom-list  the same for a day-of-month field covering 1-31.
  equal-range    croniter reads ``a-a`` / ``a-a/n`` (``5-5``, ``SUN-SUN``,
                 ``JAN-JAN``) as the whole cycle (deliberately, its
                 "Jan-Jan"); SPEC's 5 fields are the standard crontab, where
                 ``5-5`` is 5 (Vixie cron; poussetaches).

Chains: the two DST rules mean "croniter has one run more", so after one the
croniter side moves past its extra run and the poussetaches answer still
waits to be matched by croniter's next one (nothing is skipped unchecked).
For full-*-list and equal-range, croniter is given the spec as SPEC reads it
(``5-5`` -> ``5``; both day fields ``*``, since OR with every day is every
day) for the whole chain, and each run where croniter's own reading of the
spec as written differs is counted.  After ``horizon`` the chain stops.
Every run both sides agree on is also checked against SPEC's own terms (a
whole minute whose wall time matches, at that wall time's first instant),
since croniter itself deviates at DST changes and agreement alone would not
catch poussetaches copying it.  Anything else that differs, any spec one
side refuses and the other accepts, and any crash, is a FAILURE.

Not generated (poussetaches and croniter knowingly differ, not covered by
SPEC's grammar or SPEC-consistent): wrap-around ranges (``22-2``,
``MON-SUN``: croniter wraps, poussetaches refuses as Vixie cron does),
``?`` outside the day fields or with a step (poussetaches reads it as ``*``,
croniter refuses), ``L``/``W``/``#`` (croniter only), 6 fields (croniter
puts seconds last, SPEC first).

Prints the first failures in full, then exactly one summary line; exit 1 if
any failure, else 0.  POUSSETACHES_ORACLE_CASES overrides the number of specs
(for exploration; CI uses the default).
"""

import datetime as dt
import os
import random
import re
import sys
import time
import traceback
import zoneinfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import poussetaches as pt  # noqa: E402

import croniter as croniter_mod  # noqa: E402
from croniter import CroniterBadDateError, CroniterError, croniter  # noqa: E402

try:
    from importlib.metadata import version as _dist_version
    CRONITER_VERSION = _dist_version("croniter")
except Exception:  # noqa: BLE001 - only for the summary line
    CRONITER_VERSION = getattr(croniter_mod, "__version__", "?")

NS = 10 ** 9
SEED = int(os.environ.get("POUSSETACHES_SEED", "20261207"))
CASES = int(os.environ.get("POUSSETACHES_ORACLE_CASES", "5000"))
RUNS = 5                      # successive runs compared per spec
MAX_EXTRA = 200               # croniter-only runs tolerated in one chain
SHOW = 20                     # failures printed in full
HORIZON_S = 5 * 365 * 86400   # SPEC: "no time in the next 5 years"

ZONES = (
    "Europe/Paris", "America/New_York", "Australia/Lord_Howe",
    "America/Sao_Paulo", "Asia/Kolkata", "UTC", "Pacific/Chatham",
    "America/St_Johns", "America/Santiago", "Europe/Dublin",
    "Australia/Sydney", "America/Havana", "Europe/London",
)
RANGE_START = int(dt.datetime(2010, 1, 1, tzinfo=dt.timezone.utc).timestamp())
RANGE_END = int(dt.datetime(2036, 1, 1, tzinfo=dt.timezone.utc).timestamp())
EPOCH = dt.datetime(1970, 1, 1)

RULES = ("dst-skipped", "dst-repeated", "horizon", "full-dow-list", "full-dom-list",
         "equal-range", "dow-7-step-refused")

MONTH_NAMES = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
DAY_NAMES = "SUN MON TUE WED THU FRI SAT".split()


# --------------------------------------------------------------------------
# Time zone helpers (independent of poussetaches)
# --------------------------------------------------------------------------

def offset_at(t, tz):
    """UTC offset (timedelta) in force at Unix second t."""
    return dt.datetime.fromtimestamp(t, tz).utcoffset()


def transitions(tz):
    """Unix seconds at which tz's UTC offset changes, RANGE_START..RANGE_END."""
    out = []
    step = 5 * 86400
    t, off = RANGE_START, offset_at(RANGE_START, tz)
    while t < RANGE_END:
        nxt = t + step
        off2 = offset_at(nxt, tz)
        if off2 != off:
            lo, hi = t, nxt          # offset(lo) == off, offset(hi) != off
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if offset_at(mid, tz) == off:
                    lo = mid
                else:
                    hi = mid
            out.append(hi)
        t, off = nxt, off2
    return out


def naive_wall(t, off):
    """Naive wall time of Unix second t under UTC offset off."""
    return EPOCH + dt.timedelta(seconds=t) + off


def iso(t_ns, tz):
    if t_ns is None:
        return "None"
    t = t_ns // NS
    text = dt.datetime.fromtimestamp(t, tz).isoformat()
    if t_ns % NS:
        text += " +%dns" % (t_ns % NS)
    return "%s (%d)" % (text, t_ns)


# --------------------------------------------------------------------------
# Spec generation
# --------------------------------------------------------------------------

# field: low, high, names (or None)
FIELDS = {
    "minute": (0, 59, None),
    "hour": (0, 23, None),
    "dom": (1, 31, None),
    "month": (1, 12, MONTH_NAMES),
    "dow": (0, 7, DAY_NAMES),  # 7 is Sunday
}


def spell(rng, field, v):
    """A value as a number or (sometimes) a name, in a random case."""
    lo, hi, names = FIELDS[field]
    if names and rng.random() < 0.35:
        if field == "month":
            word = names[v - 1]
        elif v <= 6:
            word = names[v]
        else:
            return str(v)
        r = rng.random()
        return word if r < 0.7 else word.lower() if r < 0.85 else word.capitalize()
    return str(v)


def gen_item(rng, field):
    lo, hi, names = FIELDS[field]
    top = 6 if field == "dow" else hi       # a start below the last value
    width = hi - lo + 1
    kind = rng.random()
    if kind < 0.35:                                       # single value
        if field == "dow" and rng.random() < 0.15:
            return "7"
        if field == "dom" and rng.random() < 0.7:
            return str(rng.randint(1, 28))
        return spell(rng, field, rng.randint(lo, hi if field != "dow" else 6))
    if kind < 0.6:                                        # range a-b, a < b
        if rng.random() < 0.04:                           # an equal range: 5-5, SUN-SUN, 7-7
            a = rng.randint(lo, hi)
            return "%s-%s" % (spell(rng, field, a), spell(rng, field, a))
        a = rng.randint(lo, top - 1 if field != "dow" else 5)
        if field == "dow" and rng.random() < 0.35:
            b = 7                                         # MON-7, 3-7...
        else:
            b = rng.randint(a + 1, top if field != "dow" else 6)
        return "%s-%s" % (spell(rng, field, a), spell(rng, field, b))
    if kind < 0.72:                                       # */n
        return "*/%d" % rng.randint(1, max(1, width // 2 + 1))
    if kind < 0.9:                                        # a-b/n
        a = rng.randint(lo, top - 1 if field != "dow" else 5)
        if field == "dow" and rng.random() < 0.5:
            b = 7                                         # 1-7/2, MON-7/1, 3-7/2
        else:
            b = rng.randint(a + 1, top if field != "dow" else 6)
        n = rng.randint(1, max(1, b - a + 1))
        if rng.random() < 0.03:                           # an equal range with a step: 10-10/5
            b = a
        return "%s-%s/%d" % (spell(rng, field, a), spell(rng, field, b), n)
    # a/n (for day of week, a in 0..6, and now and then 7: 7/2)
    a = rng.randint(lo, top)
    if field == "dow" and rng.random() < 0.1:
        a = 7
    n = rng.randint(1, max(1, width // 2))
    return "%s/%d" % (spell(rng, field, a), n)


def gen_field(rng, field, p_star, p_question=0.0, hours=None):
    r = rng.random()
    if r < p_star:
        return "*"
    if r < p_star + p_question:
        return "?"
    if hours is not None:
        return ",".join(str(h) for h in sorted(hours))
    k = rng.choice((1, 1, 1, 2, 2, 3, 4))
    items = [gen_item(rng, field) for _ in range(k)]
    # a full day-of-week list now and then: 0,1,2,3,4,5,6 / SUN-SAT / MON-7
    if field == "dow" and rng.random() < 0.04:
        items = [rng.choice(("0,1,2,3,4,5,6", "SUN-SAT", "MON-7", "1-7", "0-6",
                             "1,2,3,4,5,6,7", "MON-FRI,SAT,SUN"))]
    if field == "dom" and rng.random() < 0.02:
        items = [rng.choice(("1-31", "1-15,16-31"))]
    # a list whose later item starts with '*' (the full-list rules' trigger),
    # or is a bare '*' (5,*)
    if field in ("dom", "dow") and rng.random() < 0.08:
        items.append("*/%d" % rng.randint(1, 4) if rng.random() < 0.85 else "*")
    return ",".join(items)


def gen_case(rng, trans_by_zone):
    """(spec, zone, use_prefix, start_ns)."""
    zone = rng.choice(ZONES)
    tz = zoneinfo.ZoneInfo(zone)
    trans = trans_by_zone[zone]
    near = trans and rng.random() < 0.45
    hours = None
    if near:
        t_tr = rng.choice(trans)
        start = t_tr - rng.randint(-3 * 3600, 2 * 86400)
        if rng.random() < 0.1:
            start = t_tr + rng.randint(-3, 3)
        if rng.random() < 0.6:
            # hours around the change, so that the 5 runs meet it
            before = naive_wall(t_tr, offset_at(t_tr - 1, tz))
            after = naive_wall(t_tr, offset_at(t_tr, tz))
            base = {before.hour, after.hour, (before - dt.timedelta(hours=1)).hour}
            hours = {h for h in base if rng.random() < 0.8} or {before.hour}
            if rng.random() < 0.3:
                hours.add(rng.randint(0, 23))
    else:
        start = rng.randrange(RANGE_START, RANGE_END)
    start_ns = start * NS
    r = rng.random()
    if r < 0.2:
        start_ns += rng.randrange(1, NS)
    elif r < 0.4:
        start_ns -= start_ns % (60 * NS)              # on a minute boundary
    minute = gen_field(rng, "minute", 0.15 if not near else 0.3)
    hour = gen_field(rng, "hour", 0.3 if hours is None else 0.15, hours=hours)
    mode = rng.random()
    if near and rng.random() < 0.6:
        dom, month, dow = "*", "*", "*"
        if rng.random() < 0.3:
            dow = gen_field(rng, "dow", 0.0)
    else:
        # both day fields restricted (OR), one of them, or neither
        dom_restricted = mode < 0.35 or 0.6 <= mode < 0.8
        dow_restricted = mode < 0.6
        dom = gen_field(rng, "dom", 0.0) if dom_restricted else rng.choice(("*", "*", "?", "*/1"))
        dow = gen_field(rng, "dow", 0.0) if dow_restricted else rng.choice(("*", "*", "?"))
        month = gen_field(rng, "month", 0.6)
    if not near and rng.random() < 0.04:
        # rare days (a day of month on some weekdays, AND-ed: the weekday field
        # starts with '*'): next runs months to decades away, around the 5-year
        # horizon; now and then impossible (30 Feb)
        dom = rng.choice(("29", "29", "31", "30", "13", "29-30", "31,29"))
        month = rng.choice(("2", "FEB", "2", "2,4", "*/6", "JAN,FEB", "4,6,9,11", "*"))
        dow = "*/%d" % rng.randint(2, 6)
        if rng.random() < 0.3:
            dow += "," + spell(rng, "dow", rng.randint(0, 7))
    spec = " ".join((minute, hour, dom, month, dow))
    return spec, zone, rng.random() < 0.3, start_ns


# --------------------------------------------------------------------------
# Reading a spec as SPEC does (for the full-list rules)
# --------------------------------------------------------------------------

def field_values(text, lo, hi, names):
    """Vixie-style value set of a field (day of week 7 -> 0); None if unreadable."""
    values = set()
    try:
        for part in text.split(","):
            span, slash, step = part.partition("/")
            step = int(step) if slash else 1

            def value(w):
                w = w.lower()
                if names:
                    low = [n.lower() for n in names]
                    if w in low:
                        return low.index(w) + (1 if lo == 1 else 0)
                return int(w)
            if span in ("*", "?"):
                a, b = lo, hi
            elif "-" in span:
                a, b = (value(x) for x in span.split("-"))
            else:
                a = value(span)
                b = (6 if hi == 7 else hi) if slash else a
            values.update(range(a, b + 1, step))
    except ValueError:
        return None
    if hi == 7 and 7 in values:
        values.discard(7)
        values.add(0)
    return values


def full_list_rule(spec):
    """The full-list rule that applies to this 5-field spec, or None.

    croniter (``_expand``) turns a day field whose values are the whole set
    into ``*`` when the other day field's text contains a ``*`` anywhere, and
    a list holding a bare ``*`` item (``5,*``) reads as ``*`` too; a day field
    read as ``*`` means no OR.  SPEC reads both fields as restricted (neither
    text starts with ``*`` or ``?``): OR-ed, and OR with every day is every day.
    """
    fields = spec.split()
    if len(fields) != 5:
        return None
    dom, dow = fields[2], fields[4]
    if dom[0] in "*?" or dow[0] in "*?":
        return None                    # not both restricted: AND in both readings
    if field_values(dow, 0, 7, DAY_NAMES) == set(range(7)) and (
            "*" in dom or "*" in dow.split(",")):
        return "full-dow-list"
    if field_values(dom, 1, 31, None) == set(range(1, 32)) and (
            "*" in dow or "*" in dom.split(",")):
        return "full-dom-list"
    return None


def respell_days_unrestricted(spec):
    f = spec.split()
    return " ".join(f[:2] + ["*", f[3], "*"])


def respell_equal_ranges(spec):
    """Each list item ``a-a`` or ``a-a/n`` (the same value written twice) as
    ``a``, the standard crontab reading (SPEC 3: 5 fields = standard crontab;
    Vixie cron: a range from a to a is a).  croniter deliberately reads an
    equal range as the whole cycle (its "Jan-Jan"): ``5-5`` is every minute."""
    out = []
    for text, name in zip(spec.split(), ("minute", "hour", "dom", "month", "dow")):
        lo, hi, names = FIELDS[name]
        items = []
        for item in text.split(","):
            span = item.partition("/")[0]
            ends = span.split("-")
            if len(ends) == 2:
                a = field_values(ends[0], lo, hi, names)
                b = field_values(ends[1], lo, hi, names)
                # as written: 7-7 is an equal range, SUN-7 (0-7: every day) is not
                one_seven = name == "dow" and (ends[0] == "7") != (ends[1] == "7")
                if a is not None and a == b and not one_seven:
                    item = ends[0]
            items.append(item)
        out.append(",".join(items))
    return " ".join(out)


# --------------------------------------------------------------------------
# croniter wrappers
# --------------------------------------------------------------------------

class Cron:
    """croniter on one spec in one zone: next run after a Unix ns time."""

    def __init__(self, spec, tz):
        self.spec, self.tz = spec, tz
        start = dt.datetime(2020, 1, 1, tzinfo=tz)
        self.it = croniter(spec, start, implement_cron_bug=True)
        self.naive = None

    def next_after(self, t_ns):
        t = t_ns // NS
        start = dt.datetime.fromtimestamp(t, self.tz).replace(microsecond=(t_ns % NS) // 1000)
        try:
            ts = self.it.get_next(float, start_time=start)
        except CroniterBadDateError:
            return None
        return int(round(ts)) * NS

    def matches_wall(self, wall):
        """Whether the naive wall time (a whole minute) matches, as croniter reads it."""
        return self.first_wall_from(wall) == wall

    def first_wall_from(self, wall):
        """First naive wall time >= wall (a whole minute) matching, or None
        (croniter without a zone: wall-clock arithmetic only)."""
        if self.naive is None:
            self.naive = croniter(self.spec, wall, implement_cron_bug=True)
        try:
            return self.naive.get_next(dt.datetime, start_time=wall - dt.timedelta(minutes=1))
        except CroniterBadDateError:
            return None


# --------------------------------------------------------------------------
# Allowed-difference rules: each returns (rule name, action) or None.
# action "cron-extra": croniter has a run poussetaches rightly lacks; move
# croniter past it, keep poussetaches' answer to match.  "stop": end chain.
# --------------------------------------------------------------------------

def rule_dst_skipped(p, c, s_p, cron, tz):
    """croniter's run c is the end of a DST gap, standing in for a matching wall
    time inside the gap (moved forward); c's own wall time does not match, and
    poussetaches (which does not run skipped times) answers later."""
    if c is None or (p is not None and p <= c):
        return None
    t = c // NS
    if c % NS:
        return None
    before, after = offset_at(t - 1, tz), offset_at(t, tz)
    if after <= before:
        return None                                   # not the end of a gap
    gap_start, gap_end = naive_wall(t, before), naive_wall(t, after)
    if cron.matches_wall(gap_end):
        return None                                   # c is a real run: pt must have it
    first = cron.first_wall_from(gap_start)
    if first is None or not gap_start <= first < gap_end:
        return None                                   # nothing skipped to stand in for
    return "dst-skipped", "cron-extra"


def rule_dst_repeated(p, c, s_p, cron, tz):
    """croniter's run c is the second occurrence of a repeated (fall-back) wall
    time that matches; its first occurrence is not after poussetaches' start
    (so poussetaches ran it, or it was before the window), and poussetaches,
    running it once, answers later."""
    if c is None or (p is not None and p <= c) or c % NS:
        return None
    t = c // NS
    local = dt.datetime.fromtimestamp(t, tz)
    if local.fold != 1:
        return None
    wall = local.replace(tzinfo=None, fold=0)
    first = int(wall.replace(tzinfo=tz, fold=0).timestamp())
    if first >= t:
        return None                                   # not a repeated wall time
    if first * NS > s_p:
        return None                                   # pt had to run the first one
    if not cron.matches_wall(wall):
        return None
    return "dst-repeated", "cron-extra"


def rule_horizon(p, c, s_p, cron, tz):
    """poussetaches looks 5 years ahead; croniter found a run further away."""
    if p is None and c is not None and c - s_p >= HORIZON_S * NS:
        return "horizon", "stop"
    return None


ALLOWED = (rule_dst_skipped, rule_dst_repeated, rule_horizon)


def check_run(p, cron, tz):
    """SPEC's own terms, checked on a run both sides agree on (croniter itself
    deviates there, so agreement alone would not catch poussetaches copying
    it): a whole minute whose wall time matches the spec and is that wall
    time's first instant (not a time moved out of a DST gap, not the second
    pass of a repeated hour).  None if fine, else what is wrong."""
    if p % (60 * NS):
        return "it is not a whole minute"
    local = dt.datetime.fromtimestamp(p // NS, tz)
    wall = local.replace(tzinfo=None, fold=0)
    if int(wall.replace(tzinfo=tz, fold=0).timestamp()) * NS != p:
        return "it is the second instant of the repeated wall time %s" % wall
    if not cron.matches_wall(wall):
        return "its wall time %s does not match the spec" % wall
    return None


# --------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------

def run_case(index, spec, zone, use_prefix, start_ns, counts, failures):
    tz = zoneinfo.ZoneInfo(zone)
    where = "seed=%d case=%d spec=%r zone=%s%s start=%s" % (
        SEED, index, spec, zone, " (via CRON_TZ=)" if use_prefix else " (tz argument)",
        iso(start_ns, tz))
    pt_error = cron_error = None
    try:
        if use_prefix:
            ours = pt.CronSpec("CRON_TZ=%s %s" % (zone, spec))
        else:
            ours = pt.CronSpec(spec, tz)
    except pt.CronError as exc:
        pt_error = "CronError: %s" % exc
    except Exception:  # noqa: BLE001 - anything but CronError is a crash
        failures.append("%s: poussetaches crashed on the spec: %s"
                        % (where, traceback.format_exc(limit=3)))
        return
    try:
        cron = Cron(spec, tz)
    except (CroniterError, ValueError, TypeError, KeyError) as exc:
        cron_error = "%s: %s" % (type(exc).__name__, exc)
    if pt_error or cron_error:
        if pt_error and cron_error:
            counts["both-refused"] += 1
        elif pt_error and re.search(r"(^|,)7/[0-9]+(,|$)", spec.split()[-1]) \
                and "is read differently by each cron" in pt_error:
            counts["dow-7-step-refused"] += 1  # SPEC: 7/step is a 400 (crons disagree on it)
        elif pt_error:
            counts["refused-by-poussetaches"] += 1
            failures.append("%s: poussetaches refuses a spec croniter accepts: %s"
                            % (where, pt_error))
        else:
            counts["refused-by-croniter"] += 1
            failures.append("%s: croniter refuses a spec poussetaches accepts: %s"
                            % (where, cron_error))
        return

    # croniter reads some spellings otherwise than SPEC does: give it SPEC's
    # reading, and count each run where its own reading differs
    respelled, respell_rules = spec, []
    if respell_equal_ranges(spec) != spec:
        respelled = respell_equal_ranges(spec)
        respell_rules.append("equal-range")
    if full_list_rule(spec):
        respelled = respell_days_unrestricted(respelled)
        respell_rules.append(full_list_rule(spec))
    raw = None
    if respelled != spec:
        raw, cron = cron, Cron(respelled, tz)

    s_p = s_c = start_ns
    p_cache = None
    matched = extra = 0
    while matched < RUNS:
        try:
            if p_cache is None or p_cache[0] != s_p:
                p_cache = (s_p, ours.next_after(s_p))
            p = p_cache[1]
        except Exception:  # noqa: BLE001
            failures.append("%s: run %d after %s: next_after raised %s"
                            % (where, matched + 1, iso(s_p, tz), traceback.format_exc(limit=3)))
            return
        try:
            c = cron.next_after(s_c)
            if raw is not None and raw.next_after(s_c) != c:
                for name in respell_rules:
                    counts[name] += 1
        except Exception:  # noqa: BLE001 - croniter crashed: report, go on
            failures.append("%s: run %d after %s: croniter raised %s"
                            % (where, matched + 1, iso(s_c, tz), traceback.format_exc(limit=3)))
            return
        if p == c:
            if p is None:
                return                                # neither runs again
            problem = check_run(p, cron, tz)
            if problem:
                failures.append("%s: run %d after %s: poussetaches and croniter agree on %s, "
                                "but %s" % (where, matched + 1, iso(s_p, tz), iso(p, tz), problem))
                return
            matched += 1
            s_p = s_c = p
            continue
        for rule in ALLOWED:
            verdict = rule(p, c, s_p, cron, tz)
            if verdict:
                break
        else:
            failures.append(
                "%s: run %d after %s%s: croniter %s, poussetaches %s"
                % (where, matched + 1, iso(s_p, tz),
                   "" if s_c == s_p else " (croniter from %s)" % iso(s_c, tz),
                   iso(c, tz), iso(p, tz)))
            return
        name, action = verdict
        counts[name] += 1
        if action == "stop":
            return
        extra += 1
        if extra > MAX_EXTRA:
            failures.append("%s: more than %d croniter-only runs in one chain"
                            % (where, MAX_EXTRA))
            return
        s_c = c


def main():
    t0 = time.monotonic()
    rng = random.Random(SEED)
    trans_by_zone = {z: transitions(zoneinfo.ZoneInfo(z)) for z in ZONES}
    counts = dict.fromkeys(RULES + ("both-refused", "refused-by-poussetaches",
                                    "refused-by-croniter"), 0)
    failures = []
    failing_cases = 0
    for index in range(CASES):
        spec, zone, use_prefix, start_ns = gen_case(rng, trans_by_zone)
        before = len(failures)
        run_case(index, spec, zone, use_prefix, start_ns, counts, failures)
        failing_cases += len(failures) > before
    elapsed = time.monotonic() - t0
    for line in failures[:SHOW]:
        print("FAIL " + line)
    if len(failures) > SHOW:
        print("... and %d more failures" % (len(failures) - SHOW))
    refusals = ["%s=%d" % (k, counts[k]) for k in ("refused-by-poussetaches",
                                                   "refused-by-croniter", "both-refused")
                if counts[k]]
    print("oracle croniter %s: %d specs x %d runs (seed %d) in %.1f s: %d failures%s; "
          "allowed differences by rule: %s"
          % (CRONITER_VERSION, CASES, RUNS, SEED, elapsed, failing_cases,
             " (%s)" % ", ".join(refusals) if refusals else "",
             ", ".join("%s=%d" % (name, counts[name]) for name in RULES)))
    return 1 if failing_cases else 0


if __name__ == "__main__":
    sys.exit(main())
