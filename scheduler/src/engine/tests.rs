use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use chrono::TimeZone;
use proptest::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::job::JobSpec;
use crate::schedule::Schedule;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()
}

fn at(ms: i64) -> DateTime<Utc> {
    t0() + TimeDelta::milliseconds(ms)
}

const SEC: i64 = 1000;

/// What the test sink does with the next delivery of a job.
enum Outcome {
    Ok,
    Fail,
    /// Waits for the test to send the result; the flag is set once a delivery has taken it.
    Hold(
        oneshot::Receiver<Result<Delivered, DeliveryError>>,
        Arc<std::sync::atomic::AtomicBool>,
    ),
}

#[derive(Debug, Clone)]
struct Delivery {
    tick: Tick,
    /// The clock when the sink got it.
    at: DateTime<Utc>,
}

type FailIf = Box<dyn Fn(&Tick) -> bool + Send>;

/// Records deliveries (at dispatch) and answers them as scripted per job name (default: OK).
struct TestSink {
    clock: Arc<ManualClock>,
    log: Mutex<Vec<Delivery>>,
    script: Mutex<HashMap<String, VecDeque<Outcome>>>,
    /// Fails every delivery for which this returns true (after the script).
    fail_if: Mutex<Option<FailIf>>,
    finished: AtomicU64,
    /// Deliveries whose outcome is known but whose future has not finished yet (scripted OK or
    /// failure, or a held one the test has answered). `settle` waits for it to reach 0.
    ready: std::sync::atomic::AtomicI64,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    /// Deliveries in flight per job key, and the most ever seen for one key.
    per_key: Arc<Mutex<HashMap<JobKey, usize>>>,
    max_per_key: Arc<AtomicUsize>,
}

