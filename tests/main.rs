//! Integration suites: each test boots its own Postgres (and Redis where a sink needs one).

mod rules;
mod stream;
mod support;
