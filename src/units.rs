//! Sizes and ages as people write them (`40M`, `64K`; `30d`, `12h`), for
//! the command line and the job file alike.

/// A size: digits with an optional binary suffix (K, M, G, T, P; B for
/// bytes): `4096`, `64K`, `40M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G, T or P)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 10G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// An age in seconds: a positive number of days, hours, minutes or
/// seconds (`30d`, `12h`, `90m`, `45s`; bare digits are seconds).
pub fn parse_age(text: &str) -> Result<i64, String> {
    let (digits, unit) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&text[..at], c),
        _ => (text, 's'),
    };
    let n: i64 = digits
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?}: give a positive age such as 30d, 12h, 90m or 45s"))?;
    let scale = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return Err(format!("{text:?}: the unit is d, h, m or s")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long an age"))
}

/// `n` bytes for people: `0 B`, `1023 B`, `64 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
