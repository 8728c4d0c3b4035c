//! Parsing of the time formats Dapr accepts for jobs, reminders and timers, and the next-tick
//! computation of a job schedule.
//!
//! - [`parse_go_duration`]: Go's `time.ParseDuration` (`"1h30m"`, `"1.5h"`, `"-2s"`, `"0"`, and the
//!   Python SDK's `"1h0m0s0ms0μs"`), with Go's overflow rules (±2^63 ns).
//! - [`parse_iso_duration`]: ISO 8601 durations as Dapr accepts them: an optional `R<n>/` repetition
//!   prefix, `P`, then Y, M(onth), W, D, then `T` and H, M(inute), S, whole numbers only.
//!   Differences from Dapr's permissive parser, all of which reject input Dapr would take as a
//!   zero or garbled duration: designators must be upper case, each may appear once, unknown
//!   characters and a number without a designator are errors, and `P`/`PT` alone are rejected.
//!   Designators may come in any order within the date and the time part, as Dapr allows.
//! - [`parse_due_time`], [`parse_ttl`]: a Go duration, an ISO duration (no repetitions) or an
//!   RFC 3339 time, durations counted from `now` / from the due time. Calendar units follow Go's
//!   `AddDate` (January 31 plus one month is March 3 or 2, not February 28).
//! - [`parse_reminder_period`]: what scheduler-backed reminders accept: ISO first (with `R<n>/`),
//!   then a Go duration; calendar units, zero and negative periods are rejected.
//! - [`parse_job_schedule`]: cron with six fields, seconds first (`"0 30 * * * *"`), month and
//!   weekday names, the `@yearly`/`@annually`/`@monthly`/`@weekly`/`@daily`/`@midnight`/`@hourly`
//!   macros and `@every <go duration>`. All schedules are in UTC. Cron matching is croner's;
//!   croner's extensions that Dapr's parser does not know (`L`, `W`, `#`, `+`) are rejected here.
//!
//! Every parser returns a [`ParseError`] whose message names what was wrong and what is accepted,
//! and none panics on any input (`tests/parse_fuzz.rs`).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, Days, NaiveDate, TimeDelta, Utc};
use croner::parser::{CronParser, Seconds, Year};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Inputs longer than this are cut in error messages.
const MAX_ECHO: usize = 80;

/// What a parser was reading, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    GoDuration,
    IsoDuration,
    DueTime,
    Ttl,
    Period,
    Schedule,
}

impl Format {
    fn noun(self) -> &'static str {
        match self {
            Format::GoDuration => "duration",
            Format::IsoDuration => "ISO 8601 duration",
            Format::DueTime => "due time",
            Format::Ttl => "ttl",
            Format::Period => "period",
            Format::Schedule => "schedule",
        }
    }

    fn accepted(self) -> &'static str {
        match self {
            Format::GoDuration => {
                "expected a Go duration: decimal numbers each with a unit, like \"300ms\", \
                 \"1.5h\" or \"2h45m\" (units ns, us, µs, μs, ms, s, m, h)"
            }
            Format::IsoDuration => {
                "expected an ISO 8601 duration such as \"PT1H30M\", \"P1DT12H\" or \"R5/PT10S\" \
                 (P, then Y, M, W, D, then T and H, M, S; whole numbers only)"
            }
            Format::DueTime | Format::Ttl => {
                "expected a Go duration (\"30s\"), an ISO 8601 duration (\"PT30S\") or an \
                 RFC 3339 time (\"2026-01-02T15:04:05Z\")"
            }
            Format::Period => {
                "expected a Go duration (\"10s\", \"1h30m\") or an ISO 8601 duration with an \
                 optional repetition count (\"PT10S\", \"R5/PT10S\"); days and longer units are \
                 not supported, use hours (\"PT24H\")"
            }
            Format::Schedule => {
                "expected a cron expression with 6 fields, seconds first (\"0 30 * * * *\"), \
                 \"@every <duration>\" (\"@every 1h30m\") or one of @yearly, @annually, \
                 @monthly, @weekly, @daily, @midnight, @hourly"
            }
        }
    }
}

/// A time format that could not be parsed: what was being read, the input, why it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {} {:?}: {reason}; {}", .what.noun(), .input, .what.accepted())]
pub struct ParseError {
    what: Format,
    input: String,
    reason: String,
}

