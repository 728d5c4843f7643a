//! UTC timestamps for backup ids and manifests, from the system clock.
//!
//! A debug build adds `BITBACK_CLOCK_OFFSET` seconds (may be negative) to
//! the clock, so tests can step it back as NTP does; release builds ignore
//! the variable.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC time, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Utc {
    pub fn now() -> Utc {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let offset = if cfg!(debug_assertions) {
            std::env::var("BITBACK_CLOCK_OFFSET")
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        Utc::from_unix(secs.saturating_add(offset))
    }

    /// Seconds since 1970-01-01T00:00:00Z.
    pub fn to_unix(&self) -> i64 {
        // Days from civil (the inverse of `from_unix`).
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// The time at the start of a backup id (`20261126T152252Z`, maybe
    /// followed by `-N`), or `None` if it does not start with one.
    pub fn parse_compact_prefix(id: &str) -> Option<Utc> {
        let b = id.as_bytes();
        if b.len() < 16 || b[8] != b'T' || b[15] != b'Z' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let s = id.get(r)?;
            s.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| s.parse().ok())?
        };
        let t = Utc {
            year: i64::from(num(0..4)?),
            month: num(4..6)?,
            day: num(6..8)?,
            hour: num(9..11)?,
            minute: num(11..13)?,
            second: num(13..15)?,
        };
        let valid = (1..=12).contains(&t.month)
            && (1..=31).contains(&t.day)
            && t.hour < 24
            && t.minute < 60
            && t.second < 60;
        valid.then_some(t)
    }

    /// An RFC 3339 time in UTC as S3 gives it (`2026-11-26T15:22:52Z`,
    /// maybe with a fraction: `2026-11-26T15:22:52.000Z`).
    pub fn parse_rfc3339(text: &str) -> Option<Utc> {
        let head = text.get(..19)?;
        let b = head.as_bytes();
        let shape = b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':';
        let rest = &text[19..];
        let tail = rest.strip_suffix('Z')?;
        let fraction = tail.is_empty()
            || tail
                .strip_prefix('.')
                .is_some_and(|f| !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()));
        if !shape || !fraction {
            return None;
        }
        let compact: String = head.chars().filter(|c| *c != '-' && *c != ':').collect();
        Utc::parse_compact_prefix(&format!("{compact}Z"))
    }

    /// Whether `id` is a backup id bitback makes: `20261126T152252Z` or
    /// `20261126T152252Z-N`.
    pub fn is_backup_id(id: &str) -> bool {
        if Utc::parse_compact_prefix(id).is_none() {
            return false;
        }
        match &id[16..] {
            "" => true,
            rest => rest.strip_prefix('-').is_some_and(|n| {
                !n.is_empty() && n.len() <= 9 && n.bytes().all(|c| c.is_ascii_digit())
            }),
        }
    }

    pub fn from_unix(secs: i64) -> Utc {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's method).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Utc {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// The ISO 8601 week: (its year, its number 1-53). Weeks start on
    /// Monday; week 1 is the one holding the year's first Thursday.
    pub fn iso_week(&self) -> (i64, u32) {
        let days = self.to_unix().div_euclid(86_400);
        // 1970-01-01 was a Thursday: Monday is 0.
        let weekday = (days + 3).rem_euclid(7);
        let thursday = days - weekday + 3;
        let year = Utc::from_unix(thursday * 86_400).year;
        let first = Utc {
            year,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
        }
        .to_unix()
            / 86_400;
        (year, ((thursday - first) / 7 + 1) as u32)
    }

    /// `2026-11-26T15:22:52Z`
    pub fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `20261126T152252Z`: a backup id, sortable and safe as a file name.
    pub fn compact(&self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod rfc3339_tests {
    use super::Utc;

    #[test]
    fn s3s_times_read_back() {
        let t = Utc::parse_rfc3339("2026-12-09T00:00:00Z").unwrap();
        assert_eq!(t.rfc3339(), "2026-12-09T00:00:00Z");
        let f = Utc::parse_rfc3339("2026-12-09T10:20:30.000Z").unwrap();
        assert_eq!(f.rfc3339(), "2026-12-09T10:20:30Z");
        for bad in [
            "2026-12-09",
            "2026-12-09T00:00:00",
            "2026-13-09T00:00:00Z",
            "2026-12-09T00:00:00.Z",
            "x026-12-09T00:00:00Z",
        ] {
            assert!(Utc::parse_rfc3339(bad).is_none(), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Utc;

    #[test]
    fn known_dates() {
        assert_eq!(Utc::from_unix(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Utc::from_unix(951_782_400).rfc3339(),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            Utc::from_unix(1_795_704_928).rfc3339(),
            "2026-11-26T14:55:28Z"
        );
        assert_eq!(Utc::from_unix(1_795_704_928).compact(), "20261126T145528Z");
        assert_eq!(Utc::from_unix(-1).rfc3339(), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn unix_round_trip_and_ids() {
        for secs in [
            0,
            1,
            951_782_400,
            1_795_704_928,
            -1,
            4_102_444_800,
            1_709_164_799,
        ] {
            assert_eq!(Utc::from_unix(secs).to_unix(), secs, "{secs}");
        }
        let t = Utc::from_unix(1_795_704_928);
        assert_eq!(Utc::parse_compact_prefix(&t.compact()), Some(t));
        assert!(Utc::is_backup_id("20261126T145528Z"));
        assert!(Utc::is_backup_id("20261126T145528Z-12"));
        for bad in [
            "20261126T145528Z-",
            "20261126T145528Z-x",
            "20261126T145528Z-20261126T145528Z",
            "20261326T145528Z",
            "2026112T145528Z",
            "b3",
        ] {
            assert!(!Utc::is_backup_id(bad), "{bad}");
        }
    }

    #[test]
    fn iso_weeks_start_on_monday_and_belong_to_their_thursdays_year() {
        let week = |text: &str| Utc::parse_rfc3339(text).unwrap().iso_week();
        // Thursday 1 January 2026: week 1 of 2026 from Monday 29 December.
        assert_eq!(week("2025-12-29T00:00:00Z"), (2026, 1));
        assert_eq!(week("2025-12-28T23:59:59Z"), (2025, 52));
        assert_eq!(week("2026-01-04T12:00:00Z"), (2026, 1));
        assert_eq!(week("2026-01-05T00:00:00Z"), (2026, 2));
        // 2020 had 53 weeks; 1 January 2021 (a Friday) is in its last.
        assert_eq!(week("2021-01-01T00:00:00Z"), (2020, 53));
        assert_eq!(week("2021-01-04T00:00:00Z"), (2021, 1));
        assert_eq!(week("2026-12-06T16:00:00Z"), (2026, 49));
    }
}
