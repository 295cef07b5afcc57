#!/usr/bin/env python3
"""Keeps an in-process cache fresh with walsweep broadcasts (docs/broadcasts.md).

The cache maps table -> {key: value}, keys named as the [[table]] `keys` rules name them; here
the entries the app loaded from its database arrive as JSON on stdin.
usage: broadcast_client.py REDIS_URL CHANNEL [--exit-after N]     (needs: pip install redis)
"""
import json
import sys

import redis


def apply(cache, message, last_lsn):
    """Drops what one message invalidates; returns the lsn the next prev_lsn must equal."""
    if message.get("reset") or (last_lsn is not None and message["prev_lsn"] != last_lsn):
        cache.clear()  # missed messages (or walsweep says so): nothing cached can be trusted
    changes = message.get("changes", [])
    # Too many changes to list ("counts"), or a TRUNCATE: drop those tables.
    for table in set(message.get("counts", {})) | {c["table"] for c in changes if c["op"] == "truncate"}:
        cache.pop(table, None)
    for key in (k for c in changes for k in c.get("keys", [])):
        for entries in cache.values():  # "prefix*" stands for a table-wide invalidation
            for name in [n for n in entries if n == key or (key[-1:] == "*" and n.startswith(key[:-1]))]:
                del entries[name]
    return message["lsn"]


def main(url, channel, exit_after=None):
    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)  # before loading, so no change falls in between
    cache, last_lsn = json.load(sys.stdin), None  # stands in for reading the app's database
    for seen, item in enumerate(pubsub.listen(), 1):
        last_lsn = apply(cache, json.loads(item["data"]), last_lsn)
        if seen == exit_after:
            break
    json.dump(cache, sys.stdout)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], int(args[3]) if args[2:3] == ["--exit-after"] else None)