impl TestSink {
    fn new(clock: Arc<ManualClock>) -> Self {
        TestSink {
            clock,
            log: Mutex::new(Vec::new()),
            script: Mutex::new(HashMap::new()),
            fail_if: Mutex::new(None),
            finished: AtomicU64::new(0),
            ready: std::sync::atomic::AtomicI64::new(0),
            running: Arc::new(AtomicUsize::new(0)),
            max_running: Arc::new(AtomicUsize::new(0)),
            per_key: Arc::new(Mutex::new(HashMap::new())),
            max_per_key: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn push(&self, name: &str, o: Outcome) {
        self.script
            .lock()
            .unwrap()
            .entry(name.into())
            .or_default()
            .push_back(o);
    }

    /// The next delivery of `name` waits until [`Harness::answer`] answers it.
    fn hold(&self, name: &str) -> oneshot::Sender<Result<Delivered, DeliveryError>> {
        self.hold_flagged(name).0
    }

    /// Like `hold`, with a flag telling whether a delivery has taken the hold yet.
    fn hold_flagged(
        &self,
        name: &str,
    ) -> (
        oneshot::Sender<Result<Delivered, DeliveryError>>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let (tx, rx) = oneshot::channel();
        let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.push(name, Outcome::Hold(rx, taken.clone()));
        (tx, taken)
    }
}

impl Sink for Arc<TestSink> {
    fn deliver(
        &self,
        tick: Tick,
    ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
        let outcome = self
            .script
            .lock()
            .unwrap()
            .get_mut(&tick.name)
            .and_then(VecDeque::pop_front)
            .unwrap_or_else(|| match &*self.fail_if.lock().unwrap() {
                Some(f) if f(&tick) => Outcome::Fail,
                _ => Outcome::Ok,
            });
        let key = tick.key.clone();
        {
            let mut per_key = self.per_key.lock().unwrap();
            let n = per_key.entry(key.clone()).or_default();
            *n += 1;
            self.max_per_key.fetch_max(*n, Ordering::SeqCst);
        }
        self.log.lock().unwrap().push(Delivery {
            tick,
            at: self.clock.now(),
        });
        match &outcome {
            Outcome::Hold(_, taken) => taken.store(true, Ordering::SeqCst),
            _ => {
                self.ready.fetch_add(1, Ordering::SeqCst);
            }
        }
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(running, Ordering::SeqCst);
        let me = self.clone();
        async move {
            let (r, was_ready) = match outcome {
                Outcome::Ok => (Ok(Delivered::default()), true),
                Outcome::Fail => (Err(DeliveryError::Failed("scripted failure".into())), true),
                Outcome::Hold(rx, _) => match rx.await {
                    Ok(r) => (r, true),
                    Err(_) => (Err(DeliveryError::Failed("hold dropped".into())), false),
                },
            };
            me.running.fetch_sub(1, Ordering::SeqCst);
            if let Some(n) = me.per_key.lock().unwrap().get_mut(&key) {
                *n -= 1;
            }
            me.finished.fetch_add(1, Ordering::SeqCst);
            if was_ready {
                me.ready.fetch_sub(1, Ordering::SeqCst);
            }
            r
        }
    }
}

struct Harness {
    clock: Arc<ManualClock>,
    sink: Arc<TestSink>,
    handle: SchedulerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    fn new() -> Self {
        Self::with(
            Arc::new(JobStore::temporary().unwrap()),
            EngineConfig::default(),
            None,
        )
    }

    fn with(store: Arc<JobStore>, config: EngineConfig, clock: Option<Arc<ManualClock>>) -> Self {
        let clock = clock.unwrap_or_else(|| Arc::new(ManualClock::new(t0())));
        let sink = Arc::new(TestSink::new(clock.clone()));
        let engine = Engine::new(store, clock.clone(), Arc::new(sink.clone()), config);
        let handle = engine.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.await;
        }));
        Harness {
            clock,
            sink,
            handle,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Waits until the loop has acted on everything that happened so far and is waiting.
    async fn settle(&self) {
        let mut status = self.handle.status();
        let ok = tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| {
                let now = self.clock.now();
                s.parked
                    && self.sink.ready.load(Ordering::SeqCst) == 0
                    && s.seen_epoch >= self.handle.epoch()
                    && s.completed >= self.sink.finished.load(Ordering::SeqCst)
                    && (s.now >= now || s.sleeping_until.is_none_or(|w| w > now))
            }),
        )
        .await
        .is_ok();
        assert!(
            ok,
            "the loop did not settle: {:?}",
            *self.handle.status().borrow()
        );
    }

    /// Answers a held delivery and waits until the loop has applied the answer.
    async fn answer(
        &self,
        hold: oneshot::Sender<Result<Delivered, DeliveryError>>,
        r: Result<Delivered, DeliveryError>,
    ) {
        self.sink.ready.fetch_add(1, Ordering::SeqCst);
        if hold.send(r).is_err() {
            self.sink.ready.fetch_sub(1, Ordering::SeqCst);
        }
        self.settle().await;
    }

    async fn advance_to(&self, ms: i64) {
        self.clock.set(at(ms));
        self.settle().await;
    }

    async fn create(&self, job: Job) -> u64 {
        match self.handle.create(job, true).await.unwrap() {
            PutOutcome::Stored { generation, .. } => {
                self.settle().await;
                generation
            }
            other => panic!("{other:?}"),
        }
    }

    async fn delete(&self, name: &str) -> bool {
        let deleted = self.handle.delete(&key(name)).await.unwrap();
        self.settle().await;
        deleted
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.sink.log.lock().unwrap().clone()
    }

    /// `(scheduled ms, missed, attempt, delivered-at ms)` of each delivery of `name`.
    fn of(&self, name: &str) -> Vec<(i64, u32, u32, i64)> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.tick.name == name)
            .map(|d| {
                (
                    (d.tick.scheduled - t0()).num_milliseconds(),
                    d.tick.missed,
                    d.tick.attempt,
                    (d.at - t0()).num_milliseconds(),
                )
            })
            .collect()
    }
}

fn key(name: &str) -> JobKey {
    JobKey::app("ns", "app", name)
}

fn one_shot(name: &str, due_ms: i64) -> Job {
    Job {
        name: name.into(),
        target: Target::App {
            app_id: "app".into(),
            namespace: "ns".into(),
        },
        schedule: None,
        due_time: Some(at(due_ms)),
        created_at: t0(),
        repeats: None,
        expiry: None,
        data: br#"{"hello":"world"}"#.to_vec(),
        failure_policy: FailurePolicy::default(),
        spec: JobSpec::default(),
    }
}

fn every(name: &str, due_ms: i64, every_ms: u64) -> Job {
    Job {
        schedule: Some(Schedule::Every(Duration::from_millis(every_ms))),
        ..one_shot(name, due_ms)
    }
}

fn policy(job: Job, failure_policy: FailurePolicy) -> Job {
    Job {
        failure_policy,
        ..job
    }
}

// --- never early ---------------------------------------------------------------------------------

