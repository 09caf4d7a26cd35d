//! Value parsers for the command-line flags of `backchannel hub` and
//! `backchannel agent`: every flag is checked when the command starts, and a
//! bad value stops it (exit status 2) with a message naming the rule.

use crate::addr::Target;
use std::time::Duration;

/// A duration in seconds: `10`, `2.5`, or with a unit: `500ms`, `10s`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds (e.g. 10, 2.5, 500ms, 2m)"))?;
    if v.is_nan() {
        return Err("NaN is not a duration".into());
    }
    if v < 0.0 {
        return Err(format!("must not be negative (got {s})"));
    }
    let secs = v * scale;
    if secs.is_infinite() {
        return Ok(Duration::MAX);
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is too large"))
}

/// Seconds, `0` allowed (e.g. `--grace 0`: do not wait), `inf` for no limit.
pub fn seconds_or_zero(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Seconds, more than zero, finite.
pub fn positive_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0 seconds".into());
    }
    if d == Duration::MAX {
        return Err("must be finite".into());
    }
    Ok(d)
}

/// The largest reconnect delay: at least 0.1 s (retrying faster floods the
/// hub and the log), finite.
pub fn backoff_seconds(s: &str) -> Result<Duration, String> {
    let d = positive_seconds(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("must be at least 0.1 s (got {s})"));
    }
    Ok(d)
}

/// A count of at least 1.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A count, 0 allowed.
pub fn count(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))
}

/// `host:port` with a numeric port (host may be a name, an IPv4 address or
/// a bracketed IPv6 address).
pub fn host_port(s: &str) -> Result<String, String> {
    match Target::parse_listen(s) {
        Ok(t @ Target::Tcp { .. }) if !s.contains("://") => Ok(t.to_string()),
        Ok(_) => Err(format!("'{s}' is not HOST:PORT")),
        Err(e) => Err(format!(
            "{e} (e.g. 127.0.0.1:7443, hub.example.com:7443, [::1]:7443)"
        )),
    }
}

/// The hub address of an agent: `host:port`, `tcp://host:port` or `unix:PATH`.
pub fn hub_addr(s: &str) -> Result<String, String> {
    s.parse::<Target>()
        .map(|t| t.to_string())
        .map_err(|e| format!("{e} (expected HOST:PORT, tcp://HOST:PORT or unix:PATH)"))
}

/// The exposed service: `host:port`, `http://host:port` or `unix:PATH`.
pub fn expose_addr(s: &str) -> Result<String, String> {
    s.parse::<Target>()
        .map(|t| t.to_string())
        .map_err(|e| format!("{e} (expected HOST:PORT, http://HOST:PORT or unix:PATH)"))
}

/// `KEY=VALUE` with a non-empty key.
pub fn label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(seconds_or_zero("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(
            seconds_or_zero("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(seconds_or_zero("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(seconds_or_zero("0").unwrap(), Duration::ZERO);
        assert_eq!(seconds_or_zero("inf").unwrap(), Duration::MAX);
        assert!(seconds_or_zero("NaN").unwrap_err().contains("NaN"));
        assert!(seconds_or_zero("-5").unwrap_err().contains("negative"));
        assert!(seconds_or_zero("soon").is_err());
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("inf").is_err());
        assert!(backoff_seconds("0.01").is_err());
        assert!(backoff_seconds("0.5").is_ok());
    }

    #[test]
    fn addresses() {
        assert!(host_port("127.0.0.1:7443").is_ok());
        assert!(host_port("[::1]:7443").is_ok());
        assert!(host_port("hub.example.com:1").is_ok());
        assert!(host_port("notahostport").is_err());
        assert!(host_port("host:99999").is_err());
        assert!(host_port(":7443").is_err());
        assert!(host_port("a b:1").is_err());
        assert!(hub_addr("tcp://h:1").is_ok());
        assert!(hub_addr("unix:/x").is_ok());
        assert!(hub_addr("unix:").is_err());
        assert!(expose_addr("http://127.0.0.1:9").is_ok());
        assert!(label("a=b").is_ok());
        assert!(label("=b").is_err());
        assert!(at_least_one("0").is_err());
        assert!(at_least_one("-1").is_err());
    }
}
