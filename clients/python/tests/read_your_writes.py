"""Read-your-writes through a matroska-cache-backed read path, with walsweep running.

    read_your_writes.py <redis-port> <postgres-dsn> <database> <slot> <iterations> [--no-wait]

A writer updates its own row, commits, waits for walsweep's applied position to reach its
commit (walsweep_client.wait_for_lsn; skipped with --no-wait) and reads the row back through
matroska-cache (get(); on a miss, read the database and put() with the row's dependency). It
must see the value it just wrote. Meanwhile a second thread keeps updating other rows, so
walsweep applies a concurrent load. The rules invalidate dependency ``id:item:<id>``.

Prints one line: iterations, stale reads, and the wait's p50/p99/max in ms. Exits 1 if any
read returned a value from before the reader's own commit (and --no-wait was not given).
"""

import sys
import threading
import time

try:
    import psycopg2
    import redis
    from matroska_cache import MatroskaCache, NotInCache, dep
    from matroska_cache.backends.redis import RedisBackend
except ImportError as e:
    sys.exit(f"read_your_writes.py: {e}; run scripts/ensure-venv")

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from walsweep_client import commit_lsn, position_key, wait_for_lsn  # noqa: E402

OWN_ROW = 1
LOAD_ROWS = range(2, 102)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def background_load(dsn, stop, counter):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    n = 0
    while not stop.is_set():
        row = LOAD_ROWS[n % len(LOAD_ROWS)]
        cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (row,))
        n += 1
        counter[0] = n
        time.sleep(0.001)
    conn.close()


def main(argv):
    port, dsn, database, slot, iterations = argv[1:6]
    iterations = int(iterations)
    wait = "--no-wait" not in argv
    # matroska-cache 0.1.3 reads str replies: without decode_responses a hit comes back None.
    client = redis.Redis(host="127.0.0.1", port=int(port), decode_responses=True)
    cache = MatroskaCache(RedisBackend(client, prefix="cache"))
    key = position_key(database, slot)

    conn = psycopg2.connect(dsn)
    cur = conn.cursor()
    stop = threading.Event()
    load_writes = [0]
    loader = threading.Thread(target=background_load, args=(dsn, stop, load_writes))
    loader.start()

    def read_through(row):
        try:
            return cache.get("item:%d" % row)
        except NotInCache:
            cur.execute("SELECT v FROM items WHERE id = %s", (row,))
            value = cur.fetchone()[0]
            conn.commit()
            cache.put("item:%d" % row, value, dep.Id("item", row), expires=600)
            return value

    stale = 0
    waits = []
    try:
        read_through(OWN_ROW)
        for i in range(1, iterations + 1):
            cur.execute("UPDATE items SET v = %s WHERE id = %s", (i, OWN_ROW))
            conn.commit()
            if wait:
                lsn = commit_lsn(cur)
                conn.commit()
                started = time.monotonic()
                wait_for_lsn(client, key, lsn, timeout=10.0)
                waits.append((time.monotonic() - started) * 1000.0)
            seen = read_through(OWN_ROW)
            if seen != i:
                stale += 1
                if wait and stale <= 5:
                    print(f"iteration {i}: read {seen!r} after writing {i}", file=sys.stderr)
    finally:
        stop.set()
        loader.join()
    print(
        f"iterations={iterations} stale={stale} load_writes={load_writes[0]} "
        f"wait_p50_ms={percentile(waits, 0.5):.3f} wait_p99_ms={percentile(waits, 0.99):.3f} "
        f"wait_max_ms={max(waits, default=0.0):.3f}"
    )
    return 1 if wait and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
