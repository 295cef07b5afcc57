//! Decode throughput of pgoutput change messages on one core.
//!
//! Replays the Insert, Update and Delete messages of the captured fixture stream (decoded in the
//! stream state they were captured in) for about two seconds. The decoder must keep well ahead
//! of a walsender, which on one busy table sends in the order of a million changes a second.
//!
//! Run: `cargo bench --bench decode`

use std::hint::black_box;
use std::time::{Duration, Instant};

use walsweep::pg::pgoutput::{parse_message, Decoder, PgOutput};

const STREAM: &[u8] = include_bytes!("../tests/fixtures/pgoutput/stream.bin");
const RUN_FOR: Duration = Duration::from_secs(2);

/// The fixture format: a u32 big-endian length, then that many bytes, repeated.
fn frames(mut stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = stream.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        let (frame, rest) = rest.split_at(len);
        out.push(frame);
        stream = rest;
    }
    out
}

fn main() {
    let mut decoder = Decoder::new();
    let mut changes = Vec::new();
    for frame in frames(STREAM) {
        let in_stream = decoder.in_stream();
        let msg = decoder.decode(frame).expect("fixture decodes");
        if matches!(
            msg,
            PgOutput::Insert(_) | PgOutput::Update(_) | PgOutput::Delete(_)
        ) {
            changes.push((frame, in_stream));
        }
    }
    let bytes_per_pass: usize = changes.iter().map(|(frame, _)| frame.len()).sum();

    let started = Instant::now();
    let mut messages: u64 = 0;
    let mut passes: u64 = 0;
    while started.elapsed() < RUN_FOR {
        for &(frame, in_stream) in &changes {
            let decoded = parse_message(black_box(frame), in_stream);
            black_box(decoded.is_ok());
            drop(black_box(decoded));
        }
        messages += changes.len() as u64;
        passes += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "decode: {messages} messages in {secs:.2} s = {:.2} M messages/s \
         ({} change messages, {:.0} MB/s)",
        messages as f64 / secs / 1e6,
        changes.len(),
        (passes * bytes_per_pass as u64) as f64 / secs / 1e6,
    );
}
