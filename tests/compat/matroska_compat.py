"""The app side of tests/rules/compat.rs: writes and reads cache entries with the real
matroska-cache (installed from PyPI by scripts/ensure-venv), so the Rust test checks walsweep
against the library's own key layout and dependency strings, not against our reading of it.

    matroska_compat.py put   <redis-port>
        Fills the cache the way an app does; prints one line per entry:
        <cache key> TAB <dependency> TAB <dependency> ...
    matroska_compat.py put-events <redis-port> <postgres-url> <time-zone>
        Loads the `events` rows through SQLAlchemy and psycopg2 on connections whose TimeZone
        is <time-zone>, and caches one listing per row under its `starts_at` scope; prints
        what `put` prints.
    matroska_compat.py check <redis-port> --gone KEY... --kept KEY...
        After walsweep applied the changes: every --gone entry is missing (has() is False,
        get() raises NotInCache), every --kept entry still holds what `put` stored, and the
        cache holds no other entry.

Exits non-zero with the reason on stderr when anything differs.
"""

import sys

try:
    import redis
    from matroska_cache import MatroskaCache, NotInCache, dep
    from matroska_cache.backends.redis import RedisBackend
    from matroska_cache.sa_tools import sa_dependencies
    from sqlalchemy import Boolean, Column, DateTime, Integer, Text, create_engine
    from sqlalchemy.orm import Session, declarative_base, make_transient_to_detached
except ImportError as e:
    sys.exit(
        f"matroska_compat.py: {e} (interpreter {sys.executable}); "
        "run scripts/ensure-venv and point WALSWEEP_PYTHON at <repo>/.venv/bin/python"
    )

PREFIX = "cache"
EXPIRES = 600

# The app's models. PrimaryKey takes the class name; sa_dependencies() renders a composite
# identity with repr(), as it does for rows an app loaded.
Base = declarative_base()


class Article(Base):
    __tablename__ = "articles"
    id = Column(Integer, primary_key=True)
    title = Column(Text)
    category = Column(Text)
    published = Column(Boolean)


class Pair(Base):
    __tablename__ = "pairs"
    a = Column(Integer, primary_key=True)
    b = Column(Text, primary_key=True)
    v = Column(Integer)


def loaded(instance):
    """An instance as if loaded from the database (it gets an identity key)."""
    make_transient_to_detached(instance)
    return instance


article_scopes = dep.Scopes("Article", production_mode=False)


@article_scopes.describes("category", "published")
def article_listing(article, **info):
    return {"category": article.category, "published": article.published}


class Task(Base):
    __tablename__ = "tasks"
    id = Column(Integer, primary_key=True)
    # An enum and a domain over boolean in the database; psycopg hands the app str and bool.
    state = Column(Text)
    active = Column(Boolean)


task_scopes = dep.Scopes("Task", production_mode=False)


@task_scopes.describes("state", "active")
def task_listing(task, **info):
    return {"state": task.state, "active": task.active}


class Event(Base):
    __tablename__ = "events"
    id = Column(Integer, primary_key=True)
    # psycopg2 hands the app a datetime in the session's TimeZone; its str() is in the scope.
    starts_at = Column(DateTime(timezone=True))


event_scopes = dep.Scopes("Event", production_mode=False)


@event_scopes.describes("starts_at")
def event_listing(event, **info):
    return {"starts_at": event.starts_at}


def value_for(key):
    """What `put` stores under `key` and `check` expects back."""
    return {"key": key, "payload": [1, "two", None]}


def entries():
    """(cache key, dependencies) the app caches."""
    return [
        ("a1", [dep.Id("article", 1)]),
        ("a1pk", [dep.PrimaryKey(Article, 1)]),
        ("a2", [dep.Id("article", 2)]),
        ("a2pk", [dep.PrimaryKey("Article", 2)]),
        # Scoped lists: articles with category x/published, y/unpublished, z/published.
        ("list-x-true", article_scopes.condition(category="x", published=True)),
        ("list-y-false", article_scopes.condition(category="y", published=False)),
        ("list-z-true", article_scopes.condition(category="z", published=True)),
        ("pair-1-x", sa_dependencies(loaded(Pair(a=1, b="x")), {})),
        ("pair-2-y", sa_dependencies(loaded(Pair(a=2, b="y")), {})),
        ("pair-3-quote", sa_dependencies(loaded(Pair(a=3, b="it's")), {})),
        ("tasks-open-true", task_scopes.condition(state="open", active=True)),
        ("tasks-done-true", task_scopes.condition(state="done", active=True)),
        ("tasks-done-false", task_scopes.condition(state="done", active=False)),
    ]