#[tokio::test]
async fn fires_at_its_due_time_and_not_before() {
    let h = Harness::new();
    h.create(one_shot("a", 10 * SEC)).await;
    h.advance_to(10 * SEC - 1).await;
    assert!(h.deliveries().is_empty());
    h.advance_to(10 * SEC).await;
    assert_eq!(h.of("a"), vec![(10 * SEC, 0, 0, 10 * SEC)]);
    let d = &h.deliveries()[0].tick;
    assert_eq!((d.sequence, &*d.data), (1, &br#"{"hello":"world"}"#[..]));
    h.advance_to(100 * SEC).await;
    assert_eq!(h.deliveries().len(), 1, "a one-shot fires once");
    assert_eq!(
        h.handle.get(&key("a")).unwrap(),
        None,
        "and is then removed"
    );
}

#[tokio::test]
async fn sub_millisecond_due_times_are_not_fired_early() {
    let h = Harness::new();
    let mut j = one_shot("a", 0);
    j.due_time = Some(at(5) + TimeDelta::microseconds(500));
    h.create(j).await;
    h.advance_to(5).await;
    assert!(h.deliveries().is_empty(), "5 ms is before 5.5 ms");
    h.clock.set(at(5) + TimeDelta::microseconds(700));
    h.settle().await;
    assert!(
        h.deliveries().is_empty(),
        "the index rounds up to the next millisecond"
    );
    h.advance_to(6).await;
    assert_eq!(h.deliveries().len(), 1);
    assert!(h.deliveries()[0].at >= h.deliveries()[0].tick.scheduled);
}

#[tokio::test]
async fn a_past_due_time_fires_at_once() {
    let h = Harness::new();
    h.advance_to(50 * SEC).await;
    h.create(one_shot("a", 10 * SEC)).await;
    assert_eq!(h.of("a"), vec![(10 * SEC, 0, 0, 50 * SEC)]);
}

// --- schedules, repeats, expiry --------------------------------------------------------------------

#[tokio::test]
async fn periodic_job_with_repeats() {
    let h = Harness::new();
    let mut j = every("p", 10 * SEC, 10_000);
    j.repeats = Some(3);
    h.create(j).await;
    for s in 1..=6 {
        h.advance_to(s * 10 * SEC).await;
    }
    assert_eq!(
        h.of("p"),
        vec![
            (10 * SEC, 0, 0, 10 * SEC),
            (20 * SEC, 0, 0, 20 * SEC),
            (30 * SEC, 0, 0, 30 * SEC)
        ]
    );
    let seqs: Vec<u32> = h.deliveries().iter().map(|d| d.tick.sequence).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(h.handle.get(&key("p")).unwrap(), None);
}

#[tokio::test]
async fn expiry_ends_a_periodic_job() {
    let h = Harness::new();
    let mut j = every("p", 0, 10_000);
    j.expiry = Some(at(25 * SEC));
    h.create(j).await;
    h.advance_to(100 * SEC).await;
    // Due at creation; then one delivery covering 10 and 20 s; nothing after the expiry.
    assert_eq!(h.of("p"), vec![(0, 0, 0, 0), (10 * SEC, 1, 0, 100 * SEC)]);
    assert_eq!(h.handle.get(&key("p")).unwrap(), None);
}

#[tokio::test]
async fn cron_jobs_fire_on_their_seconds() {
    let h = Harness::new();
    let mut j = one_shot("c", 0);
    j.due_time = None;
    j.schedule = Some(crate::schedule::parse_job_schedule("*/15 * * * * *").unwrap());
    h.create(j).await;
    for s in [14, 15, 29, 30, 45] {
        h.advance_to(s * SEC).await;
    }
    let fired: Vec<i64> = h.of("c").iter().map(|d| d.0 / SEC).collect();
    assert_eq!(fired, [15, 30, 45]);
}

// --- coalescing ----------------------------------------------------------------------------------

#[tokio::test]
async fn missed_ticks_are_coalesced_into_one_delivery() {
    let h = Harness::new();
    h.create(every("p", 10 * SEC, 10_000)).await;
    // An outage: the loop sees the clock only at 95 s.
    h.advance_to(95 * SEC).await;
    assert_eq!(h.of("p"), vec![(10 * SEC, 8, 0, 95 * SEC)]);
    h.advance_to(100 * SEC).await;
    assert_eq!(h.of("p")[1], (100 * SEC, 0, 0, 100 * SEC));
    assert_eq!(
        h.deliveries()[1].tick.sequence,
        10,
        "ticks 1-9 were accounted for"
    );
}

#[tokio::test]
async fn a_million_missed_millisecond_ticks_are_one_delivery() {
    let h = Harness::new();
    h.create(every("fast", 0, 1)).await;
    h.advance_to(1_000_000).await;
    assert_eq!(h.of("fast"), vec![(0, 0, 0, 0), (1, 999_999, 0, 1_000_000)]);
}

// --- one tick in flight ----------------------------------------------------------------------------

#[tokio::test]
async fn one_tick_in_flight_per_job() {
    let h = Harness::new();
    let release = h.sink.hold("p");
    h.create(every("p", SEC, 1000)).await;
    h.advance_to(SEC).await;
    h.advance_to(6 * SEC).await;
    assert_eq!(
        h.of("p"),
        vec![(SEC, 0, 0, SEC)],
        "the next tick waits for the first"
    );
    h.answer(release, Ok(Delivered::default())).await;
    // The ticks at 2..6 s go out together as soon as the first is done.
    assert_eq!(h.of("p"), vec![(SEC, 0, 0, SEC), (2 * SEC, 4, 0, 6 * SEC)]);
}

#[tokio::test]
async fn in_flight_is_bounded_but_every_due_job_fires() {
    let store = Arc::new(JobStore::temporary().unwrap());
    let config = EngineConfig {
        max_in_flight: 3,
        ..EngineConfig::default()
    };
    let h = Harness::with(store, config, None);
    let holds: Vec<_> = (0..10).map(|i| h.sink.hold(&format!("j{i}"))).collect();
    for i in 0..10 {
        h.create(one_shot(&format!("j{i}"), SEC)).await;
    }
    h.advance_to(SEC).await;
    assert_eq!(h.deliveries().len(), 3);
    for tx in holds {
        h.answer(tx, Ok(Delivered::default())).await;
    }
    assert_eq!(h.deliveries().len(), 10);
    assert!(h.sink.max_running.load(Ordering::SeqCst) <= 3);
}

// --- failures ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unroutable_ticks_wait_without_using_up_the_policy_then_coalesce() {
    let h = Harness::new();
    let p = FailurePolicy::Constant {
        interval: Duration::from_secs(1),
        max_retries: Some(1),
    };
    h.create(policy(every("u", SEC, 1000), p)).await;
    // Nobody connected for 5 s: far more than the policy's one retry.
    for i in 0..10 {
        let hold = h.sink.hold("u");
        h.advance_to(SEC + i * 500).await;
        h.answer(hold, Err(DeliveryError::Unroutable("no host".into())))
            .await;
    }
    let before = h.of("u").len();
    h.advance_to(6 * SEC).await;
    let of = h.of("u");
    // Every attempt so far was the first tick (attempt 0), and the one that finally went out
    // stands for every tick due by then.
    assert!(of.iter().all(|d| d.0 == SEC && d.2 == 0), "{of:?}");
    assert_eq!(of.len(), before + 1);
    let last = of.last().unwrap();
    assert_eq!(last.1, 5, "ticks at 2..6 s folded in: {of:?}");
}

#[tokio::test]
async fn an_ack_from_an_older_epoch_is_refused_and_retried() {
    let h = Harness::new();
    h.create(every("e", SEC, 1000)).await;
    let hold = h.sink.hold("e");
    h.advance_to(SEC).await;
    h.answer(hold, Ok(Delivered { epoch: Some(7) })).await;
    assert_eq!(h.handle.get(&key("e")).unwrap().unwrap().state.epoch, 7);
    let hold = h.sink.hold("e");
    h.advance_to(2 * SEC).await;
    h.answer(hold, Ok(Delivered { epoch: Some(5) })).await;
    // Refused: the tick at 2 s is still pending, retried per the default policy (1 s later).
    let rec = h.handle.get(&key("e")).unwrap().unwrap();
    assert_eq!((rec.state.tick, rec.state.attempt), (at(2 * SEC), 1));
    h.advance_to(3 * SEC).await;
    let of = h.of("e");
    assert_eq!(of.last().unwrap().0, 2 * SEC, "{of:?}");
    assert_eq!(of.last().unwrap().2, 1, "{of:?}");
    let rec = h.handle.get(&key("e")).unwrap().unwrap();
    assert_eq!(rec.state.epoch, 7);
    assert_eq!(rec.state.tick, at(4 * SEC));
}

#[tokio::test]
async fn constant_policy_retries_then_gives_up() {
    let h = Harness::new();
    let p = FailurePolicy::Constant {
        interval: Duration::from_secs(2),
        max_retries: Some(2),
    };
    h.create(policy(every("p", 10 * SEC, 100_000), p)).await;
    for _ in 0..3 {
        h.sink.push("p", Outcome::Fail);
    }
    for s in [10, 11, 12, 14, 16, 30] {
        h.advance_to(s * SEC).await;
    }
    assert_eq!(
        h.of("p"),
        vec![
            (10 * SEC, 0, 0, 10 * SEC),
            (10 * SEC, 0, 1, 12 * SEC),
            (10 * SEC, 0, 2, 14 * SEC)
        ],
        "two retries, 2 s apart, then the tick is given up"
    );
    // The schedule goes on from the tick, not from the last retry.
    h.advance_to(110 * SEC).await;
    assert_eq!(h.of("p")[3], (110 * SEC, 0, 0, 110 * SEC));
}

#[tokio::test]
async fn a_retry_that_succeeds_ends_the_retries() {
    let h = Harness::new();
    let p = FailurePolicy::Constant {
        interval: Duration::from_secs(1),
        max_retries: None,
    };
    h.create(policy(one_shot("a", SEC), p)).await;
    h.sink.push("a", Outcome::Fail);
    h.sink.push("a", Outcome::Fail);
    for s in 1..=10 {
        h.advance_to(s * SEC).await;
    }
    assert_eq!(
        h.of("a"),
        vec![(SEC, 0, 0, SEC), (SEC, 0, 1, 2 * SEC), (SEC, 0, 2, 3 * SEC)]
    );
    assert_eq!(h.handle.get(&key("a")).unwrap(), None);
}

#[tokio::test]
async fn the_default_policy_is_three_retries_a_second_apart() {
    let h = Harness::new();
    for _ in 0..10 {
        h.sink.push("a", Outcome::Fail);
    }
    h.create(one_shot("a", 0)).await;
    for s in 0..10 {
        h.advance_to(s * SEC).await;
    }
    let attempts: Vec<(u32, i64)> = h.of("a").iter().map(|d| (d.2, d.3)).collect();
    assert_eq!(attempts, [(0, 0), (1, SEC), (2, 2 * SEC), (3, 3 * SEC)]);
}

#[tokio::test]
async fn drop_policy_does_not_retry() {
    let h = Harness::new();
    h.create(policy(every("p", SEC, 5000), FailurePolicy::Drop))
        .await;
    h.sink.push("p", Outcome::Fail);
    for s in 1..=6 {
        h.advance_to(s * SEC).await;
    }
    assert_eq!(h.of("p"), vec![(SEC, 0, 0, SEC), (6 * SEC, 0, 0, 6 * SEC)]);
}

#[tokio::test]
async fn a_retry_folds_in_ticks_that_fell_due_meanwhile() {
    let h = Harness::new();
    let p = FailurePolicy::Constant {
        interval: Duration::from_secs(5),
        max_retries: None,
    };
    h.create(policy(every("p", SEC, 1000), p)).await;
    h.sink.push("p", Outcome::Fail);
    h.advance_to(SEC).await;
    h.advance_to(6 * SEC).await;
    // The retry of the 1 s tick also stands for 2..6 s.
    assert_eq!(h.of("p"), vec![(SEC, 0, 0, SEC), (SEC, 5, 1, 6 * SEC)]);
    h.advance_to(7 * SEC).await;
    assert_eq!(h.of("p")[2], (7 * SEC, 0, 0, 7 * SEC));
}

#[tokio::test]
async fn a_panicking_delivery_counts_as_a_failure() {
    struct PanicSink;
    impl Sink for PanicSink {
        #[allow(clippy::manual_async_fn)] // the trait needs a 'static future
        fn deliver(
            &self,
            _: Tick,
        ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
            async { panic!("sink bug") }
        }
    }
    let clock = Arc::new(ManualClock::new(t0()));
    let store = Arc::new(JobStore::temporary().unwrap());
    let engine = Engine::new(
        store.clone(),
        clock.clone(),
        Arc::new(PanicSink),
        EngineConfig::default(),
    );
    let handle = engine.handle();
    let task = tokio::spawn(engine.run(std::future::pending()));
    handle.create(one_shot("a", 0), true).await.unwrap();
    let mut status = handle.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.completed >= 1 && s.parked),
    )
    .await
    .unwrap()
    .unwrap();
    let rec = store
        .get(&key("a"))
        .unwrap()
        .expect("still there, waiting to retry");
    assert_eq!(rec.state.attempt, 1);
    task.abort();
}

