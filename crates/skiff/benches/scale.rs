//! Instances-on-demand benchmark (run as root, base image cached):
//!
//!     cargo bench -p skiff --bench scale
//!
//! Each figure against a baseline from the same run:
//! 1. resume latency: a request to a frozen instance (idle_suspend = 0s)
//!    against one to a running instance (idle_suspend = 1h), same app;
//! 2. cold start from zero to the first 200, for a minimal native binary
//!    and a minimal Python app, against the same start command run
//!    directly (`bash -c`, as the contract starts it; Python from the base
//!    image by chroot); also with prepared sandboxes turned off
//!    (`SKIFF_NO_SPARE=1`): the share when no spare is ready;
//! 3. scale-out: a second instance started while the first is busy, to its
//!    first 200, against the same direct start;
//! 4. restart: `skiff serve` on the state of 300 deployed services, until
//!    every one answers;
//! 5. density: 200 suspended instances of the native app: memory per
//!    instance beyond the app's own, and the platform's CPU while all idle.
//!
//! With `SKIFF_BASELINE=/path/to/another/skiff` (e.g. a release build of
//! the commit before a change), 2-4 also run that build, in turns with this
//! one, and report both.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// A minimal HTTP/1.1 server in C: one process per connection, keep-alive.
const SERVER_C: &str = r#"
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static const char R[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
int main(void) {
    int port = atoi(getenv("PORT") ? getenv("PORT") : "8080");
    signal(SIGCHLD, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET; a.sin_port = htons(port); a.sin_addr.s_addr = INADDR_ANY;
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) return 1;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        if (fork() == 0) {
            char buf[8192]; size_t have = 0;
            for (;;) {
                ssize_t n = read(c, buf + have, sizeof buf - have - 1);
                if (n <= 0) _exit(0);
                have += n; buf[have] = 0;
                char *end;
                while ((end = strstr(buf, "\r\n\r\n"))) {
                    if (!strncmp(buf, "GET /slow", 9)) sleep(1);
                    if (write(c, R, sizeof R - 1) < 0) _exit(0);
                    size_t used = end + 4 - buf;
                    memmove(buf, buf + used, have - used); have -= used; buf[have] = 0;
                }
                if (have >= sizeof buf - 1) _exit(0);
            }
        }
        close(c);
    }
}
"#;

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn native_app(dir: &Path, name: &str, limits: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("skiff.toml"),
        format!("name = \"{name}\"\nstart = \"exec ./server\"\n[limits]\n{limits}\n"),
    )
    .unwrap();
}

fn compile_server(into: &Path) -> PathBuf {
    let src = into.join("server.c");
    std::fs::write(&src, SERVER_C).unwrap();
    let bin = into.join("server");
    let ok = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("gcc")
        .success();
    assert!(ok, "compiling the native test server failed");
    bin
}

struct Up {
    child: Child,
    port: u16,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn skiff_up(dirs: &[PathBuf], state: &Path) -> Up {
    skiff_up_with(Path::new(common::SKIFF), &[], dirs, state)
}

/// `skiff up` of another build, with more environment.
fn skiff_up_with(skiff: &Path, env: &[(&str, &str)], dirs: &[PathBuf], state: &Path) -> Up {
    let dirs_ref: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut child = common::skiff_up_with(skiff, state, &dirs_ref, Stdio::null())
        .envs(env.iter().copied())
        .spawn()
        .expect("skiff up");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut port = 0;
    let mut seen = 0;
    let mut lines = out.lines();
    while seen < dirs.len() {
        let line = lines.next().expect("skiff ended early").expect("read");
        if line.starts_with("http://") {
            seen += 1;
            port = common::port_of(&line).expect("port");
        }
    }
    // Keep draining stdout so skiff never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Up { child, port }
}

/// One GET on a kept-alive connection; returns the time to the full answer.
fn timed_get(conn: &mut TcpStream, host: &str) -> Duration {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let t = Instant::now();
    conn.write_all(req.as_bytes()).unwrap();
    read_response(conn);
    t.elapsed()
}

fn read_response(conn: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).expect("response head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).expect("body");
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Whether an instance of `name` runs: a cgroup of it with a process that
/// is not skiff's own (a spare's helper, pid 1 and held command are all
/// `skiff` until the exec).
fn running(name: &str) -> bool {
    std::fs::read_dir("/sys/fs/cgroup/unified/skiff")
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
                    && std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|p| {
                        p.lines().any(|pid| {
                            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                                .is_ok_and(|c| c.trim() != "skiff")
                        })
                    })
            })
        })
        .unwrap_or(false)
}

