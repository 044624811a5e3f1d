//! Typed durations and sizes as the command line writes them: `30s`, `1h30m`, `24h`,
//! `64KiB`, `50MB`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("{0:?} is not a duration; write numbers with units: 500ms, 30s, 5m, 1h30m, 30d")]
    BadDuration(String),
    #[error("{0:?} is not a size; write a number and a unit: 4096, 64KiB, 8MiB, 1.5GiB, 50MB")]
    BadSize(String),
}

/// A duration as `humantime` reads it: number-unit pairs such as `90s`, `1h30m`, `2d12h`,
/// `500ms`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|_| UnitError::BadDuration(s.to_string()))
}

/// Unix milliseconds as RFC 3339 in UTC, always with three digits of milliseconds, so
/// that columns line up and every output says a time the same way.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// An RPO as people read it: 42s, 5m07s, 2h03m, 3d04h; `-` before the first point (< 0).
pub fn rpo_text(secs: i64) -> String {
    match secs {
        s if s < 0 => "-".into(),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A size as `bytesize` reads it: bytes (`4096`), binary units (`64KiB`, `1.5GiB`) or
/// decimal ones (`50MB`).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    s.trim().parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|_| UnitError::BadSize(s.to_string()))
}

/// A size for people: `512 B`, `1.5 GiB`.
pub fn size_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d12h"), Ok(Duration::from_secs(216_000)));
        assert_eq!(parse_duration("1m30s500ms"), Ok(Duration::from_millis(90_500)));
        assert!(parse_duration("1h30").is_err(), "a number without a unit");
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }
}