// --- deletes -------------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_stops_later_ticks() {
    let h = Harness::new();
    h.create(every("p", SEC, 1000)).await;
    h.advance_to(SEC).await;
    h.advance_to(2 * SEC).await;
    assert!(h.delete("p").await);
    h.advance_to(60 * SEC).await;
    assert_eq!(h.of("p").len(), 2);
}

#[tokio::test]
async fn delete_cancels_a_scheduled_retry() {
    let h = Harness::new();
    let p = FailurePolicy::Constant {
        interval: Duration::from_secs(5),
        max_retries: None,
    };
    h.create(policy(one_shot("a", SEC), p)).await;
    h.sink.push("a", Outcome::Fail);
    h.advance_to(SEC).await;
    assert_eq!(h.handle.get(&key("a")).unwrap().unwrap().state.attempt, 1);
    assert!(h.delete("a").await);
    h.advance_to(60 * SEC).await;
    assert_eq!(h.of("a").len(), 1);
}

#[tokio::test]
async fn the_outcome_of_a_tick_in_flight_at_delete_is_discarded() {
    for result in [
        Ok(Delivered::default()),
        Err(DeliveryError::Failed("late failure".into())),
    ] {
        let h = Harness::new();
        let release = h.sink.hold("p");
        h.create(every("p", SEC, 1000)).await;
        h.advance_to(SEC).await;
        assert!(h.delete("p").await);
        h.answer(release, result).await;
        h.advance_to(60 * SEC).await;
        assert_eq!(h.of("p").len(), 1, "nothing after the one in flight");
        assert_eq!(h.handle.get(&key("p")).unwrap(), None, "no resurrection");
    }
}

