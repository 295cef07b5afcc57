"""Fenced fills: walsweep_client.fences and the matroska-cache backend against a real Redis 7
(WALSWEEP_TEST_REDIS_PORT) with walsweep's function library loaded from the repository
(src/sink/redis/functions/walsweep.lua), fences set by hand as walsweep sets them.
tests/fenced_fills.rs and tests/read_your_writes.rs boot a Redis and run
``python -m unittest discover clients/python/tests``."""

import os
import subprocess
import sys
import threading
import unittest

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from walsweep_client import (  # noqa: E402
    FencesNotLoaded,
    fill,
    fill_begin,
    fill_counts,
    position_key,
)
from walsweep_client.fences import FENCE_ALL, FILLS_KEY, fence_key  # noqa: E402

LIBRARY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(HERE))),
    "src/sink/redis/functions/walsweep.lua",
)


class WithoutMatroska(unittest.TestCase):
    def test_the_package_imports_without_matroska_cache(self):
        code = (
            "import sys; sys.modules['matroska_cache'] = None\n"
            "import walsweep_client\n"
            "walsweep_client.fill, walsweep_client.wait_for_lsn\n"
            "try:\n"
            "    walsweep_client.FencedRedisBackend\n"
            "except ImportError:\n"
            "    print('lazy')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=os.path.dirname(HERE),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "lazy")

    def test_fence_keys(self):
        self.assertEqual(fence_key("cache::rdep::id:item:1"), "walsweep:fence:cache::rdep::id:item:1")
        self.assertEqual(FENCE_ALL, "walsweep:fence-all")


@unittest.skipUnless(os.environ.get("WALSWEEP_TEST_REDIS_PORT"), "needs a Redis to talk to")
class Fenced(unittest.TestCase):
    """Keys under a per-test prefix; fence-all and the counters are shared, so reset here."""

    def setUp(self):
        from matroska_cache import MatroskaCache, NotInCache, dep
        from matroska_cache.backends.redis import RedisBackend

        from walsweep_client import FencedRedisBackend

        self.dep, self.NotInCache = dep, NotInCache
        port = int(os.environ["WALSWEEP_TEST_REDIS_PORT"])
        # matroska-cache reads str values (its unserialize looks at the first character).
        self.redis = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        with open(LIBRARY) as f:
            self.redis.execute_command("FUNCTION", "LOAD", "REPLACE", f.read())
        self.prefix = "t%d" % (abs(hash(self.id())) % 10**9)
        self.position = position_key("test", self.prefix)
        for key in self.redis.scan_iter(match="*%s*" % self.prefix, count=1000):
            self.redis.delete(key)
        self.redis.delete(FENCE_ALL, FILLS_KEY)
        self.redis.set(self.position, "100")
        self.backend = FencedRedisBackend(self.redis, prefix=self.prefix, position_key=self.position)
        self.cache = MatroskaCache(self.backend)
        self.plain = MatroskaCache(RedisBackend(self.redis, prefix=self.prefix))

    def data_key(self, key):
        return "%s::data::%s" % (self.prefix, key)

    def set_key(self, row):
        return "%s::rdep::id:item:%d" % (self.prefix, row)

    def miss(self, key):
        with self.assertRaises(self.NotInCache):
            self.cache.get(key)

    def fence(self, key, lsn):
        """As walsweep raises it before invalidating ``key``."""
        self.redis.set(fence_key(key), str(lsn), px=60000)

    def test_stored_when_no_fence_and_readable_by_the_plain_backend(self):
        self.miss("item:1")
        value = {"id": 1, "v": [1, "two"]}
        self.assertIs(self.cache.put("item:1", value, self.dep.Id("item", 1), expires=600), True)
        self.assertEqual(self.plain.get("item:1"), value)
        self.assertEqual(self.cache.get("item:1"), value)
        self.miss("title:1")
        self.cache.put("title:1", "a string", self.dep.Id("item", 1), expires=600)
        self.assertEqual(self.plain.get("title:1"), "a string")
        self.assertEqual(
            self.redis.smembers(self.set_key(1)), {self.data_key("item:1"), self.data_key("title:1")}
        )
        self.assertTrue(0 < self.redis.ttl(self.data_key("item:1")) <= 600)
        self.assertEqual(fill_counts(self.redis), {"stored": 2, "refused": 0})

    def test_refused_when_a_dependency_set_is_fenced_after_the_token(self):
        self.miss("item:1")  # token 100: the app reads the database after this
        self.fence(self.set_key(2), 101)  # another set: no effect
        self.fence(self.set_key(1), 101)
        self.redis.set(self.position, "150")
        stored = self.cache.put(
            "item:1", "old", self.dep.Id("item", 2), self.dep.Id("item", 1), expires=600
        )
        self.assertIs(stored, False)
        self.assertFalse(self.plain.has("item:1"))
        self.assertFalse(self.redis.exists(self.set_key(1), self.set_key(2)))
        self.assertEqual(fill_counts(self.redis), {"stored": 0, "refused": 1})

    def test_refused_when_the_data_key_is_fenced_after_the_token(self):
        self.miss("item:1")
        self.fence(self.data_key("item:1"), 1000)
        self.assertIs(self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600), False)
        self.assertFalse(self.plain.has("item:1"))
        self.assertFalse(self.redis.exists(self.set_key(1)))

    def test_refused_when_fence_all_is_after_the_token(self):
        self.miss("item:1")
        self.redis.set(FENCE_ALL, "101", px=60000)
        self.assertIs(self.cache.put("item:1", "old", expires=600), False)
        self.assertFalse(self.plain.has("item:1"))

    def test_fences_at_or_before_the_token_do_not_refuse(self):
        # A fence at the token: that invalidation was applied when the fill began, so the
        # database read that follows sees its commit. Compared as numbers, not strings.
        self.redis.set(self.position, "1000")
        self.fence(self.set_key(1), 1000)
        self.fence(self.data_key("item:1"), 999)
        self.redis.set(FENCE_ALL, "99", px=60000)
        self.miss("item:1")
        self.assertIs(self.cache.put("item:1", "new", self.dep.Id("item", 1), expires=600), True)
        self.assertEqual(self.plain.get("item:1"), "new")

    def test_the_token_is_the_one_taken_at_the_miss_not_at_the_put(self):
        self.miss("item:1")  # token 100
        # While the app reads the database, walsweep applies a commit: fence, then position.
        self.fence(self.set_key(1), 150)
        self.redis.set(self.position, "160")
        self.assertIs(self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600), False)
        # The token was used up: a put with no miss before it takes one at put time (160),
        # which is why it is weaker: the same stale value is stored now. It says so, once.
        with self.assertLogs("walsweep_client.matroska", "WARNING"):
            stored = self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600)
        self.assertIs(stored, True)

    def test_a_second_miss_keeps_the_first_token(self):
        self.miss("item:1")  # token 100
        self.fence(self.set_key(1), 150)
        self.redis.set(self.position, "160")
        self.miss("item:1")
        self.assertIs(self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600), False)

    def test_has_false_takes_the_token_too(self):
        self.assertFalse(self.cache.has("item:1"))
        self.fence(self.set_key(1), 150)
        self.redis.set(self.position, "160")
        self.assertIs(self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600), False)

    def test_tokens_are_per_key(self):
        self.miss("a")  # token 100
        self.redis.set(self.position, "200")
        self.miss("b")  # token 200
        self.fence(self.set_key(1), 150)
        self.assertIs(self.cache.put("b", "v", self.dep.Id("item", 1), expires=600), True)
        self.assertIs(self.cache.put("a", "v", self.dep.Id("item", 1), expires=600), False)

    def test_tokens_are_per_thread(self):
        began, advanced, results = threading.Event(), threading.Event(), {}

        def early():
            self.miss("item:1")  # token 100, in this thread only
            began.set()
            advanced.wait(5)
            results["early"] = self.cache.put("item:1", "old", self.dep.Id("item", 1), expires=600)

        thread = threading.Thread(target=early)
        thread.start()
        self.assertTrue(began.wait(5))
        self.fence(self.set_key(1), 150)
        self.redis.set(self.position, "200")
        self.miss("item:1")  # token 200, in this thread
        self.assertIs(self.cache.put("item:1", "new", self.dep.Id("item", 1), expires=600), True)
        advanced.set()
        thread.join(5)
        self.assertIs(results.get("early"), False)
        self.assertEqual(self.plain.get("item:1"), "new")

    def test_a_set_ttl_is_never_shortened_and_a_set_without_one_gets_one(self):
        long_set, short_set, no_ttl_set = self.set_key(1), self.set_key(2), self.set_key(3)
        for s in (long_set, short_set, no_ttl_set):
            self.redis.sadd(s, "someone-else")
        self.redis.expire(long_set, 5000)
        self.redis.expire(short_set, 5)
        self.miss("item:1")
        self.cache.put(
            "item:1",
            "v",
            self.dep.Id("item", 1),
            self.dep.Id("item", 2),
            self.dep.Id("item", 3),
            expires=600,
        )
        self.assertGreater(self.redis.ttl(long_set), 4000)
        self.assertTrue(500 < self.redis.ttl(short_set) <= 600)
        self.assertTrue(500 < self.redis.ttl(no_ttl_set) <= 600)
        for s in (long_set, short_set, no_ttl_set):
            self.assertEqual(self.redis.smembers(s), {"someone-else", self.data_key("item:1")})

    def test_the_functions_work_with_bytes_replies_and_without_matroska(self):
        raw = redis.Redis(host="127.0.0.1", port=int(os.environ["WALSWEEP_TEST_REDIS_PORT"]))
        token = fill_begin(raw, self.position)
        self.assertEqual(int(token), 100)
        self.assertEqual(int(fill_begin(raw, self.position + ":none")), 0)
        key, s = self.data_key("raw"), self.set_key(9)
        self.fence(s, 101)
        self.assertFalse(fill(raw, key, b"\x00bytes", 60, token, [s]))
        self.assertTrue(fill(raw, key, b"\x00bytes", 60, "101", [s]))
        self.assertEqual(raw.get(key), b"\x00bytes")
        self.assertEqual(fill_counts(raw), {"stored": 1, "refused": 1})

    def test_no_library_is_a_clear_error(self):
        self.redis.execute_command("FUNCTION", "DELETE", "walsweep")
        try:
            with self.assertRaises(FencesNotLoaded) as raised:
                self.cache.get("item:1")
            self.assertIn("walsweep setup", str(raised.exception))
            self.assertIn("fences = true", str(raised.exception))
        finally:
            with open(LIBRARY) as f:
                self.redis.execute_command("FUNCTION", "LOAD", "REPLACE", f.read())


if __name__ == "__main__":
    unittest.main()
