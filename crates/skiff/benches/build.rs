//! Build benchmark (run as root, base image cached; fetches from PyPI):
//!
//!     cargo bench -p skiff --bench build
//!
//! For `examples/python-gunicorn`, against baselines from the same run:
//! 1. build time in skiff's build sandbox against the same build command
//!    run directly on the host (no pip cache on either side);
//! 2. a cached redeploy (same source): skiff's own time, that is from
//!    `skiff up` to the URL minus the app's own start;
//! 3. the image layer's size against what the build wrote.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
const BUILD: &str = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn copy_example(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in ["app.py", "requirements.txt", "skiff.toml"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copy example");
    }
    tmp
}

/// Runs `skiff up` until it prints the URL; returns (stderr lines, elapsed).
fn skiff_up(dir: &Path, state: &Path) -> (Vec<String>, Duration) {
    let t = Instant::now();
    let mut up = common::skiff_up(state, &[dir], Stdio::piped())
        .spawn()
        .expect("skiff up");
    let (tx, rx) = mpsc::channel();
    let err = BufReader::new(up.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let out = BufReader::new(up.stdout.take().expect("stdout"));
    let url = out
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("http://"));
    let elapsed = t.elapsed();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = up.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(url.is_some(), "skiff printed no URL:\n{}", lines.join("\n"));
    (lines, elapsed)
}

/// The build's line in `skiff up`'s output.
fn build_line(lines: &[String]) -> &str {
    lines
        .iter()
        .find(|l| l.contains("skiff: built"))
        .unwrap_or_else(|| panic!("no build line in {lines:?}"))
}

/// How long the build took, in seconds, as `skiff up` reports it.
fn build_time(lines: &[String]) -> f64 {
    number_after(build_line(lines), " in ").expect("build time")
}

/// The number after `key` in `line`, e.g. `in 2.7s` or `app start 38.2ms`.
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the build benchmark starts real sandboxes: run it as root");
        std::process::exit(1);
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python-gunicorn");
    let runs = 3;

    let mut host = Vec::new();
    for _ in 0..runs {
        let dir = copy_example(&example);
        let t = Instant::now();
        let status = Command::new("bash")
            .args(["-c", BUILD])
            .current_dir(dir.path())
            .env("PIP_NO_CACHE_DIR", "1")
            .env_remove("PIP_FIND_LINKS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("bash");
        assert!(status.success(), "the build failed on the host");
        host.push(t.elapsed());
    }

    let mut sandboxed = Vec::new();
    let mut sizes = (0.0, 0.0);
    let mut state = tempfile::tempdir().expect("tempdir");
    for i in 0..runs {
        // A first build each time: a new state directory (so an empty
        // build cache) and a new source.
        state = tempfile::tempdir().expect("tempdir");
        let dir = copy_example(&example);
        std::fs::write(dir.path().join("bump.txt"), i.to_string()).expect("write");
        let (lines, _) = skiff_up(dir.path(), state.path());
        let s = build_time(&lines);
        sandboxed.push(Duration::from_secs_f64(s));
        let built = build_line(&lines);
        sizes = (
            number_after(built, "image layer").unwrap_or(0.0),
            number_after(built, "the build wrote").unwrap_or(0.0),
        );
    }
    // A one-line change after the last: a rebuild with the build cache.
    let dir = copy_example(&example);
    std::fs::write(dir.path().join("bump.txt"), "changed").expect("write");
    let python_rebuild = build_time(&skiff_up(dir.path(), state.path()).0);

    let dir = copy_example(&example);
    skiff_up(dir.path(), state.path());
    let mut cached = Vec::new();
    for _ in 0..5 {
        let (lines, total) = skiff_up(dir.path(), state.path());
        assert!(
            lines.iter().any(|l| l.contains("reusing the built image")),
            "{lines:?}"
        );
        let ready = lines
            .iter()
            .find(|l| l.contains("is ready"))
            .expect("ready line");
        let app_ms = number_after(ready, "app start").expect("app start");
        cached.push(total.saturating_sub(Duration::from_secs_f64(app_ms / 1000.0)));
    }

    // An apt build, where dropping package lists and downloads matters.
    let apt = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        apt.path().join("skiff.toml"),
        "name = \"apt-jq\"\nbuild = \"apt-get update && apt-get install -y jq\"\n\
         start = \"exec python3 -m http.server $PORT\"\n",
    )
    .expect("write");
    let apt_state = tempfile::tempdir().expect("tempdir");
    let (lines, _) = skiff_up(apt.path(), apt_state.path());
    let apt_first = build_time(&lines);
    let built = build_line(&lines);
    let apt_sizes = (
        number_after(built, "image layer").unwrap_or(0.0),
        number_after(built, "the build wrote").unwrap_or(0.0),
    );
    std::fs::write(apt.path().join("bump.txt"), "changed").expect("write");
    let apt_rebuild = build_time(&skiff_up(apt.path(), apt_state.path()).0);

    let (h, b) = (median(host), median(sandboxed));
    println!("build of python-gunicorn ({BUILD}), {runs} runs, median:");
    println!("  in skiff's build sandbox {}", secs(b));
    println!("  baseline: the same command on the host {}", secs(h));
    println!("  ratio {:.2}x", b.as_secs_f64() / h.as_secs_f64());
    println!(
        "cached redeploy (same source): platform time {} median of 5 (target under 1 s)",
        secs(median(cached))
    );
    println!("rebuild after a one-line change, with the service's build cache:");
    for (what, first, again) in [
        ("python-gunicorn", b.as_secs_f64(), python_rebuild),
        ("apt-get install jq", apt_first, apt_rebuild),
    ] {
        println!(
            "  {what}: {again:.2} s against {first:.2} s for a first build ({:.2}x)",
            again / first
        );
    }
    for (what, (layer, wrote)) in [
        ("python-gunicorn", sizes),
        ("apt-get install jq", apt_sizes),
    ] {
        println!(
            "{what}: image layer {layer:.1} MiB against {wrote:.1} MiB the build wrote ({:.0}%)",
            100.0 * layer / wrote.max(0.001)
        );
    }
}