#[tokio::test]
async fn an_overwrite_in_flight_starts_the_new_job_cleanly() {
    let h = Harness::new();
    let release = h.sink.hold("p");
    let g1 = h.create(every("p", SEC, 1000)).await;
    h.advance_to(SEC).await;
    let g2 = h.create(every("p", 2 * SEC, 10_000)).await;
    assert!(g2 > g1);
    h.advance_to(3 * SEC).await;
    assert_eq!(
        h.of("p").len(),
        1,
        "the new job waits for the old tick in flight"
    );
    h.answer(release, Ok(Delivered::default())).await;
    let ticks: Vec<(u64, i64)> = h
        .deliveries()
        .iter()
        .map(|d| {
            (
                d.tick.generation,
                (d.tick.scheduled - t0()).num_milliseconds(),
            )
        })
        .collect();
    assert_eq!(ticks, [(g1, SEC), (g2, 2 * SEC)]);
    let rec = h.handle.get(&key("p")).unwrap().unwrap();
    assert_eq!((rec.generation, rec.state.tick), (g2, at(12 * SEC)));
}

#[tokio::test]
async fn deleting_all_reminders_of_an_actor() {
    let h = Harness::new();
    for (actor, name) in [("1", "x"), ("1", "y"), ("2", "x")] {
        let mut j = every(name, SEC, 1000);
        j.target = Target::ActorReminder {
            app_id: None,
            namespace: "ns".into(),
            actor_type: "T".into(),
            actor_id: actor.into(),
        };
        h.handle.create(j, false).await.unwrap();
    }
    assert_eq!(
        h.handle
            .delete_prefix(&JobKey::actor_prefix("ns", "T", "1"))
            .await
            .unwrap(),
        2
    );
    h.settle().await;
    h.advance_to(3 * SEC).await;
    assert!(h.deliveries().iter().all(|d| d.tick.target
        == Target::ActorReminder {
            app_id: None,
            namespace: "ns".into(),
            actor_type: "T".into(),
            actor_id: "2".into()
        }));
}

