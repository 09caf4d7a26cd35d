//! A yamux session in server mode fed arbitrary bytes by its peer.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::raw_bytes(data, backchannel_yamux::Mode::Server);
});
