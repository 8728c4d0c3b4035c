//! The parsers' fuzz target: every parser, on arbitrary strings, returns `Ok` or `Err` and never
//! panics, and an `Ok` schedule can be asked for its next tick. Runs as a proptest with thousands
//! of cases per strategy: arbitrary Unicode, arbitrary bytes (lossily decoded), and strings built
//! from the characters the formats use, which reach deeper into each parser.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use scheduler::schedule::{
    parse_due_time, parse_go_duration, parse_iso_duration, parse_job_schedule,
    parse_reminder_period, parse_ttl,
};

fn exercise(s: &str, t: DateTime<Utc>) {
    let _ = parse_go_duration(s).map(|d| (d.as_std(), d.to_string()));
    if let Ok(p) = parse_iso_duration(s) {
        let _ = (p.fixed_duration(), p.add_to(t), p.to_string());
    }
    let _ = parse_due_time(s, t);
    let _ = parse_ttl(s, t);
    if let Ok(Some(p)) = parse_reminder_period(s) {
        let _ = p.schedule().next_after(t);
    }
    if let Ok(schedule) = parse_job_schedule(s) {
        let _ = schedule.next_after(t);
        let _ = schedule.to_string();
    }
    // Error messages are built for any input too.
    if let Err(e) = parse_job_schedule(s) {
        let _ = e.to_string();
    }
}

fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        (-62_135_596_800i64..253_402_300_799).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
    ]
}

/// Strings made of the tokens the formats use.
fn format_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("P".to_string()),
        Just("T".to_string()),
        Just("R".to_string()),
        Just("/".to_string()),
        Just("@every ".to_string()),
        Just("@daily".to_string()),
        Just("*".to_string()),
        Just("?".to_string()),
        Just(",".to_string()),
        Just("-".to_string()),
        Just("+".to_string()),
        Just(".".to_string()),
        Just(" ".to_string()),
        Just(":".to_string()),
        Just("Z".to_string()),
        Just("μs".to_string()),
        Just("µs".to_string()),
        Just("JAN".to_string()),
        Just("MON".to_string()),
        Just("L".to_string()),
        Just("#".to_string()),
        "[0-9]{1,25}",
        "[YMWDHS]",
        "(ns|us|ms|s|m|h)",
    ];
    prop::collection::vec(token, 0..14).prop_map(|v| v.concat())
}

/// Six whitespace-separated fields from cron-ish tokens.
fn cron_like() -> impl Strategy<Value = String> {
    let part = "[0-9*?,/LW#A-Za-z-]{1,8}";
    prop::collection::vec(part, 4..8).prop_map(|v| v.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn never_panics_on_unicode(s in any::<String>(), t in any_time()) {
        exercise(&s, t);
    }

    #[test]
    fn never_panics_on_bytes(b in prop::collection::vec(any::<u8>(), 0..64), t in any_time()) {
        exercise(&String::from_utf8_lossy(&b), t);
    }

    #[test]
    fn never_panics_on_format_like_strings(s in format_like(), t in any_time()) {
        exercise(&s, t);
    }

    #[test]
    fn never_panics_on_cron_like_strings(s in cron_like(), t in any_time()) {
        exercise(&s, t);
    }
}

#[test]
fn never_panics_on_known_edge_cases() {
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    for s in [
        "",
        " ",
        "0",
        "-",
        "+",
        ".",
        "R",
        "R/",
        "R1",
        "R1/",
        "P",
        "PT",
        "@",
        "@every",
        "@every ",
        "*/0 * * * * *",
        "0/0 * * * * *",
        "59-0 * * * * *",
        "0-59/60 * * * * *",
        "99999999999999999999 * * * * *",
        "-1 * * * * *",
        "* * * * * 7",
        "* * * * * 8",
        "* * * 0 * *",
        "* * * * 0 *",
        "* * * * 13 *",
        ",,, * * * * *",
        "--- * * * * *",
        "/// * * * * *",
        "1-2-3 * * * * *",
        "1/2/3 * * * * *",
        "SUN-SAT * * * * *",
        "0 0 0 * * SUN-SAT",
        "0 0 0 * * SAT-SUN",
        "0 0 0 * DEC-JAN *",
        "9223372036854775808ns",
        "-9223372036854775808ns",
        "@every 9223372036854775807ns",
        "@every 2562047h",
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-01-01T00:00:60Z",
        "R4294967295/P4294967295Y4294967295M4294967295W4294967295D",
        "PT4294967295H4294967295M4294967295S",
    ] {
        exercise(s, t);
        exercise(s, DateTime::<Utc>::MAX_UTC);
        exercise(s, DateTime::<Utc>::MIN_UTC);
    }
}