impl ParseError {
    fn new(what: Format, input: &str, reason: impl Into<String>) -> Self {
        let input = match input.char_indices().nth(MAX_ECHO) {
            Some((cut, _)) => format!("{}...", &input[..cut]),
            None => input.to_string(),
        };
        ParseError {
            what,
            input,
            reason: reason.into(),
        }
    }

    /// The same failure, reported as a failure to read `what`.
    fn rewrap(self, what: Format) -> Self {
        ParseError { what, ..self }
    }

    /// What was being parsed.
    pub fn format(&self) -> Format {
        self.what
    }

    /// The input (cut if long).
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Why it was rejected, without the list of what is accepted.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

// ---------------------------------------------------------------------------------------------
// Go durations

/// A signed duration with Go's range and resolution: whole nanoseconds in an `i64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration {
    nanos: i64,
}

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration { nanos: 0 };

    pub const fn from_nanos(nanos: i64) -> Self {
        GoDuration { nanos }
    }

    pub const fn as_nanos(&self) -> i64 {
        self.nanos
    }

    pub const fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// The duration as a `std` one; `None` if negative.
    pub fn as_std(&self) -> Option<Duration> {
        u64::try_from(self.nanos).ok().map(Duration::from_nanos)
    }

    /// `None` if `d` is longer than Go can represent (about 292 years).
    pub fn from_std(d: Duration) -> Option<Self> {
        i64::try_from(d.as_nanos()).ok().map(Self::from_nanos)
    }

    /// The duration as a chrono delta (always representable).
    pub fn as_delta(&self) -> TimeDelta {
        TimeDelta::nanoseconds(self.nanos)
    }
}

/// Go's `Duration.String()`: `"1h2m3.5s"`, `"1.5ms"`, `"-2m0s"`, `"0s"`.
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = self.nanos.unsigned_abs();
        if u == 0 {
            return f.write_str("0s");
        }
        if self.nanos < 0 {
            f.write_str("-")?;
        }
        if u < NANOS_PER_SEC {
            let (digits, unit) = match u {
                0..1_000 => (0, "ns"),
                1_000..1_000_000 => (3, "µs"),
                _ => (6, "ms"),
            };
            write_fraction(f, u, digits)?;
            return f.write_str(unit);
        }
        let secs = u / NANOS_PER_SEC;
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h{m}m")?;
        } else if m > 0 {
            write!(f, "{m}m")?;
        }
        write_fraction(f, s * NANOS_PER_SEC + u % NANOS_PER_SEC, 9)?;
        f.write_str("s")
    }
}

/// Writes `v / 10^digits` with its fraction, trailing zeros (and a bare point) dropped.
fn write_fraction(f: &mut fmt::Formatter<'_>, v: u64, digits: u32) -> fmt::Result {
    let scale = 10u64.pow(digits);
    write!(f, "{}", v / scale)?;
    let frac = v % scale;
    if frac != 0 {
        let s = format!("{frac:0width$}", width = digits as usize);
        write!(f, ".{}", s.trim_end_matches('0'))?;
    }
    Ok(())
}

fn go_unit(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Go's `time.ParseDuration`.
pub fn parse_go_duration(s: &str) -> Result<GoDuration, ParseError> {
    let err = |reason: String| ParseError::new(Format::GoDuration, s, reason);
    // Go accepts up to 2^63 ns in magnitude while parsing; the sign decides the final bound.
    const LIMIT: u128 = 1 << 63;
    let overflow = || err("out of range: at most about 2562047h (292 years)".into());

    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(GoDuration::ZERO);
    }
    if rest.is_empty() {
        return Err(err("empty".into()));
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, mut after) = rest.split_at(int_len);
        let mut frac_digits = "";
        if let Some(r) = after.strip_prefix('.') {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            (frac_digits, after) = r.split_at(n);
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            let found = rest.chars().next().unwrap_or(' ');
            return Err(err(format!("expected a number, found {found:?}")));
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        if unit_len == 0 {
            return Err(err("missing unit after a number".into()));
        }
        let (unit, tail) = after.split_at(unit_len);
        rest = tail;
        let Some(unit_ns) = go_unit(unit) else {
            return Err(err(format!("unknown unit {unit:?}")));
        };
        let mut whole: u128 = 0;
        for d in int_digits.bytes() {
            whole = whole * 10 + u128::from(d - b'0');
            if whole > LIMIT {
                return Err(overflow());
            }
        }
        let mut part = whole * unit_ns;
        if part > LIMIT {
            return Err(overflow());
        }
        // Like Go, digits past what the arithmetic can hold are read and ignored.
        let (mut frac, mut scale) = (0u128, 1u128);
        for d in frac_digits.bytes().take(18) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        part += frac * unit_ns / scale;
        total += part;
        if part > LIMIT || total > LIMIT {
            return Err(overflow());
        }
    }
    let nanos = if neg {
        // total <= 2^63 here, so the negation fits (i64::MIN included).
        i64::try_from(-(total as i128)).map_err(|_| overflow())?
    } else {
        i64::try_from(total).map_err(|_| overflow())?
    };
    Ok(GoDuration::from_nanos(nanos))
}

