"""Fenced fills, for any cache layout (README, "Fenced fills").

walsweep (with ``[matroska] fences = true``) raises a fence before each invalidation: the key
``walsweep:fence:<key>`` holds the LSN of the commit that invalidated ``<key>`` (a data key or a
dependency set), ``walsweep:fence-all`` that of a table-wide invalidation. A fill:

1. takes a token with ``fill_begin`` (walsweep's applied position) BEFORE it reads the database;
2. reads the database;
3. stores with ``fill``, which refuses (returns False, writes nothing) when a fence of the data
   key, of one of its dependency sets, or fence-all is newer than the token: the fill may have
   read a row from before that commit, after walsweep already removed the entry.

Both are Redis Functions of the ``walsweep`` library, which walsweep loads at start (and
``walsweep setup`` loads): no Lua is shipped here.
"""

__all__ = [
    "FENCE_ALL",
    "FENCE_PREFIX",
    "FILLS_KEY",
    "FencesNotLoaded",
    "fence_key",
    "fill",
    "fill_begin",
    "fill_counts",
]

FENCE_PREFIX = "walsweep:fence:"
FENCE_ALL = "walsweep:fence-all"
# Hash the functions count fills in (fields ``stored``, ``refused``); walsweep exports them.
FILLS_KEY = "walsweep:fills"


class FencesNotLoaded(RuntimeError):
    """The Redis has no ``walsweep`` function library (or is older than Redis 7)."""


def fence_key(key):
    """The fence of a full Redis key (a data key or a dependency set)."""
    return FENCE_PREFIX + key


def fill_begin(redis, position_key):
    """The token for a fill: walsweep's applied position now (``"0"`` before its first batch).
    Take it before reading the database."""
    return _fcall(redis, "walsweep_fill_begin", [position_key], [])


def fill(redis, data_key, value, ttl, token, sets=()):
    """Stores ``value`` (bytes or str, stored as is) under ``data_key`` for ``ttl`` seconds and
    adds ``data_key`` to each dependency set in ``sets`` (full keys; a set's TTL is raised to
    ``ttl``, never shortened), unless a fence is newer than ``token``. True when stored, False
    when refused."""
    keys = [data_key, fence_key(data_key), FENCE_ALL, FILLS_KEY]
    for s in sorted(set(sets)):
        keys += [s, fence_key(s)]
    return _fcall(redis, "walsweep_fill", keys, [token, value, int(ttl)]) == 1


def fill_counts(redis):
    """``{"stored": n, "refused": n}`` since the counters were created (all apps together)."""
    stored, refused = redis.hmget(FILLS_KEY, ["stored", "refused"])
    return {"stored": int(stored or 0), "refused": int(refused or 0)}


def _fcall(redis, function, keys, args):
    try:
        return redis.execute_command("FCALL", function, len(keys), *keys, *args)
    except Exception as e:  # redis.exceptions.ResponseError, whichever redis-py is installed
        message = str(e)
        lowered = message.lower()
        if "function not found" in lowered or "unknown command" in lowered:
            raise FencesNotLoaded(
                "Redis has no walsweep function %s (%s): fenced fills need Redis 7 or newer and "
                "the walsweep function library, which walsweep loads when its config has "
                "`[matroska] fences = true` (run it, or `walsweep setup --config <file>`)"
                % (function, message)
            ) from e
        raise
