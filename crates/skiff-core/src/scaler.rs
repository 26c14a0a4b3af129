//! When instances start, freeze, thaw and stop: pure decisions, fed by
//! events and a clock, returning actions. No I/O, no sleeping, no tokio:
//! `service.rs` carries the actions out. Tests drive it with made-up times.
//!
//! Rules (docs/contract.md §2, the README's `[limits]`):
//! - a request goes to a ready instance with fewer than `concurrency`
//!   requests in flight, preferring a running one (no thaw) and then the
//!   busiest (so that others go idle and can be stopped);
//! - with none free, the request waits in a bounded queue and, when the
//!   instances already starting cannot take the waiting requests, another
//!   instance is started, up to `max_instances`;
//! - serverless: an instance with nothing in flight is frozen after
//!   `idle_suspend` and stopped after `idle_stop`; never one with a request
//!   in flight;
//! - persistent: one instance always runs; it is restarted when it dies;
//! - an instance that dies unexpectedly counts as a crash; after
//!   [`CRASHES_BEFORE_BACKOFF`] crashes in a row, starts back off
//!   exponentially, and requests that cannot be served are told why.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub type InstanceNo = u64;
pub type WaiterId = u64;

/// Crashes in a row after which starts are delayed.
pub const CRASHES_BEFORE_BACKOFF: u32 = 3;
/// The first delay; it doubles with each further crash.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// An instance that ran this long before dying ends a crash streak.
const STABLE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub concurrency: u32,
    pub max_instances: u32,
    pub idle_suspend: Duration,
    pub idle_stop: Duration,
    pub queue_timeout: Duration,
    pub max_queue: u32,
    pub persistent: bool,
}

/// Why a request was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Every instance is busy, no more may start, and the queue is full.
    QueueFull {
        max_instances: u32,
        max_queue: u32,
    },
    /// The request waited `queue_timeout` for a free instance.
    QueueTimeout {
        waited: Duration,
        max_instances: u32,
    },
    /// The instance started for it failed to start.
    StartFailed(String),
    /// The service keeps crashing; starts are paused.
    CrashLoop {
        last: String,
        retry_in: Duration,
    },
    ShuttingDown,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueueFull {
                max_instances,
                max_queue,
            } => write!(
                f,
                "it is at capacity: all {max_instances} instances (limits.max_instances) are busy \
                 and {max_queue} requests (limits.max_queue) are already waiting. Raise \
                 limits.max_instances or limits.concurrency, or retry later"
            ),
            Self::QueueTimeout {
                waited,
                max_instances,
            } => write!(
                f,
                "it is at capacity: the request waited {} (limits.queue_timeout) for one of its \
                 {max_instances} instances (limits.max_instances) to be free. Raise \
                 limits.max_instances or limits.concurrency, or retry later",
                skiff_model::format_duration(*waited)
            ),
            Self::StartFailed(reason) => write!(f, "a new instance failed to start: {reason}"),
            Self::CrashLoop { last, retry_in } => write!(
                f,
                "it keeps crashing ({CRASHES_BEFORE_BACKOFF} or more times in a row; the last \
                 time: {last}). skiff waits {} before starting it again; see `skiff logs`",
                skiff_model::format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
            ),
            Self::ShuttingDown => write!(f, "the platform is shutting down"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(InstanceNo),
    /// Stop gracefully; it has nothing in flight and gets nothing new.
    Stop(InstanceNo),
    Freeze(InstanceNo),
    Thaw(InstanceNo),
    /// Hand a waiting request to an instance (its in-flight count is taken).
    Dispatch {
        waiter: WaiterId,
        instance: InstanceNo,
    },
    Reject {
        waiter: WaiterId,
        reason: Rejection,
    },
}

/// What happened to one request right away.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Go to this instance now (it has been counted as in flight).
    Dispatched(InstanceNo),
    /// Wait for a `Dispatch` or `Reject` action for this waiter.
    Queued(WaiterId),
    Rejected(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Stopping,
}

