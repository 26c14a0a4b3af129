//! Start-up benchmark (run as root, base image cached):
//!
//!     cargo bench -p skiff --bench startup
//!
//! Reports, each against a baseline measured in the same run:
//! 1. the sandbox's own start cost: from `Sandbox::spawn` to the start
//!    command being executed, against spawning the same command unsandboxed;
//! 2. `skiff up` to the first 200 through the gateway for the bundled
//!    Python example, against starting the same app directly on the host and
//!    polling it until its first 200.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_sandbox::{Bind, CgroupLimits, Identity, Network, Sandbox, SandboxConfig};

mod common;
use common::SKIFF;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn get_ok(port: u16, host: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    // One write, as real clients do: a request in pieces would measure
    // Nagle's algorithm against delayed ACKs, not skiff.
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn sandbox_cost(runs: usize) -> PathBuf {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cache = PathBuf::from("/var/cache/skiff");
    let base = rt
        .block_on(skiff_runtime::base::ensure(
            &cache,
            "http://deb.debian.org/debian",
            |_| {},
        ))
        .expect("base image (run skiff up once first)");
    let mnt = tempfile::tempdir().expect("tempdir");
    let app = tempfile::tempdir().expect("tempdir");
    let sandbox = Sandbox::new(PathBuf::from(SKIFF));
    let config = SandboxConfig {
        hostname: "bench".into(),
        mount_point: mnt.path().to_path_buf(),
        layers: vec![base.root.clone()],
        writable: None,
        binds: vec![Bind {
            source: app.path().to_path_buf(),
            target: "/app".into(),
            writable: false,
        }],
        cwd: "/app".into(),
        tmp_size: 64 << 20,
        identity: Identity::User {
            uid: 10001,
            gid: 10001,
        },
        network: Network::Loopback,
        argv: vec!["/bin/true".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        open_files: 65536,
        syscall_filter: true,
        layers_owned_by: None,
        warm_root: None,
        hold: false,
    };
    let unfiltered = SandboxConfig {
        syscall_filter: false,
        ..config.clone()
    };
    let limits = CgroupLimits {
        memory_bytes: 256 << 20,
        pids: 64,
        cpu: 1.0,
    };
    let (mut sandboxed, mut plain, mut without_filter) = (Vec::new(), Vec::new(), Vec::new());
    let mut held = Vec::new();
    // How long one sandboxed start takes until its command runs.
    let start = |id: String, config: &SandboxConfig| {
        let (sandbox, config) = (&sandbox, config.clone());
        async move {
            // The whole of it: cgroups, helper, handshake, until the
            // command has been executed.
            let t = Instant::now();
            let mut inst = sandbox
                .spawn(&id, &config, limits)
                .await
                .expect("sandbox spawn");
            let started = t.elapsed();
            let _ = inst.stop(Duration::ZERO).await;
            started
        }
    };
    // The same start from a sandbox built and held ahead, as a service's
    // spare is: only the exec is timed.
    let held_start = |id: String| {
        let (sandbox, config) = (&sandbox, config.clone());
        async move {
            let prepared = sandbox.prepare(&id, limits).await.expect("prepare");
            let ahead = prepared.hold(&config).await.expect("hold");
            let mut inst = ahead.start().await.expect("held start");
            let started = inst.timings.started;
            let _ = inst.stop(Duration::ZERO).await;
            started
        }
    };
    let pid = std::process::id();
    rt.block_on(async {
        for i in 0..runs + 5 {
            // The same start without the system-call filter, in turn.
            let unfiltered_start = start(format!("bench-nofilter-{pid}-{i}"), &unfiltered).await;

            let t = Instant::now();
            let mut child = tokio::process::Command::new("/bin/true")
                .spawn()
                .expect("spawn");
            let spawned = t.elapsed();
            let _ = child.wait().await;

            let started = start(format!("bench-{pid}-{i}"), &config).await;
            let held_started = held_start(format!("bench-held-{pid}-{i}")).await;
            if i >= 5 {
                held.push(held_started);
                // the first runs warm caches
                sandboxed.push(started);
                plain.push(spawned);
                without_filter.push(unfiltered_start);
            }
        }
    });
    let (m, b) = (median(sandboxed.clone()), median(plain));
    println!("sandbox start cost (spawn -> start command executed), {runs} runs:");
    println!(
        "  median {}  p90 {}  max {}",
        ms(m),
        ms(pct(sandboxed.clone(), 0.9)),
        ms(pct(sandboxed, 1.0))
    );
    println!("  baseline: plain spawn of the same command {}", ms(b));
    println!(
        "  ratio sandboxed/plain {:.1}x; target: median under 15 ms",
        m.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  built and held ahead (a spare), only the exec left: median {}  p90 {}",
        ms(median(held.clone())),
        ms(pct(held, 0.9))
    );
    let nf = median(without_filter);
    println!(
        "  the system-call filter: median {} with it, {} without (same run, in turn): \
         {:+.3} ms; target: under 0.5 ms",
        ms(m),
        ms(nf),
        (m.as_secs_f64() - nf.as_secs_f64()) * 1000.0
    );

    // A start after the host has been idle for a while: the first cgroup
    // migration then waits for an RCU grace period (cgroup v1 takes the
    // global threadgroup rwsem), which back-to-back starts do not.
    let mut cold = Vec::new();
    rt.block_on(async {
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cold.push(start(format!("bench-cold-{pid}-{i}"), &config).await);
        }
    });
    println!(
        "  after 300 ms idle, 10 runs: median {}  max {}",
        ms(median(cold.clone())),
        ms(pct(cold, 1.0))
    );
    base.root
}

fn up_to_first_200(runs: usize, base: &Path) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-python");
    let script = std::fs::read(example.join("app.py")).expect("example app");
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // Baseline: the same app with the same python (the image's, by
        // chroot), unsandboxed, the script on stdin.
        let port = free_port();
        let t = Instant::now();
        let mut app = Command::new("chroot")
            .arg(base)
            .args(["python3", "-"])
            .env("PORT", port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("chroot python3");
        if let Some(mut stdin) = app.stdin.take() {
            stdin.write_all(&script).expect("script to python");
        }
        while !get_ok(port, "localhost") {
            std::thread::sleep(Duration::from_millis(1));
        }
        direct.push(t.elapsed());
        let _ = app.kill();
        let _ = app.wait();

        let state = tempfile::tempdir().expect("tempdir");
        let t = Instant::now();
        let mut up = common::skiff_up(state.path(), &[&example], Stdio::null())
            .spawn()
            .expect("skiff up");
        let out = BufReader::new(up.stdout.take().expect("stdout"));
        let url = out
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("http://"))
            .expect("skiff printed no URL");
        let port = common::port_of(&url).expect("port in URL");
        while !get_ok(port, "hello-python.localhost") {
            std::thread::sleep(Duration::from_millis(1));
        }
        through.push(t.elapsed());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(up.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = up.wait();
    }
    let (m, b) = (median(through), median(direct));
    println!("skiff up -> first 200 (hello-python, base image cached), {runs} runs:");
    println!("  median {}", ms(m));
    println!(
        "  baseline: the same app, same python, unsandboxed (chroot) -> first 200 {}",
        ms(b)
    );
    println!(
        "  ratio {:.2}x; platform share {}",
        m.as_secs_f64() / b.as_secs_f64(),
        ms(m.saturating_sub(b))
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass other flags.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the startup benchmark starts real sandboxes: run it as root");
        std::process::exit(1);
    }
    let base = sandbox_cost(60);
    up_to_first_200(10, &base);
}
