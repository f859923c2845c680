//! Budget windows: calendar periods in a configured time zone, rolling (sliding) periods, or the
//! whole lifetime (`total`).
//!
//! **Rolling windows** are kept as [`ROLLING_BUCKETS`] buckets of `length / 60` seconds each
//! (a rolling day: 24-minute buckets). Usage recorded in a bucket keeps counting until the window
//! has slid a full bucket past it, so usage counts for at least `length` and at most
//! `length + length/60` after it happened: it never ages out early, and at most 1/60 of the window
//! (1.7 %) late. A rolling month is 30 days.
//!
//! A window is computed on read from the instant and the zone: there is no reset job. Hours start on
//! the hour, days at local midnight, weeks on Monday, months on the 1st; `every: N` groups N units,
//! aligned to a fixed origin (local hour 0 for hours, 1970-01-01 for days, Monday 1970-01-05 for
//! weeks, January 1970 for months) so every replica computes the same boundaries.
//! A local boundary that does not exist (a DST gap) starts at the first instant after it.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowUnit {
    Hour,
    Day,
    Week,
    Month,
}

impl WindowUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowUnit::Hour => "hour",
            WindowUnit::Day => "day",
            WindowUnit::Week => "week",
            WindowUnit::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<WindowUnit> {
        Some(match s {
            "hour" => WindowUnit::Hour,
            "day" => WindowUnit::Day,
            "week" => WindowUnit::Week,
            "month" => WindowUnit::Month,
            _ => return None,
        })
    }
}

/// Buckets per rolling window.
pub const ROLLING_BUCKETS: i64 = 60;

/// The period a budget's limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// `every` consecutive calendar units, aligned as the module doc says.
    Calendar { unit: WindowUnit, every: u32 },
    /// The last `every` units, sliding (a month is 30 days).
    Rolling { unit: WindowUnit, every: u32 },
    /// Never resets.
    Total,
}

/// Where the window containing an instant begins and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: DateTime<Utc>,
    /// `None` for [`Window::Total`].
    pub end: Option<DateTime<Utc>>,
}

impl Bounds {
    /// The key of this window in the store's counters: its start in epoch seconds (0 for total).
    pub fn bucket(&self) -> i64 {
        self.start.timestamp()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window.every must be at least 1")]
    ZeroEvery,
    #[error("window.every for hour windows must divide 24 (1, 2, 3, 4, 6, 8, 12, 24), got {0}")]
    HoursNotDividingDay(u32),
    #[error("window.every is too large: {0}")]
    TooLarge(u32),
}

impl Window {
    pub fn validate(&self) -> Result<(), WindowError> {
        let (unit, every, calendar) = match *self {
            Window::Calendar { unit, every } => (unit, every, true),
            Window::Rolling { unit, every } => (unit, every, false),
            Window::Total => return Ok(()),
        };
        if every == 0 {
            return Err(WindowError::ZeroEvery);
        }
        if calendar && unit == WindowUnit::Hour && 24 % every != 0 {
            return Err(WindowError::HoursNotDividingDay(every));
        }
        if every > 10_000 {
            return Err(WindowError::TooLarge(every));
        }
        Ok(())
    }

    /// Seconds in one unit of a rolling window.
    fn unit_seconds(unit: WindowUnit) -> i64 {
        match unit {
            WindowUnit::Hour => 3_600,
            WindowUnit::Day => 86_400,
            WindowUnit::Week => 604_800,
            WindowUnit::Month => 2_592_000,
        }
    }

    /// Rolling windows: (length, bucket size) in seconds.
    fn rolling(&self) -> Option<(i64, i64)> {
        match *self {
            Window::Rolling { unit, every } => {
                let len = Window::unit_seconds(unit) * i64::from(every.max(1));
                Some((len, (len / ROLLING_BUCKETS).max(1)))
            }
            _ => None,
        }
    }

    /// The bucket that usage recorded at `now` goes into (its start, epoch seconds).
    pub fn bucket(&self, now: DateTime<Utc>, tz: Tz) -> i64 {
        match self.rolling() {
            Some((_, g)) => now.timestamp().div_euclid(g) * g,
            None => self.bounds(now, tz).bucket(),
        }
    }

