"""walsweep_client against a real Redis (WALSWEEP_TEST_REDIS_PORT; tests/read_your_writes.rs
boots one and runs ``python -m unittest discover clients/python/tests``)."""

import os
import sys
import threading
import time
import unittest
from decimal import Decimal

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from walsweep_client import WaitTimeout, parse_lsn, position_key, wait_for_lsn  # noqa: E402


class ParseLsn(unittest.TestCase):
    def test_text_decimal_and_bytes(self):
        self.assertEqual(parse_lsn("0/16B3748"), 0x16B3748)
        self.assertEqual(parse_lsn("1/0"), 1 << 32)
        self.assertEqual(parse_lsn("23803720"), 23803720)
        self.assertEqual(parse_lsn(b"42"), 42)
        self.assertEqual(parse_lsn(Decimal("42")), 42)
        with self.assertRaises(ValueError):
            parse_lsn("yesterday")

    def test_position_key(self):
        self.assertEqual(position_key("app", "s1"), "walsweep:app/s1:applied")
        self.assertEqual(position_key("app"), "walsweep:app/walsweep:applied")


@unittest.skipUnless(os.environ.get("WALSWEEP_TEST_REDIS_PORT"), "needs a Redis to talk to")
class WaitForLsn(unittest.TestCase):
    def setUp(self):
        self.redis = redis.Redis(host="127.0.0.1", port=int(os.environ["WALSWEEP_TEST_REDIS_PORT"]))
        self.key = "walsweep:test/%s:applied" % self.id()
        self.redis.delete(self.key)

    def test_returns_at_once_when_already_reached(self):
        self.redis.set(self.key, "1000")
        self.assertEqual(wait_for_lsn(self.redis, self.key, 1000, timeout=1), 1000)
        self.assertEqual(wait_for_lsn(self.redis, self.key, "0/3E7", timeout=1), 1000)

    def test_wakes_on_the_advance_that_reaches_it(self):
        self.redis.set(self.key, "10")

        def advance():
            for value in ("20", "30", "40"):
                time.sleep(0.05)
                self.redis.set(self.key, value)
                self.redis.publish(self.key, value)

        threading.Thread(target=advance).start()
        started = time.monotonic()
        self.assertEqual(wait_for_lsn(self.redis, self.key, 30, timeout=5), 30)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_times_out_with_the_key_and_both_positions(self):
        self.redis.set(self.key, "5")
        with self.assertRaises(WaitTimeout) as raised:
            wait_for_lsn(self.redis, self.key, 6, timeout=0.2)
        self.assertIn(self.key, str(raised.exception))
        self.assertIn("not yet 6", str(raised.exception))


if __name__ == "__main__":
    unittest.main()