// ---------------------------------------------------------------------------------------------
// ISO 8601 durations

/// An ISO 8601 duration with an optional repetition count, as Dapr accepts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IsoPeriod {
    /// `n` of an `R<n>/` prefix (never 0: `R0/` is rejected).
    pub repetitions: Option<u32>,
    pub years: u32,
    pub months: u32,
    pub weeks: u32,
    pub days: u32,
    pub hours: u32,
    pub minutes: u32,
    pub seconds: u32,
}

impl IsoPeriod {
    /// Whether it has years, months, weeks or days (whose length Dapr's reminders do not fix).
    pub fn has_calendar_units(&self) -> bool {
        self.years != 0 || self.months != 0 || self.weeks != 0 || self.days != 0
    }

    /// The length of the hours/minutes/seconds part; `None` if it has calendar units.
    pub fn fixed_duration(&self) -> Option<Duration> {
        if self.has_calendar_units() {
            return None;
        }
        Some(Duration::from_secs(
            u64::from(self.hours) * 3600 + u64::from(self.minutes) * 60 + u64::from(self.seconds),
        ))
    }

    /// `t` plus this duration with Go's `AddDate` rules: years and months move the calendar
    /// month and an overflowing day of month rolls into the next month; weeks and days are then
    /// added as days, and the time part as a fixed duration. The repetition count is ignored.
    /// `None` if the result is out of chrono's range.
    pub fn add_to(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let month0 = i64::from(t.month0()) + i64::from(self.months);
        let year = i64::from(t.year()) + i64::from(self.years) + month0 / 12;
        let first =
            NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, (month0 % 12) as u32 + 1, 1)?;
        let days = u64::from(t.day() - 1) + u64::from(self.weeks) * 7 + u64::from(self.days);
        let date = first.checked_add_days(Days::new(days))?;
        let shifted = date.and_time(t.time()).and_utc();
        let secs =
            i64::from(self.hours) * 3600 + i64::from(self.minutes) * 60 + i64::from(self.seconds);
        shifted.checked_add_signed(TimeDelta::try_seconds(secs)?)
    }
}

/// The canonical form: `R5/P1Y2M3W4DT5H6M7S` with zero parts left out, `PT0S` when all are zero.
impl fmt::Display for IsoPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.repetitions {
            write!(f, "R{n}/")?;
        }
        f.write_str("P")?;
        let date = [
            (self.years, 'Y'),
            (self.months, 'M'),
            (self.weeks, 'W'),
            (self.days, 'D'),
        ];
        let time = [(self.hours, 'H'), (self.minutes, 'M'), (self.seconds, 'S')];
        for (v, c) in date {
            if v != 0 {
                write!(f, "{v}{c}")?;
            }
        }
        if time.iter().any(|(v, _)| *v != 0) {
            f.write_str("T")?;
            for (v, c) in time {
                if v != 0 {
                    write!(f, "{v}{c}")?;
                }
            }
        } else if !self.has_calendar_units() {
            f.write_str("T0S")?;
        }
        Ok(())
    }
}

/// Reason text for `R0/`, as Dapr words it.
const ZERO_REPETITIONS: &str = "has zero repetitions";

/// An ISO 8601 duration as Dapr accepts it (see the module doc for the exact rules).
pub fn parse_iso_duration(s: &str) -> Result<IsoPeriod, ParseError> {
    let err = |reason: String| ParseError::new(Format::IsoDuration, s, reason);
    let mut p = IsoPeriod::default();
    let body = match s.strip_prefix('R') {
        Some(r) => {
            let Some((n, body)) = r.split_once('/') else {
                return Err(err(
                    "a repetition prefix R<n> must be followed by '/' and a duration, as in \
                     \"R5/PT10S\""
                        .into(),
                ));
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(
                    "the repetition count after R must be a whole number".into()
                ));
            }
            let n: u32 = n
                .parse()
                .map_err(|_| err("the repetition count is too large".into()))?;
            if n == 0 {
                return Err(err(ZERO_REPETITIONS.into()));
            }
            p.repetitions = Some(n);
            body
        }
        None => s,
    };
    let Some(body) = body.strip_prefix('P') else {
        return Err(err("an ISO 8601 duration starts with 'P'".into()));
    };
    let (date, time) = match body.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (body, None),
    };
    let mut any = false;
    iso_part(date, false, &mut p, &mut any).map_err(err)?;
    if let Some(time) = time {
        if time.is_empty() {
            return Err(err(
                "'T' must be followed by hours (H), minutes (M) or seconds (S)".into(),
            ));
        }
        iso_part(time, true, &mut p, &mut any).map_err(err)?;
    }
    if !any {
        return Err(err("no duration components after 'P'".into()));
    }
    Ok(p)
}

