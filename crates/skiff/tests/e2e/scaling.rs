//! Instances on demand: CPU suspension while idle, scale to zero and back,
//! scale out, queueing, crashes, and never cutting a request short.

use std::time::{Duration, Instant};

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

fn app(name: &str, limits: &str) -> App {
    App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n[limits]\n{limits}\n"),
        &[("app.py", TICKER_APP)],
    )
}

fn up_one(app: &App) -> Up {
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    up
}

fn ok_body(up: &Up, name: &str, path: &str) -> String {
    let r = up.get(&host(name), path);
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r.body
}

fn ticks(up: &Up, name: &str) -> u64 {
    ok_body(up, name, "/ticks").parse().expect("ticks")
}

/// Waits until skiff says it stopped `name`'s idle instance.
fn wait_stopped_idle(up: &mut Up, name: &str) {
    assert!(
        up.wait_output(
            &format!("{name}: stopped idle instance"),
            Duration::from_secs(15)
        ),
        "the idle instance was not stopped: {}",
        up.stderr()
    );
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Processes in the service's instances beyond a waiting sandbox helper.
/// The service's own processes: those in its cgroups that are not skiff's
/// (a spare's pid 1 and held command are `skiff` until the exec).
fn running_processes(name: &str) -> usize {
    cgroups_named(name)
        .iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup/unified"))
        .map(|p| {
            std::fs::read_to_string(p.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() != "skiff")
                })
                .count()
        })
        .sum()
}

fn frozen(name: &str) -> bool {
    cgroups_named(name)
        .iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup/unified"))
        .any(|p| {
            std::fs::read_to_string(p.join("cgroup.events"))
                .is_ok_and(|e| e.lines().any(|l| l == "frozen 1"))
        })
}

#[test]
fn an_idle_instance_gets_no_cpu_and_a_busy_one_does() {
    let (cold, warm) = (unique("frozen"), unique("awake"));
    let (a, b) = (
        app(&cold, "idle_suspend = \"0s\""),
        app(&warm, "idle_suspend = \"1h\""),
    );
    let mut up = Up::start(&[a.path(), b.path()], &[]);
    assert_eq!(up.wait_urls(2, FIRST_START).len(), 2, "{}", up.stderr());

    let before = (ticks(&up, &cold), ticks(&up, &warm));
    assert!(
        eventually(Duration::from_secs(5), || frozen(&cold)),
        "the idle instance is not frozen"
    );
    std::thread::sleep(Duration::from_millis(600));
    let after = (ticks(&up, &cold), ticks(&up, &warm));
    // The ticker runs every 10 ms: ~60 ticks in 600 ms when awake. Frozen,
    // it gets only what the two requests themselves let it run.
    assert!(
        after.0 - before.0 < 15,
        "frozen ticker advanced {} ticks",
        after.0 - before.0
    );
    assert!(
        after.1 - before.1 > 30,
        "awake ticker advanced only {} ticks",
        after.1 - before.1
    );
    assert!(!frozen(&warm));

    // During a request, the instance runs: its ticker advances.
    let start = ticks(&up, &cold);
    ok_body(&up, &cold, "/slow?ms=500");
    let during = ticks(&up, &cold) - start;
    assert!(
        during > 20,
        "the ticker advanced only {during} ticks during a 500 ms request"
    );
}

#[test]
fn scales_to_zero_and_back_with_a_fresh_tmp() {
    let name = unique("zero");
    let app = app(&name, "idle_stop = \"1s\"");
    let mut up = up_one(&app);
    let first = ok_body(&up, &name, "/tmp-write");
    assert_eq!(ok_body(&up, &name, "/tmp-read"), first);
    wait_stopped_idle(&mut up, &name);
    // Only a spare waits (skiff's own processes, none of the service).
    assert!(
        eventually(Duration::from_secs(5), || running_processes(&name) == 0),
        "instance processes left: {}",
        running_processes(&name)
    );
    // From zero: the request waits for a new instance, then succeeds.
    let second = ok_body(&up, &name, "/");
    assert_ne!(second, first, "a new instance answers");
    assert_eq!(
        ok_body(&up, &name, "/tmp-read"),
        "none",
        "/tmp does not carry over"
    );
}