def connect(port):
    client = redis.Redis(host="127.0.0.1", port=int(port), decode_responses=True)
    return client, MatroskaCache(RedisBackend(client, prefix=PREFIX))


def fail(message):
    print(f"matroska_compat.py: {message}", file=sys.stderr)
    sys.exit(1)


def put(port):
    client, cache = connect(port)
    for key, deps in entries():
        cache.put(key, value_for(key), *deps, expires=EXPIRES)
        print("\t".join([key] + [d.key() for d in deps]))
    # The library reads back what it wrote.
    for key, _ in entries():
        if not cache.has(key):
            fail(f"has({key!r}) is False right after put")
        got = cache.get(key)
        if got != value_for(key):
            fail(f"get({key!r}) returned {got!r} right after put, expected {value_for(key)!r}")


def put_events(port, url, zone):
    """Caches, for every event, the listing of events starting when it does, as an app whose
    connections run with TimeZone = `zone` would."""
    _, cache = connect(port)
    # SQLAlchemy 1.4 dropped the postgres:// alias.
    url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    engine = create_engine(url, connect_args={"options": f"-c TimeZone={zone}"})
    with Session(engine) as session:
        events = session.query(Event).order_by(Event.id).all()
    for event in events:
        key = f"events-at-{event.id}"
        deps = event_scopes.condition(starts_at=event.starts_at)
        cache.put(key, value_for(key), *deps, expires=EXPIRES)
        if not cache.has(key):
            fail(f"has({key!r}) is False right after put")
        print("\t".join([key] + [d.key() for d in deps]))


def check(port, gone, kept):
    client, cache = connect(port)
    problems = []
    for key in gone:
        if cache.has(key):
            problems.append(f"{key!r} should be gone but has() is True")
        try:
            got = cache.get(key)
            problems.append(f"{key!r} should be gone but get() returned {got!r}")
        except NotInCache:
            pass
    for key in kept:
        if not cache.has(key):
            problems.append(f"{key!r} should remain but has() is False")
        try:
            got = cache.get(key)
            if got != value_for(key):
                problems.append(f"{key!r} holds {got!r}, expected {value_for(key)!r}")
        except NotInCache:
            problems.append(f"{key!r} should remain but get() raised NotInCache")
    # Nothing else in the cache (a walsweep that removed too little would leave extra keys).
    data_prefix = f"{PREFIX}::data::"
    present = {k[len(data_prefix):] for k in client.scan_iter(match=data_prefix + "*")}
    if present != set(kept):
        problems.append(
            f"cache holds {sorted(present)}, expected exactly the kept entries {sorted(kept)}"
        )
    if problems:
        fail("check failed:\n  " + "\n  ".join(problems))
    print(f"ok: {len(gone)} gone, {len(kept)} kept")


def split_lists(args):
    """`--gone a b --kept c d` -> (['a', 'b'], ['c', 'd'])."""
    lists = {"--gone": [], "--kept": []}
    current = None
    for arg in args:
        if arg in lists:
            current = lists[arg]
        elif current is None:
            fail(f"unexpected argument {arg!r}; usage: check <port> --gone KEY... --kept KEY...")
        else:
            current.append(arg)
    return lists["--gone"], lists["--kept"]


def main(argv):
    if len(argv) == 3 and argv[1] == "put":
        put(argv[2])
    elif len(argv) == 5 and argv[1] == "put-events":
        put_events(argv[2], argv[3], argv[4])
    elif len(argv) >= 3 and argv[1] == "check":
        gone, kept = split_lists(argv[3:])
        check(argv[2], gone, kept)
    else:
        fail(
            "usage: matroska_compat.py put <redis-port> | put-events <redis-port> <postgres-url> "
            "<time-zone> | check <redis-port> --gone KEY... --kept KEY..."
        )


if __name__ == "__main__":
    main(sys.argv)