/// Reads `<number><designator>` pairs of the date part (Y, M, W, D) or the time part (H, M, S).
fn iso_part(mut s: &str, time: bool, p: &mut IsoPeriod, any: &mut bool) -> Result<(), String> {
    let mut seen = Vec::new();
    while !s.is_empty() {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        let (digits, rest) = s.split_at(n);
        let Some(c) = rest.chars().next() else {
            return Err(format!("the number {digits} has no designator"));
        };
        if !digits.is_empty() && matches!(c, '.' | ',') {
            return Err("fractions are not supported: use whole numbers".into());
        }
        if digits.is_empty() {
            return Err(format!(
                "expected a whole number before a designator, found {c:?}"
            ));
        }
        let slot = match (time, c) {
            (false, 'Y') => &mut p.years,
            (false, 'M') => &mut p.months,
            (false, 'W') => &mut p.weeks,
            (false, 'D') => &mut p.days,
            (true, 'H') => &mut p.hours,
            (true, 'M') => &mut p.minutes,
            (true, 'S') => &mut p.seconds,
            (false, 'H' | 'S') => return Err(format!("{c:?} must come after 'T'")),
            (true, 'Y' | 'W' | 'D') => return Err(format!("{c:?} must come before 'T'")),
            _ => {
                return Err(format!(
                    "unexpected {c:?}; designators are Y, M, W, D before 'T' and H, M, S after it"
                ))
            }
        };
        if seen.contains(&c) {
            return Err(format!("{c:?} appears twice"));
        }
        seen.push(c);
        *slot = digits
            .parse()
            .map_err(|_| format!("the number {digits} is too large"))?;
        *any = true;
        s = &rest[c.len_utf8()..];
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Due times, TTLs and reminder periods

/// Whether a failed input was most likely meant as an ISO duration (the other formats cannot
/// start with 'P' or 'R').
fn looks_iso(s: &str) -> bool {
    s.starts_with('P') || s.starts_with('R')
}

/// Whether a failed input was most likely meant as an RFC 3339 time: four digits and a dash.
fn looks_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// A point in time given as a duration from `base`, an ISO duration from `base` or an RFC 3339
/// time.
fn parse_point(s: &str, base: DateTime<Utc>, what: Format) -> Result<DateTime<Utc>, ParseError> {
    let out_of_range = || ParseError::new(what, s, "the resulting time is out of range");
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let go = match parse_go_duration(s) {
        Ok(d) => {
            return base
                .checked_add_signed(d.as_delta())
                .ok_or_else(out_of_range)
        }
        Err(e) => e,
    };
    let iso = match parse_iso_duration(s) {
        Ok(p) if p.repetitions.is_some() => {
            return Err(ParseError::new(
                what,
                s,
                "repetitions (R<n>/) are only allowed in a period",
            ))
        }
        Ok(p) => return p.add_to(base).ok_or_else(out_of_range),
        Err(e) => e,
    };
    if s.is_empty() {
        return Err(ParseError::new(what, s, "empty"));
    }
    if looks_iso(s) {
        Err(iso.rewrap(what))
    } else if looks_rfc3339(s) {
        Err(ParseError::new(what, s, "not a valid RFC 3339 time"))
    } else {
        Err(go.rewrap(what))
    }
}

/// When a job or reminder first fires: empty means `now`; otherwise a Go duration or an ISO
/// duration (no repetitions) from `now`, or an RFC 3339 time.
pub fn parse_due_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ParseError> {
    if s.is_empty() {
        return Ok(now);
    }
    parse_point(s, now, Format::DueTime)
}

/// When a job or reminder expires: a Go duration or an ISO duration (no repetitions) measured
/// from `due`, or an RFC 3339 time. An empty TTL means "none" and is the caller's to handle; this
/// rejects it.
pub fn parse_ttl(s: &str, due: DateTime<Utc>) -> Result<DateTime<Utc>, ParseError> {
    parse_point(s, due, Format::Ttl)
}

/// How a reminder repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    /// Time between two ticks (> 0).
    pub every: Duration,
    /// How many ticks in all, from `R<n>/`; `None` = until deleted or expired.
    pub repeats: Option<u32>,
}

impl Period {
    /// The job schedule a scheduler-backed reminder with this period runs on (`@every`).
    pub fn schedule(&self) -> Schedule {
        Schedule::every_normalized(self.every)
    }
}

/// A reminder's period as scheduler-backed Dapr reminders accept it: empty means one-shot
/// (`None`); otherwise an ISO duration (with an optional `R<n>/`), else a Go duration. Years,
/// months, weeks and days are rejected ("unsupported period format"), as are `R0/` ("has zero
/// repetitions"), zero and negative periods.
pub fn parse_reminder_period(s: &str) -> Result<Option<Period>, ParseError> {
    let err = |reason: &str| ParseError::new(Format::Period, s, reason);
    if s.is_empty() {
        return Ok(None);
    }
    let iso_err =
        match parse_iso_duration(s) {
            Ok(p) if p.has_calendar_units() => return Err(err(
                "unsupported period format: years, months, weeks and days are not supported by \
                 reminders; give the period in hours, as in \"PT24H\"",
            )),
            Ok(p) => {
                let every = p.fixed_duration().unwrap_or_default();
                if every.is_zero() {
                    return Err(err("the period must be longer than zero"));
                }
                return Ok(Some(Period {
                    every,
                    repeats: p.repetitions,
                }));
            }
            Err(e) => e,
        };
    if looks_iso(s) {
        return Err(iso_err.rewrap(Format::Period));
    }
    let d = parse_go_duration(s).map_err(|e| e.rewrap(Format::Period))?;
    match d.as_std() {
        None => Err(err("the period must not be negative")),
        Some(every) if every.is_zero() => Err(err("the period must be longer than zero")),
        Some(every) => Ok(Some(Period {
            every,
            repeats: None,
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// Job schedules

/// A parsed cron expression (six fields or a macro) with its source text.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    source: String,
    cron: croner::Cron,
}

impl CronSchedule {
    /// The expression as the user wrote it (surrounding whitespace removed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `t` (to the second, sub-second part ignored) matches the expression.
    pub fn matches(&self, t: DateTime<Utc>) -> bool {
        self.cron.is_time_matching(&t).unwrap_or(false)
    }
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for CronSchedule {}

/// When a recurring job fires: on a cron expression (UTC) or at a fixed interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Boxed: a compiled expression is large next to an interval.
    Cron(Box<CronSchedule>),
    /// Every this long, counted from the job's due time (or its creation).
    Every(Duration),
}

/// The macros Dapr accepts and the cron expressions they stand for.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 0 1 1 *"),
    ("@annually", "0 0 0 1 1 *"),
    ("@monthly", "0 0 0 1 * *"),
    ("@weekly", "0 0 0 * * 0"),
    ("@daily", "0 0 0 * * *"),
    ("@midnight", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
];

const FIELD_NAMES: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
/// Days each month can have (February 29 exists in leap years).
const MONTH_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl Schedule {
    /// `@every d` as Dapr runs it: below a millisecond counts as one millisecond, and any
    /// sub-millisecond remainder is dropped.
    pub fn every_normalized(d: Duration) -> Schedule {
        let ms = d.as_millis().max(1);
        Schedule::Every(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
    }

    /// The first tick strictly after `t`; `None` if there is none (a cron expression that no
    /// longer matches any time before year 5000, a zero interval, or out of range).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) if d.is_zero() => None,
            Schedule::Every(d) => t.checked_add_signed(TimeDelta::from_std(*d).ok()?),
            Schedule::Cron(c) => {
                let next = c.cron.find_next_occurrence(&t, false).ok()?;
                (next > t).then_some(next)
            }
        }
    }
}

/// The text form: the cron source or macro as written, or `@every <Go duration>`. It parses back
/// to the same schedule.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(c) => f.write_str(&c.source),
            Schedule::Every(d) => match GoDuration::from_std(*d) {
                Some(g) => write!(f, "@every {g}"),
                None => write!(f, "@every {}s", d.as_secs()),
            },
        }
    }
}

impl serde::Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_job_schedule(&s).map_err(serde::de::Error::custom)
    }
}

