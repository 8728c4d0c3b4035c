use super::*;
use chrono::{TimeZone, Timelike};
use proptest::prelude::*;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
}

fn go(s: &str) -> i64 {
    parse_go_duration(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .as_nanos()
}

const S: i64 = 1_000_000_000;

// --- Go durations ----------------------------------------------------------------------------

#[test]
fn go_durations_parse_like_go() {
    assert_eq!(go("0"), 0);
    assert_eq!(go("+0"), 0);
    assert_eq!(go("-0"), 0);
    assert_eq!(go("0s"), 0);
    assert_eq!(go("1h30m"), 5400 * S);
    assert_eq!(go("1.5h"), 5400 * S);
    assert_eq!(go("-2s"), -2 * S);
    assert_eq!(go("+2s"), 2 * S);
    assert_eq!(go(".5s"), S / 2);
    assert_eq!(go("1.s"), S);
    assert_eq!(go("300ms"), 300_000_000);
    assert_eq!(go("1us"), 1_000);
    assert_eq!(go("1\u{b5}s"), 1_000);
    assert_eq!(go("1\u{3bc}s"), 1_000);
    assert_eq!(go("5ns"), 5);
    assert_eq!(go("2h45m0.5s"), (2 * 3600 + 45 * 60) * S + S / 2);
    // What the Python SDK sends for timedelta(hours=1) and timedelta(seconds=3, microseconds=7).
    assert_eq!(go("1h0m0s0ms0μs"), 3600 * S);
    assert_eq!(go("0h0m3s0ms7μs"), 3 * S + 7_000);
    // Units may repeat and come in any order, as in Go.
    assert_eq!(go("1s1s"), 2 * S);
    assert_eq!(go("1s1h"), 3601 * S);
    // Fraction digits past what fits are ignored.
    assert_eq!(go("0.1234567891234567891234s"), 123_456_789);
    assert_eq!(go("000000000000000000000000001s"), S);
}

#[test]
fn go_durations_overflow_at_go_bounds() {
    assert_eq!(go("9223372036854775807ns"), i64::MAX);
    assert_eq!(go("-9223372036854775808ns"), i64::MIN);
    assert_eq!(go("2562047h47m16.854775807s"), i64::MAX);
    for bad in [
        "9223372036854775808ns",
        "2562048h",
        "2562047h47m16.854775808s",
        "-9223372036854775809ns",
        "99999999999999999999999999h",
        "1000000000000000000000000000000ns",
    ] {
        let e = parse_go_duration(bad).unwrap_err();
        assert!(e.reason().contains("out of range"), "{bad}: {e}");
    }
}

#[test]
fn go_durations_reject_what_go_rejects() {
    for (bad, why) in [
        ("", "empty"),
        ("-", "empty"),
        ("+", "empty"),
        ("1", "missing unit"),
        ("10", "missing unit"),
        ("s", "expected a number"),
        ("1x", "unknown unit"),
        ("1hh", "unknown unit"),
        ("1S", "unknown unit"),
        (".s", "expected a number"),
        ("-.s", "expected a number"),
        ("1.2.3s", "missing unit"),
        ("+-1s", "expected a number"),
        (" 1s", "expected a number"),
        ("1s ", "unknown unit"),
        ("1e3s", "unknown unit"),
        ("P1D", "expected a number"),
    ] {
        let e = parse_go_duration(bad).unwrap_err();
        assert!(e.reason().contains(why), "{bad:?}: {e}");
        assert_eq!(e.format(), Format::GoDuration);
    }
}

#[test]
fn go_duration_errors_say_what_is_accepted() {
    let msg = parse_go_duration("5 minutes").unwrap_err().to_string();
    assert!(msg.contains("\"5 minutes\""), "{msg}");
    assert!(msg.contains("units ns, us"), "{msg}");
    let long = "9".repeat(500);
    let msg = parse_go_duration(&long).unwrap_err().to_string();
    assert!(msg.len() < 400, "long inputs are cut in messages: {msg}");
}

#[test]
fn go_duration_string_matches_go() {
    let cases = [
        (0, "0s"),
        (1, "1ns"),
        (999, "999ns"),
        (1_500, "1.5µs"),
        (1_000_000, "1ms"),
        (1_500_000, "1.5ms"),
        (S, "1s"),
        (S + S / 2, "1.5s"),
        (90 * S, "1m30s"),
        (3600 * S, "1h0m0s"),
        (3600 * S + 1, "1h0m0.000000001s"),
        (-60 * S, "-1m0s"),
        (-1, "-1ns"),
        (100 * 3600 * S, "100h0m0s"),
        (i64::MAX, "2562047h47m16.854775807s"),
        (i64::MIN, "-2562047h47m16.854775808s"),
    ];
    for (n, want) in cases {
        assert_eq!(GoDuration::from_nanos(n).to_string(), want, "{n}");
    }
}

#[test]
fn go_duration_conversions() {
    assert_eq!(GoDuration::from_nanos(-1).as_std(), None);
    assert_eq!(
        GoDuration::from_nanos(1500).as_std(),
        Some(Duration::from_nanos(1500))
    );
    assert_eq!(
        GoDuration::from_std(Duration::from_secs(2)),
        Some(GoDuration::from_nanos(2 * S))
    );
    assert_eq!(GoDuration::from_std(Duration::MAX), None);
    assert!(GoDuration::from_nanos(-5).is_negative());
}

/// The Python SDK's `timedelta` encoding: `{h}h{m}m{s}s{ms}ms{us}μs` (Greek mu), hours unbounded.
fn python_format(micros: u64) -> String {
    let (h, rest) = (micros / 3_600_000_000, micros % 3_600_000_000);
    let (m, rest) = (rest / 60_000_000, rest % 60_000_000);
    let (s, rest) = (rest / 1_000_000, rest % 1_000_000);
    let (ms, us) = (rest / 1000, rest % 1000);
    format!("{h}h{m}m{s}s{ms}ms{us}\u{3bc}s")
}

proptest! {
    #[test]
    fn go_string_round_trips(n in any::<i64>()) {
        let d = GoDuration::from_nanos(n);
        prop_assert_eq!(parse_go_duration(&d.to_string()).unwrap(), d);
    }

    #[test]
    fn python_format_round_trips(micros in 0u64..(i64::MAX as u64 / 1000)) {
        let s = python_format(micros);
        prop_assert_eq!(parse_go_duration(&s).unwrap().as_nanos(), micros as i64 * 1000, "{}", s);
    }

    #[test]
    fn small_python_durations_round_trip(h in 0u64..48, m in 0u64..60, s in 0u64..60, ms in 0u64..1000, us in 0u64..1000) {
        let micros = ((h * 60 + m) * 60 + s) * 1_000_000 + ms * 1000 + us;
        let text = python_format(micros);
        prop_assert_eq!(parse_go_duration(&text).unwrap().as_nanos(), micros as i64 * 1000);
    }
}

// --- ISO 8601 durations -----------------------------------------------------------------------

fn iso(s: &str) -> IsoPeriod {
    parse_iso_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn iso_durations_parse() {
    assert_eq!(
        iso("PT10S"),
        IsoPeriod {
            seconds: 10,
            ..Default::default()
        }
    );
    assert_eq!(
        iso("R5/PT1M30S"),
        IsoPeriod {
            repetitions: Some(5),
            minutes: 1,
            seconds: 30,
            ..Default::default()
        }
    );
    assert_eq!(
        iso("P1Y2M3W4DT5H6M7S"),
        IsoPeriod {
            repetitions: None,
            years: 1,
            months: 2,
            weeks: 3,
            days: 4,
            hours: 5,
            minutes: 6,
            seconds: 7,
        }
    );
    // M is months before T and minutes after it.
    assert_eq!(iso("P1M").months, 1);
    assert_eq!(iso("PT1M").minutes, 1);
    // Any order within a part, as Dapr allows.
    assert_eq!(iso("PT1S1H"), iso("PT1H1S"));
    assert_eq!(iso("P0D"), IsoPeriod::default());
}

#[test]
fn iso_durations_reject() {
    for (bad, why) in [
        ("R0/PT1S", "has zero repetitions"),
        ("R/PT1S", "whole number"),
        ("R-1/PT1S", "whole number"),
        ("R5PT1S", "followed by '/'"),
        ("R99999999999/PT1S", "too large"),
        ("PT1.5S", "fractions are not supported"),
        ("PT1,5S", "fractions are not supported"),
        ("P", "no duration components"),
        ("PT", "'T' must be followed"),
        ("P1", "has no designator"),
        ("P1X", "unexpected 'X'"),
        ("pt1s", "starts with 'P'"),
        ("PT1s", "unexpected 's'"),
        ("P1H", "must come after 'T'"),
        ("PT1D", "must come before 'T'"),
        ("PT1S1S", "appears twice"),
        ("P1D1D", "appears twice"),
        ("PT-5S", "expected a whole number"),
        ("PT99999999999S", "too large"),
        ("1h", "starts with 'P'"),
        ("", "starts with 'P'"),
        ("P1DT1H2", "has no designator"),
    ] {
        let e = parse_iso_duration(bad).unwrap_err();
        assert!(e.reason().contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn iso_fixed_duration_and_calendar_units() {
    assert_eq!(
        iso("PT1H30M5S").fixed_duration(),
        Some(Duration::from_secs(5405))
    );
    assert_eq!(iso("P1D").fixed_duration(), None);
    assert_eq!(iso("P1W").fixed_duration(), None);
    assert!(iso("P1Y").has_calendar_units());
    assert!(!iso("PT24H").has_calendar_units());
}

#[test]
fn iso_add_follows_go_add_date() {
    let jan31 = utc(2023, 1, 31, 10, 0, 0);
    assert_eq!(iso("P1M").add_to(jan31), Some(utc(2023, 3, 3, 10, 0, 0)));
    assert_eq!(
        iso("P1M").add_to(utc(2024, 1, 31, 10, 0, 0)),
        Some(utc(2024, 3, 2, 10, 0, 0))
    );
    assert_eq!(iso("P1Y").add_to(jan31), Some(utc(2024, 1, 31, 10, 0, 0)));
    assert_eq!(iso("P13M").add_to(jan31), Some(utc(2024, 3, 2, 10, 0, 0)));
    assert_eq!(iso("P1W2D").add_to(jan31), Some(utc(2023, 2, 9, 10, 0, 0)));
    assert_eq!(
        iso("P1DT1H1M1S").add_to(jan31),
        Some(utc(2023, 2, 1, 11, 1, 1))
    );
    assert_eq!(iso("P4000000000Y").add_to(jan31), None);
}

fn any_iso() -> impl Strategy<Value = IsoPeriod> {
    (
        prop::option::of(1u32..),
        prop::array::uniform7(prop_oneof![Just(0u32), any::<u32>()]),
    )
        .prop_map(|(repetitions, v)| IsoPeriod {
            repetitions,
            years: v[0],
            months: v[1],
            weeks: v[2],
            days: v[3],
            hours: v[4],
            minutes: v[5],
            seconds: v[6],
        })
}

proptest! {
    #[test]
    fn iso_round_trips(p in any_iso()) {
        let text = p.to_string();
        prop_assert_eq!(parse_iso_duration(&text).unwrap(), p, "{}", text);
    }
}

// --- due times, TTLs, periods -----------------------------------------------------------------

#[test]
fn due_times() {
    let now = utc(2026, 1, 2, 3, 4, 5);
    assert_eq!(parse_due_time("", now), Ok(now));
    assert_eq!(parse_due_time("30s", now), Ok(utc(2026, 1, 2, 3, 4, 35)));
    assert_eq!(parse_due_time("-5s", now), Ok(utc(2026, 1, 2, 3, 4, 0)));
    assert_eq!(
        parse_due_time("0h0m3s0ms0μs", now),
        Ok(utc(2026, 1, 2, 3, 4, 8))
    );
    assert_eq!(parse_due_time("PT30S", now), Ok(utc(2026, 1, 2, 3, 4, 35)));
    assert_eq!(parse_due_time("P1DT2H", now), Ok(utc(2026, 1, 3, 5, 4, 5)));
    assert_eq!(
        parse_due_time("2030-05-06T07:08:09Z", now),
        Ok(utc(2030, 5, 6, 7, 8, 9))
    );
    assert_eq!(
        parse_due_time("2030-05-06T07:08:09.5+02:00", now),
        Ok(utc(2030, 5, 6, 5, 8, 9) + TimeDelta::milliseconds(500))
    );
    let e = parse_due_time("R5/PT1S", now).unwrap_err();
    assert!(e.reason().contains("only allowed in a period"), "{e}");
    assert_eq!(e.format(), Format::DueTime);
    let e = parse_due_time("2030-13-06T07:08:09Z", now).unwrap_err();
    assert!(e.reason().contains("RFC 3339"), "{e}");
    let e = parse_due_time("PT5X", now).unwrap_err();
    assert!(e.reason().contains("unexpected 'X'"), "{e}");
    let e = parse_due_time("5 minutes", now).unwrap_err();
    assert!(e.to_string().contains("RFC 3339 time"), "{e}");
    assert!(parse_due_time("2562047h", now).is_ok());
    let e = parse_due_time("P4000000000Y", now).unwrap_err();
    assert!(e.reason().contains("out of range"), "{e}");
}

#[test]
fn ttls_count_from_the_due_time() {
    let due = utc(2026, 1, 2, 3, 4, 5);
    assert_eq!(parse_ttl("1h", due), Ok(utc(2026, 1, 2, 4, 4, 5)));
    assert_eq!(parse_ttl("PT1H", due), Ok(utc(2026, 1, 2, 4, 4, 5)));
    assert_eq!(
        parse_ttl("2027-01-01T00:00:00Z", due),
        Ok(utc(2027, 1, 1, 0, 0, 0))
    );
    let e = parse_ttl("", due).unwrap_err();
    assert_eq!(e.format(), Format::Ttl);
    assert!(parse_ttl("R2/PT1H", due).is_err());
}

#[test]
fn reminder_periods() {
    assert_eq!(parse_reminder_period(""), Ok(None));
    let p = |s: &str| parse_reminder_period(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(
        p("1h0m0s0ms0μs"),
        Some(Period {
            every: Duration::from_secs(3600),
            repeats: None
        })
    );
    assert_eq!(
        p("R5/PT1M30S"),
        Some(Period {
            every: Duration::from_secs(90),
            repeats: Some(5)
        })
    );
    assert_eq!(p("PT24H").unwrap().every, Duration::from_secs(86400));
    assert_eq!(p("1.5ms").unwrap().every, Duration::from_micros(1500));
    for (bad, why) in [
        ("R0/PT1S", "has zero repetitions"),
        ("P1D", "unsupported period format"),
        ("P1W", "unsupported period format"),
        ("R3/P1M", "unsupported period format"),
        ("P1Y", "unsupported period format"),
        ("PT0S", "longer than zero"),
        ("0s", "longer than zero"),
        ("0", "longer than zero"),
        ("-1s", "must not be negative"),
        ("@every 1s", "expected a number"),
        ("0 * * * * *", "unknown unit"),
        ("PT1.5S", "fractions are not supported"),
    ] {
        let e = parse_reminder_period(bad).unwrap_err();
        assert!(e.reason().contains(why), "{bad:?}: {e}");
        assert_eq!(e.format(), Format::Period);
    }
    let msg = parse_reminder_period("P1D").unwrap_err().to_string();
    assert!(msg.contains("PT24H"), "{msg}");
    assert_eq!(
        p("R2/PT10S").unwrap().schedule(),
        Schedule::Every(Duration::from_secs(10))
    );
}

// --- job schedules ------------------------------------------------------------------------------

fn sched(s: &str) -> Schedule {
    parse_job_schedule(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn cron_with_seconds() {
    let s = sched("0 30 * * * *");
    let t = utc(2026, 1, 1, 10, 0, 0);
    assert_eq!(s.next_after(t), Some(utc(2026, 1, 1, 10, 30, 0)));
    assert_eq!(
        s.next_after(utc(2026, 1, 1, 10, 30, 0)),
        Some(utc(2026, 1, 1, 11, 30, 0))
    );
    // Strictly after, also from inside the matching second.
    let inside = utc(2026, 1, 1, 10, 30, 0) + TimeDelta::milliseconds(500);
    assert_eq!(s.next_after(inside), Some(utc(2026, 1, 1, 11, 30, 0)));
    let every5 = sched("*/5 * * * * *");
    assert_eq!(
        every5.next_after(utc(2026, 1, 1, 0, 0, 3)),
        Some(utc(2026, 1, 1, 0, 0, 5))
    );
    // N/step means N to the end of the range, step apart (as in Dapr's parser).
    let from7 = sched("7/20 * * * * *");
    assert_eq!(
        from7.next_after(utc(2026, 1, 1, 0, 0, 30)),
        Some(utc(2026, 1, 1, 0, 0, 47))
    );
}

#[test]
fn cron_names_and_question_marks() {
    // 2026-01-02 is a Friday.
    let s = sched("0 0 12 ? jan-Mar MON-FRI");
    assert_eq!(
        s.next_after(utc(2026, 1, 2, 13, 0, 0)),
        Some(utc(2026, 1, 5, 12, 0, 0))
    );
    let s = sched("0 0 0 1 * SUN");
    // Both day fields restricted: either matches (Sunday Jan 4 before Feb 1).
    assert_eq!(
        s.next_after(utc(2026, 1, 2, 0, 0, 0)),
        Some(utc(2026, 1, 4, 0, 0, 0))
    );
    assert!(parse_job_schedule("? * * * * *").is_ok());
}

#[test]
fn macros_and_every() {
    let t = utc(2026, 1, 2, 3, 4, 5);
    assert_eq!(
        sched("@yearly").next_after(t),
        Some(utc(2027, 1, 1, 0, 0, 0))
    );
    assert_eq!(
        sched("@annually").next_after(t),
        Some(utc(2027, 1, 1, 0, 0, 0))
    );
    assert_eq!(
        sched("@monthly").next_after(t),
        Some(utc(2026, 2, 1, 0, 0, 0))
    );
    // 2026-01-04 is a Sunday.
    assert_eq!(
        sched("@weekly").next_after(t),
        Some(utc(2026, 1, 4, 0, 0, 0))
    );
    assert_eq!(
        sched("@daily").next_after(t),
        Some(utc(2026, 1, 3, 0, 0, 0))
    );
    assert_eq!(
        sched("@midnight").next_after(t),
        Some(utc(2026, 1, 3, 0, 0, 0))
    );
    assert_eq!(
        sched("@hourly").next_after(t),
        Some(utc(2026, 1, 2, 4, 0, 0))
    );
    assert_eq!(
        sched("@every 1h30m").next_after(t),
        Some(utc(2026, 1, 2, 4, 34, 5))
    );
    assert_eq!(
        sched("@every 1h30m"),
        Schedule::Every(Duration::from_secs(5400))
    );
    assert_eq!(
        sched("@every  10s"),
        Schedule::Every(Duration::from_secs(10))
    );
    // Dapr runs sub-millisecond intervals as 1 ms and drops sub-millisecond remainders.
    assert_eq!(
        sched("@every 500us"),
        Schedule::Every(Duration::from_millis(1))
    );
    assert_eq!(
        sched("@every 1.0015s"),
        Schedule::Every(Duration::from_millis(1001))
    );
    assert_eq!(sched("  @daily "), sched("@daily"));
}

#[test]
fn schedules_reject_with_a_reason() {
    for (bad, why) in [
        ("", "empty"),
        ("* * * * *", "add a seconds field"),
        ("0 0 0 1 1 * 2030", "year field"),
        ("* * *", "expected 6 fields"),
        ("60 * * * * *", ""),
        ("0 0 0 L * *", "\"L\" is not allowed"),
        ("0 0 0 15W * *", "\"W\" is not allowed"),
        ("0 0 0 * * 5L", "\"L\" is not a name"),
        ("0 0 0 * * 1#2", "'#' is not allowed"),
        ("0 0 0 * * +1", "'+' is not allowed"),
        ("0 0 0 * FOO *", "\"FOO\" is not a name"),
        ("0 0 0 * MON *", "\"MON\" is not a name"),
        ("0 0 0 30 2 *", "matches no date"),
        ("0 0 0 31 4,6,9,11 *", "matches no date"),
        ("@every", "followed by a space"),
        ("@every 0s", "longer than zero"),
        ("@every -1s", "longer than zero"),
        ("@every 1x", "unknown unit"),
        ("@everyday", "followed by a space"),
        ("@DAILY", "unknown macro"),
        ("@reboot", "unknown macro"),
        ("TZ=UTC 0 * * * * *", "time zone"),
        ("PT1S", "expected 6 fields"),
    ] {
        let e = parse_job_schedule(bad).unwrap_err();
        assert!(e.reason().contains(why), "{bad:?}: {e}");
        assert_eq!(e.format(), Format::Schedule);
    }
    // February 29 exists.
    assert!(parse_job_schedule("0 0 0 29 2 *").is_ok());
    // With a weekday restriction, the day-of-month field no longer decides alone.
    assert!(parse_job_schedule("0 0 0 30 2 MON").is_ok());
}

#[test]
fn schedules_display_and_serialize_round_trip() {
    for s in [
        "0 30 * * * *",
        "@daily",
        "@every 1h30m0s",
        "0 0 12 ? JAN-MAR MON-FRI",
    ] {
        let parsed = sched(s);
        assert_eq!(parsed.to_string(), s);
        let json = serde_json::to_string(&parsed).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), parsed);
    }
    assert_eq!(
        Schedule::Every(Duration::from_millis(1500)).to_string(),
        "@every 1.5s"
    );
    assert!(serde_json::from_str::<Schedule>("\"nope\"").is_err());
}

#[test]
fn every_edge_cases() {
    let t = utc(2026, 1, 1, 0, 0, 0);
    assert_eq!(Schedule::Every(Duration::ZERO).next_after(t), None);
    assert_eq!(Schedule::Every(Duration::MAX).next_after(t), None);
    assert_eq!(
        Schedule::every_normalized(Duration::ZERO),
        Schedule::Every(Duration::from_millis(1))
    );
    // Far in the future the cron search gives up instead of running on.
    let far = utc(5000, 6, 1, 0, 0, 0);
    assert_eq!(sched("0 0 0 1 1 *").next_after(far), None);
}

// --- cron properties -----------------------------------------------------------------------------

/// A cron field as a test generates it: `None` = `*`, else the allowed values.
type Field = Option<Vec<u32>>;

fn field(lo: u32, hi: u32) -> impl Strategy<Value = Field> {
    prop_oneof![
        1 => Just(None),
        3 => prop::collection::btree_set(lo..=hi, 1..4).prop_map(|s| Some(s.into_iter().collect())),
    ]
}

fn render(f: &Field) -> String {
    match f {
        None => "*".into(),
        Some(v) => v
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn allows(f: &Field, v: u32) -> bool {
    f.as_ref().is_none_or(|s| s.contains(&v))
}

/// The reference semantics: every field matches; when both day fields are restricted either one
/// may match.
fn reference_match(fields: &[Field; 6], t: DateTime<Utc>) -> bool {
    let day = match (&fields[3], &fields[5]) {
        (Some(_), Some(_)) => {
            allows(&fields[3], t.day()) || allows(&fields[5], t.weekday().num_days_from_sunday())
        }
        _ => allows(&fields[3], t.day()) && allows(&fields[5], t.weekday().num_days_from_sunday()),
    };
    allows(&fields[0], t.second())
        && allows(&fields[1], t.minute())
        && allows(&fields[2], t.hour())
        && allows(&fields[4], t.month())
        && day
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn cron_next_after_is_the_first_match_strictly_after(
        fields in (field(0, 59), field(0, 59), field(0, 23), field(1, 28), field(1, 12), field(0, 6)),
        start in 0i64..4_000_000_000,
        nanos in 0u32..1_000_000_000,
    ) {
        let fields = [fields.0, fields.1, fields.2, fields.3, fields.4, fields.5];
        let expr = fields.iter().map(render).collect::<Vec<_>>().join(" ");
        let schedule = parse_job_schedule(&expr).unwrap();
        let t = DateTime::from_timestamp(start, nanos).unwrap();
        let next = schedule.next_after(t).expect("a satisfiable expression has a next tick");
        prop_assert!(next > t, "{} not after {}", next, t);
        prop_assert_eq!(next.nanosecond(), 0);
        prop_assert!(reference_match(&fields, next), "{} does not match {}", next, expr);
        if let Schedule::Cron(c) = &schedule {
            prop_assert!(c.matches(next));
        }
        // Nothing in between matches (checked second by second within a day).
        let mut probe = t.with_nanosecond(0).unwrap() + TimeDelta::seconds(1);
        let mut steps = 0;
        while probe < next && steps < 86_400 {
            prop_assert!(!reference_match(&fields, probe), "{} matches {} before {}", probe, expr, next);
            probe += TimeDelta::seconds(1);
            steps += 1;
        }
    }

    #[test]
    fn every_next_after_adds_the_interval(ms in 1u64..10_000_000_000, start in 0i64..4_000_000_000) {
        let s = Schedule::Every(Duration::from_millis(ms));
        let t = DateTime::from_timestamp(start, 0).unwrap();
        prop_assert_eq!(s.next_after(t), Some(t + TimeDelta::milliseconds(ms as i64)));
        let text = s.to_string();
        prop_assert_eq!(parse_job_schedule(&text).unwrap(), s);
    }
}
