//! One deployed service at run time: carries out the scaler's decisions
//! (start, freeze, thaw, stop instances; hand waiting requests over) and
//! feeds it the events (requests, instance ready, exited). The decisions
//! themselves are in `skiff_core::scaler`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use skiff_core::{diagnose, EventKind, StartReport};
use skiff_gateway::{
    Connect, ConnectFuture, ExchangeLimits, FailureFuture, Lease, Route, Upstream, Wake,
};
use skiff_model::{format_duration, ServiceSpec};
use skiff_sandbox::beneath::Tree;
use skiff_sandbox::{disk, Freezer, Held, NetNs, Prepared, WarmRoot, WritableLayer};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::context::Context;
use crate::events::Event;
use crate::images::base::{which, APP_PATH, RUN_UID};
use crate::instance::{self, Mark, StartContext, StartError, Tail};
use skiff_core::scaler::{Action, InstanceNo, Outcome, Rejection, ScaleConfig, Scaler, WaiterId};
use skiff_store::LogSender;

/// How long instances get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What is decided and what must follow the decisions' order: the freezer
/// writes happen under the same lock, so a freeze decided before a thaw is
/// never carried out after it.
struct Core {
    scaler: Scaler,
    freezers: HashMap<InstanceNo, Freezer>,
    /// Each instance's last lines of output, for the checks after answering.
    tails: HashMap<InstanceNo, Tail>,
    /// Instances answered a request and left running a moment, to see
    /// whether they work on after answering (see `settled`).
    settling: HashMap<InstanceNo, Settling>,
    /// Whether answers are checked for work after them (a version that is
    /// suspended at once, until such work is found), and how many answers
    /// left an instance idle so far (the ones that may be checked).
    checking: bool,
    answers: u64,
    /// The deadline the timer task sleeps until; it is woken only when a
    /// decision brings the next deadline earlier (not on every request).
    armed: Option<Instant>,
}

/// How long an instance is left running after one of the first answers of
/// its version before it is suspended, to see whether it works on.
const SETTLE_WINDOW: Duration = Duration::from_millis(50);
/// Which answers are checked so: a version's first ones, then one in
/// `SETTLE_EVERY` (work after answering may follow only some requests).
const SETTLE_FIRST: u64 = 3;
const SETTLE_EVERY: u64 = 32;
/// CPU used within `SETTLE_WINDOW` after answering that counts as work
/// (a request log line or a collector's pass uses far less).
const SETTLE_BUSY: Duration = Duration::from_millis(20);

/// An instance left running after answering: which check this is, and the
/// CPU it had used and the output it had written by its answer.
struct Settling {
    check: u64,
    cpu: Duration,
    lines: Mark,
}

/// What an instance did in the `SETTLE_WINDOW` after answering, with no
/// request in flight, as an event's message; `None` when it did nothing
/// worth telling: request log lines (servers write them after answering)
/// and a little CPU are not.
fn work_after_answer(lines: &[String], cpu: Duration) -> Option<String> {
    let own: Vec<String> = lines
        .iter()
        .map(|l| diagnose::without_colours(l).trim().to_string())
        .filter(|l| !l.is_empty() && !diagnose::is_access_log(l))
        .collect();
    let window = format_duration(SETTLE_WINDOW);
    // The most telling line: one the rules recognise (a failed write),
    // else the first.
    let line = own
        .iter()
        .find(|l| !diagnose::diagnose_lines([l.as_str()]).is_empty())
        .or(own.first());
    match line {
        Some(line) => Some(format!(
            "it wrote {line:?} in the {window} after answering, with no request in flight \
             ({})",
            match own.len() {
                1 => "its only line".to_string(),
                n => format!("{n} lines in all"),
            }
        )),
        None if cpu >= SETTLE_BUSY => Some(format!(
            "it used {} of CPU in the {window} after answering, with no request in flight",
            format_duration(cpu)
        )),
        None => None,
    }
}

/// A running instance as the executor knows it.
/// What a request waited for before its lease (`ServiceRuntime::lease`).
enum Woke {
    Warm,
    Thawed,
    /// It was queued at this instant, for an instance to start or free up.
    Cold {
        queued: Instant,
    },
}

struct Running {
    upstream: Upstream,
    stop: watch::Sender<bool>,
    /// When it was ready: a request queued before that waited for its
    /// start (`Wake::Cold`).
    ready_at: Instant,
}