/// A Jobs API schedule: six-field cron (seconds first), a macro or `@every <Go duration>`.
pub fn parse_job_schedule(s: &str) -> Result<Schedule, ParseError> {
    let err = |reason: String| ParseError::new(Format::Schedule, s, reason);
    let source = s.trim();
    if source.is_empty() {
        return Err(err("empty".into()));
    }
    if let Some(rest) = source.strip_prefix("@every") {
        let d = rest.trim_start();
        if d.len() == rest.len() || d.is_empty() {
            return Err(err(
                "@every must be followed by a space and a duration".into()
            ));
        }
        let d = parse_go_duration(d).map_err(|e| err(e.reason().to_string()))?;
        return match d.as_std() {
            Some(d) if !d.is_zero() => Ok(Schedule::every_normalized(d)),
            _ => Err(err("the @every interval must be longer than zero".into())),
        };
    }
    if source.starts_with('@') {
        let Some((_, expr)) = MACROS.iter().find(|(m, _)| *m == source) else {
            return Err(err(format!("unknown macro {source:?}")));
        };
        return cron(source, expr).map_err(err);
    }
    if source.starts_with("TZ=") || source.starts_with("CRON_TZ=") {
        return Err(err(
            "time zone prefixes are not supported: schedules run in UTC".into(),
        ));
    }
    cron(source, source).map_err(err)
}

