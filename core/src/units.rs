//! Typed durations and sizes as the command line writes them: `30s`, `1h30m`, `24h`,
//! `64KiB`, `50MB`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("{0:?} is not a duration; write numbers with units, largest first: 500ms, 30s, 5m, 1h30m, 30d")]
    BadDuration(String),
    #[error("{0:?} is not a size; write a number and a unit: 4096, 64KiB, 8MiB, 1GiB, 50MB")]
    BadSize(String),
}

fn split(s: &str) -> (&str, &str) {
    let i = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..i], s[i..].trim())
}

/// A duration: one or more number-unit pairs, largest first, e.g. `90s`, `1h30m`, `2d12h`.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::BadDuration(s.to_string());
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let i = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: u64 = rest[..i].parse().map_err(|_| bad())?;
        let tail = &rest[i..];
        let j = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let unit = match tail[..j].trim() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        // Largest first, each unit once: `1h30m`, not `30m1h` or `1m1m`.
        if unit >= last_unit {
            return Err(bad());
        }
        last_unit = unit;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        rest = &tail[j..];
    }
    Ok(Duration::from_millis(total))
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

pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::BadSize(s.to_string());
    let (num, unit) = split(s.trim());
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
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
        assert!(parse_duration("30m1h").is_err(), "largest first");
        assert!(parse_duration("1m1m").is_err());
        assert!(parse_duration("1h30").is_err(), "a number without a unit");
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
    }
}
