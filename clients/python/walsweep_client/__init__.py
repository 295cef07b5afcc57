"""App-side helpers for walsweep.

Read your own writes through the cache: right after COMMIT, take the commit's LSN on the same
connection, then wait until walsweep's published applied position reaches it; a read through
the cache after that sees the commit (its invalidations are done).

    from walsweep_client import commit_lsn, position_key, wait_for_lsn

    cur.execute("UPDATE articles SET title = %s WHERE id = %s", (title, 1))
    conn.commit()
    lsn = commit_lsn(cur)                        # pg_current_wal_insert_lsn(), as a number
    wait_for_lsn(redis, position_key("app", "walsweep"), lsn, timeout=2.0)
    article = cache.get("article:1")             # a miss, or the new row: never the old one

The protocol, for any language (README, "Read your own writes"): the key
``walsweep:<database>/<slot>:applied`` holds a decimal LSN and only grows; each advance is
published on the channel of the same name. Subscribe, then GET, then wait for a message.

Fenced fills (README, "Fenced fills"; walsweep with ``[matroska] fences = true``): a fill that
read the database before a commit walsweep has invalidated since is refused, not stored.
matroska-cache apps change the line that builds the backend:

    from walsweep_client import FencedRedisBackend, position_key

    cache = MatroskaCache(
        FencedRedisBackend(redis, prefix="cache", position_key=position_key("app", "walsweep"))
    )

Other caches use ``fill_begin`` (before reading the database) and ``fill`` directly
(``walsweep_client.fences``). ``FencedRedisBackend`` is imported on first use, so this package
imports without matroska-cache installed.
"""

import time

from .fences import FencesNotLoaded, fill, fill_begin, fill_counts

__all__ = [
    "FencedRedisBackend",
    "FencesNotLoaded",
    "WaitTimeout",
    "commit_lsn",
    "fill",
    "fill_begin",
    "fill_counts",
    "parse_lsn",
    "position_key",
    "wait_for_lsn",
]


def __getattr__(name):
    # Lazy: matroska-cache is only needed by apps that use the backend.
    if name == "FencedRedisBackend":
        from .matroska import FencedRedisBackend

        return FencedRedisBackend
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


class WaitTimeout(Exception):
    """walsweep's applied position did not reach the LSN in time (is walsweep running?)."""


def position_key(database, slot="walsweep"):
    """The key (and Pub/Sub channel) walsweep publishes its applied position under."""
    return "walsweep:%s/%s:applied" % (database, slot)


def parse_lsn(value):
    """An LSN as an int, from Postgres's text form (``0/16B3748``), a decimal number (string,
    int or Decimal, as ``pg_current_wal_insert_lsn() - '0/0'`` returns) or bytes."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        value = value.strip()
        if "/" in value:
            high, low = value.split("/", 1)
            return (int(high, 16) << 32) | int(low, 16)
    return int(value)


def commit_lsn(cursor):
    """The LSN to wait for after the COMMIT just made on ``cursor``'s connection.

    ``pg_current_wal_insert_lsn()``, not ``pg_current_wal_lsn()``: the latter is only what the
    server has written out so far, which can be before the commit record, so waiting for it
    could return before walsweep applied the commit."""
    cursor.execute("SELECT pg_current_wal_insert_lsn() - '0/0'")
    return parse_lsn(cursor.fetchone()[0])


def wait_for_lsn(redis, key, lsn, timeout=5.0):
    """Blocks until the published position under ``key`` is at or past ``lsn``; returns the
    position. Raises WaitTimeout after ``timeout`` seconds.

    ``redis`` is a redis-py client (``redis.Redis``). Subscribes before reading the key, so an
    advance between the two cannot be missed; blocks on the subscription, never polls."""
    target = parse_lsn(lsn)
    deadline = time.monotonic() + timeout
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(key)
        current = _as_position(redis.get(key))
        if current is not None and current >= target:
            return current
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    "%s is %s, not yet %s after %.3f s; is walsweep running?"
                    % (key, current, target, timeout)
                )
            message = pubsub.get_message(timeout=left)
            if message is None or message.get("type") != "message":
                continue
            current = _as_position(message.get("data"))
            if current is not None and current >= target:
                return current
    finally:
        pubsub.close()


def _as_position(value):
    if value is None:
        return None
    try:
        return parse_lsn(value)
    except ValueError:
        return None
