"""The refill race with the real matroska-cache, fenced or not (driven by tests/fenced_fills.rs).

    refill_race_fenced.py <redis-port> <postgres-dsn> <database> <slot> fenced|plain
        [--fills N] [--rounds K] [--max-secs S] [--procs P] [--threads T] [--rows R]
        [--views V] [--writes-per-sec W] [--slow-share F] [--slow-ms MS] [--seed N]

Readers (P processes of T threads) do what an app does: ``cache.get(key)``; on NotInCache read
the row from Postgres and ``cache.put(key, value, dep.Id("item", id), expires=600)``. The
cache is ``MatroskaCache(FencedRedisBackend(...))`` (fenced) or ``MatroskaCache(RedisBackend(
...))`` (plain); nothing else differs. Each of the R hot rows is cached under V keys
(``item:<id>:<view>``, as an app caches a row in several listings), so every UPDATE
invalidates V entries. A share F of fills does some work (sleeps up to MS ms) between reading
the database and ``put()``, as a slow request would. The readers run throughout.

K rounds: a writer updates random hot rows at W/s (0: as fast as it can) until the readers
made N/K more fills (or S seconds passed in all); then quiescence: the writer's last
``pg_current_wal_insert_lsn()``, and a wait until walsweep's applied position reaches it (every
invalidation applied); then every cached entry is compared with the database: stale = the
cached value is not the row's value. Stale entries are counted and deleted (so the next round
does not count them again). Only a row's last change before a check can leave an entry stale
(an earlier stale fill is removed by the next change: the set walsweep keeps still names it),
so more rounds, not longer ones, give the plain backend's races more chances to show.

At the end the race is played once on purpose on row R+1, which no reader or writer touches:
a miss, the row read, an UPDATE committed and applied by walsweep, then ``put()`` of the value
read before it: the plain backend stores it (stale), the fenced one must refuse it. Readers
stop, and a last check counts it.

Prints one line of ``name=value`` figures. Exits 1 when the check itself is broken (an entry
the test spoils on purpose is not counted as stale); the figures are for the Rust test to judge.
"""

import argparse
import multiprocessing
import os
import random
import sys
import threading
import time

try:
    import psycopg2
    import redis
    from matroska_cache import MatroskaCache, NotInCache, dep
    from matroska_cache.backends.redis import RedisBackend, unserialize
except ImportError as e:
    sys.exit(f"refill_race_fenced.py: {e}; run scripts/ensure-venv")

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from walsweep_client import (  # noqa: E402
    FencedRedisBackend,
    commit_lsn,
    fill_counts,
    position_key,
    wait_for_lsn,
)

PREFIX = "cache"
EXPIRES = 600


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("dsn")
    p.add_argument("database")
    p.add_argument("slot")
    p.add_argument("mode", choices=["fenced", "plain"])
    p.add_argument("--fills", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-secs", type=float, default=120.0)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--writes-per-sec", type=float, default=200)
    p.add_argument("--slow-share", type=float, default=0.2)
    p.add_argument("--slow-ms", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0x5EED)
    return p.parse_args(argv[1:])


def make_cache(args, r):
    if args.mode == "fenced":
        backend = FencedRedisBackend(
            r, prefix=PREFIX, position_key=position_key(args.database, args.slot)
        )
    else:
        backend = RedisBackend(r, prefix=PREFIX)
    return MatroskaCache(backend)


def connect_redis(args):
    # matroska-cache reads str values.
    return redis.Redis(host="127.0.0.1", port=args.port, decode_responses=True)


def reader_thread(args, cache, seed, stop, slot, results):
    """Counts in results[slot * 4 ...]: fills, stored, refused, hits."""
    rng = random.Random(seed)
    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True  # each SELECT reads a new snapshot, as an app's request would
    cur = conn.cursor()
    fills = stored = refused = hits = 0
    base = slot * 4
    while not stop.is_set():
        row = rng.randint(1, args.rows)
        key = "item:%d:%d" % (row, rng.randrange(args.views))
        try:
            cache.get(key)
            hits += 1
            results[base + 3] = hits
            continue
        except NotInCache:
            pass
        cur.execute("SELECT v FROM items WHERE id = %s", (row,))
        value = cur.fetchone()[0]
        if rng.random() < args.slow_share:
            time.sleep(rng.uniform(0, args.slow_ms) / 1000.0)
        # RedisBackend.put returns None: it always stores.
        if cache.put(key, value, dep.Id("item", row), expires=EXPIRES) is False:
            refused += 1
        else:
            stored += 1
        fills += 1
        results[base], results[base + 1], results[base + 2] = fills, stored, refused
    conn.close()


def reader_process(args, proc, stop, results):
    cache = make_cache(args, connect_redis(args))  # one client (connection pool) per process
    threads = [
        threading.Thread(
            target=reader_thread,
            args=(args, cache, args.seed * 1000 + proc * 100 + t, stop, proc * args.threads + t, results),
        )
        for t in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def write_until(args, cur, rng, done, deadline):
    """UPDATEs random hot rows at the rate asked until ``done()`` or the deadline; returns how
    many and the insert position after the last one (covers every write before it)."""
    interval = 1.0 / args.writes_per_sec if args.writes_per_sec > 0 else 0.0
    next_at = time.monotonic()
    writes = 0
    while not done() and time.monotonic() < deadline:
        cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (rng.randint(1, args.rows),))
        writes += 1
        if interval:
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()
    return writes, commit_lsn(cur)