fn resume_latency(work: &Path, server: &Path) {
    let (frozen, awake) = (work.join("frozen"), work.join("awake"));
    native_app(&frozen, "bench-frozen", "idle_suspend = \"0s\"");
    native_app(&awake, "bench-awake", "idle_suspend = \"1h\"");
    for d in [&frozen, &awake] {
        std::fs::copy(server, d.join("server")).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let up = skiff_up(&[frozen, awake], state.path());
    let mut cf = connect(up.port);
    let mut ca = connect(up.port);
    let (hf, ha) = ("bench-frozen.localhost", "bench-awake.localhost");
    for _ in 0..20 {
        timed_get(&mut cf, hf);
        timed_get(&mut ca, ha);
    }
    let (mut f, mut a) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        // Idle long enough for the freeze to complete.
        std::thread::sleep(Duration::from_millis(3));
        f.push(timed_get(&mut cf, hf));
        a.push(timed_get(&mut ca, ha));
    }
    println!("resume latency, 300 requests each, native server through the gateway:");
    println!(
        "  to a frozen instance:  p50 {}  p99 {}",
        ms(pct(&f, 0.5)),
        ms(pct(&f, 0.99))
    );
    println!(
        "  baseline, running one: p50 {}  p99 {}",
        ms(pct(&a, 0.5)),
        ms(pct(&a, 0.99))
    );
    println!(
        "  added by thawing: p50 {} (target under 1 ms)",
        ms(pct(&f, 0.5).saturating_sub(pct(&a, 0.5)))
    );
}