// --- restarts and the real clock ---------------------------------------------------------------------

#[tokio::test]
async fn a_tick_in_flight_at_shutdown_fires_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(JobStore::open(dir.path()).unwrap());
    let clock = Arc::new(ManualClock::new(t0()));
    let mut h = Harness::with(store.clone(), EngineConfig::default(), Some(clock.clone()));
    let _never = h.sink.hold("a");
    h.create(one_shot("a", SEC)).await;
    h.advance_to(SEC).await;
    h.stop().await;
    drop(h);
    drop(store);
    let store = Arc::new(JobStore::open(dir.path()).unwrap());
    let h = Harness::with(store, EngineConfig::default(), Some(clock));
    h.settle().await;
    assert_eq!(
        h.of("a"),
        vec![(SEC, 0, 0, SEC)],
        "at least once across restarts"
    );
}

#[tokio::test]
async fn the_system_clock_fires_on_time() {
    struct Record(Mutex<Vec<(Tick, DateTime<Utc>)>>);
    impl Sink for Arc<Record> {
        fn deliver(
            &self,
            tick: Tick,
        ) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send + 'static {
            self.0.lock().unwrap().push((tick, Utc::now()));
            async { Ok(Delivered::default()) }
        }
    }
    let rec = Arc::new(Record(Mutex::new(Vec::new())));
    let store = Arc::new(JobStore::temporary().unwrap());
    let engine = Engine::new(
        store,
        Arc::new(SystemClock),
        Arc::new(rec.clone()),
        EngineConfig::default(),
    );
    let handle = engine.handle();
    let task = tokio::spawn(engine.run(std::future::pending()));
    let now = Utc::now();
    let mut j = every("rt", 0, 30);
    j.due_time = Some(now + TimeDelta::milliseconds(50));
    j.created_at = now;
    j.repeats = Some(3);
    handle.create(j, true).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rec.0.lock().unwrap().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    for (tick, when) in got {
        assert!(when >= tick.scheduled, "early: {when} < {}", tick.scheduled);
    }
    task.abort();
}