pub(crate) struct ServiceRuntime {
    pub name: String,
    /// The version this runtime runs.
    pub version: i64,
    spec: ServiceSpec,
    layers: Vec<PathBuf>,
    shared: Arc<Context>,
    log: LogSender,
    core: Mutex<Core>,
    running: Mutex<HashMap<InstanceNo, Running>>,
    waiters: Mutex<HashMap<WaiterId, oneshot::Sender<Result<LeaseGuard, Rejection>>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the timer when the next deadline may have moved.
    wake: Notify,
    shutdown: watch::Sender<bool>,
    /// Persistent mode: the instance's writable layer, kept across restarts.
    writable: Option<WritableLayer>,
    /// The service's own host uid and gid (`crate::users`).
    uid: u32,
    /// `/etc/passwd` and `/etc/group` naming that uid `app`.
    accounts: Vec<skiff_sandbox::Bind>,
    /// A sandbox prepared for the next start (see `Sandbox::prepare`).
    spare: Mutex<Spare>,
    /// Wakes the wait for a ready spare's expiry when a start took it.
    spare_taken: Notify,
    /// Where this service's thaws are timed (`crate::metrics`).
    thaws: prometheus_client::metrics::histogram::Histogram,
    /// The image's layers stacked once for all its instances, when they
    /// are several and the root is read-only (`skiff_sandbox::WarmRoot`):
    /// set by `stack_layers` (`None` when stacking failed), unset before.
    warm_root: std::sync::OnceLock<Option<Arc<WarmRoot>>>,
}

/// The next start's sandbox, prepared ahead (`Sandbox::prepare`).
#[derive(Default)]
enum Spare {
    #[default]
    None,
    /// Being prepared since then: the sender says true once the slot
    /// holds the outcome (or is dropped when the preparation ended
    /// otherwise).
    Preparing(watch::Receiver<bool>, Instant),
    /// Ready since then.
    Ready(Box<Ahead>, Instant),
}

/// A sandbox made ahead of its start.
#[allow(clippy::large_enum_variant)] // one per service, moved rarely
enum Ahead {
    /// Built and held before the exec: the start only executes.
    Held(Held),
    /// Only its helper waits in its cgroups. So for a persistent service,
    /// whose writable layer the instance before may still have mounted.
    Prepared(Prepared),
}

impl Ahead {
    async fn discard(self) {
        match self {
            Self::Held(held) => held.discard().await,
            Self::Prepared(prepared) => prepared.discard().await,
        }
    }
}

/// How long after a spare's preparation began a start still waits for it
/// rather than prepare its own: a preparation takes milliseconds, more
/// only on a loaded host; one stuck longer holds no start up.
const SPARE_WAIT: Duration = Duration::from_secs(1);

/// How long a spare waits for a start before it is discarded: a service
/// left at zero holds no sandbox (three processes, 2.3 MB) for good.
/// `SKIFF_SPARE_KEEP` (e.g. `2s`) sets it, for the tests.
fn spare_keep() -> Duration {
    static KEEP: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| {
        std::env::var("SKIFF_SPARE_KEEP")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(600))
    })
}