    /// What a lease on this window is for: the calendar window containing `now` (a new window
    /// needs a new lease), or 0 for rolling and lifetime windows (one lease, used amounts age out).
    pub fn lease_epoch(&self, now: DateTime<Utc>, tz: Tz) -> i64 {
        match self {
            Window::Calendar { .. } => self.bounds(now, tz).bucket(),
            Window::Rolling { .. } | Window::Total => 0,
        }
    }

    /// The oldest bucket that still counts at `now`.
    pub fn oldest_counted(&self, now: DateTime<Utc>, tz: Tz) -> i64 {
        match self.rolling() {
            Some((_, g)) => now.timestamp().div_euclid(g) * g - ROLLING_BUCKETS * g,
            None => self.bounds(now, tz).bucket(),
        }
    }

    /// Rolling windows: the instant usage in bucket `b` stops counting.
    pub fn ages_out_at(&self, bucket: i64) -> Option<DateTime<Utc>> {
        let (len, g) = self.rolling()?;
        DateTime::<Utc>::from_timestamp(bucket + len + g, 0)
    }

    /// The window that contains `now`, in zone `tz`. A rolling window has no fixed end: its
    /// bounds are `[now − length, —)`.
    pub fn bounds(&self, now: DateTime<Utc>, tz: Tz) -> Bounds {
        let (unit, every) = match *self {
            Window::Total => {
                return Bounds {
                    start: DateTime::<Utc>::UNIX_EPOCH,
                    end: None,
                };
            }
            Window::Rolling { .. } => {
                let (len, _) = self.rolling().unwrap_or((0, 1));
                return Bounds {
                    start: now - Duration::seconds(len),
                    end: None,
                };
            }
            Window::Calendar { unit, every } => (unit, i64::from(every.max(1))),
        };
        let local = now.with_timezone(&tz).naive_local();
        let (start, end) = match unit {
            WindowUnit::Hour => {
                let h = i64::from(local.hour());
                let h0 = h - h.rem_euclid(every);
                let start = local.date().and_time(chrono::NaiveTime::MIN) + Duration::hours(h0);
                (start, start + Duration::hours(every))
            }
            WindowUnit::Day => {
                let d = days_since_epoch(local.date());
                let d0 = d - d.rem_euclid(every);
                (midnight(d0), midnight(d0 + every))
            }
            WindowUnit::Week => {
                // 1970-01-05 is a Monday, four days after the epoch.
                let weeks = (days_since_epoch(local.date()) - 4).div_euclid(7);
                let w0 = weeks - weeks.rem_euclid(every);
                (midnight(4 + w0 * 7), midnight(4 + (w0 + every) * 7))
            }
            WindowUnit::Month => {
                let m = i64::from(local.year()) * 12 + i64::from(local.month0());
                let m0 = m - m.rem_euclid(every);
                (first_of_month(m0), first_of_month(m0 + every))
            }
        };
        Bounds {
            start: to_utc(start, tz),
            end: Some(to_utc(end, tz)),
        }
    }

