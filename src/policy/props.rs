//! Property tests of the pure policy core: windows in several zones (month ends, leap years, DST
//! gaps and folds, half-hour offsets), rolling ageing, reset times, and integer money.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::admission::{Admission, Amount, Ask, Counters, LeaseStep};
use super::budget::tests::budget;
use super::budget::{Limit, Principal, SubjectKind};
use super::money::{NanoUsd, Price, TokenClasses, Tokens};
use super::window::{Window, WindowUnit};
use super::{Policy, PriceBook, UnpricedModel};

const ZONES: [Tz; 5] = [
    chrono_tz::UTC,
    chrono_tz::America::New_York,
    chrono_tz::Europe::London,
    chrono_tz::Asia::Kolkata,
    chrono_tz::Australia::Lord_Howe, // 30-minute DST shift
];

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // 1971 .. 2099, at second resolution.
    (31_536_000i64..4_102_444_800)
        .prop_map(|s| DateTime::<Utc>::from_timestamp(s, 0).unwrap_or_default())
}

fn calendar() -> impl Strategy<Value = Window> {
    prop_oneof![
        prop::sample::select(vec![1u32, 2, 3, 4, 6, 8, 12, 24]).prop_map(|every| {
            Window::Calendar {
                unit: WindowUnit::Hour,
                every,
            }
        }),
        (1u32..10).prop_map(|every| Window::Calendar {
            unit: WindowUnit::Day,
            every
        }),
        (1u32..5).prop_map(|every| Window::Calendar {
            unit: WindowUnit::Week,
            every
        }),
        (1u32..13).prop_map(|every| Window::Calendar {
            unit: WindowUnit::Month,
            every
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The window containing t contains t, the next one starts where it ends, and the instant
    /// just before the end is in the same window.
    #[test]
    fn calendar_windows_tile_time(t in instant(), w in calendar(), z in 0usize..ZONES.len()) {
        let tz = ZONES[z];
        let b = w.bounds(t, tz);
        let end = b.end.unwrap();
        prop_assert!(b.start <= t && t < end, "{w} in {tz}: {t} not in [{}, {end})", b.start);
        prop_assert_eq!(w.bounds(end - Duration::milliseconds(1), tz), b);
        prop_assert_eq!(w.bounds(end, tz).start, end);
    }

    /// Days begin at local midnight, weeks on Monday, months on the 1st (unless a DST gap removed
    /// midnight, then at the first instant after it), and a month is 28 to 31 days long.
    #[test]
    fn calendar_windows_start_where_people_expect(t in instant(), z in 0usize..ZONES.len()) {
        let tz = ZONES[z];
        for unit in [WindowUnit::Day, WindowUnit::Week, WindowUnit::Month] {
            let w = Window::Calendar { unit, every: 1 };
            let b = w.bounds(t, tz);
            let local = b.start.with_timezone(&tz);
            let midnight = local.date_naive().and_time(chrono::NaiveTime::MIN);
            match tz.from_local_datetime(&midnight).earliest() {
                Some(m) => prop_assert_eq!(b.start, m.with_timezone(&Utc), "{} in {} does not start at midnight", w, tz),
                None => {
                    // Midnight fell in a DST gap: the first instant after it.
                    let gap = local.naive_local() - midnight;
                    prop_assert!(gap > Duration::zero() && gap <= Duration::hours(2), "{} in {} starts {:?} after midnight", w, tz, gap);
                    let before = b.start - Duration::minutes(1);
                    prop_assert!(before.with_timezone(&tz).date_naive() < local.date_naive());
                }
            }
            match unit {
                WindowUnit::Week => prop_assert_eq!(local.weekday(), Weekday::Mon),
                WindowUnit::Month => {
                    prop_assert_eq!(local.day(), 1);
                    let days = (b.end.unwrap() - b.start).num_hours() as f64 / 24.0;
                    prop_assert!((27.9..=31.1).contains(&days), "month of {days} days");
                }
                _ => {}
            }
        }
    }

    /// Rolling windows: usage counts for at least the window and at most one bucket longer.
    #[test]
    fn rolling_usage_ages_out_within_one_bucket(
        u in instant(),
        later in 0i64..(3 * 86_400),
        unit in prop::sample::select(vec![WindowUnit::Hour, WindowUnit::Day]),
        every in 1u32..4,
    ) {
        let w = Window::Rolling { unit, every };
        let len = w.nominal_seconds().unwrap() as i64;
        let g = len / 60;
        let mut b = budget("r", SubjectKind::User, "a", Limit::Tokens(Tokens(1_000_000)));
        b.window = w;
        let policy = Policy::new(vec![b], PriceBook::default(), chrono_tz::UTC, UnpricedModel::Deny);
        let p = Principal::user("a");
        let ask = Ask { principal: &p, model: Some("m"), estimate: TokenClasses { input: 1, ..Default::default() }, lease: LeaseStep::Acquire };
        let mut c = Counters::default();
        let Admission::Allowed { reservation, .. } = c.admit(&policy, &ask, u) else { panic!() };
        c.settle(&reservation, Amount { tokens: 100, nanos: 0 }, u, chrono_tz::UTC);
        let t = u + Duration::seconds(later);
        let used = c.evaluate(&policy, &ask, t).considered[0].status.used;
        if later < len {
            prop_assert_eq!(used, 100, "aged out early at +{}s of {}s", later, len);
        }
        if later >= len + g {
            prop_assert_eq!(used, 0, "still counted at +{}s of {}s (bucket {}s)", later, len, g);
        }
    }

    /// A calendar denial's reset time is the window's end, and at that instant the budget is free.
    #[test]
    fn denials_reset_when_the_window_ends(t in instant(), w in calendar(), z in 0usize..ZONES.len()) {
        let tz = ZONES[z];
        let mut b = budget("c", SubjectKind::User, "a", Limit::Tokens(Tokens(100)));
        b.window = w;
        let policy = Policy::new(vec![b], PriceBook::default(), tz, UnpricedModel::Deny);
        let p = Principal::user("a");
        let ask = Ask { principal: &p, model: None, estimate: TokenClasses { input: 60, ..Default::default() }, lease: LeaseStep::Acquire };
        let mut c = Counters::default();
        let Admission::Allowed { reservation, .. } = c.admit(&policy, &ask, t) else { panic!() };
        c.settle(&reservation, Amount { tokens: 60, nanos: 0 }, t, tz);
        let Admission::Denied { denial, .. } = c.admit(&policy, &ask, t) else { panic!("second 60 of 100 fit") };
        let reset = denial.status.resets_at.unwrap();
        prop_assert_eq!(reset, w.bounds(t, tz).end.unwrap());
        prop_assert!(denial.status.reset_after(t).unwrap() >= 1);
        let free_again = matches!(c.admit(&policy, &ask, reset), Admission::Allowed { .. });
        prop_assert!(free_again, "still denied at the reset time");
    }

    /// Dollar amounts print and parse back exactly.
    #[test]
    fn usd_round_trips(n in any::<u64>()) {
        let shown = NanoUsd(n).to_string();
        prop_assert_eq!(shown.parse::<NanoUsd>().unwrap(), NanoUsd(n));
    }

    /// Costs are exact up to one nano-dollar per request, monotone, and never below the true cost.
    #[test]
    fn costs_round_up_once(
        p in (0u64..100_000_000_000, 0u64..100_000_000_000, 0u64..100_000_000_000, 0u64..100_000_000_000),
        a in (0u64..10_000_000, 0u64..10_000_000, 0u64..10_000_000, 0u64..10_000_000),
        extra in 0u64..1000,
    ) {
        let price = Price { input: NanoUsd(p.0), output: NanoUsd(p.1), cache_read: NanoUsd(p.2), cache_write: NanoUsd(p.3), cache_write_1h: NanoUsd(p.3 * 2) };
        let t = TokenClasses { input: a.0, output: a.1, cache_read: a.2, cache_write: a.3, cache_write_1h: a.3 / 3 };
        let exact = u128::from(a.0) * u128::from(p.0) + u128::from(a.1) * u128::from(p.1)
            + u128::from(a.2) * u128::from(p.2) + u128::from(a.3) * u128::from(p.3)
            + u128::from(a.3 / 3) * u128::from(p.3 * 2);
        let cost = u128::from(price.cost(&t).0);
        prop_assert!(cost * 1_000_000 >= exact && cost * 1_000_000 < exact + 1_000_000);
        let more = TokenClasses { output: a.1 + extra, ..t };
        prop_assert!(price.cost(&more) >= price.cost(&t));
    }
}

#[test]
fn leap_years_and_month_ends() {
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let m = Window::Calendar {
        unit: WindowUnit::Month,
        every: 1,
    };
    for (now, start, end) in [
        (
            "2028-02-29T23:59:59Z",
            "2028-02-01T00:00:00Z",
            "2028-03-01T00:00:00Z",
        ),
        (
            "2100-02-28T12:00:00Z",
            "2100-02-01T00:00:00Z",
            "2100-03-01T00:00:00Z",
        ),
        (
            "2026-04-30T23:59:59Z",
            "2026-04-01T00:00:00Z",
            "2026-05-01T00:00:00Z",
        ),
        (
            "2026-12-31T23:59:59Z",
            "2026-12-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        ),
    ] {
        let b = m.bounds(at(now), chrono_tz::UTC);
        assert_eq!((b.start, b.end), (at(start), Some(at(end))), "{now}");
    }
    // Europe/London, autumn fold: 2026-10-25 has 25 hours.
    let d = Window::Calendar {
        unit: WindowUnit::Day,
        every: 1,
    }
    .bounds(at("2026-10-25T12:00:00Z"), chrono_tz::Europe::London);
    assert_eq!(d.end.unwrap() - d.start, Duration::hours(25));
}
