use super::*;

fn cfg() -> ScaleConfig {
    ScaleConfig {
        concurrency: 1,
        max_instances: 3,
        idle_suspend: Duration::ZERO,
        idle_stop: Duration::from_secs(300),
        queue_timeout: Duration::from_secs(30),
        max_queue: 2,
        persistent: false,
    }
}

fn secs(t0: Instant, s: u64) -> Instant {
    t0 + Duration::from_secs(s)
}

/// A scaler with instance 1 deployed and ready.
fn deployed(cfg: ScaleConfig, t0: Instant) -> Scaler {
    let mut s = Scaler::new(cfg);
    let (n, actions) = s.start_first(t0);
    assert_eq!((n, actions), (1, vec![Action::Start(1)]));
    s.on_ready(1, t0);
    s
}

#[test]
fn an_idle_instance_is_frozen_at_once_and_thawed_for_the_next_request() {
    let t0 = Instant::now();
    let mut s = Scaler::new(cfg());
    s.start_first(t0);
    assert_eq!(s.on_ready(1, t0), vec![Action::Freeze(1)]);
    assert_eq!(s.counts(), (0, 1, 0));
    let (out, actions) = s.on_request(secs(t0, 1));
    assert_eq!(out, Outcome::Dispatched(1));
    assert_eq!(actions, vec![Action::Thaw(1)]);
    assert_eq!(s.on_done(1, secs(t0, 2)), vec![Action::Freeze(1)]);
}

#[test]
fn idle_suspend_waits_before_freezing() {
    let t0 = Instant::now();
    let mut s = deployed(
        ScaleConfig {
            idle_suspend: Duration::from_secs(10),
            ..cfg()
        },
        t0,
    );
    assert_eq!(s.next_deadline(), Some(secs(t0, 10)));
    assert!(s.on_tick(secs(t0, 9)).is_empty());
    assert_eq!(s.on_tick(secs(t0, 10)), vec![Action::Freeze(1)]);
    assert_eq!(
        s.next_deadline(),
        Some(secs(t0, 300)),
        "next: the idle stop"
    );
}

#[test]
fn scale_to_zero_and_back() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    assert_eq!(s.on_tick(secs(t0, 299)), vec![]);
    assert_eq!(s.on_tick(secs(t0, 300)), vec![Action::Stop(1)]);
    assert_eq!(s.on_exit(1, "stopped".into(), secs(t0, 301)), vec![]);
    assert_eq!(s.counts(), (0, 0, 0));

    let (out, actions) = s.on_request(secs(t0, 400));
    assert_eq!(out, Outcome::Queued(1));
    assert_eq!(actions, vec![Action::Start(2)]);
    assert_eq!(
        s.on_ready(2, secs(t0, 401)),
        vec![Action::Dispatch {
            waiter: 1,
            instance: 2
        }],
        "the waiting request gets the new instance, which is not frozen"
    );
}

#[test]
fn scales_out_up_to_max_instances_then_queues_then_refuses() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    let t = secs(t0, 1);
    assert_eq!(
        s.on_request(t),
        (Outcome::Dispatched(1), vec![Action::Thaw(1)])
    );
    assert_eq!(
        s.on_request(t),
        (Outcome::Queued(1), vec![Action::Start(2)])
    );
    assert_eq!(
        s.on_request(t),
        (Outcome::Queued(2), vec![Action::Start(3)])
    );
    // max_instances reached: the third waiter waits without a new start...
    let (out, actions) = s.on_request(t);
    assert_eq!(
        (out, actions),
        (
            Outcome::Rejected(Rejection::QueueFull {
                max_instances: 3,
                max_queue: 2
            }),
            vec![]
        )
    );
    // ...and a finished request hands instance 1 to the first waiter.
    assert_eq!(
        s.on_done(1, secs(t0, 2)),
        vec![Action::Dispatch {
            waiter: 1,
            instance: 1
        }]
    );
    assert_eq!(
        s.on_ready(2, secs(t0, 3)),
        vec![Action::Dispatch {
            waiter: 2,
            instance: 2
        }]
    );
    // Instance 3 finds nobody waiting and is frozen.
    assert_eq!(s.on_ready(3, secs(t0, 3)), vec![Action::Freeze(3)]);
}

