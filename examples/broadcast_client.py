#!/usr/bin/env python3
"""Keeps an in-process cache fresh with walsweep broadcasts (docs/broadcasts.md).

The cache maps table -> {key: value}, keys named like the [[table]] `keys` rules. Here the
entries the app loaded from its database arrive as JSON on stdin. Each message drops what it
names; a reset, or a gap in the prev_lsn chain (Pub/Sub dropped messages), drops everything.

usage: broadcast_client.py REDIS_URL CHANNEL [--exit-after N]   (needs: pip install redis)
"""
import argparse
import json
import sys

import redis


def matches(name, key):
    """Whether cache entry `name` is `key`, or starts with "prefix" for a table-wide "prefix*"."""
    return name == key or (key.endswith("*") and name.startswith(key[:-1]))


def apply(cache, message, last_lsn):
    """Drops what one message invalidates; returns the lsn the next prev_lsn must equal."""
    if message.get("reset") or (last_lsn is not None and message["prev_lsn"] != last_lsn):
        cache.clear()  # missed messages: nothing cached can be trusted
    for table in message.get("counts", {}):  # "truncated": too many changes to list
        cache.pop(table, None)
    for change in message.get("changes", []):
        if change["op"] == "truncate":
            cache.pop(change["table"], None)
        for key in change.get("keys", []):
            for entries in cache.values():  # a key may be cached from another table's rows
                for name in [n for n in entries if matches(n, key)]:
                    del entries[name]
    return message["lsn"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("channel")
    parser.add_argument("--exit-after", type=int, help="stop after N messages, print the cache")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(args.channel)  # before loading, so no change falls in between
    cache = json.load(sys.stdin)  # stands in for reading the app's database
    last_lsn, seen = None, 0
    for item in pubsub.listen():
        last_lsn = apply(cache, json.loads(item["data"]), last_lsn)
        seen += 1
        if seen == args.exit_after:
            break
    json.dump(cache, sys.stdout)


if __name__ == "__main__":
    main()
