//! Hostile input in, validated values out. Nothing downstream accepts a raw string
//! where a [`BucketName`] or [`Prefix`] is meant, so an unchecked value cannot reach a policy.

use std::fmt;
use std::time::Duration;

use crate::error::{shown, Error, Result};

/// An S3 bucket name that follows S3's naming rules for general purpose buckets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BucketName(String);

/// A key prefix with folder semantics: always ends in `/`, never widens the scope.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(String);

pub const MAX_PREFIX_BYTES: usize = 1024;
pub const MIN_SESSION_DURATION: Duration = Duration::from_secs(15 * 60);
pub const MAX_SESSION_DURATION: Duration = Duration::from_secs(12 * 3600);
pub const MIN_ROTATE_EVERY: Duration = Duration::from_secs(3600);
pub const MAX_ROTATE_EVERY: Duration = Duration::from_secs(8760 * 3600);

impl BucketName {
    pub fn parse(name: &str) -> Result<Self> {
        check_bucket_name(name).map_err(|reason| Error::InvalidBucket {
            bucket: shown(name),
            reason: reason.to_string(),
        })?;
        Ok(BucketName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_bucket_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.len() < 3 || name.len() > 63 {
        return Err("must be 3 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("may contain only lowercase letters, digits, dots and hyphens");
    }
    let first_and_last = [name.as_bytes()[0], name.as_bytes()[name.len() - 1]];
    if !first_and_last
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err("must begin and end with a letter or digit");
    }
    if name.contains("..") {
        return Err("must not contain two adjacent dots");
    }
    if name.contains(".-") || name.contains("-.") {
        return Err("must not contain a dot next to a hyphen");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("must not be formatted as an IP address");
    }
    const RESERVED_PREFIXES: [&str; 3] = ["xn--", "sthree-", "amzn-s3-demo-"];
    const RESERVED_SUFFIXES: [&str; 5] = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"];
    if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
        || RESERVED_SUFFIXES.iter().any(|s| name.ends_with(s))
    {
        return Err("uses a prefix or suffix that S3 reserves");
    }
    Ok(())
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Prefix {
    /// Validates a prefix and gives it folder semantics: `tenant-a` and `tenant-a/`
    /// both become `tenant-a/`, so the grant never reaches `tenant-ab/...`.
    pub fn parse(prefix: &str) -> Result<Self> {
        check_prefix(prefix).map_err(|reason| Error::InvalidPrefix {
            prefix: shown(prefix),
            reason: reason.to_string(),
        })?;
        let mut folder = prefix.to_string();
        if !folder.ends_with('/') {
            folder.push('/');
        }
        if folder.len() > MAX_PREFIX_BYTES {
            return Err(Error::InvalidPrefix {
                prefix: shown(prefix),
                reason: format!("is longer than {MAX_PREFIX_BYTES} bytes"),
            });
        }
        Ok(Prefix(folder))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when every key under `self` is also under `other`.
    pub fn is_within(&self, other: &Prefix) -> bool {
        self.0.starts_with(&other.0)
    }
}

fn check_prefix(prefix: &str) -> std::result::Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("must not be empty (leave it out to ask for the whole bucket)");
    }
    if prefix.len() > MAX_PREFIX_BYTES {
        return Err("is longer than 1024 bytes");
    }
    if let Some(c) = prefix.chars().find(|c| matches!(c, '*' | '?')) {
        return Err(if c == '*' {
            "must not contain the wildcard '*'"
        } else {
            "must not contain the wildcard '?'"
        });
    }
    if prefix.contains(['$', '{', '}']) {
        return Err("must not contain '$', '{' or '}' (IAM policy variables)");
    }
    if prefix.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    if prefix.starts_with('/') {
        return Err("must not start with '/'");
    }
    let segments: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    if prefix.ends_with("//") || segments.iter().any(|s| s.is_empty()) {
        return Err("must not contain empty segments ('//')");
    }
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err("must not contain '.' or '..' segments");
    }
    Ok(())
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates prefixes, applies folder semantics, and drops any prefix that another
/// one already covers (`a/b/` under `a/`). The result is sorted and free of repeats.
pub fn parse_prefixes<S: AsRef<str>>(prefixes: &[S]) -> Result<Vec<Prefix>> {
    let mut parsed = prefixes
        .iter()
        .map(|p| Prefix::parse(p.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    parsed.sort();
    parsed.dedup();
    let covered: Vec<bool> = parsed
        .iter()
        .map(|p| parsed.iter().any(|q| q != p && p.is_within(q)))
        .collect();
    Ok(parsed
        .into_iter()
        .zip(covered)
        .filter(|(_, covered)| !covered)
        .map(|(p, _)| p)
        .collect())
}

/// Parses a Go-style duration made of hours, minutes and seconds (`1h`, `90m`, `1h30m`),
/// the syntax the CRD's CEL rules accept too.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    if text.is_empty() {
        return Err("is empty".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_unit_rank = 0;
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let (seconds, rank) = match c {
            'h' => (3600, 3),
            'm' => (60, 2),
            's' => (1, 1),
            _ => return Err("must be hours, minutes and seconds like 1h, 90m or 1h30m".into()),
        };
        if digits.is_empty() {
            return Err(format!("has a unit '{c}' without a number"));
        }
        if last_unit_rank != 0 && rank >= last_unit_rank {
            return Err("must give units in the order h, m, s, each at most once".into());
        }
        last_unit_rank = rank;
        let amount: u64 = digits.parse().map_err(|_| "is too large".to_string())?;
        total = amount
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or("is too large")?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err("needs a unit after the last number (h, m or s)".into());
    }
    Ok(Duration::from_secs(total))
}

/// Parses a duration and checks it lies within `[min, max]`.
pub fn parse_bounded_duration(
    field: &'static str,
    text: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration> {
    let invalid = |reason: String| Error::InvalidDuration {
        field,
        value: shown(text),
        reason,
    };
    let duration = parse_duration(text).map_err(invalid)?;
    if duration < min || duration > max {
        return Err(invalid(format!(
            "must be between {} and {}",
            format_duration(min),
            format_duration(max)
        )));
    }
    Ok(duration)
}

/// `at` plus `by`, saturating at the end of time instead of overflowing.
pub fn later(at: jiff::Timestamp, by: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(by)
        .ok()
        .and_then(|by| at.checked_add(by).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bucket_names_are_accepted() {
        for name in [
            "acme-data",
            "abc",
            "my.bucket.name",
            "a1b2c3",
            &"a".repeat(63),
        ] {
            assert!(BucketName::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn bucket_names_outside_s3_rules_are_rejected() {
        for name in [
            "ab",
            &"a".repeat(64),
            "Acme",
            "acme_data",
            "-acme",
            "acme-",
            "acme..data",
            "acme.-data",
            "192.168.1.1",
            "xn--acme",
            "acme-s3alias",
            "acme/data",
            "acme*",
            "",
        ] {
            assert!(BucketName::parse(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn prefix_gets_folder_semantics() {
        assert_eq!(Prefix::parse("tenant-a").unwrap().as_str(), "tenant-a/");
        assert_eq!(Prefix::parse("tenant-a/").unwrap().as_str(), "tenant-a/");
        assert_eq!(Prefix::parse("a/b c/d").unwrap().as_str(), "a/b c/d/");
    }

    #[test]
    fn hostile_prefixes_are_rejected_with_a_reason() {
        let cases = [
            ("tenant-*", "wildcard '*'"),
            ("tenant-?", "wildcard '?'"),
            ("${aws:username}/", "policy variables"),
            ("a{b}", "policy variables"),
            ("/tenant-a", "start with '/'"),
            ("tenant-a/../tenant-b/", "'..' segments"),
            ("../x", "'..' segments"),
            ("./x", "'..' segments"),
            ("a/./b", "'..' segments"),
            ("a//b", "empty segments"),
            ("a//", "empty segments"),
            ("a\nb", "control characters"),
            ("a\u{7f}b", "control characters"),
            ("", "must not be empty"),
        ];
        for (prefix, expected) in cases {
            let message = Prefix::parse(prefix).unwrap_err().to_string();
            assert!(message.contains(expected), "{prefix:?}: {message}");
        }
    }

    #[test]
    fn prefix_over_1024_bytes_is_rejected() {
        assert!(Prefix::parse(&"a".repeat(1023)).is_ok());
        assert!(
            Prefix::parse(&"a".repeat(1024)).is_err(),
            "1024 + '/' is 1025"
        );
        assert!(Prefix::parse(&format!("{}/", "a".repeat(1023))).is_ok());
        let message = Prefix::parse(&"a".repeat(5000)).unwrap_err().to_string();
        assert!(
            message.contains("1024 bytes") && message.len() < 300,
            "{message}"
        );
    }

    #[test]
    fn sibling_prefixes_are_not_within_each_other() {
        let a = Prefix::parse("tenant-a").unwrap();
        let ab = Prefix::parse("tenant-ab").unwrap();
        assert!(!ab.is_within(&a));
        assert!(Prefix::parse("tenant-a/x").unwrap().is_within(&a));
    }

    #[test]
    fn nested_and_repeated_prefixes_collapse() {
        let parsed = parse_prefixes(&["b/", "a/x/", "a", "a/", "ab"]).unwrap();
        let shown: Vec<&str> = parsed.iter().map(Prefix::as_str).collect();
        assert_eq!(shown, ["a/", "ab/", "b/"]);
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("90m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("1h30m15s").unwrap().as_secs(), 5415);
        for bad in [
            "",
            "1",
            "h",
            "1d",
            "1m1h",
            "1h1h",
            "-1h",
            "1.5h",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_duration_bounds_are_15m_to_12h() {
        let parse =
            |t| parse_bounded_duration("duration", t, MIN_SESSION_DURATION, MAX_SESSION_DURATION);
        assert!(parse("15m").is_ok());
        assert!(parse("12h").is_ok());
        assert!(parse("14m59s").is_err());
        let message = parse("13h").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid duration \"13h\": must be between 15m and 12h"
        );
    }

    #[test]
    fn later_saturates() {
        let start = jiff::Timestamp::from_second(100).unwrap();
        assert_eq!(later(start, Duration::from_secs(50)).as_second(), 150);
        assert_eq!(later(start, Duration::MAX), jiff::Timestamp::MAX);
        assert_eq!(
            later(jiff::Timestamp::MAX, Duration::from_secs(1)),
            jiff::Timestamp::MAX
        );
    }

    #[test]
    fn format_duration_round_trips() {
        for secs in [1, 60, 900, 3600, 5415, 43200] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
