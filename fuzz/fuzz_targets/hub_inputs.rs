//! What a caller or an agent hands the hub before any routing: the
//! `grpc-timeout` header, the announced name and labels, and (from the
//! operator) the policy file. None of them may panic; `grpc-timeout` must
//! agree with the gRPC spec (1 to 8 ASCII digits and a unit), and an
//! accepted announcement must satisfy the documented limits.
#![no_main]

use std::{collections::HashMap, time::Duration};

use arbitrary::Arbitrary;
use backchannel_sidecar::{
    hub::{
        policy::Policy,
        state::{validate_announcement, MAX_LABELS, MAX_NAME_LEN},
    },
    router::parse_grpc_timeout,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    timeout: Vec<u8>,
    name: String,
    labels: Vec<(String, String)>,
    policy: String,
}

/// The spec's `grpc-timeout`, written independently of the hub's parser.
fn reference_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fuzz_target!(|input: Input| {
    if let Ok(v) = http::HeaderValue::from_bytes(&input.timeout) {
        assert_eq!(
            parse_grpc_timeout(&v),
            reference_timeout(&input.timeout),
            "grpc-timeout {:?}",
            input.timeout
        );
    }

    let labels: HashMap<String, String> = input.labels.into_iter().collect();
    if validate_announcement(&input.name, &labels).is_ok() {
        assert!(!input.name.is_empty() && input.name.len() <= MAX_NAME_LEN);
        assert!(input.name.parse::<u64>().is_err(), "a name must not look like a peer ID");
        assert!(labels.len() <= MAX_LABELS);
    }

    // A policy file either loads or is refused with a message naming a line
    // of the file.
    if let Err(e) = Policy::parse("fuzz.toml", &input.policy) {
        let msg = e.to_string();
        let lines = input.policy.lines().count().max(1);
        let line: usize = msg
            .strip_prefix("fuzz.toml line ")
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("policy error without a line: {msg}"));
        assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}: {msg}");
    }
});