/// Starts `argv` directly and polls until it answers 200 on `port`; the
/// app's own start.
fn direct_start(argv: &[&str], cwd: &Path, port: u16) -> Duration {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(cwd)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start app");
    loop {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            if c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .is_ok()
                && read_response(&mut c) == 200
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{argv:?} never answered on port {port}"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until no instance of `name` runs (its idle_stop has passed).
fn wait_stopped(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(name) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A quiet machine for the next start: every instance of `names`
/// stopped, and a moment for the spares made after those stops.
fn wait_quiet(names: &[String]) {
    for name in names {
        wait_stopped(name);
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// A GET on a new connection; the time to its 200.
fn timed_first_get(port: u16, host: &str, path: &str) -> Duration {
    let mut c = connect(port);
    let t = Instant::now();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    c.write_all(req.as_bytes()).unwrap();
    assert_eq!(read_response(&mut c), 200, "{host}{path}");
    t.elapsed()
}

fn report_share(what: &str, label: &str, total: &[Duration], own: Duration) {
    let t = pct(total, 0.5);
    println!(
        "  {what}, {label}: {} (p90 {}), platform share {}",
        ms(t),
        ms(pct(total, 0.9)),
        ms(t.saturating_sub(own))
    );
}

/// A skiff build to measure, and the environment it runs with.
struct Config {
    label: String,
    bin: PathBuf,
    env: Vec<(&'static str, &'static str)>,
}

/// The builds to measure, each with the environment it runs with: each
/// build, and this one without spares.
fn cold_configs() -> Vec<Config> {
    let mut configs: Vec<Config> = common::builds()
        .into_iter()
        .map(|(label, bin)| Config {
            label: label.into(),
            bin,
            env: vec![],
        })
        .collect();
    configs.insert(
        1,
        Config {
            label: "this build, no spare".into(),
            bin: common::SKIFF.into(),
            env: vec![("SKIFF_NO_SPARE", "1")],
        },
    );
    configs
}

/// Cold starts, each build on a daemon of its own, all up at once and
/// measured in turn, run by run, with the direct start between: the
/// machine's drift (it is shared) falls on all alike.
fn cold_start(work: &Path, server: &Path, base: &Path) {
    let rounds = 12;
    let configs = cold_configs();
    let python_start = "exec python3 -m http.server $PORT";
    let mut ups = Vec::new();
    for (c, config) in configs.iter().enumerate() {
        let native = work.join(format!("cold-native-{c}"));
        native_app(
            &native,
            &format!("bench-cold-native-{c}"),
            "idle_stop = \"1s\"",
        );
        std::fs::copy(server, native.join("server")).unwrap();
        let python = work.join(format!("cold-python-{c}"));
        std::fs::create_dir_all(&python).unwrap();
        std::fs::write(
            python.join("skiff.toml"),
            format!(
                "name = \"bench-cold-python-{c}\"\nstart = \"{python_start}\"\n\
                 [limits]\nidle_stop = \"1s\"\n"
            ),
        )
        .unwrap();
        let state = tempfile::tempdir().unwrap();
        let up = skiff_up_with(&config.bin, &config.env, &[native, python], state.path());
        ups.push((up, state));
    }
    let native_dir = work.join("cold-native-0");
    let base_s = base.to_string_lossy().into_owned();
    let apps = ["native", "python"];
    let direct = |app: &str| match app {
        "native" => direct_start(&["bash", "-c", "exec ./server"], &native_dir, free_port()),
        _ => direct_start(
            &["chroot", &base_s, "bash", "-c", python_start],
            Path::new("/"),
            free_port(),
        ),
    };
    let mut total = vec![vec![Vec::new(); apps.len()]; configs.len()];
    let mut own = vec![Vec::new(); apps.len()];
    let every: Vec<String> = (0..configs.len())
        .flat_map(|c| apps.map(|app| format!("bench-cold-{app}-{c}")))
        .collect();
    let quiet = || wait_quiet(&every);
    for round in 0..rounds {
        for (a, app) in apps.iter().enumerate() {
            // The builds' order turns each round.
            for i in 0..ups.len() {
                let c = (i + round) % ups.len();
                let name = format!("bench-cold-{app}-{c}");
                quiet();
                total[c][a].push(timed_first_get(
                    ups[c].0.port,
                    &format!("{name}.localhost"),
                    "/",
                ));
            }
            quiet();
            own[a].push(direct(app));
        }
    }
    drop(ups);
    for (a, app) in apps.iter().enumerate() {
        let o = pct(&own[a], 0.5);
        println!("cold start from zero to first 200, {app}, median of {rounds}:");
        println!("  baseline: the app started directly {}", ms(o));
        for (c, config) in configs.iter().enumerate() {
            report_share("through skiff", &config.label, &total[c][a], o);
        }
    }
}

/// A second instance, started while the first is busy (concurrency = 1),
/// until its first 200; against the same start command run directly. The
/// builds run at once, on daemons of their own, measured in turn.
fn scale_out(work: &Path, server: &Path) {
    let rounds = 12;
    let builds = common::builds();
    let mut ups = Vec::new();
    for (b, (_, bin)) in builds.iter().enumerate() {
        let dir = work.join(format!("scale-out-{b}"));
        native_app(
            &dir,
            &format!("bench-scale-out-{b}"),
            "idle_stop = \"1s\"\nconcurrency = 1\nmax_instances = 4",
        );
        std::fs::copy(server, dir.join("server")).unwrap();
        let state = tempfile::tempdir().unwrap();
        ups.push((skiff_up_with(bin, &[], &[dir], state.path()), state));
    }
    let mut total = vec![Vec::new(); builds.len()];
    let mut own = Vec::new();
    let every: Vec<String> = (0..ups.len())
        .map(|b| format!("bench-scale-out-{b}"))
        .collect();
    let quiet = || wait_quiet(&every);
    for round in 0..rounds {
        for i in 0..ups.len() {
            let b = (i + round) % ups.len();
            let up = &ups[b].0;
            let name = format!("bench-scale-out-{b}");
            let host = format!("{name}.localhost");
            quiet();
            // The first instance starts and sleeps a second in its answer.
            let mut busy = connect(up.port);
            busy.write_all(format!("GET /slow HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            total[b].push(timed_first_get(up.port, &host, "/"));
            assert_eq!(read_response(&mut busy), 200);
        }
        quiet();
        own.push(direct_start(
            &["bash", "-c", "exec ./server"],
            &work.join("scale-out-0"),
            free_port(),
        ));
    }
    drop(ups);
    let o = pct(&own, 0.5);
    println!(
        "scale-out: a second instance while the first is busy, to its first 200, median of \
         {rounds}:"
    );
    println!("  baseline: the app started directly {}", ms(o));
    for (b, (label, _)) in builds.iter().enumerate() {
        report_share("through skiff", label, &total[b], o);
    }
}

/// `skiff serve` on the state of `n` deployed services: how long until
/// every one answers through the gateway.
fn restart(work: &Path, server: &Path) {
    let n = 300;
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| {
            let d = work.join(format!("restart-{i}"));
            native_app(&d, &format!("bench-restart-{i}"), "");
            std::fs::copy(server, d.join("server")).unwrap();
            d
        })
        .collect();
    println!("restart: skiff serve on the state of {n} services, until every one answers:");
    for (label, bin) in common::builds() {
        let state = tempfile::tempdir().unwrap();
        drop(skiff_up_with(&bin, &[], &dirs, state.path()));
        let t = Instant::now();
        let mut serve = Command::new(&bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--state",
            ])
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skiff serve");
        let mut lines = BufReader::new(serve.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("skiff serve ended early")
                .expect("read");
            if let Some(rest) = line.split("serving services on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break common::port_of(addr).expect("gateway port");
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let serve = Up { child: serve, port };
        let deadline = t + Duration::from_secs(300);
        for i in 0..n {
            let host = format!("bench-restart-{i}.localhost");
            loop {
                let answered = TcpStream::connect(("127.0.0.1", serve.port)).is_ok_and(|mut c| {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    let req =
                        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                    c.write_all(req.as_bytes()).is_ok() && read_response(&mut c) == 200
                });
                if answered {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{host} never answered after the restart"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        println!("  {label}: {:.2} s", t.elapsed().as_secs_f64());
    }
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after ") " they are at 11, 12.
    f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn density(work: &Path, server: &Path) {
    let n = 200;
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| {
            let d = work.join(format!("dense-{i}"));
            native_app(&d, &format!("bench-dense-{i}"), "");
            std::fs::copy(server, d.join("server")).unwrap();
            d
        })
        .collect();
    // Baseline: the same n apps run directly on the host, measured the same
    // way (host memory in use before and after), so shared pages count once.
    let before = mem_used_kib();
    let mut direct: Vec<Child> = (0..n)
        .map(|_| {
            Command::new(server)
                .env("PORT", free_port().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("server")
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let direct_kib = mem_used_kib().saturating_sub(before) as f64 / n as f64;
    for c in &mut direct {
        let _ = c.kill();
        let _ = c.wait();
    }
    std::thread::sleep(Duration::from_secs(2));

    let before = mem_used_kib();
    let state = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let up = skiff_up(&dirs, state.path());
    let deployed_in = t.elapsed();
    let pid = up.child.id();
    std::thread::sleep(Duration::from_secs(2));
    let skiff_kib = mem_used_kib().saturating_sub(before) as f64 / n as f64;
    let frozen = (0..n)
        .filter(|i| {
            std::fs::read_dir("/sys/fs/cgroup/unified/skiff")
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("bench-dense-{i}-"))
                            && std::fs::read_to_string(e.path().join("cgroup.events"))
                                .is_ok_and(|s| s.contains("frozen 1"))
                    })
                })
                .unwrap_or(false)
        })
        .count();
    let c0 = proc_cpu_ticks(pid);
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle);
    let c1 = proc_cpu_ticks(pid);
    let hz = 100.0; // USER_HZ on Linux
    let cpu = (c1 - c0) as f64 / hz / idle.as_secs_f64() * 100.0;
    println!(
        "density: {n} instances of the native app, deployed in {:.1} s, {frozen} frozen:",
        deployed_in.as_secs_f64()
    );
    println!("  host memory per instance through skiff {skiff_kib:.0} KiB (sandbox, helper, pid 1, skiff's share)");
    println!("  baseline: per copy of the app run directly {direct_kib:.0} KiB");
    println!(
        "  beyond the app's own: {:.0} KiB per instance",
        skiff_kib - direct_kib
    );
    println!(
        "  platform CPU while all idle: {cpu:.2}% over {}s (target ~0%)",
        idle.as_secs()
    );
}

/// Host memory in use: MemTotal - MemAvailable, in KiB.
fn mem_used_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    get("MemTotal:").saturating_sub(get("MemAvailable:"))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the scale benchmark starts real sandboxes: run it as root");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = rt
        .block_on(skiff_runtime::base::ensure(
            Path::new("/var/cache/skiff"),
            "http://deb.debian.org/debian",
            |_| {},
        ))
        .expect("base image (run skiff up once first)");
    let work = tempfile::tempdir().unwrap();
    let server = compile_server(work.path());
    // `cargo bench -p skiff --bench scale -- cold` runs one part.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("resume") {
        resume_latency(work.path(), &server);
    }
    if run("cold") {
        cold_start(work.path(), &server, &base.root);
    }
    if run("scale-out") {
        scale_out(work.path(), &server);
    }
    if run("restart") {
        restart(work.path(), &server);
    }
    if run("density") {
        density(work.path(), &server);
    }
}
