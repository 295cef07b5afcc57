//! Calendar math for `epoch()`: a proleptic Gregorian date and time of day as a count from the
//! Unix epoch. Pure arithmetic on `value`'s date and time parts, kept apart from scores so it can
//! join the rest of the calendar code in `value`.

use crate::value::{Time, Ymd};

/// Microseconds since 1970-01-01 00:00:00 UTC of `date` at `time`, a local time `offset` seconds
/// east of UTC. `date` must have a month in 1..=12 and a day in 1..=31; i128 holds every result.
pub(super) fn unix_micros(date: Ymd, time: Time, offset: i32) -> i128 {
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

/// Days from 1970-01-01 to a proleptic Gregorian date, after Howard Hinnant's
/// `days_from_civil`: counting years from March puts the leap day at the end of the year, so
/// the day within a year is a fixed function of the month, and 400-year eras repeat exactly.
fn days_since_epoch(date: Ymd) -> i64 {
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
}