    /// Nominal length in seconds, for the IETF `RateLimit-Policy` `w` parameter.
    pub fn nominal_seconds(&self) -> Option<u64> {
        match *self {
            Window::Total => None,
            Window::Calendar { unit, every } | Window::Rolling { unit, every } => {
                u64::try_from(Window::unit_seconds(unit))
                    .ok()
                    .map(|s| s * u64::from(every))
            }
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Window::Total => f.write_str("total"),
            Window::Calendar { unit, every: 1 } => f.write_str(unit.as_str()),
            Window::Calendar { unit, every } => write!(f, "{every} {}s", unit.as_str()),
            Window::Rolling { unit, every: 1 } => write!(f, "rolling {}", unit.as_str()),
            Window::Rolling { unit, every } => write!(f, "rolling {every} {}s", unit.as_str()),
        }
    }
}

fn epoch_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

fn days_since_epoch(d: NaiveDate) -> i64 {
    (d - epoch_date()).num_days()
}

fn midnight(days: i64) -> NaiveDateTime {
    (epoch_date() + Duration::days(days)).and_time(chrono::NaiveTime::MIN)
}

fn first_of_month(month_index: i64) -> NaiveDateTime {
    let year = month_index.div_euclid(12) as i32;
    let month = month_index.rem_euclid(12) as u32 + 1;
    NaiveDate::from_ymd_opt(year, month, 1)
        .unwrap_or_default()
        .and_time(chrono::NaiveTime::MIN)
}

/// Local wall time → instant. Ambiguous (DST fold): the earlier instant. Nonexistent (DST gap):
/// the first valid instant after it, found by stepping in minutes (gaps are at most a few hours).
fn to_utc(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..(24 * 60) {
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return t.with_timezone(&Utc);
        }
        probe += Duration::minutes(1);
    }
    local.and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn check(window: Window, tz: Tz, now: &str, start: &str, end: Option<&str>) {
        let b = window.bounds(at(now), tz);
        assert_eq!(b.start, at(start), "start of {window} at {now} in {tz}");
        assert_eq!(b.end, end.map(at), "end of {window} at {now} in {tz}");
    }

    const fn cal(unit: WindowUnit, every: u32) -> Window {
        Window::Calendar { unit, every }
    }

    #[test]
    fn calendar_windows_in_utc() {
        use WindowUnit::*;
        let utc = chrono_tz::UTC;
        check(
            cal(Hour, 1),
            utc,
            "2026-03-04T10:59:59Z",
            "2026-03-04T10:00:00Z",
            Some("2026-03-04T11:00:00Z"),
        );
        check(
            cal(Hour, 6),
            utc,
            "2026-03-04T13:00:00Z",
            "2026-03-04T12:00:00Z",
            Some("2026-03-04T18:00:00Z"),
        );
        check(
            cal(Day, 1),
            utc,
            "2026-03-04T00:00:00Z",
            "2026-03-04T00:00:00Z",
            Some("2026-03-05T00:00:00Z"),
        );
        // 2026-11-30 is a Monday.
        check(
            cal(Week, 1),
            utc,
            "2026-12-03T17:00:00Z",
            "2026-11-30T00:00:00Z",
            Some("2026-12-07T00:00:00Z"),
        );
        check(
            cal(Week, 1),
            utc,
            "2026-11-30T00:00:00Z",
            "2026-11-30T00:00:00Z",
            Some("2026-12-07T00:00:00Z"),
        );
        check(
            cal(Month, 1),
            utc,
            "2026-12-31T23:59:59Z",
            "2026-12-01T00:00:00Z",
            Some("2027-01-01T00:00:00Z"),
        );
        check(
            cal(Month, 1),
            utc,
            "2028-02-29T12:00:00Z",
            "2028-02-01T00:00:00Z",
            Some("2028-03-01T00:00:00Z"),
        );
        check(
            cal(Month, 3),
            utc,
            "2026-05-15T00:00:00Z",
            "2026-04-01T00:00:00Z",
            Some("2026-07-01T00:00:00Z"),
        );
        check(
            Window::Total,
            utc,
            "2026-05-15T00:00:00Z",
            "1970-01-01T00:00:00Z",
            None,
        );
    }

    #[test]
    fn calendar_windows_follow_the_zone() {
        use WindowUnit::*;
        let ny = chrono_tz::America::New_York;
        // 2026-03-08 02:00 local does not exist (spring forward): that day is 23 hours long.
        check(
            cal(Day, 1),
            ny,
            "2026-03-08T12:00:00Z",
            "2026-03-08T05:00:00Z",
            Some("2026-03-09T04:00:00Z"),
        );
        check(
            cal(Month, 1),
            ny,
            "2026-12-01T03:00:00Z",
            "2026-11-01T04:00:00Z",
            Some("2026-12-01T05:00:00Z"),
        );
        let kolkata = chrono_tz::Asia::Kolkata;
        check(
            cal(Hour, 1),
            kolkata,
            "2026-01-01T00:10:00Z",
            "2025-12-31T23:30:00Z",
            Some("2026-01-01T00:30:00Z"),
        );
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            cal(WindowUnit::Day, 0).validate(),
            Err(WindowError::ZeroEvery)
        );
        assert_eq!(
            cal(WindowUnit::Hour, 5).validate(),
            Err(WindowError::HoursNotDividingDay(5))
        );
        assert!(cal(WindowUnit::Hour, 12).validate().is_ok());
    }
}