#[derive(Debug, Clone)]
struct Inst {
    phase: Phase,
    in_flight: u32,
    frozen: bool,
    /// When the last request ended (or the instance became ready).
    idle_since: Instant,
    ready_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Scaler {
    cfg: ScaleConfig,
    instances: BTreeMap<InstanceNo, Inst>,
    waiters: VecDeque<(WaiterId, Instant)>,
    next_instance: InstanceNo,
    next_waiter: WaiterId,
    crash_streak: u32,
    backoff_until: Option<Instant>,
    last_failure: Option<String>,
    shutting_down: bool,
    /// Whether any instance ever became ready. Until then a failure is the
    /// deploy's to report, not a reason to start again.
    ever_ready: bool,
}

impl Scaler {
    pub fn new(cfg: ScaleConfig) -> Self {
        Self {
            cfg,
            instances: BTreeMap::new(),
            waiters: VecDeque::new(),
            next_instance: 1,
            next_waiter: 1,
            crash_streak: 0,
            backoff_until: None,
            last_failure: None,
            shutting_down: false,
            ever_ready: false,
        }
    }

    /// Starts the first instance (a deploy waits for it to be ready).
    pub fn start_first(&mut self, now: Instant) -> (InstanceNo, Vec<Action>) {
        let n = self.new_instance(now);
        (n, vec![Action::Start(n)])
    }

    fn new_instance(&mut self, now: Instant) -> InstanceNo {
        let n = self.next_instance;
        self.next_instance += 1;
        self.instances.insert(
            n,
            Inst {
                phase: Phase::Starting,
                in_flight: 0,
                frozen: false,
                idle_since: now,
                ready_at: None,
            },
        );
        n
    }