def provoke(args, cache, r, row):
    """The race on purpose: miss, read, a commit walsweep applies, put of the old value.
    Returns (put's result, walsweep's fence of the row's set after the commit)."""
    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    key = "item:%d:0" % row
    # A sibling entry of the row: its removal shows walsweep applied the invalidation.
    sibling = "item:%d:sibling" % row
    try:
        cache.get(sibling)
    except NotInCache:
        pass
    cache.put(sibling, -1, dep.Id("item", row), expires=EXPIRES)
    try:
        cache.get(key)
        raise AssertionError("%s is cached before the provoked race" % key)
    except NotInCache:
        pass
    cur.execute("SELECT v FROM items WHERE id = %s", (row,))
    old = cur.fetchone()[0]
    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (row,))
    wait_for_lsn(r, position_key(args.database, args.slot), commit_lsn(cur), timeout=30)
    if cache.has(sibling):
        raise AssertionError("walsweep applied the UPDATE of row %d but %s is still cached" % (row, sibling))
    fence = r.get("walsweep:fence:%s::rdep::id:item:%d" % (PREFIX, row))
    result = cache.put(key, old, dep.Id("item", row), expires=EXPIRES)
    conn.close()
    return result, fence


def check(args, r, rows):
    """Every cached entry of rows 1..rows against the database: (checked, stale keys). Reads
    them as RedisBackend.get does (one MGET, the library's own unserialize)."""
    conn = psycopg2.connect(args.dsn)
    cur = conn.cursor()
    cur.execute("SELECT id, v FROM items")
    values = dict(cur.fetchall())
    conn.close()
    keys = ["item:%d:%d" % (row, view) for row in range(1, rows + 1) for view in range(args.views)]
    cached = r.mget(["%s::data::%s" % (PREFIX, k) for k in keys])
    checked, stale = 0, []
    for key, data in zip(keys, cached):
        if data is None:
            continue
        checked += 1
        if unserialize(data) != values[int(key.split(":")[1])]:
            stale.append(key)
    return checked, stale


def main(argv):
    args = parse(argv)
    r = connect_redis(args)
    cache = make_cache(args, r)
    position = position_key(args.database, args.slot)
    counts_before = fill_counts(r)
    slots = args.procs * args.threads
    results = multiprocessing.Array("q", slots * 4, lock=False)
    stop_readers = multiprocessing.Event()

    def total(field):
        return sum(results[s * 4 + field] for s in range(slots))

    started = time.monotonic()
    deadline = started + args.max_secs
    readers = [
        multiprocessing.Process(target=reader_process, args=(args, p, stop_readers, results))
        for p in range(args.procs)
    ]
    for p in readers:
        p.start()

    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    rng = random.Random(args.seed)
    writes, checked, stale, quiesce_ms, rounds = 0, 0, [], [], 0
    for round_ in range(1, args.rounds + 1):
        target = args.fills * round_ // args.rounds

        def done():
            if not all(p.is_alive() for p in readers):
                stop_readers.set()
                sys.exit("a reader process died (exit codes %s)" % [p.exitcode for p in readers])
            return total(0) >= target

        n, last_lsn = write_until(args, cur, rng, done, deadline)
        writes += n
        # Quiescence: every write's invalidation applied. Readers keep going meanwhile; what
        # they read now is the rows' last values.
        quiesce_started = time.monotonic()
        wait_for_lsn(r, position, last_lsn, timeout=60)
        quiesce_ms.append((time.monotonic() - quiesce_started) * 1000.0)
        c, s = check(args, r, args.rows)
        checked += c
        stale += ["%d/%s" % (round_, k) for k in s]
        if s:
            r.delete(*["%s::data::%s" % (PREFIX, k) for k in s])
        rounds = round_
        if time.monotonic() >= deadline:
            break
    load_secs = time.monotonic() - started
    conn.close()

    provoked_row = args.rows + 1
    provoked, fence = provoke(args, cache, r, provoked_row)

    stop_readers.set()
    for p in readers:
        p.join(30)
        if p.exitcode != 0:
            sys.exit("a reader process failed (exit code %s)" % p.exitcode)
    fills, stored, refused, hits = (total(i) for i in range(4))

    # The last check: the readers' last fills, and the provoked race.
    c, s = check(args, r, provoked_row)
    checked += c
    provoked_key = "item:%d:0" % provoked_row
    stale += ["last/%s" % k for k in s if k != provoked_key]

    # The checker checks: an entry spoiled on purpose is counted, exactly it.
    victim = next(
        "item:%d:%d" % (row, view)
        for row in range(1, args.rows + 1)
        for view in range(args.views)
        if "item:%d:%d" % (row, view) not in s
    )
    RedisBackend(r, prefix=PREFIX).put(victim, -1, [], EXPIRES)
    if sorted(check(args, r, provoked_row)[1]) != sorted(s + [victim]):
        print("the check missed the entry spoiled on purpose: %s" % victim, file=sys.stderr)
        return 1
    r.delete("%s::data::%s" % (PREFIX, victim))

    counts = fill_counts(r)
    print(
        " ".join(
            "%s=%s" % kv
            for kv in [
                ("mode", args.mode),
                ("fills", fills),
                ("stored", stored),
                ("refused", refused),
                ("hits", hits),
                ("writes", writes),
                ("rounds", rounds),
                ("load_secs", "%.1f" % load_secs),
                ("fills_per_sec", "%.0f" % (fills / load_secs)),
                ("quiesce_ms_max", "%.0f" % max(quiesce_ms)),
                ("checked", checked),
                ("stale", len(stale)),
                ("provoked_stored", "false" if provoked is False else "true"),
                ("provoked_stale", "true" if provoked_key in s else "false"),
                ("provoked_fence", fence),
                ("function_stored", counts["stored"] - counts_before["stored"]),
                ("function_refused", counts["refused"] - counts_before["refused"]),
            ]
        )
    )
    if stale:
        print("stale entries (round/key): %s" % " ".join(stale[:30]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
