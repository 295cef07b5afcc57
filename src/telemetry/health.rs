//! Process-wide health flags behind `/readyz`: whether the replication stream is open and
//! whether Redis answered lately. Set by the stream (streaming) and the Redis sink and its probe
//! (Redis up).

use std::sync::atomic::{AtomicBool, Ordering};

static STREAMING: AtomicBool = AtomicBool::new(false);
static REDIS_UP: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_streaming(on: bool) {
    STREAMING.store(on, Ordering::Relaxed);
    crate::telemetry::metrics::set_streaming(on);
}

pub fn set_redis_up(up: bool) {
    REDIS_UP.store(up, Ordering::Relaxed);
    crate::telemetry::metrics::set_redis_up(up);
}

pub(crate) fn streaming() -> bool {
    STREAMING.load(Ordering::Relaxed)
}

pub fn redis_up() -> bool {
    REDIS_UP.load(Ordering::Relaxed)
}