/// Every instance of an image gets the same stacked root (one overlay,
/// its caches warm from the instances before), which is in no mount
/// table: not the host's, not the platform's. It shows the instance no
/// host path and stays read-only, without set-user-id programs or devices.
#[test]
fn instances_of_an_image_share_one_root_that_no_mount_table_shows() {
    let name = unique("warm");
    // Each instance notes who it is, its root's device and its root's
    // mount, for /tmp-read.
    let start = r#"{ cat /proc/sys/kernel/random/uuid; stat -c %d /; grep \" / / \" /proc/self/mountinfo; } > /tmp/mark; exec python3 app.py"#;
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"{start}\"\n\
             [limits]\nconcurrency = 1\nmax_instances = 2\n"
        ),
        &[("app.py", TICKER_APP)],
    );
    let up = up_one(&app);
    let (port, h) = (up.port.unwrap(), host(&name));
    // Two instances at once (the first busy, the second started for the
    // next request): separate overlays would be two file systems.
    let busy = {
        let h = h.clone();
        std::thread::spawn(move || http_get(port, &h, "/slow?ms=1500"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let second = ok_body(&up, &name, "/tmp-read");
    assert_eq!(busy.join().unwrap().status, 200);
    let first = ok_body(&up, &name, "/tmp-read");
    let (a, b): (Vec<&str>, Vec<&str>) = (first.lines().collect(), second.lines().collect());
    assert!(a.len() == 3 && b.len() == 3, "{first}\n{second}");
    assert_ne!(a[0], b[0], "one instance answered both");
    assert_eq!(a[1], b[1], "two instances, two roots:\n{first}\n{second}");
    let root = b[2];
    // The image's two layers (source snapshot, base) under short names.
    let fields: Vec<&str> = root.split_whitespace().collect();
    assert_eq!(fields.get(8), Some(&"overlay"), "{root}");
    assert!(
        fields[5].split(',').take(3).eq(["ro", "nosuid", "nodev"]),
        "{root}"
    );
    assert!(root.contains("lowerdir=l0:l1,"), "{root}");
    let platform = std::fs::read_to_string(format!("/proc/{}/mountinfo", up.pid())).unwrap();
    assert!(
        !platform.lines().any(|l| l.contains(" - overlay ")),
        "the platform's mount table holds an overlay:\n{platform}"
    );
    assert!(mounts_with("lowerdir=l0").is_empty());
    // The layers were named in a directory of the platform's only while
    // they were stacked.
    let staging = up.state_dir().join("warm");
    let left: Vec<_> = std::fs::read_dir(&staging).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A spare that no start takes goes after a while (`SKIFF_SPARE_KEEP`,
/// 10 minutes unless set): a service left at zero holds no sandbox for
/// good. The next request still gets an instance, started afresh.
#[test]
fn an_unused_spare_goes_and_the_next_start_makes_its_own() {
    let name = unique("expire");
    let app = app(&name, "idle_stop = \"1s\"");
    let mut up = Up::start_wrapped(&["env", "SKIFF_SPARE_KEEP=2s"], &[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    ok_body(&up, &name, "/");
    wait_stopped_idle(&mut up, &name);
    let groups = || cgroups_named(&name);
    assert!(
        eventually(Duration::from_secs(5), || running_processes(&name) == 0
            && !groups().is_empty()),
        "no spare waits: {}",
        up.stderr()
    );
    assert!(
        eventually(Duration::from_secs(10), || groups().is_empty()),
        "the spare is still there: {:?}",
        groups()
    );
    ok_body(&up, &name, "/");
}

/// The spare of a service at zero is built ahead and waits; killed while
/// it waits (the host's OOM killer, an operator), the next start does not
/// fail for it: it starts afresh.
#[test]
fn a_spare_killed_while_it_waits_gives_way_to_a_fresh_start() {
    let name = unique("spare");
    let app = app(&name, "idle_stop = \"1s\"");
    let mut up = up_one(&app);
    ok_body(&up, &name, "/");
    wait_stopped_idle(&mut up, &name);
    // The spare: a group of the service's with skiff's own processes only.
    let spare = || {
        cgroups_named(&name).into_iter().find(|p| {
            p.starts_with("/sys/fs/cgroup/unified")
                && std::fs::read_to_string(p.join("cgroup.procs"))
                    .is_ok_and(|procs| procs.lines().count() > 0)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || running_processes(&name) == 0
            && spare().is_some()),
        "no spare waits: {}",
        up.stderr()
    );
    let group = spare().unwrap();
    // Built and waiting: its command's process has taken the run user (the
    // last steps before the wait take microseconds).
    let held = || {
        std::fs::read_to_string(group.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
                    st.lines().any(|l| {
                        l.starts_with("Uid:")
                            && l.split_whitespace().nth(1).is_some_and(|u| u != "0")
                    })
                })
            })
    };
    assert!(
        eventually(Duration::from_secs(5), held),
        "the spare was never built whole"
    );
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(group.join("cgroup.kill"), "1").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(group.join("cgroup.procs")).map_or(true, |p| p.is_empty())
        }),
        "the spare's processes outlived cgroup.kill"
    );
    assert!(!ok_body(&up, &name, "/").is_empty());
    assert!(
        up.wait_output("was gone; starting afresh", Duration::from_secs(5)),
        "{}",
        up.stderr()
    );
}

#[test]
fn scales_out_when_instances_are_busy() {
    let name = unique("out");
    let app = app(&name, "concurrency = 1\nmax_instances = 3");
    let up = up_one(&app);
    let port = up.port.unwrap();
    let h = host(&name);
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || http_get(port, &h, "/slow?ms=1500"))
        })
        .collect();
    let tokens: std::collections::HashSet<String> = handles
        .into_iter()
        .map(|t| {
            let r = t.join().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            r.body
        })
        .collect();
    assert_eq!(tokens.len(), 3, "three instances served: {tokens:?}");
}