/// Checks a six-field expression against the syntax Dapr's parser knows, then compiles it.
fn cron(source: &str, expr: &str) -> Result<Schedule, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields.len() {
        6 => {}
        5 => {
            return Err(
                "cron expressions have 6 fields, seconds first: add a seconds field, as in \
                 \"0 <your five fields>\""
                    .into(),
            )
        }
        7 => return Err("a year field is not supported".into()),
        n => return Err(format!("expected 6 fields, found {n}")),
    }
    let mut normalized = Vec::with_capacity(6);
    for (i, field) in fields.iter().enumerate() {
        let names: &[&str] = match i {
            4 => &MONTH_NAMES,
            5 => &DAY_NAMES,
            _ => &[],
        };
        check_field(field, names)
            .map_err(|e| format!("{} field {field:?}: {e}", FIELD_NAMES[i]))?;
        // '?' means '*' in any field, as in Dapr.
        normalized.push(field.replace('?', "*"));
    }
    let parser = CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .sloppy_ranges(true)
        .build();
    let compiled = parser
        .parse(&normalized.join(" "))
        .map_err(|e| e.to_string())?;
    let schedule = CronSchedule {
        source: source.to_string(),
        cron: compiled,
    };
    if never_fires(&schedule) {
        return Err(
            "the expression matches no date (day of month past the end of the month)".into(),
        );
    }
    Ok(Schedule::Cron(Box::new(schedule)))
}

/// Only digits, `* ? , - /` and, in the month and weekday fields, three-letter names.
fn check_field(field: &str, names: &[&str]) -> Result<(), String> {
    let mut rest = field;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_alphabetic() {
            let word_len = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            let word = &rest[..word_len];
            if !names.iter().any(|n| n.eq_ignore_ascii_case(word)) {
                return Err(if names.is_empty() {
                    format!("{word:?} is not allowed: use numbers, ranges (1-5), lists (1,5), steps (*/5), * or ?")
                } else {
                    format!(
                        "{word:?} is not a name this field accepts ({})",
                        names.join(", ")
                    )
                });
            }
            rest = &rest[word_len..];
        } else if c.is_ascii_digit() || matches!(c, '*' | '?' | ',' | '-' | '/') {
            rest = &rest[1..];
        } else {
            return Err(format!(
                "{c:?} is not allowed: use numbers, ranges (1-5), lists (1,5), steps (*/5), * or ?"
            ));
        }
    }
    Ok(())
}

/// Whether the day-of-month field excludes every day of every month the month field allows
/// (with the weekday field '*'). Such an expression would make every search run to year 5000.
fn never_fires(c: &CronSchedule) -> bool {
    let p = &c.cron.pattern;
    if !p.is_dow_wildcard() || p.is_dom_wildcard() {
        return false;
    }
    let months = p.months.values();
    let days = p.days.values();
    !months.iter().any(|m| {
        let max = MONTH_DAYS
            .get(usize::from(*m).wrapping_sub(1))
            .copied()
            .unwrap_or(0);
        days.iter().any(|d| u32::from(*d) <= max)
    })
}

#[cfg(test)]
mod tests;