/// The current bounds of calendar windows, remembered until they end: working out a window in a
/// time zone is the dearest step of a decision, and every request of the day asks again.
/// Rolling and lifetime windows are plain arithmetic and are not kept.
#[derive(Debug, Default)]
pub struct WindowCache {
    calendar: Vec<(Window, Tz, Bounds)>,
}

impl WindowCache {
    /// Windows kept before the cache is emptied.
    const CAPACITY: usize = 256;

    pub fn bounds(&mut self, w: &Window, now: DateTime<Utc>, tz: Tz) -> Bounds {
        if !matches!(w, Window::Calendar { .. }) {
            return w.bounds(now, tz);
        }
        let current = |b: &Bounds| b.start <= now && b.end.is_some_and(|e| now < e);
        if let Some((_, _, b)) = self
            .calendar
            .iter()
            .find(|(x, t, b)| x == w && *t == tz && current(b))
        {
            return *b;
        }
        let b = w.bounds(now, tz);
        match self
            .calendar
            .iter_mut()
            .find(|(x, t, _)| x == w && *t == tz)
        {
            Some(slot) => slot.2 = b,
            None => {
                if self.calendar.len() >= Self::CAPACITY {
                    self.calendar.clear();
                }
                self.calendar.push((*w, tz, b));
            }
        }
        b
    }

    /// [`Window::bucket`], through the cache.
    pub fn bucket(&mut self, w: &Window, now: DateTime<Utc>, tz: Tz) -> i64 {
        match w {
            Window::Calendar { .. } => self.bounds(w, now, tz).bucket(),
            _ => w.bucket(now, tz),
        }
    }

    /// [`Window::oldest_counted`], through the cache.
    pub fn oldest(&mut self, w: &Window, now: DateTime<Utc>, tz: Tz) -> i64 {
        match w {
            Window::Calendar { .. } => self.bounds(w, now, tz).bucket(),
            _ => w.oldest_counted(now, tz),
        }
    }

    /// [`Window::lease_epoch`], through the cache.
    pub fn lease_epoch(&mut self, w: &Window, now: DateTime<Utc>, tz: Tz) -> i64 {
        match w {
            Window::Calendar { .. } => self.bounds(w, now, tz).bucket(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn the_cache_agrees_with_the_window_at_every_instant_and_across_boundaries() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        let mut cache = WindowCache::default();
        let windows = [
            Window::Calendar {
                unit: WindowUnit::Hour,
                every: 6,
            },
            Window::Calendar {
                unit: WindowUnit::Day,
                every: 1,
            },
            Window::Calendar {
                unit: WindowUnit::Week,
                every: 1,
            },
            Window::Calendar {
                unit: WindowUnit::Month,
                every: 1,
            },
            Window::Rolling {
                unit: WindowUnit::Hour,
                every: 1,
            },
            Window::Total,
        ];
        // Across the autumn DST change, in steps that cross every boundary.
        let mut t = DateTime::parse_from_rfc3339("2026-10-24T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for _ in 0..2_000 {
            for w in &windows {
                assert_eq!(cache.bounds(w, t, tz), w.bounds(t, tz), "{w:?} at {t}");
                assert_eq!(cache.bucket(w, t, tz), w.bucket(t, tz));
                assert_eq!(cache.oldest(w, t, tz), w.oldest_counted(t, tz));
                assert_eq!(cache.lease_epoch(w, t, tz), w.lease_epoch(t, tz));
            }
            t += chrono::Duration::minutes(17);
        }
    }
}
