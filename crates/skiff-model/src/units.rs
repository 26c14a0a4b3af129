//! Sizes (`512MiB`) and durations (`15m`) as they are written in `skiff.toml`.

use std::time::Duration;

/// Parses a size such as `512MiB`, `6MB`, `1GiB` or `1024` (bytes).
/// Binary (`KiB`, `MiB`, `GiB`) and decimal (`KB`, `MB`, `GB`) units are accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{s:?} is not a size; write a number with a unit, such as \"512MiB\" or \"1GiB\""
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{digits:?} is too large a number"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" | "kB" => 1_000,
        "KiB" | "Ki" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" | "Mi" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" | "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use B, KiB, MiB, GiB (or KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration such as `15m`, `30s`, `500ms`, `1h` or `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || {
        format!("{s:?} is not a duration; write a number with a unit, such as \"30s\", \"15m\", \"500ms\" or \"1h\"")
    };
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits_end].parse().map_err(|_| bad())?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => {
                return Err(format!(
                    "{s:?} has no unit; write for example \"{n}s\" for seconds"
                ))
            }
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(format!(
            "{s:?} is too long; the longest a limit can be is 366 days (\"8784h\")"
        ));
    }
    Ok(total)
}

/// Limits are added to clock readings; beyond this they could overflow, and
/// no timeout of a web service needs more.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Formats a size the way a user would write it, e.g. `6MiB` or `6291457B`.
pub fn format_size(bytes: u64) -> String {
    for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= mult && bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// Formats a measured amount of bytes for people: `1.1 GiB`, `22.3 MiB`,
/// `640 B` (one decimal, binary units). Limits use [`format_size`], which
/// is exact and reads back.
pub fn format_amount(bytes: u64) -> String {
    for (unit, mult) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= mult {
            return format!("{:.1} {unit}", bytes as f64 / mult as f64);
        }
    }
    format!("{bytes} B")
}

/// Formats a duration the way a user would write it, e.g. `15m` or `1500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::format_amount;

    #[test]
    fn amounts_read_like_people_write_them() {
        assert_eq!(format_amount(1_172_950_707), "1.1 GiB");
        assert_eq!(format_amount(23_383_244), "22.3 MiB");
        assert_eq!(format_amount(2048), "2.0 KiB");
        assert_eq!(format_amount(640), "640 B");
    }

    use super::*;

    #[test]
    fn sizes() {
        let table = [
            ("512MiB", 512 << 20),
            ("6MiB", 6_291_456),
            ("6MB", 6_000_000),
            ("1GiB", 1 << 30),
            ("100", 100),
            ("64KiB", 65536),
        ];
        for (input, want) in table {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
        for bad in ["", "MiB", "12 parsecs", "1.5GiB", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_size("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations() {
        let table = [
            ("15m", 900_000),
            ("0s", 0),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_duration(input),
                Ok(Duration::from_millis(want)),
                "{input}"
            );
        }
        for bad in ["", "15", "m", "3 days", "1.5s", "10x"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("15").unwrap_err().contains("\"15s\""));
        assert!(parse_duration("8784h").is_ok());
        assert!(parse_duration("8785h").unwrap_err().contains("too long"));
        assert!(parse_duration("18446744073709551615s")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["6MiB", "512MiB", "1GiB", "100B"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        for s in ["15m", "0s", "500ms", "1h", "90s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
