"""Read-through caching in Redis, kept fresh by freshness-agent.

Only redis-py and the documented FCALLs: the app reads the row and its
version from the source of truth, and stores the value with
`FCALL freshness_fill`, which refuses it if the row changed (and the agent
applied the change) after the read. Before serving from the cache it checks
`freshness:feed`, so it is never silently stale: past its bound it reads
the source instead.

Run: python3 readthrough.py --redis redis://127.0.0.1:6379/0 --store store.json get user:1
The store is a JSON file {"user:1": {"version": 3, "name": "Ada"}, ...}
standing in for the database.
"""

import argparse
import json

import redis

MAX_STALENESS_MS = 1000  # serve cached data at most 1 s behind the source


def feed_fresh(r):
    """True when the agent's feed is within the bound (freshness:feed)."""
    fresh_at = r.hget("freshness:feed", "fresh_at_ms")
    if fresh_at is None:
        return False
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    return now_ms - int(fresh_at) <= MAX_STALENESS_MS


def read_through(r, key, entity, load, ttl_ms=60_000):
    """The cached value of `key`, or `load()` -> (value, version) stored
    with its dependency on `entity` at the version it read."""
    if feed_fresh(r):
        cached = r.get(key)
        if cached is not None:
            return cached.decode(), "cache"
    else:
        value, _ = load()
        return value, "source (feed stale: not cached)"
    value, version = load()
    # 1 stored, 0 refused: the row changed after this read.
    stored = r.fcall("freshness_fill", 1, key, value, ttl_ms, entity, version)
    return value, "source (stored)" if stored == 1 else "source (fill refused)"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--store", required=True)
    p.add_argument("command", choices=["get"])
    p.add_argument("entity")
    args = p.parse_args()
    r = redis.Redis.from_url(args.redis)

    def load():
        with open(args.store) as f:
            row = json.load(f)[args.entity]
        return row["name"], row["version"]

    key = "cache:" + args.entity
    value, source = read_through(r, key, args.entity, load)
    print(json.dumps({"value": value, "source": source}))


if __name__ == "__main__":
    main()