    fn in_backoff(&self, now: Instant) -> Option<Duration> {
        self.backoff_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Instances starting or ready (not stopping).
    fn live(&self) -> usize {
        self.instances
            .values()
            .filter(|i| i.phase != Phase::Stopping)
            .count()
    }

    /// Whether a sandbox should be prepared ahead for the next start: when
    /// no instance is left (the next request starts one from zero), and
    /// when every instance is ready and full while another may start (the
    /// next request scales out). Not while one starts already, nor once
    /// the version is shutting down.
    pub fn wants_spare(&self) -> bool {
        if self.shutting_down {
            return false;
        }
        let mut live = self
            .instances
            .values()
            .filter(|i| i.phase != Phase::Stopping)
            .peekable();
        if live.peek().is_none() {
            return true;
        }
        let mut count = 0;
        for i in live {
            if i.phase != Phase::Ready || i.in_flight < self.cfg.concurrency {
                return false;
            }
            count += 1;
        }
        count < self.cfg.max_instances as usize
    }

    /// A request arrived.
    pub fn on_request(&mut self, now: Instant) -> (Outcome, Vec<Action>) {
        if self.shutting_down {
            return (Outcome::Rejected(Rejection::ShuttingDown), vec![]);
        }
        let concurrency = self.cfg.concurrency;
        let best = self
            .instances
            .iter()
            .filter(|(_, i)| i.phase == Phase::Ready && i.in_flight < concurrency)
            .min_by_key(|(n, i)| (i.frozen, std::cmp::Reverse(i.in_flight), **n))
            .map(|(n, _)| *n);
        if let Some(n) = best {
            let mut actions = Vec::new();
            self.take(n, &mut actions);
            return (Outcome::Dispatched(n), actions);
        }
        if self.waiters.len() >= self.cfg.max_queue as usize {
            return (
                Outcome::Rejected(Rejection::QueueFull {
                    max_instances: self.cfg.max_instances,
                    max_queue: self.cfg.max_queue,
                }),
                vec![],
            );
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.push_back((id, now));
        let mut actions = Vec::new();
        self.provision(now, &mut actions);
        match actions
            .iter()
            .position(|a| matches!(a, Action::Reject { waiter, .. } if *waiter == id))
        {
            Some(i) => {
                let Action::Reject { reason, .. } = actions.remove(i) else {
                    unreachable!("position matched a Reject")
                };
                (Outcome::Rejected(reason), actions)
            }
            None => (Outcome::Queued(id), actions),
        }
    }

    /// Counts a request in flight on `n`, thawing it if needed.
    fn take(&mut self, n: InstanceNo, actions: &mut Vec<Action>) {
        if let Some(inst) = self.instances.get_mut(&n) {
            inst.in_flight += 1;
            if inst.frozen {
                inst.frozen = false;
                actions.push(Action::Thaw(n));
            }
        }
    }

    /// Starts instances for the waiting requests, or tells them why not.
    fn provision(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let starting = self
            .instances
            .values()
            .filter(|i| i.phase == Phase::Starting)
            .count();
        let coming = starting * self.cfg.concurrency as usize;
        if self.waiters.len() <= coming {
            return;
        }
        if let Some(retry_in) = self.in_backoff(now) {
            // Nothing is coming for them: say so now rather than at the timeout.
            let ready = self.instances.values().any(|i| i.phase == Phase::Ready);
            if starting == 0 && !ready {
                let last = self.last_failure.clone().unwrap_or_default();
                for (waiter, _) in self.waiters.drain(..) {
                    actions.push(Action::Reject {
                        waiter,
                        reason: Rejection::CrashLoop {
                            last: last.clone(),
                            retry_in,
                        },
                    });
                }
            }
            return;
        }
        if self.live() < self.cfg.max_instances as usize {
            let n = self.new_instance(now);
            actions.push(Action::Start(n));
        }
    }

    /// A request on `n` ended (its response was sent or abandoned).
    pub fn on_done(&mut self, n: InstanceNo, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(inst) = self.instances.get_mut(&n) else {
            return actions; // the instance died meanwhile
        };
        inst.in_flight = inst.in_flight.saturating_sub(1);
        if inst.phase == Phase::Ready {
            if let Some((waiter, _)) = self.waiters.pop_front() {
                self.take(n, &mut actions);
                actions.push(Action::Dispatch {
                    waiter,
                    instance: n,
                });
                return actions;
            }
        }
        self.went_idle(n, now, &mut actions);
        actions
    }

    fn went_idle(&mut self, n: InstanceNo, now: Instant, actions: &mut Vec<Action>) {
        let cfg = &self.cfg;
        if let Some(inst) = self.instances.get_mut(&n) {
            if inst.in_flight == 0 && inst.phase == Phase::Ready {
                inst.idle_since = now;
                if !cfg.persistent && cfg.idle_suspend.is_zero() && !inst.frozen {
                    inst.frozen = true;
                    actions.push(Action::Freeze(n));
                }
            }
        }
    }

    /// Instance `n` answered its health check.
    pub fn on_ready(&mut self, n: InstanceNo, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(inst) = self.instances.get_mut(&n) else {
            return actions;
        };
        if inst.phase != Phase::Starting {
            return actions;
        }
        inst.phase = Phase::Ready;
        inst.ready_at = Some(now);
        self.ever_ready = true;
        if self.shutting_down {
            inst.phase = Phase::Stopping;
            actions.push(Action::Stop(n));
            return actions;
        }
        while self.instances[&n].in_flight < self.cfg.concurrency {
            let Some((waiter, _)) = self.waiters.pop_front() else {
                break;
            };
            self.take(n, &mut actions);
            actions.push(Action::Dispatch {
                waiter,
                instance: n,
            });
        }
        self.went_idle(n, now, &mut actions);
        actions
    }

    /// Instance `n` did not become ready.
    pub fn on_start_failed(&mut self, n: InstanceNo, reason: String, now: Instant) -> Vec<Action> {
        self.instances.remove(&n);
        self.crashed(reason.clone(), now);
        let mut actions = Vec::new();
        let others = self.instances.values().any(|i| i.phase != Phase::Stopping);
        if !others {
            for (waiter, _) in self.waiters.drain(..) {
                actions.push(Action::Reject {
                    waiter,
                    reason: Rejection::StartFailed(reason.clone()),
                });
            }
        }
        self.keep_persistent_running(now, &mut actions);
        actions
    }

    /// Instance `n` ended. `reason` says how (for crash reports).
    pub fn on_exit(&mut self, n: InstanceNo, reason: String, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(inst) = self.instances.remove(&n) else {
            return actions;
        };
        if inst.phase != Phase::Stopping && !self.shutting_down {
            if inst
                .ready_at
                .is_some_and(|t| now.duration_since(t) >= STABLE_AFTER)
            {
                self.crash_streak = 0;
            }
            self.crashed(reason, now);
            self.provision(now, &mut actions);
            self.keep_persistent_running(now, &mut actions);
        }
        actions
    }

    fn crashed(&mut self, reason: String, now: Instant) {
        self.crash_streak += 1;
        self.last_failure = Some(reason);
        if self.crash_streak >= CRASHES_BEFORE_BACKOFF {
            let doublings = (self.crash_streak - CRASHES_BEFORE_BACKOFF).min(16);
            let delay = (BACKOFF_BASE * 2u32.pow(doublings)).min(BACKOFF_MAX);
            self.backoff_until = Some(now + delay);
        }
    }

    fn keep_persistent_running(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.cfg.persistent
            && self.ever_ready
            && !self.shutting_down
            && self.live() == 0
            && self.in_backoff(now).is_none()
        {
            let n = self.new_instance(now);
            actions.push(Action::Start(n));
        }
    }

    /// Time passed: freeze and stop idle instances, time out waiters,
    /// restart after a backoff.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(&(waiter, since)) = self.waiters.front() {
            if now.duration_since(since) < self.cfg.queue_timeout {
                break;
            }
            self.waiters.pop_front();
            actions.push(Action::Reject {
                waiter,
                reason: Rejection::QueueTimeout {
                    waited: self.cfg.queue_timeout,
                    max_instances: self.cfg.max_instances,
                },
            });
        }
        if !self.cfg.persistent {
            for (n, inst) in self.instances.iter_mut() {
                if inst.phase != Phase::Ready || inst.in_flight > 0 {
                    continue;
                }
                let idle = now.duration_since(inst.idle_since);
                if idle >= self.cfg.idle_stop {
                    inst.phase = Phase::Stopping;
                    actions.push(Action::Stop(*n));
                } else if !inst.frozen && idle >= self.cfg.idle_suspend {
                    inst.frozen = true;
                    actions.push(Action::Freeze(*n));
                }
            }
        }
        if !self.waiters.is_empty() {
            self.provision(now, &mut actions);
        }
        self.keep_persistent_running(now, &mut actions);
        actions
    }