// --- the property: random creates, deletes and clock moves --------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: usize,
        due_ms: i64,
        every_ms: Option<u64>,
        repeats: Option<u32>,
        ttl_ms: Option<i64>,
    },
    Delete {
        name: usize,
    },
    Advance {
        ms: i64,
    },
    /// The next delivery of this job waits for a `Release`.
    Hold {
        name: usize,
    },
    /// Answers the oldest held delivery of this job.
    Release {
        name: usize,
        ok: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..4, 0i64..20_000, prop::option::of(300u64..5_000), prop::option::of(1u32..6), prop::option::of(0i64..30_000))
            .prop_map(|(name, due_ms, every_ms, repeats, ttl_ms)| Op::Create { name, due_ms, every_ms, repeats, ttl_ms }),
        1 => (0usize..4).prop_map(|name| Op::Delete { name }),
        4 => (0i64..7_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0usize..4).prop_map(|name| Op::Hold { name }),
        1 => (0usize..4, any::<bool>()).prop_map(|(name, ok)| Op::Release { name, ok }),
    ]
}

/// A job as the test created it, and when (in log positions) it stopped being current.
struct Created {
    generation: u64,
    job: Job,
    /// Number of deliveries logged when it was deleted or replaced.
    ended_at: Option<usize>,
}

/// Every tick of `job` up to `until`, computed without the engine.
fn expected_ticks(job: &Job, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let due = job.due_time.unwrap_or(job.created_at);
    let step = match &job.schedule {
        Some(Schedule::Every(d)) => Some(TimeDelta::from_std(*d).unwrap()),
        None => None,
        Some(Schedule::Cron(_)) => unreachable!("the property uses intervals"),
    };
    let mut out = Vec::new();
    let mut t = due;
    loop {
        if t > until
            || job.expiry.is_some_and(|e| t > e)
            || job.repeats.is_some_and(|r| out.len() >= r as usize)
        {
            break;
        }
        out.push(t);
        match step {
            Some(s) => t += s,
            None => break,
        }
    }
    out
}

