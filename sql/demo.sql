-- The demo schema: a blog whose pages are cached in Redis.
CREATE TABLE authors (
    id   int PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE articles (
    id        int PRIMARY KEY,
    author_id int NOT NULL REFERENCES authors (id),
    slug      text NOT NULL UNIQUE,
    title     text NOT NULL,
    body      text NOT NULL DEFAULT '',
    category  text NOT NULL,
    published boolean NOT NULL DEFAULT false,
    views     int NOT NULL DEFAULT 0
);
-- Rules read old slug/category/published on UPDATE and DELETE: send the whole old row.
ALTER TABLE articles REPLICA IDENTITY FULL;

INSERT INTO authors VALUES (1, 'Ada'), (2, 'Linus');
INSERT INTO articles (id, author_id, slug, title, category, published) VALUES
    (1, 1, 'hello-world', 'Hello, world', 'news', true),
    (2, 1, 'caching', 'On caching', 'tech', true),
    (3, 2, 'draft', 'A draft', 'tech', false);