    /// When `on_tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(&(_, since)) = self.waiters.front() {
            consider(since + self.cfg.queue_timeout);
        }
        if !self.cfg.persistent {
            for inst in self.instances.values() {
                if inst.phase == Phase::Ready && inst.in_flight == 0 {
                    if !inst.frozen {
                        consider(inst.idle_since + self.cfg.idle_suspend);
                    }
                    consider(inst.idle_since + self.cfg.idle_stop);
                }
            }
        }
        if let Some(until) = self.backoff_until {
            let waiting = !self.waiters.is_empty();
            if (self.cfg.persistent && self.live() == 0) || waiting {
                consider(until);
            }
        }
        next
    }

    /// Whether any request is in flight or waiting: a version being
    /// replaced is stopped only once this is false (or its drain times out).
    pub fn busy(&self) -> bool {
        !self.waiters.is_empty() || self.instances.values().any(|i| i.in_flight > 0)
    }

    /// Stop everything; turn every waiter away.
    pub fn shutdown(&mut self) -> Vec<Action> {
        self.shutting_down = true;
        let mut actions: Vec<Action> = self
            .waiters
            .drain(..)
            .map(|(waiter, _)| Action::Reject {
                waiter,
                reason: Rejection::ShuttingDown,
            })
            .collect();
        for (n, inst) in self.instances.iter_mut() {
            if inst.phase == Phase::Ready {
                inst.phase = Phase::Stopping;
                actions.push(Action::Stop(*n));
            }
        }
        actions
    }

    /// Counts for status displays: (ready running, ready frozen, starting).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for i in self.instances.values() {
            match (i.phase, i.frozen) {
                (Phase::Ready, false) => c.0 += 1,
                (Phase::Ready, true) => c.1 += 1,
                (Phase::Starting, _) => c.2 += 1,
                (Phase::Stopping, _) => {}
            }
        }
        c
    }
}

#[cfg(test)]
#[path = "scaler_tests.rs"]
mod tests;
