//! Fuzzes the pgoutput decoder: it must return, never panic, on any bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walsweep::pg::pgoutput::{parse_message, Decoder};

fuzz_target!(|data: &[u8]| {
    for in_stream in [false, true] {
        if let Err(err) = parse_message(data, in_stream) {
            // Rendering walks the error's fields too.
            let _ = err.to_string();
        }
    }

    // The same framing as tests/fixtures/pgoutput/stream.bin (u32 big-endian length, bytes), so
    // that file seeds whole-stream inputs that exercise the Decoder's stream tracking.
    let mut decoder = Decoder::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len =
            usize::try_from(u32::from_be_bytes(*len)).map_or(tail.len(), |n| n.min(tail.len()));
        let (frame, tail) = tail.split_at(len);
        let _ = decoder.decode(frame);
        rest = tail;
    }
});