#[test]
fn at_capacity_a_waiting_request_times_out_with_503() {
    let name = unique("full");
    let app = app(
        &name,
        "concurrency = 1\nmax_instances = 1\nqueue_timeout = \"1s\"",
    );
    let up = up_one(&app);
    let port = up.port.unwrap();
    let h = host(&name);
    let slow = {
        let h = h.clone();
        std::thread::spawn(move || http_get(port, &h, "/slow?ms=3000"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let r = http_get(port, &h, "/");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-skiff-error"), Some("service-unavailable"));
    assert!(r.body.contains("at capacity"), "{r:?}");
    assert!(r.body.contains("limits.queue_timeout"), "{r:?}");
    assert_eq!(
        slow.join().unwrap().status,
        200,
        "the running request is not disturbed"
    );
}

#[test]
fn a_request_in_flight_is_never_cut_by_scale_down() {
    let name = unique("drain");
    let app = app(&name, "idle_stop = \"1s\"");
    let up = up_one(&app);
    let token = ok_body(&up, &name, "/");
    // Longer than idle_stop: the instance must not be stopped under it.
    let slow = ok_body(&up, &name, "/slow?ms=2500");
    assert_eq!(slow, token);
}

#[test]
fn repeated_crashes_back_off_and_say_so() {
    let name = unique("crashy");
    let app = app(&name, "");
    let up = up_one(&app);
    for crash in 1..=3 {
        if crash > 1 {
            // The crashed instance is replaced on demand.
            ok_body(&up, &name, "/");
        }
        let r = up.get(&host(&name), "/exit?code=9");
        assert_eq!(r.status, 502, "{r:?}");
        assert!(r.body.contains("exited (exit code 9)"), "{r:?}");
        assert!(eventually(Duration::from_secs(5), || {
            up.stderr().matches("exited (exit code 9)").count() == crash
        }));
    }
    // Three in a row: no hot restart loop; the client is told why.
    let r = up.get(&host(&name), "/");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("keeps crashing"), "{r:?}");
    assert!(r.body.contains("exit code 9"), "{r:?}");
}