#[test]
fn requests_prefer_a_running_instance_and_pack_onto_the_busiest() {
    let t0 = Instant::now();
    let mut s = deployed(
        ScaleConfig {
            concurrency: 10,
            ..cfg()
        },
        t0,
    );
    // Instance 2 comes up while 1 is busy.
    s.on_request(t0);
    let (n, _) = (s.new_instance(t0), ());
    s.on_ready(n, t0);
    assert_eq!(s.counts(), (1, 1, 0), "1 running, 2 frozen");
    assert_eq!(s.on_request(t0), (Outcome::Dispatched(1), vec![]));
}

#[test]
fn waiting_requests_time_out_with_the_reason() {
    let t0 = Instant::now();
    let mut s = deployed(
        ScaleConfig {
            max_instances: 1,
            ..cfg()
        },
        t0,
    );
    s.on_request(t0);
    assert_eq!(s.on_request(t0), (Outcome::Queued(1), vec![]));
    assert_eq!(s.next_deadline(), Some(secs(t0, 30)));
    assert_eq!(
        s.on_tick(secs(t0, 30)),
        vec![Action::Reject {
            waiter: 1,
            reason: Rejection::QueueTimeout {
                waited: Duration::from_secs(30),
                max_instances: 1
            }
        }]
    );
}

#[test]
fn never_freezes_or_stops_with_a_request_in_flight() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    s.on_request(t0);
    assert_eq!(s.on_tick(secs(t0, 10_000)), vec![]);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn a_crash_is_replaced_on_demand_and_repeated_crashes_back_off() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    // Crashes 1 and 2: the next request starts a new instance at once.
    for (crash, next) in [(1, 2), (2, 3)] {
        s.on_request(t0);
        assert_eq!(s.on_exit(crash, format!("exit code {crash}"), t0), vec![]);
        let (out, actions) = s.on_request(t0);
        assert!(matches!(out, Outcome::Queued(_)), "{out:?}");
        assert_eq!(actions, vec![Action::Start(next)]);
        s.on_ready(next, t0);
        s.on_done(next, t0);
    }
    // Crash 3: starts are delayed; a request is told why at once.
    s.on_request(t0);
    s.on_exit(3, "exit code 3".into(), t0);
    let (out, actions) = s.on_request(t0);
    assert_eq!(
        out,
        Outcome::Rejected(Rejection::CrashLoop {
            last: "exit code 3".into(),
            retry_in: Duration::from_secs(1)
        })
    );
    assert!(actions.is_empty());
    // After the backoff, a request starts an instance again.
    let (out, actions) = s.on_request(secs(t0, 1));
    assert!(matches!(out, Outcome::Queued(_)), "{out:?}");
    assert_eq!(actions, vec![Action::Start(4)]);
    // A fourth crash doubles the delay.
    s.on_start_failed(
        4,
        "Port Some(8080) is not being listened to".into(),
        secs(t0, 2),
    );
    let (out, _) = s.on_request(secs(t0, 2));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::CrashLoop { retry_in, .. }) if retry_in == Duration::from_secs(2)),
        "{out:?}"
    );
}

#[test]
fn a_long_stable_run_ends_the_crash_streak() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    for n in 1..=2 {
        s.on_exit(n, "boom".into(), t0);
        s.on_request(t0);
        s.on_ready(n + 1, t0);
        s.on_done(n + 1, t0);
    }
    // Instance 3 runs for two minutes, then dies: no backoff.
    s.on_exit(3, "boom".into(), secs(t0, 120));
    let (out, actions) = s.on_request(secs(t0, 120));
    assert!(matches!(out, Outcome::Queued(_)));
    assert_eq!(actions, vec![Action::Start(4)]);
}

#[test]
fn a_failed_start_turns_its_waiters_away_with_the_reason() {
    let t0 = Instant::now();
    let mut s = deployed(cfg(), t0);
    s.on_tick(secs(t0, 300));
    s.on_exit(1, "stopped".into(), secs(t0, 300));
    let (out, _) = s.on_request(secs(t0, 301));
    let Outcome::Queued(w) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        s.on_start_failed(2, "no port".into(), secs(t0, 302)),
        vec![Action::Reject {
            waiter: w,
            reason: Rejection::StartFailed("no port".into())
        }]
    );
}

