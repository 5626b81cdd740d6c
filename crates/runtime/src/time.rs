//! Durations in flags, and the global time scale that shrinks simulated ones.

use std::time::Duration;

/// Parses `250ms`, `15s`, `2m`, `1h`, `1d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// Parses the time scale: a finite factor, at least 0.
pub fn parse_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid time scale {s:?}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "the time scale must be a finite number >= 0, not {s:?}"
        ))
    }
}

/// `d` multiplied by the time scale; 0 (or anything not positive, or NaN) is instant.
pub fn scale(d: Duration, factor: f64) -> Duration {
    if factor.is_nan() || factor <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn scales() {
        assert_eq!(parse_scale("0.01").unwrap(), 0.01);
        assert_eq!(parse_scale("0").unwrap(), 0.0);
        assert!(parse_scale("-1").is_err());
        assert!(parse_scale("inf").is_err());
        assert!(parse_scale("NaN").is_err());

        let minute = Duration::from_secs(60);
        assert_eq!(scale(minute, 1.0), minute);
        assert_eq!(scale(minute, 0.01), Duration::from_millis(600));
        assert_eq!(scale(minute, 0.0), Duration::ZERO);
        assert_eq!(scale(minute, -1.0), Duration::ZERO);
        assert_eq!(scale(minute, f64::NAN), Duration::ZERO);
        assert_eq!(scale(Duration::MAX, 2.0), Duration::MAX);
    }
}
