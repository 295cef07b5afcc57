"""A cache-aside app on a Redis Cluster, for tests/cluster.rs.

Reads each item through the cache: a hit returns the cached name; a miss reads the row from
Postgres and caches it twice, the ways apps do: under its own key (`itemkey:<id>`), and as a
matroska-cache entry (`cache::data::item:<id>`) registered in its dependency set
(`cache::rdep::id:item:<id>`), which usually lives on another node.

usage: cluster_app.py <seed-host:port> <postgres-dsn> <id>...
prints one JSON line: [{"id": 1, "name": "...", "hit": true, "entry_hit": true}, ...]
"""

import json
import sys

import psycopg2
from rediscluster import RedisCluster


def main():
    seed, dsn, ids = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]]
    host, port = seed.rsplit(":", 1)
    cache = RedisCluster(
        startup_nodes=[{"host": host, "port": int(port)}], decode_responses=True
    )
    db = psycopg2.connect(dsn)
    out = []
    for item_id in ids:
        key = f"itemkey:{item_id}"
        entry = f"cache::data::item:{item_id}"
        name = cache.get(key)
        entry_name = cache.get(entry)
        hit, entry_hit = name is not None, entry_name is not None
        if not hit or not entry_hit:
            with db.cursor() as cur:
                cur.execute("SELECT name FROM items WHERE id = %s", (item_id,))
                row = cur.fetchone()
            db.rollback()
            fresh = row[0] if row else ""
            if not hit:
                cache.setex(key, 600, fresh)
                name = fresh
            if not entry_hit:
                cache.sadd(f"cache::rdep::id:item:{item_id}", entry)
                cache.setex(entry, 600, fresh)
                entry_name = fresh
        out.append(
            {"id": item_id, "name": name, "entry_name": entry_name, "hit": hit, "entry_hit": entry_hit}
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