#[test]
fn persistent_never_freezes_never_idles_out_and_restarts() {
    let t0 = Instant::now();
    let mut s = Scaler::new(ScaleConfig {
        persistent: true,
        ..cfg()
    });
    s.start_first(t0);
    assert_eq!(s.on_ready(1, t0), vec![]);
    assert_eq!(s.on_tick(secs(t0, 100_000)), vec![]);
    assert_eq!(s.next_deadline(), None);
    // It dies: it is restarted right away, without waiting for a request.
    assert_eq!(s.on_exit(1, "exit 1".into(), t0), vec![Action::Start(2)]);
    assert_eq!(
        s.on_start_failed(2, "exit 1".into(), t0),
        vec![Action::Start(3)]
    );
    // Third failure in a row: the restart waits for the backoff.
    assert_eq!(s.on_start_failed(3, "exit 1".into(), t0), vec![]);
    assert_eq!(s.next_deadline(), Some(secs(t0, 1)));
    assert_eq!(s.on_tick(secs(t0, 1)), vec![Action::Start(4)]);
}

#[test]
fn shutdown_stops_everything_and_turns_waiters_away() {
    let t0 = Instant::now();
    let mut s = deployed(
        ScaleConfig {
            max_instances: 2,
            ..cfg()
        },
        t0,
    );
    s.on_request(t0);
    let (out, actions) = s.on_request(t0);
    assert_eq!((out, actions), (Outcome::Queued(1), vec![Action::Start(2)]));
    assert_eq!(
        s.shutdown(),
        vec![
            Action::Reject {
                waiter: 1,
                reason: Rejection::ShuttingDown
            },
            Action::Stop(1)
        ]
    );
    assert_eq!(
        s.on_ready(2, t0),
        vec![Action::Stop(2)],
        "a late start is stopped too"
    );
    assert_eq!(
        s.on_request(t0).0,
        Outcome::Rejected(Rejection::ShuttingDown)
    );
}

#[test]
fn rejections_explain_themselves() {
    let full = Rejection::QueueFull {
        max_instances: 3,
        max_queue: 2,
    }
    .to_string();
    assert!(
        full.contains("at capacity") && full.contains("limits.max_instances"),
        "{full}"
    );
    let crash = Rejection::CrashLoop {
        last: "exit code 5".into(),
        retry_in: Duration::from_millis(1500),
    }
    .to_string();
    assert!(
        crash.contains("keeps crashing") && crash.contains("exit code 5"),
        "{crash}"
    );
}

#[test]
fn a_failed_deploy_of_a_persistent_service_is_not_retried() {
    let t0 = Instant::now();
    let mut s = Scaler::new(ScaleConfig {
        persistent: true,
        ..cfg()
    });
    s.start_first(t0);
    assert_eq!(s.on_start_failed(1, "no port".into(), t0), vec![]);
    assert_eq!(s.on_tick(secs(t0, 100)), vec![]);
}

/// A sandbox is prepared ahead when the next request would start an
/// instance: once the last one's stop is decided (not after it ends), and
/// when every instance is full and another may start.
#[test]
fn a_spare_is_wanted_before_the_start_that_needs_it() {
    let t0 = Instant::now();
    let mut s = deployed(
        ScaleConfig {
            idle_stop: Duration::from_secs(10),
            ..cfg()
        },
        t0,
    );
    assert!(
        !s.wants_spare(),
        "one idle instance serves the next request"
    );
    // Full (concurrency 1), with room for two more: the next one scales out.
    let (out, _) = s.on_request(secs(t0, 1));
    assert_eq!(out, Outcome::Dispatched(1));
    assert!(s.wants_spare());
    // Scaling out: while the second starts, no other spare.
    let (out, actions) = s.on_request(secs(t0, 1));
    assert!(matches!(out, Outcome::Queued(_)), "{out:?}");
    assert_eq!(actions, vec![Action::Start(2)]);
    assert!(!s.wants_spare());
    s.on_ready(2, secs(t0, 1));
    assert!(s.wants_spare(), "both full, a third may start");
    s.on_done(1, secs(t0, 2));
    s.on_done(2, secs(t0, 2));
    assert!(!s.wants_spare());
    // The idle stop decided: the spare is wanted now, while they stop.
    assert_eq!(
        s.on_tick(secs(t0, 12)),
        vec![Action::Stop(1), Action::Stop(2)]
    );
    assert!(s.wants_spare());
    s.on_exit(1, "stopped".into(), secs(t0, 12));
    s.on_exit(2, "stopped".into(), secs(t0, 12));
    assert!(s.wants_spare());
    // At max_instances, nothing more may start.
    let mut full = deployed(
        ScaleConfig {
            max_instances: 1,
            ..cfg()
        },
        t0,
    );
    full.on_request(secs(t0, 1));
    assert!(!full.wants_spare());
    // A version shutting down wants none.
    let mut gone = deployed(cfg(), t0);
    gone.shutdown();
    assert!(!gone.wants_spare());
}