async fn run_ops(ops: Vec<Op>, flaky: bool) -> Result<(), TestCaseError> {
    let h = Harness::new();
    if flaky {
        // Deterministic failures: about one attempt in three.
        *h.sink.fail_if.lock().unwrap() = Some(Box::new(|t: &Tick| {
            (t.generation * 31
                + t.scheduled.timestamp_millis() as u64 / 7
                + u64::from(t.attempt) * 13)
                .is_multiple_of(3)
        }));
    }
    let mut created: Vec<Created> = Vec::new();
    let mut current: HashMap<usize, usize> = HashMap::new();
    type Held = (
        oneshot::Sender<Result<Delivered, DeliveryError>>,
        Arc<std::sync::atomic::AtomicBool>,
    );
    let mut holds: HashMap<usize, VecDeque<Held>> = HashMap::new();
    let mut now_ms = 0i64;
    for op in ops {
        match op {
            Op::Create {
                name,
                due_ms,
                every_ms,
                repeats,
                ttl_ms,
            } => {
                let now = at(now_ms);
                let due = now + TimeDelta::milliseconds(due_ms);
                let job = Job {
                    name: format!("j{name}"),
                    schedule: every_ms.map(|ms| Schedule::Every(Duration::from_millis(ms))),
                    due_time: Some(due),
                    created_at: now,
                    repeats: every_ms.and(repeats),
                    expiry: every_ms
                        .and(ttl_ms)
                        .map(|t| due + TimeDelta::milliseconds(t)),
                    failure_policy: FailurePolicy::Constant {
                        interval: Duration::from_millis(700),
                        max_retries: None,
                    },
                    ..one_shot("", 0)
                };
                let logged = h.deliveries().len();
                let generation = h.create(job.clone()).await;
                if let Some(prev) = current.insert(name, created.len()) {
                    created[prev].ended_at.get_or_insert(logged);
                }
                created.push(Created {
                    generation,
                    job,
                    ended_at: None,
                });
            }
            Op::Delete { name } => {
                let logged = h.deliveries().len();
                h.delete(&format!("j{name}")).await;
                if let Some(prev) = current.remove(&name) {
                    created[prev].ended_at.get_or_insert(logged);
                }
            }
            Op::Advance { ms } => {
                now_ms += ms;
                h.advance_to(now_ms).await;
            }
            Op::Hold { name } => {
                let held = h.sink.hold_flagged(&format!("j{name}"));
                holds.entry(name).or_default().push_back(held);
            }
            Op::Release { name, ok } => {
                // Only a hold a delivery has taken can be answered now.
                let queue = holds.entry(name).or_default();
                let taken = queue.iter().position(|(_, t)| t.load(Ordering::SeqCst));
                if let Some((tx, _)) = taken.and_then(|i| queue.remove(i)) {
                    let r = if ok {
                        Ok(Delivered::default())
                    } else {
                        Err(DeliveryError::Failed("released as failed".into()))
                    };
                    h.answer(tx, r).await;
                }
            }
        }
    }
    // Heal: no more holds, deliveries succeed again and pending retries run.
    h.sink.script.lock().unwrap().clear();
    for (tx, taken) in holds.into_values().flatten() {
        if taken.load(Ordering::SeqCst) {
            h.answer(tx, Ok(Delivered::default())).await;
        }
    }
    *h.sink.fail_if.lock().unwrap() = None;
    for _ in 0..3 {
        now_ms += 700;
        h.advance_to(now_ms).await;
    }
    let end = at(now_ms);
    let log = h.deliveries();
    let by_gen: HashMap<u64, &Created> = created.iter().map(|c| (c.generation, c)).collect();
    for d in &log {
        // Never early.
        prop_assert!(d.at >= d.tick.scheduled, "early delivery: {:?}", d);
    }
    prop_assert!(
        h.sink.max_per_key.load(Ordering::SeqCst) <= 1,
        "two deliveries of one job in flight at once"
    );
    for c in &created {
        let mine: Vec<(usize, &Delivery)> = log
            .iter()
            .enumerate()
            .filter(|(_, d)| d.tick.generation == c.generation)
            .collect();
        // Nothing after a delete or replacement, beyond the one delivery in flight then.
        if let Some(end_pos) = c.ended_at {
            let late = mine.iter().filter(|(i, _)| *i >= end_pos).count();
            prop_assert!(
                late == 0,
                "{} deliveries of generation {} after its delete",
                late,
                c.generation
            );
        }
        // Coverage: each successful delivery stands for its tick and `missed` more, in order.
        let expected = expected_ticks(&c.job, end);
        let mut covered = Vec::new();
        let mut succeeded: Vec<&Delivery> = Vec::new();
        for (i, d) in &mine {
            // A delivery failed if a later one retried the same tick.
            let retried = mine
                .iter()
                .any(|(j, e)| j > i && e.tick.scheduled == d.tick.scheduled);
            if !retried {
                succeeded.push(d);
            }
        }
        for d in &succeeded {
            let first = expected.iter().position(|t| *t == d.tick.scheduled);
            prop_assert!(
                first.is_some(),
                "delivered a tick that was never due: {:?}",
                d
            );
            let first = first.unwrap_or_default();
            let stands_for: Vec<_> = expected
                .iter()
                .skip(first)
                .take(1 + d.tick.missed as usize)
                .copied()
                .collect();
            // Coalesced ticks must exist and be due by the delivery, too.
            prop_assert_eq!(stands_for.len(), 1 + d.tick.missed as usize, "{:?}", d);
            prop_assert!(
                stands_for.iter().all(|t| *t <= d.at),
                "coalesced a tick not yet due: {:?}",
                d
            );
            covered.extend(stands_for);
        }
        let mut sorted = covered.clone();
        sorted.dedup();
        prop_assert_eq!(
            &sorted,
            &covered,
            "a tick was covered twice or out of order"
        );
        if c.ended_at.is_none() {
            // No due tick lost.
            prop_assert_eq!(&covered, &expected, "generation {}", c.generation);
        } else {
            prop_assert!(covered.iter().all(|t| expected.contains(t)));
        }
    }
    prop_assert!(by_gen.len() == created.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn never_early_nothing_after_delete_no_tick_lost(ops in prop::collection::vec(op(), 1..40), flaky in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops, flaky))?;
    }
}