/// `SKIFF_NO_SPARE=1`: no sandbox is prepared ahead (the benchmarks
/// measure a start without one).
fn no_spares() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("SKIFF_NO_SPARE").is_some_and(|v| v == "1"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServiceRuntime {
    pub fn new(
        spec: ServiceSpec,
        version: i64,
        layers: Vec<PathBuf>,
        shared: Arc<Context>,
        log: LogSender,
    ) -> std::io::Result<Arc<Self>> {
        let persistent = spec.mode == skiff_model::Mode::Persistent;
        let uid = shared
            .store
            .service_uid(spec.name.as_str())
            .map_err(std::io::Error::other)?;
        let accounts = crate::users::account_files(
            &layers,
            &writable_version_dir(&shared.users_dir(spec.name.as_str()), version),
            uid,
        )?;
        let writable = if persistent {
            Some(writable_layer(
                &shared.writable_dir(spec.name.as_str()),
                version,
                spec.limits.disk,
                uid,
            )?)
        } else {
            None
        };
        let thaws = shared.metrics.thaws_of(spec.name.as_str());
        let l = &spec.limits;
        // Suspended at once: its first answers are checked for work after them.
        let checking = l.idle_suspend.is_zero() && !persistent;
        let cfg = ScaleConfig {
            concurrency: l.concurrency,
            // One writable layer, one instance: a persistent service's
            // files stay where its one instance wrote them.
            max_instances: if persistent { 1 } else { l.max_instances },
            idle_suspend: l.idle_suspend,
            idle_stop: l.idle_stop,
            queue_timeout: l.queue_timeout,
            max_queue: l.max_queue,
            persistent,
        };
        Ok(Arc::new(Self {
            name: spec.name.to_string(),
            version,
            spec,
            layers,
            shared,
            log,
            core: Mutex::new(Core {
                scaler: Scaler::new(cfg),
                freezers: HashMap::new(),
                tails: HashMap::new(),
                settling: HashMap::new(),
                checking,
                answers: 0,
                armed: None,
            }),
            running: Mutex::default(),
            waiters: Mutex::default(),
            tasks: Mutex::default(),
            wake: Notify::new(),
            shutdown: watch::channel(false).0,
            writable,
            uid,
            accounts,
            spare: Mutex::default(),
            spare_taken: Notify::new(),
            thaws,
            warm_root: std::sync::OnceLock::new(),
        }))
    }

    /// Stacks the image's layers into its warm root, once, if its root is
    /// read-only and has several (one is bound as it is, warm already).
    /// Called before a deploy's first start and before a spare is built:
    /// not on a restart's first starts, where hundreds of versions at once
    /// would make every one of them wait longer.
    pub(crate) async fn stack_layers(&self) {
        if self.warm_root.get().is_some() || self.writable.is_some() || self.layers.len() < 2 {
            return;
        }
        let (layers, staging) = (
            self.layers.clone(),
            self.shared.warm_staging(&self.name, self.version),
        );
        let stacked = tokio::task::spawn_blocking(move || WarmRoot::mount(&layers, &staging))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let root = match stacked {
            Ok(root) => Some(Arc::new(root)),
            // Each instance stacks the layers itself then, as it would
            // without: slower to start, and its own error if it fails.
            Err(e) => {
                warn!("{}: instances stack their layers each: {e}", self.name);
                None
            }
        };
        let _ = self.warm_root.set(root);
    }

    fn stacked_root(&self) -> Option<Arc<WarmRoot>> {
        self.warm_root.get().cloned().flatten()
    }

    /// Persistent services take long-lived connections (WebSocket).
    pub fn persistent(&self) -> bool {
        self.writable.is_some()
    }

    /// The gateway's rules for this service (docs/contract.md §2): serverless
    /// services get the request timeout and the size limits, persistent
    /// ones none.
    pub fn exchange_limits(&self) -> ExchangeLimits {
        if self.persistent() {
            return ExchangeLimits::default();
        }
        let l = &self.spec.limits;
        ExchangeLimits {
            request_timeout: Some(l.request_timeout),
            max_response: Some(l.max_response),
            max_request: Some(l.max_request),
        }
    }

    /// Starts the first instance and waits until it answers (a deploy).
    pub async fn start_first(self: &Arc<Self>) -> Result<StartReport, StartError> {
        let (n, _) = lock(&self.core).scaler.start_first(Instant::now());
        let (tx, rx) = oneshot::channel();
        self.spawn_instance(n, Some(tx));
        let timer = tokio::spawn(self.clone().timer());
        lock(&self.tasks).push(timer);
        rx.await.unwrap_or_else(|_| {
            Err(StartError::Sandbox(skiff_sandbox::SandboxError::Setup(
                "the instance task ended without a result".into(),
            )))
        })
    }

    /// Runs `f` on the scaler; freezes and thaws at once, in order, under
    /// the lock; everything else after it.
    fn decide<R>(self: &Arc<Self>, f: impl FnOnce(&mut Scaler) -> (R, Vec<Action>)) -> R {
        self.decide_after(None, f)
    }

    /// `decide`, after instance `answered` answered a request: one of the
    /// version's first answers leaves it running `SETTLE_WINDOW` before it
    /// is suspended, to see whether it works on (`settled`).
    fn decide_after<R>(
        self: &Arc<Self>,
        answered: Option<InstanceNo>,
        f: impl FnOnce(&mut Scaler) -> (R, Vec<Action>),
    ) -> R {
        let mut settle = None;
        let (result, rest, rearm, spare_wanted) = {
            let mut core = lock(&self.core);
            let (result, actions) = f(&mut core.scaler);
            let next = core.scaler.next_deadline();
            let rearm = match (next, core.armed) {
                (Some(n), Some(a)) => n < a,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let spare_wanted = core.scaler.wants_spare();
            let mut rest = Vec::new();
            for action in actions {
                match action {
                    Action::Freeze(n) | Action::Thaw(n) => {
                        let frozen = matches!(action, Action::Freeze(_));
                        // Thawed before its check ended: it never froze.
                        core.settling.remove(&n);
                        let check = frozen && answered == Some(n) && core.checking && {
                            core.answers += 1;
                            core.answers <= SETTLE_FIRST
                                || core.answers.is_multiple_of(SETTLE_EVERY)
                        };
                        if check {
                            let started = core
                                .freezers
                                .get(&n)
                                .and_then(|fz| fz.cpu_used().ok())
                                .zip(core.tails.get(&n).map(Tail::mark));
                            if let Some((cpu, lines)) = started {
                                let check = core.answers;
                                core.settling.insert(n, Settling { check, cpu, lines });
                                settle = Some((n, check));
                                continue;
                            }
                        }
                        if let Some(fz) = core.freezers.get(&n) {
                            let began = Instant::now();
                            match fz.set(frozen) {
                                Err(e) => warn!("{}: freezer of instance {n}: {e}", self.name),
                                Ok(()) if !frozen => {
                                    self.thaws.observe(began.elapsed().as_secs_f64());
                                }
                                Ok(()) => {}
                            }
                        }
                    }
                    other => rest.push(other),
                }
            }
            (result, rest, rearm, spare_wanted)
        };
        self.apply(rest);
        if spare_wanted {
            self.prepare_spare();
        }
        if rearm {
            self.wake.notify_one();
        }
        if let Some((n, check)) = settle {
            let this = self.clone();
            self.shared.runtime.spawn(async move {
                tokio::time::sleep(SETTLE_WINDOW).await;
                this.settled(n, check);
            });
        }
        result
    }

    /// The end of instance `n`'s check after answering: suspends it (unless
    /// a request thawed it meanwhile) and records work it did with no
    /// request in flight: its own output (request log lines aside), or CPU.
    fn settled(self: &Arc<Self>, n: InstanceNo, check: u64) {
        let message = {
            let mut core = lock(&self.core);
            // Thawed meanwhile (and maybe checked again: that check has a
            // timer of its own), stopped, or gone.
            if core.settling.get(&n).is_none_or(|s| s.check != check) {
                return;
            }
            let Some(before) = core.settling.remove(&n) else {
                return;
            };
            let Some(fz) = core.freezers.get(&n) else {
                return;
            };
            let cpu = fz
                .cpu_used()
                .map(|c| c.saturating_sub(before.cpu))
                .unwrap_or_default();
            if let Err(e) = fz.set(true) {
                warn!("{}: freezer of instance {n}: {e}", self.name);
            }
            let lines = core
                .tails
                .get(&n)
                .map(|t| t.since(before.lines))
                .unwrap_or_default();
            if !core.checking {
                return;
            }
            let Some(message) = work_after_answer(&lines, cpu) else {
                return;
            };
            core.checking = false;
            message
        };
        self.record_work_after_answer(message);
    }

    /// Records, off the async threads, that the version works after
    /// answering.
    fn record_work_after_answer(&self, message: String) {
        let store = self.shared.store.clone();
        let name = self.name.clone();
        self.shared.runtime.spawn_blocking(move || {
            crate::context::record(&store, &name, EventKind::WorkAfterAnswer, &message)
        });
    }

    fn apply(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start(n) => self.spawn_instance(n, None),
                Action::Stop(n) => {
                    if let Some(r) = lock(&self.running).get(&n) {
                        let _ = r.stop.send(true);
                    }
                }
                Action::Dispatch { waiter, instance } => {
                    // The slot travels as a guard: if the client went away
                    // (now, or before it polls its receiver), dropping the
                    // guard gives the instance's slot back.
                    let guard = LeaseGuard {
                        service: self.clone(),
                        instance,
                    };
                    if let Some(tx) = lock(&self.waiters).remove(&waiter) {
                        let _ = tx.send(Ok(guard));
                    }
                }
                Action::Reject { waiter, reason } => {
                    if let Some(tx) = lock(&self.waiters).remove(&waiter) {
                        let _ = tx.send(Err(reason));
                    }
                }
                Action::Freeze(_) | Action::Thaw(_) => {
                    unreachable!("decide() carries out freezer actions")
                }
            }
        }
    }

    fn release(self: &Arc<Self>, n: InstanceNo) {
        self.decide_after(Some(n), |s| ((), s.on_done(n, Instant::now())));
    }

    /// The gateway's question: where does the next request go?
    pub fn route(self: &Arc<Self>) -> Route {
        let outcome = {
            let now = Instant::now();
            let this = self.clone();
            self.decide(move |s| {
                let (outcome, actions) = s.on_request(now);
                if let Outcome::Queued(w) = outcome {
                    // Registered while the scaler is locked, so no Dispatch
                    // for it can be carried out before it exists.
                    let (tx, rx) = oneshot::channel();
                    lock(&this.waiters).insert(w, tx);
                    return ((outcome, Some((rx, now)), false), actions);
                }
                let thawed = match outcome {
                    Outcome::Dispatched(n) => actions.contains(&Action::Thaw(n)),
                    _ => false,
                };
                ((outcome, None, thawed), actions)
            })
        };
        match outcome {
            (Outcome::Dispatched(n), _, thawed) => {
                let wake = if thawed { Woke::Thawed } else { Woke::Warm };
                self.lease(
                    LeaseGuard {
                        service: self.clone(),
                        instance: n,
                    },
                    wake,
                )
            }
            (Outcome::Rejected(reason), ..) => Route::Unavailable {
                reason: reason.to_string(),
            },
            (Outcome::Queued(_), Some((rx, queued)), _) => {
                let this = self.clone();
                Route::Wait(Box::pin(async move {
                    match rx.await {
                        Ok(Ok(guard)) => this.lease(guard, Woke::Cold { queued }),
                        Ok(Err(reason)) => Route::Unavailable {
                            reason: reason.to_string(),
                        },
                        Err(_) => Route::Unavailable {
                            reason: Rejection::ShuttingDown.to_string(),
                        },
                    }
                }))
            }
            (Outcome::Queued(_), None, _) => Route::Unavailable {
                reason: "internal error: a queued request without a waiter".into(),
            },
        }
    }

    /// A lease of `guard`'s instance, for a request that waited as `woke`
    /// says.
    fn lease(&self, guard: LeaseGuard, woke: Woke) -> Route {
        let found = lock(&self.running)
            .get(&guard.instance)
            .map(|r| (r.upstream.clone(), r.ready_at));
        match found {
            Some((upstream, ready_at)) => {
                let wake = match woke {
                    Woke::Thawed => Wake::Thawed,
                    // It waited for a start: its instance became ready
                    // after it came (not a slot freed on a running one).
                    Woke::Cold { queued } if ready_at >= queued => Wake::Cold,
                    _ => Wake::Warm,
                };
                Route::Instance(Lease::new(upstream, guard).woke(wake))
            }
            None => Route::Unavailable {
                reason: "its instance ended just now; retry the request".into(),
            },
        }
    }

    fn spawn_instance(
        self: &Arc<Self>,
        n: InstanceNo,
        first: Option<oneshot::Sender<Result<StartReport, StartError>>>,
    ) {
        // On the platform's runtime: the decision may be taken on a gateway
        // thread, whose runtime must only serve traffic.
        let task = self
            .shared
            .runtime
            .spawn(self.clone().run_instance(n, first));
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Starts instance `n`, reports it ready, supervises it until it ends.
    async fn run_instance(
        self: Arc<Self>,
        n: InstanceNo,
        first: Option<oneshot::Sender<Result<StartReport, StartError>>>,
    ) {
        let shared = &self.shared;
        let ctx = StartContext {
            sandbox: &shared.sandbox,
            layers: &self.layers,
            writable: self.writable.clone(),
            uid: self.uid,
            accounts: &self.accounts,
            warm_root: self.stacked_root(),
            mount_point: &shared.mount_point(),
            log: self.log.clone(),
            events: shared.events.clone(),
        };
        let starting = async {
            // A prepared sandbox, when one waits (or is being prepared),
            // makes this a warm start.
            // An id of its own only for a start that makes its sandbox.
            let fresh = || async {
                let id = shared.instance_id(&self.name);
                instance::start(&ctx, &self.spec, &id).await
            };
            match self.take_spare().await {
                Some(Ahead::Held(mut held)) => {
                    // Held a while, it may have been killed meanwhile (the
                    // host's OOM killer, an operator): the start is not
                    // lost for that.
                    if held.is_alive() {
                        instance::start_held(&ctx, &self.spec, held).await
                    } else {
                        warn!(
                            "{}: a sandbox made ahead was gone; starting afresh",
                            self.name
                        );
                        held.discard().await;
                        fresh().await
                    }
                }
                Some(Ahead::Prepared(prepared)) => {
                    instance::start_prepared(&ctx, &self.spec, prepared, Duration::ZERO).await
                }
                None => fresh().await,
            }
        };
        // A shutdown does not wait for a slow start: dropping the start
        // kills the half-started instance (its Drop removes everything).
        let mut shutdown = self.shutdown.subscribe();
        let result = tokio::select! {
            r = starting => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut started = match result {
            Ok(s) => s,
            Err(e) => {
                let reason = e.to_string();
                shared.record_start_failure(&self.name, &e);
                self.decide(|s| ((), s.on_start_failed(n, reason, Instant::now())));
                if let Some(tx) = first {
                    let _ = tx.send(Err(e));
                }
                return;
            }
        };
        let id = started.instance.id.clone();
        let (exit_tx, exit_rx) = watch::channel(None);
        let upstream = Upstream {
            key: id.as_str().into(),
            connect: Arc::new(NetnsConnect {
                netns: started.netns.clone(),
                port: self.spec.port,
                exit: exit_rx,
            }),
            limits: self.exchange_limits(),
        };
        shared.register_upstream(&upstream);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        lock(&self.running).insert(
            n,
            Running {
                upstream,
                stop: stop_tx,
                ready_at: Instant::now(),
            },
        );
        // The freezer first: on_ready may decide to freeze at once.
        if let Some(fz) = started.instance.cgroups().map(|c| c.freezer()) {
            let mut core = lock(&self.core);
            core.freezers.insert(n, fz);
            core.tails.insert(n, started.tail.clone());
        }
        let report = started.report;
        let at = std::time::SystemTime::now();
        self.decide(|s| ((), s.on_ready(n, Instant::now())));
        if first.is_none() {
            let _ = shared.events.send(Event::InstanceStarted {
                service: self.name.clone(),
                instance: id.clone(),
                report,
            });
        }
        if let Some(tx) = first {
            let _ = tx.send(Ok(report));
        }
        // The start's record, once the waiting requests are on their way,
        // and off the async threads: SQLite may wait for its lock.
        let record = skiff_store::StartRecord {
            service: self.name.clone(),
            version: Some(self.version),
            instance: id.clone(),
            at,
            phases: report.phases,
        };
        shared.metrics.started(&self.name, &report.phases);
        let store = shared.store.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.add_start(&record) {
                warn!("{name}: recording a start: {e}");
            }
        });

        let mut shutdown = self.shutdown.subscribe();
        let stopped = tokio::select! {
            exit = started.instance.wait() => Err(exit),
            _ = stop_rx.wait_for(|s| *s) => Ok(()),
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        match stopped {
            Ok(()) => {
                // Stopped, not done answering: a check after its answer
                // ends here, unjudged (what it writes now is its shutdown),
                // and its timer must not freeze it while it stops.
                lock(&self.core).settling.remove(&n);
                if let Err(e) = started.instance.stop(STOP_GRACE).await {
                    warn!("stopping instance {id}: {e}");
                }
                self.forget(n, &id, "stopped".into());
                if !*self.shutdown.borrow() {
                    let _ = shared.events.send(Event::InstanceStopped {
                        service: self.name.clone(),
                        instance: id.clone(),
                    });
                }
            }
            Err(exit) => {
                let exit = exit.unwrap_or(skiff_sandbox::Exit { code: -1 });
                for p in started.pumps.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
                }
                let mut reason = format!("exited ({exit})");
                if instance::was_oom_killed(&started.instance) {
                    let limit = self.spec.limits.memory;
                    reason.push_str(&format!(
                        ": out of memory (limit {})",
                        skiff_model::format_size(limit)
                    ));
                    shared.record(
                        &self.name,
                        skiff_core::EventKind::OomKill,
                        &format!("Instance {id} was killed: {}", instance::oom_message(limit)),
                    );
                }
                if let Some(last) = started.tail.lines().last() {
                    reason.push_str(&format!(", last output: {last:?}"));
                }
                let _ = exit_tx.send(Some(reason.clone()));
                self.forget(n, &id, reason);
                let _ = shared.events.send(Event::Exited {
                    service: self.name.clone(),
                    instance: id.clone(),
                    exit,
                });
                if let Err(e) = started.instance.stop(Duration::ZERO).await {
                    warn!("cleaning up instance {id}: {e}");
                }
            }
        }
    }

    /// The instance is gone: the scaler learns it first (so no request is
    /// sent to it any more), then its handles go.
    fn forget(self: &Arc<Self>, n: InstanceNo, id: &str, reason: String) {
        self.decide(|s| ((), s.on_exit(n, reason, Instant::now())));
        let message = {
            let mut core = lock(&self.core);
            core.freezers.remove(&n);
            let tail = core.tails.remove(&n);
            // Ended by itself while it was being checked after answering
            // (a stopped one's check was dropped before it was stopped):
            // what it wrote until then is all in its tail, its output
            // having been read to the end before this.
            match (core.settling.remove(&n), tail) {
                (Some(before), Some(tail)) if core.checking => {
                    let message = work_after_answer(&tail.since(before.lines), Duration::ZERO);
                    core.checking &= message.is_none();
                    message
                }
                _ => None,
            }
        };
        if let Some(message) = message {
            self.record_work_after_answer(message);
        }
        lock(&self.running).remove(&n);
        self.shared.forget_upstream(id);
    }

    /// The spare, when one is ready; when one is being prepared, waits for
    /// it (a second preparation would only pay the same cost again).
    async fn take_spare(&self) -> Option<Ahead> {
        loop {
            let (mut ready, since) = {
                let mut spare = lock(&self.spare);
                match std::mem::take(&mut *spare) {
                    Spare::None => return None,
                    Spare::Ready(ahead, _) => {
                        self.spare_taken.notify_waiters();
                        return Some(*ahead);
                    }
                    Spare::Preparing(ready, since) => {
                        *spare = Spare::Preparing(ready.clone(), since);
                        (ready, since)
                    }
                }
            };
            let left = (since + SPARE_WAIT).saturating_duration_since(Instant::now());
            let waited = tokio::time::timeout(left, ready.wait_for(|r| *r))
                .await
                .map(|outcome| outcome.is_ok());
            match waited {
                // The slot holds the outcome now.
                Ok(true) => continue,
                // The preparation ended without saying (it cannot, short of
                // a panic): the slot is cleared so that spares go on.
                Ok(false) => {
                    let mut spare = lock(&self.spare);
                    if matches!(&*spare, Spare::Preparing(r, _) if r.same_channel(&ready)) {
                        *spare = Spare::None;
                    }
                    return None;
                }
                // Too slow: this start makes its own.
                Err(_) => return None,
            }
        }
    }

    /// Prepares a sandbox in the background for the next start, unless one
    /// is ready or being prepared (`Scaler::wants_spare` says when).
    fn prepare_spare(self: &Arc<Self>) {
        if no_spares() {
            return;
        }
        let (done, ready) = watch::channel(false);
        // The slot's lock is held until the task is listed: shutdown, which
        // sets its flag and then takes this lock, either sees no
        // preparation, or finds its task and waits for it (it must not
        // outlive the version: its layers are unpinned after).
        let mut spare = lock(&self.spare);
        if !matches!(*spare, Spare::None) || *self.shutdown.borrow() {
            return;
        }
        *spare = Spare::Preparing(ready, Instant::now());
        let this = self.clone();
        // On the platform's runtime: the decision may be taken on a gateway
        // thread.
        let task = self.shared.runtime.spawn(async move {
            this.stack_layers().await;
            let id = this.shared.instance_id(&this.name);
            let limits = instance::cgroup_limits(&this.spec);
            let mount_point = this.shared.mount_point();
            let ctx = StartContext {
                sandbox: &this.shared.sandbox,
                layers: &this.layers,
                writable: this.writable.clone(),
                uid: this.uid,
                accounts: &this.accounts,
                warm_root: this.stacked_root(),
                mount_point: &mount_point,
                log: this.log.clone(),
                events: this.shared.events.clone(),
            };
            let config = instance::sandbox_config(&ctx, &this.spec);
            // The semaphore is never closed; without a permit the build goes
            // ahead all the same.
            let _permit = this.shared.spare_builds.acquire().await.ok();
            let prepared = async {
                let prepared = this.shared.sandbox.prepare(&id, limits).await?;
                if this.writable.is_some() {
                    return Ok(Ahead::Prepared(prepared));
                }
                prepared.hold(&config).await.map(Ahead::Held)
            }
            .await;
            // Stored under the one lock that shutdown takes after setting
            // its flag: the spare is either seen and taken by shutdown, or
            // discarded here.
            let ready_at = Instant::now();
            let unused = {
                let mut spare = lock(&this.spare);
                match prepared {
                    Ok(ahead) if !*this.shutdown.borrow() => {
                        *spare = Spare::Ready(Box::new(ahead), ready_at);
                        None
                    }
                    Ok(ahead) => {
                        *spare = Spare::None;
                        Some(ahead)
                    }
                    Err(e) => {
                        warn!("{}: preparing a sandbox: {e}", this.name);
                        *spare = Spare::None;
                        None
                    }
                }
            };
            let _ = done.send(true);
            if let Some(unused) = unused {
                unused.discard().await;
                return;
            }
            // Unused for long, it goes (the next start then builds its own).
            let mut shutdown = this.shutdown.subscribe();
            let expiry = tokio::time::sleep(spare_keep());
            tokio::pin!(expiry);
            loop {
                let taken = this.spare_taken.notified();
                if !matches!(&*lock(&this.spare), Spare::Ready(_, at) if *at == ready_at) {
                    return;
                }
                tokio::select! {
                    _ = &mut expiry => break,
                    _ = taken => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            let expired = {
                let mut spare = lock(&this.spare);
                match std::mem::take(&mut *spare) {
                    Spare::Ready(ahead, at) if at == ready_at => Some(ahead),
                    other => {
                        *spare = other;
                        None
                    }
                }
            };
            if let Some(ahead) = expired {
                debug!("{}: a sandbox made ahead went unused; discarded", this.name);
                ahead.discard().await;
            }
        });
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        drop(tasks);
        drop(spare);
    }

    /// Freezes and stops idle instances, times out waiters, restarts.
    async fn timer(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let deadline = {
                let mut core = lock(&self.core);
                let next = core.scaler.next_deadline();
                core.armed = next;
                next
            };
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {
                    self.decide(|s| ((), s.on_tick(Instant::now())));
                }
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Each instance's id, CPU time used and memory used now, for the
    /// metrics (those whose groups cannot be read are left out).
    pub(crate) fn usage(&self) -> Vec<(String, Duration, u64)> {
        let freezers: Vec<(InstanceNo, Freezer)> = lock(&self.core)
            .freezers
            .iter()
            .map(|(n, fz)| (*n, fz.clone()))
            .collect();
        let ids: HashMap<InstanceNo, String> = lock(&self.running)
            .iter()
            .map(|(n, r)| (*n, r.upstream.key.to_string()))
            .collect();
        freezers
            .into_iter()
            .filter_map(|(n, fz)| {
                let id = ids.get(&n)?.clone();
                Some((id, fz.cpu_used().ok()?, fz.memory_used().ok()?))
            })
            .collect()
    }

    /// Instances (running, suspended, starting).
    pub fn counts(&self) -> (usize, usize, usize) {
        lock(&self.core).scaler.counts()
    }

    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }

    /// Waits until no request is in flight or waiting, at most `limit`: the
    /// gateway no longer routes to this version, but what it already
    /// accepted is answered. Returns whether it drained in time.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !lock(&self.core).scaler.busy() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How long a replaced version may take to answer what it accepted.
    pub fn drain_limit(&self) -> Duration {
        if self.persistent() {
            // Long-lived connections (WebSocket) never end by themselves.
            Duration::from_secs(30)
        } else {
            self.spec.limits.request_timeout + self.spec.limits.queue_timeout
        }
    }

    /// Stops every instance and waits until they are gone.
    pub async fn shutdown(self: &Arc<Self>) {
        self.decide(|s| ((), s.shutdown()));
        let _ = self.shutdown.send(true);
        let spare = std::mem::take(&mut *lock(&self.spare));
        if let Spare::Ready(spare, _) = spare {
            spare.discard().await;
        }
        loop {
            let tasks: Vec<_> = lock(&self.tasks).drain(..).collect();
            if tasks.is_empty() {
                break;
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

/// The directory of `version`'s writable layer under a persistent
/// service's `dir`.
pub(crate) fn writable_version_dir(dir: &Path, version: i64) -> PathBuf {
    dir.join(format!("v{version}"))
}

/// Removes what a service keeps per version (`dir/v<version>`: a
/// persistent writable layer, with its disk unmounted first; account files)
/// for every version but those in `keep` (the versions that still run).
pub(crate) fn prune_versions(dir: &Path, keep: &[i64]) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.iter().any(|v| name == format!("v{v}")) {
            skiff_sandbox::disk::unmount(&entry.path().join("disk"))?;
            skiff_sandbox::beneath::remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// The writable layer of a persistent service's `version`, under
/// `dir/v<version>`: kept across restarts of that version (crashes,
/// platform restarts); a new version starts with a new one, since the old
/// version still runs beside it until it has drained, and two overlays
/// must never share an upper directory. `/app` in it belongs to the run
/// user, so the service can write its files next to its code.
///
/// The layer is on a disk of its own of `size` bytes (`limits.disk`),
/// `disk.ext4` mounted on `disk/`: past it, the service's writes fail with
/// ENOSPC and the host's disk is untouched. (A layer made before layers had
/// disks, `upper/` and `work/` directly under the version's directory, is
/// used as it is.)
fn writable_layer(dir: &Path, version: i64, size: u64, uid: u32) -> std::io::Result<WritableLayer> {
    use nix::sys::stat::Mode;
    let base = writable_version_dir(dir, version);
    let legacy = base.join("upper").is_dir() && !base.join("disk.ext4").exists();
    let disk_dir = if legacy {
        base.clone()
    } else {
        base.join("disk")
    };
    let layer = WritableLayer {
        upper: disk_dir.join("upper"),
        work: disk_dir.join("work"),
    };
    if legacy {
        // Made before each service had its own user: the files the service
        // wrote belong to the old shared uid; they become the service's.
        // (A tree the walk refuses, e.g. too deep, stays as it is: the
        // service starts, with what it cannot write told by its own errors.)
        if let Err(e) =
            Tree::open(&layer.upper).and_then(|t| t.walk(&[], &mut |e| e.hand_over(RUN_UID, uid)))
        {
            warn!("handing {} over to uid {uid}: {e}", layer.upper.display());
        }
    } else {
        let file = base.join("disk.ext4");
        std::fs::create_dir_all(&disk_dir)?;
        if !file.exists() {
            let mkfs = which("mkfs.ext4").ok_or_else(|| {
                std::io::Error::other(
                    "mkfs.ext4 is not installed: install it with `apt-get install e2fsprogs`",
                )
            })?;
            disk::format(&mkfs, &file, size, disk::Durability::Journaled)?;
            // The service's disk is its own, whatever else fills the host.
            if let Err(e) = disk::reserve(&file) {
                let _ = std::fs::remove_file(&file);
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "the state directory's file system has no room for the service's \
                         disk of {} (limits.disk): {e}; free space there or lower \
                         [limits] disk",
                        skiff_model::format_size(size)
                    ),
                ));
            }
        }
        if !disk::is_mount_point(&disk_dir)? {
            disk::mount_disk(&file, &disk_dir, false)?;
        }
    }
    std::fs::create_dir_all(&layer.work)?;
    std::fs::create_dir_all(&layer.upper)?;
    // What is in the upper directory is the service's: `/app` is made
    // there through the directory's descriptor, and only when absent, so a
    // link the service left in its layer is never followed.
    let upper = Tree::open(&layer.upper)?;
    let app = APP_PATH.trim_start_matches('/');
    match nix::sys::stat::mkdirat(&upper, app, Mode::from_bits_truncate(0o755)) {
        Ok(()) => {
            let fd = upper.open_beneath(Path::new(app), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755))?;
            nix::unistd::fchown(
                &fd,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(uid)),
            )?;
        }
        Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(layer)
}

/// Dropped when a request's response is over: the instance has one request
/// less in flight.
struct LeaseGuard {
    service: Arc<ServiceRuntime>,
    instance: InstanceNo,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.service.release(self.instance);
    }
}

/// Reaches an instance's port from inside its network namespace.
struct NetnsConnect {
    netns: Arc<NetNs>,
    port: u16,
    exit: watch::Receiver<Option<String>>,
}

impl Connect for NetnsConnect {
    fn connect(&self) -> ConnectFuture {
        let (netns, port) = (self.netns.clone(), self.port);
        Box::pin(async move { netns.connect(port).await })
    }

    fn failure(&self) -> FailureFuture {
        let mut exit = self.exit.clone();
        Box::pin(async move {
            // The exit is noticed a moment after the connection breaks.
            let waited =
                tokio::time::timeout(Duration::from_millis(500), exit.wait_for(|e| e.is_some()))
                    .await;
            match waited {
                Ok(Ok(reason)) => reason.clone(),
                _ => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_failed_write_after_answering_is_told_by_its_line() {
        let out = lines(&[
            r#"127.0.0.1 - - [29/Nov/2026 23:50:00] "GET / HTTP/1.1" 200 -"#,
            "saving the database",
            "OSError: [Errno 30] Read-only file system: '/app/db.json'",
        ]);
        let message = work_after_answer(&out, Duration::ZERO).unwrap();
        assert!(message.contains("OSError: [Errno 30]"), "{message}");
        assert!(message.contains("2 lines in all"), "{message}");
    }

    #[test]
    fn request_log_lines_and_a_little_cpu_are_no_work() {
        let out = lines(&["GET /posts 200 3.123 ms - 2", ""]);
        assert_eq!(work_after_answer(&out, Duration::from_millis(2)), None);
        assert_eq!(work_after_answer(&[], Duration::ZERO), None);
    }

    #[test]
    fn cpu_after_answering_is_work_without_a_line() {
        let message = work_after_answer(&[], Duration::from_millis(45)).unwrap();
        assert!(message.contains("of CPU"), "{message}");
    }
}
