"""A drop-in matroska-cache backend whose fills walsweep's fences can refuse.

    from matroska_cache import MatroskaCache
    from walsweep_client import FencedRedisBackend, position_key

    cache = MatroskaCache(
        FencedRedisBackend(redis, prefix="cache", position_key=position_key("app", "walsweep"))
    )

The app is otherwise unchanged: ``get()`` raises NotInCache on a miss, the app reads the
database and calls ``put()``. On the miss (a ``get()`` that raises NotInCache, or a ``has()``
that returns False) the backend takes a token (``walsweep_fill_begin``) and remembers it for
that key, in the calling thread; ``put()`` stores through ``walsweep_fill`` with it, so a fill
that read the database before a commit walsweep has invalidated since is refused (nothing is
written; the next ``get()`` misses and reads again). ``put()`` returns True when stored, False
when refused (RedisBackend's returns None; MatroskaCache.put passes it on).

A ``put()`` with no remembered token (no miss before it in this thread: a cache warm-up, or a
value computed before the ``get()``) takes a token at put time. That is weaker: the database
was read before the token, so a commit applied between that read and the put is not caught.
Keep fills short compared with walsweep's ``fence_ttl_ms`` (default 60 s): a fence that
expired before the fill stored cannot refuse it.

Needs walsweep's function library in Redis (``[matroska] fences = true``; Redis 7+) and a
single Redis: the data key, its sets and their fences are one FCALL, so in Redis Cluster they
would have to share a hash slot.
"""

import collections
import logging
import threading

from matroska_cache.backends.redis import RedisBackend, serialize
from matroska_cache.exc import NotInCache

from .fences import fill, fill_begin

__all__ = ["FencedRedisBackend"]

logger = logging.getLogger(__name__)


class FencedRedisBackend(RedisBackend):
    """matroska-cache's RedisBackend with fenced fills (see the module docstring).

    ``position_key`` is walsweep's applied-position key, ``position_key(database, slot)``.
    ``max_pending`` bounds the tokens remembered per thread for keys that missed and were not
    put (yet): past it the oldest is dropped, and its put takes a token at put time."""

    def __init__(self, redis, *, prefix, position_key, max_pending=10000):
        super().__init__(redis, prefix=prefix)
        self.position_key = position_key
        self.max_pending = max_pending
        self._local = threading.local()
        self._warned_untokened = False

    def _pending(self):
        pending = getattr(self._local, "tokens", None)
        if pending is None:
            pending = self._local.tokens = collections.OrderedDict()
        return pending

    def _remember_token(self, key):
        pending = self._pending()
        # A second miss before the put keeps the first token: the older one is before every
        # database read that can follow either miss.
        if key not in pending:
            pending[key] = fill_begin(self.redis, self.position_key)
            while len(pending) > self.max_pending:
                pending.popitem(last=False)

    def get(self, key):
        try:
            return super().get(key)
        except NotInCache:
            self._remember_token(key)
            raise

    def has(self, key):
        found = super().has(key)
        if not found:
            self._remember_token(key)
        return found

    def put(self, key, data, dependencies, expires):
        token = self._pending().pop(key, None)
        if token is None:
            if not self._warned_untokened:
                self._warned_untokened = True
                logger.warning(
                    "put(%r) without a get() miss before it in this thread: its token is taken "
                    "now, after the database was read, so a commit applied in between is not "
                    "caught (logged once)",
                    key,
                )
            token = fill_begin(self.redis, self.position_key)
        sets = {self._key("rdep", dependency.key()) for dependency in dependencies}
        return fill(self.redis, self._key("data", key), serialize(data), expires, token, sets)

    def forget_tokens(self):
        """Drops the tokens this thread remembers (e.g. at the end of a request)."""
        self._pending().clear()
