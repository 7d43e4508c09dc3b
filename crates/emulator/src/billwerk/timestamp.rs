//! billwerk's timestamps: ISO 8601 in UTC with exactly 7 fractional digits and `Z`
//! (`2020-02-26T09:32:36.1230000Z`, .NET's 100-ns ticks); requests may send fewer digits.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Timelike, Utc};

/// `2020-02-26T09:32:36.1230000Z`: sub-tick precision is truncated, as .NET does.
pub fn format(at: DateTime<Utc>) -> String {
    let ticks = (at.nanosecond() / 100).min(9_999_999); // a leap second's nanos exceed 10^9
    format!("{}.{ticks:07}Z", at.format("%Y-%m-%dT%H:%M:%S"))
}

/// Accepts what billwerk's .NET binder plausibly accepts: RFC 3339 with any number of
/// fractional digits and any offset; a date-time without an offset (taken as UTC); a bare date.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    if let Ok(naive) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(naive.and_utc());
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(date.and_hms_opt(0, 0, 0)?.and_utc());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_seven_fractional_digits() {
        let at = parse("2020-02-26T09:32:36.123Z").unwrap();
        assert_eq!(format(at), "2020-02-26T09:32:36.1230000Z");
        let whole = parse("2019-05-21T06:11:34Z").unwrap();
        assert_eq!(format(whole), "2019-05-21T06:11:34.0000000Z");
        let nanos = parse("2019-05-21T06:11:34.123456789Z").unwrap();
        assert_eq!(format(nanos), "2019-05-21T06:11:34.1234567Z");
    }

    #[test]
    fn parses_offsets_naive_times_and_dates_as_utc() {
        assert_eq!(
            format(parse("2019-05-21T08:11:34.5+02:00").unwrap()),
            "2019-05-21T06:11:34.5000000Z"
        );
        assert_eq!(
            format(parse("2019-05-21T06:11:34").unwrap()),
            "2019-05-21T06:11:34.0000000Z"
        );
        assert_eq!(
            format(parse("2019-05-21").unwrap()),
            "2019-05-21T00:00:00.0000000Z"
        );
        assert_eq!(parse("21.05.2019"), None);
        assert_eq!(parse("yesterday"), None);
    }

    #[test]
    fn round_trips_its_own_format() {
        let text = "2020-02-26T09:32:36.1234567Z";
        assert_eq!(format(parse(text).unwrap()), text);
    }
}
