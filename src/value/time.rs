//! Calendar math on the proleptic Gregorian calendar (leap years, month lengths, dates to and
//! from days since 1970-01-01, instants as Unix microseconds) and the ISO 8601 pieces the
//! renderings print dates, times and UTC offsets with; the one thing it does not compute itself
//! is a zone's offset at an instant (DST rules), which comes from jiff's bundled tz database.

use std::fmt::Write as _;

use jiff::tz::TimeZone;

use super::{Time, Ymd};

/// Whether `year` (astronomical: 1 BC is 0) has a February 29.
pub(crate) fn is_leap(year: i32) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

/// The length of `month` (1..=12) in `year`.
pub(crate) fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
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

/// Days from 1970-01-01 to a proleptic Gregorian date, after Howard Hinnant's
/// `days_from_civil` (the inverse of [`civil_from_days`]): counting years from March puts the
/// leap day at the end of the year, so the day within a year is a fixed function of the month,
/// and 400-year eras repeat exactly.
pub(crate) fn days_since_epoch(date: Ymd) -> i64 {
    let month = i64::from(date.month);
    let day = i64::from(date.day);
    // January and February belong to the previous March-based year.
    let year = i64::from(date.year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400; // 0..=399
    let month_from_march = (month + 9) % 12; // March = 0, February = 11
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // 0..=365
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468 days separate 0000-03-01 (day 0 of era 0) from 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// Microseconds since 1970-01-01 00:00:00 UTC of `date` at `time`, a local time `offset` seconds
/// east of UTC; i128 holds every result. `date` is meant to be a real calendar date (every date
/// [`decode_text`](super::decode_text) reads is one); any other gives a meaningless count, never
/// a panic.
pub(crate) fn unix_micros(date: Ymd, time: Time, offset: i32) -> i128 {
    let days = i128::from(days_since_epoch(date));
    let Time {
        hour,
        minute,
        second,
        micros,
    } = time;
    // The local time minus its offset east of UTC is UTC.
    let seconds = days * 86_400 + i128::from(hour) * 3600 + i128::from(minute) * 60
        - i128::from(offset)
        + i128::from(second);
    seconds * 1_000_000 + i128::from(micros)
}

/// The same instant as `date` at `time` (`offset` seconds east of UTC) on the wall clock of
/// `zone`, with the offset `zone` has then (its DST rules). `None` outside the years a zone
/// database covers (-9999..=9999), where Python has no datetime either.
pub(crate) fn in_zone(
    date: Ymd,
    time: Time,
    offset: i32,
    zone: &TimeZone,
) -> Option<(Ymd, Time, i32)> {
    let micros = i64::try_from(unix_micros(date, time, offset)).ok()?;
    let instant = jiff::Timestamp::from_microsecond(micros).ok()?;
    let local_offset = zone.to_offset(instant).seconds();
    let local = micros.checked_add(i64::from(local_offset) * 1_000_000)?;
    let (year, month, day) = civil_from_days(local.div_euclid(86_400_000_000));
    let of_day = local.rem_euclid(86_400_000_000);
    let date = Ymd {
        year: i32::try_from(year).ok()?,
        month: u8::try_from(month).ok()?,
        day: u8::try_from(day).ok()?,
    };
    let time = Time {
        hour: u8::try_from(of_day / 3_600_000_000).ok()?,
        minute: u8::try_from(of_day / 60_000_000 % 60).ok()?,
        second: u8::try_from(of_day / 1_000_000 % 60).ok()?,
        micros: u32::try_from(of_day % 1_000_000).ok()?,
    };
    Some((date, time, local_offset))
}

/// Unix microseconds as `2024-01-02T03:04:05.123456Z`.
pub(crate) fn iso_utc(unix_micros: i64) -> String {
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
    use super::super::fixtures::ymd;
    use super::*;

    #[test]
    fn days_match_known_dates() {
        for (date, days) in [
            (ymd(1970, 1, 1), 0),
            (ymd(1969, 12, 31), -1),
            (ymd(2000, 3, 1), 11_017),
            (ymd(2000, 2, 29), 11_016),
            (ymd(1900, 3, 1), -25_508),
            (ymd(0, 3, 1), -719_468),
            (ymd(2024, 1, 1), 19_723),
        ] {
            assert_eq!(days_since_epoch(date), days, "{date:?}");
        }
    }

    /// Both directions of the day count, and the month lengths dates are checked against, are
    /// one calendar: every day maps to a date within its month's length and back to itself.
    #[test]
    fn days_and_dates_round_trip() {
        // 1600 years before and after 1970 with a stride that visits every month and leap day
        // position; the edges of each 400-year era are included.
        let days = (-600_000..600_000)
            .step_by(29)
            .chain([-719_468, -719_469, -25_508, 11_016, 11_017, 146_097]);
        for day in days {
            let (year, month, d) = civil_from_days(day);
            let date = ymd(year as i32, month as u8, d as u8);
            assert!(
                (1..=12).contains(&date.month)
                    && (1..=days_in_month(date.year, date.month)).contains(&date.day),
                "{day}: {date:?}"
            );
            assert_eq!(days_since_epoch(date), day, "{date:?}");
        }
        assert!(is_leap(2000) && is_leap(2024) && is_leap(0) && is_leap(-4));
        assert!(!is_leap(1900) && !is_leap(2023) && !is_leap(-1));
    }

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
