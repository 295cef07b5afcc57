//! Calendar math on the proleptic Gregorian calendar (leap years, month lengths, dates to and
//! from days since 1970-01-01) and the ISO 8601 pieces the renderings print dates, times and UTC
//! offsets with.

use std::fmt::Write as _;

use super::{Time, Ymd};

/// Whether `year` (astronomical: 1 BC is 0) has a February 29.
pub fn is_leap(year: i32) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

/// The length of `month` (1..=12) in `year`.
pub fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Unix microseconds as `2024-01-02T03:04:05.123456Z`.
pub fn iso_utc(unix_micros: i64) -> String {
    let days = unix_micros.div_euclid(86_400_000_000);
    let micros_of_day = unix_micros.rem_euclid(86_400_000_000);
    let (year, month, day) = civil_from_days(days);
    let secs = micros_of_day / 1_000_000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        micros_of_day % 1_000_000
    )
}

pub(super) fn push_fraction(out: &mut String, micros: u32) {
    if micros != 0 {
        let digits = format!("{micros:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

pub(super) fn push_time(out: &mut String, t: &Time) {
    let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
    push_fraction(out, t.micros);
}

/// Pushes the year as Postgres prints it (at least 4 digits); returns whether it is BC.
pub(super) fn push_ymd(out: &mut String, d: &Ymd) -> bool {
    let (year, bc) = if d.year <= 0 {
        (1 - i64::from(d.year), true)
    } else {
        (i64::from(d.year), false)
    };
    let _ = write!(out, "{year:04}-{:02}-{:02}", d.month, d.day);
    bc
}

/// Postgres' offset form: `+HH`, `+HH:MM` when minutes are set, `+HH:MM:SS` when seconds are;
/// `always_minutes` gives `+HH:MM` at least (ISO 8601, as `to_json` prints timestamptz).
pub(super) fn push_offset(out: &mut String, offset: i32, always_minutes: bool) {
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    let (h, m, s) = (abs / 3600, abs / 60 % 60, abs % 60);
    let _ = write!(out, "{sign}{h:02}");
    if s != 0 {
        let _ = write!(out, ":{m:02}:{s:02}");
    } else if m != 0 || always_minutes {
        let _ = write!(out, ":{m:02}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_print_as_iso_utc() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso_utc(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            iso_utc(1_709_210_096_123_456),
            "2024-02-29T12:34:56.123456Z"
        );
        assert_eq!(iso_utc(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
