//! `skiff serve` and the client commands: the whole deploy → ls → status →
//! logs → redeploy → rm cycle through the real CLI against a real daemon;
//! restarts after SIGTERM and SIGKILL; bad input; a redeploy under load.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{cgroups_named, cli_at, mounts_with, processes_with, unique, App, Up};
use crate::FIRST_START;

/// A Python server answering every path with the content of version.txt
/// (`/slow` after 50 ms, so that requests are in flight at any moment).
const APP: &str = r#"
import http.server, os, time
body = open("version.txt").read().encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving", body.decode(), flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

fn app(name: &str, version: &str) -> App {
    App::new(
        &format!("name = \"{name}\"\nstart = \"python3 app.py\"\n"),
        &[("app.py", APP), ("version.txt", version)],
    )
}

fn set_version(app: &App, version: &str) {
    std::fs::write(app.path().join("version.txt"), version).unwrap();
}

fn deploy(d: &Up, dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["deploy", dir.to_str().unwrap()];
    args.extend(extra);
    let (status, out, err) = d.cli(&args);
    (status.success(), out, err)
}

fn body(d: &Up, host: &str) -> (u16, String) {
    let r = d.get(&format!("{host}.localhost"), "/");
    (r.status, r.body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn deploy_ls_status_logs_redeploy_rm() {
    let name = unique("cycle");
    let a = app(&name, "v1");
    let d = Up::serve(None, &[]);

    let (ok, out, err) = deploy(&d, a.path(), &[]);
    assert!(ok, "first deploy failed:\n{err}");
    assert!(
        out.trim().starts_with(&format!("http://{name}.localhost:")),
        "{out}"
    );
    assert!(err.contains("is ready"), "{err}");
    assert_eq!(body(&d, &name), (200, "v1".into()));

    let (ok, out, _) = d.cli(&["ls", "--json"]);
    assert!(ok.success());
    let ls = json(&out);
    let svc = &ls["services"][0];
    assert_eq!(svc["name"], name.as_str());
    assert_eq!(svc["state"], "ready");
    assert_eq!(svc["version"], 1);
    let (ok, out, _) = d.cli(&["ls"]);
    assert!(ok.success());
    assert!(
        out.contains("NAME") && out.contains(&name) && out.contains("ready"),
        "{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colour when not on a terminal: {out:?}"
    );
    // On a terminal (script(1) gives it one): colour, unless NO_COLOR.
    let on_tty = |no_color: bool| {
        let cmd = format!(
            "{} ls --state {}",
            crate::support::SKIFF,
            d.state_dir().display()
        );
        let mut c = std::process::Command::new("script");
        c.args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.output().expect("run script(1)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(false);
    assert!(
        coloured.contains("\x1b[32mready"),
        "colour on a terminal: {coloured:?}"
    );
    let plain = on_tty(true);
    assert!(
        plain.contains("ready") && !plain.contains('\x1b'),
        "NO_COLOR: {plain:?}"
    );

    // A redeploy switches to the new version; `logs -f` shows it start.
    let follow = LogFollower::start(&d.state_dir(), &name);
    set_version(&a, "v2");
    let (ok, _, err) = deploy(&d, a.path(), &[]);
    assert!(ok, "redeploy failed:\n{err}");
    assert_eq!(body(&d, &name), (200, "v2".into()));
    assert!(
        follow.wait_for("serving v2", Duration::from_secs(10)),
        "logs -f did not show the new version's output: {:?}",
        follow.seen()
    );

    // A failed redeploy leaves v2 serving, and says why.
    let (ok, _, err) = deploy(&d, a.path(), &["--start", "python3 -c 'import flask_nope'"]);
    assert!(!ok, "a deploy whose start fails must exit non-zero");
    assert!(
        err.contains("flask_nope") && err.contains("still serves"),
        "{err}"
    );
    assert_eq!(body(&d, &name), (200, "v2".into()));

    let (ok, out, _) = d.cli(&["status", &name, "--json"]);
    assert!(ok.success());
    let st = json(&out);
    assert_eq!(st["state"], "ready");
    assert_eq!(st["version"], 2);
    let states: Vec<&str> = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "ready", "replaced"]);
    assert!(
        st["recent_errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("version 3 failed"),
        "{st}"
    );
    let (ok, out, _) = d.cli(&["status", &name]);
    assert!(ok.success());
    assert!(out.contains("versions") && out.contains("failed"), "{out}");

    let (ok, out, _) = d.cli(&["logs", &name]);
    assert!(ok.success());
    assert!(
        out.contains("serving v1") && out.contains("serving v2"),
        "{out}"
    );
    assert!(out.contains("No module named 'flask_nope'"), "{out}");
    let (ok, out, _) = d.cli(&["logs", &name, "--since", "1h"]);
    assert!(ok.success() && out.contains("serving v1"), "{out}");
    let (ok, out, _) = d.cli(&["logs", &name, "--since", "2099-01-01T00:00:00Z"]);
    assert!(
        ok.success() && out.is_empty(),
        "nothing is newer than 2099: {out}"
    );
    let (ok, _, err) = d.cli(&["logs", &name, "--since", "last tuesday"]);
    assert!(!ok.success() && err.contains("neither a duration"), "{err}");
    let (ok, out, _) = d.cli(&["logs", &name, "--json", "--tail", "1"]);
    assert!(ok.success());
    assert_eq!(out.lines().count(), 1, "{out}");
    json(out.lines().next().unwrap());

    let (ok, _, err) = d.cli(&["rm", &name]);
    assert!(ok.success(), "{err}");
    assert_eq!(body(&d, &name).0, 404);
    let (_, out, _) = d.cli(&["ls", "--json"]);
    assert_eq!(json(&out)["services"].as_array().unwrap().len(), 0);
    let (ok, _, err) = d.cli(&["status", &name]);
    assert!(!ok.success() && err.contains("no service named"), "{err}");
    let (ok, _, err) = d.cli(&["rm", &name]);
    assert!(!ok.success() && err.contains("no service named"), "{err}");
    assert!(cgroups_named(&name).is_empty(), "cgroups left after rm");
    let images: Vec<_> = std::fs::read_dir(d.state_dir().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "refs")
        .collect();
    assert!(images.is_empty(), "images left after rm: {images:?}");
}

#[test]
fn restart_after_sigterm_and_sigkill_serves_again() {
    let name = unique("restart");
    let a = app(&name, "kept");
    let state = tempfile::Builder::new()
        .prefix("skiff-state-")
        .tempdir()
        .unwrap();
    let mut d = Up::serve(Some(state.path()), &[]);
    let (ok, _, err) = deploy(&d, a.path(), &[]);
    assert!(ok, "{err}");

    // SIGTERM: graceful; nothing left behind.
    let status = d.signal_and_wait(Signal::SIGTERM);
    assert!(status.success(), "{}", d.stderr());
    assert!(
        processes_with(&name).is_empty(),
        "instances left after SIGTERM"
    );
    assert!(
        cgroups_named(&name).is_empty(),
        "cgroups left after SIGTERM"
    );
    drop(d);

    let mut d = Up::serve(Some(state.path()), &[]);
    assert!(d.wait_output(&name, FIRST_START), "{}", d.stderr());
    wait_serving(&d, &name, "kept");
    let old_pid = d.pid();

    // SIGKILL: no goodbye; the next start cleans up what is left.
    d.signal_and_wait(Signal::SIGKILL);
    drop(d);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with(&name).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        processes_with(&name).is_empty(),
        "instances outlived their platform"
    );
    let d = Up::serve(Some(state.path()), &[]);
    wait_serving(&d, &name, "kept");
    let stale = format!("{name}-{old_pid}-");
    let left: Vec<_> = cgroups_named(&stale);
    assert!(left.is_empty(), "cgroups of the killed platform: {left:?}");
    assert!(
        mounts_with(&stale).is_empty(),
        "mounts of the killed platform"
    );
    let (_, out, _) = d.cli(&["ls", "--json"]);
    assert_eq!(json(&out)["services"][0]["version"], 1);
}

/// `skiff logs NAME -f`, read in the background.
struct LogFollower {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl LogFollower {
    fn start(state: &Path, name: &str) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(crate::support::SKIFF)
            .args(["logs", name, "-f", "--state"])
            .arg(state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start skiff logs -f");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn seen(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_serving(d: &Up, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = body(d, name);
        if got == (200, want.to_string()) {
            return;
        }
        assert!(Instant::now() < deadline, "never served again: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tar header (ustar) for an entry, built by hand: hostile archives are
/// exactly those a well-behaved tar writer refuses to make.
fn tar_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let name = unique("bad");
    let a = app(&name, "good");
    let d = Up::serve(None, &["--max-upload", "64KiB"]);
    let (ok, _, err) = deploy(&d, a.path(), &[]);
    assert!(ok, "{err}");
    let manifest = format!("name = \"{name}\"\nstart = \"python3 app.py\"\n");
    let path = format!("/v1/deploy?name={name}");

    // No token, a wrong token.
    let (status, text) = d.api("GET", "/v1/services", b"", Some("wrong"));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("api-token"), "{text}");

    // Not a tar at all; cut off in the middle.
    let (status, text) = d.api("POST", &path, &[0x42; 3000], None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("bad_archive"), "{text}");
    let good = tar(&[tar_entry("skiff.toml", b'0', "", manifest.as_bytes())]);
    let (status, text) = d.api("POST", &path, &good[..700], None);
    assert_eq!(status, 400, "{text}");

    // Escapes: `..`, an absolute path, a link pointing out, a hard link.
    for (entry, what) in [
        (tar_entry("../escaped.txt", b'0', "", b"x"), "escaped.txt"),
        (tar_entry("/tmp/escaped.txt", b'0', "", b"x"), "escaped.txt"),
        (tar_entry("link", b'2', "/etc/shadow", b""), "link"),
        (tar_entry("up", b'2', "../../..", b""), "up"),
        (tar_entry("hard", b'1', "skiff.toml", b""), "hard"),
    ] {
        let archive = tar(&[
            tar_entry("skiff.toml", b'0', "", manifest.as_bytes()),
            entry,
        ]);
        let (status, text) = d.api("POST", &path, &archive, None);
        assert_eq!(status, 400, "{what}: {text}");
        assert!(
            text.contains(what),
            "the error names the entry {what}: {text}"
        );
    }
    assert!(!Path::new("/tmp/escaped.txt").exists());

    // A source directory with a symlink out of it, through the real CLI.
    let out_link = app(&name, "evil");
    std::os::unix::fs::symlink("/etc/passwd", out_link.path().join("passwd")).unwrap();
    let (ok, _, err) = deploy(&d, out_link.path(), &[]);
    assert!(!ok, "a link out of the source must be refused");
    assert!(err.contains("passwd"), "{err}");

    // Over the daemon's --max-upload.
    let big = app(&name, "big");
    std::fs::write(big.path().join("blob"), vec![b'x'; 100 << 10]).unwrap();
    let (ok, _, err) = deploy(&d, big.path(), &[]);
    assert!(!ok);
    assert!(
        err.contains("larger than 64KiB") && err.contains(".skiffignore"),
        "{err}"
    );

    // A manifest error: named with its place in the user's file.
    let broken = App::new(&format!("name = \"{name}\"\nport = \"eighty\"\n"), &[]);
    let (ok, _, err) = deploy(&d, broken.path(), &["--start", "x"]);
    assert!(!ok);
    assert!(err.contains("skiff.toml:2"), "{err}");
    let archive = tar(&[tar_entry("skiff.toml", b'0', "", b"port = [1]\n")]);
    let (status, text) = d.api("POST", &path, &archive, None);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("manifest") && !text.contains("uploads/"),
        "{text}"
    );

    // Two deploys of one service at once: one is refused, clearly.
    let slow = App::new(
        &format!("name = \"{name}\"\nbuild = \"sleep 2\"\nstart = \"python3 app.py\"\n"),
        &[("app.py", APP), ("version.txt", "slow")],
    );
    let results = Arc::new(Mutex::new(Vec::new()));
    let state = d.state_dir();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let results = results.clone();
            let (state, slow) = (&state, &slow);
            s.spawn(move || {
                let (st, out, err) = cli_at(state, &["deploy", slow.path().to_str().unwrap()]);
                results.lock().unwrap().push((st.success(), out, err));
            });
        }
    });
    let results = results.lock().unwrap();
    let refused: Vec<_> = results.iter().filter(|r| !r.0).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(
        refused[0].2.contains("already in progress"),
        "{:?}",
        refused[0]
    );
    assert_eq!(body(&d, &name), (200, "slow".into()));

    // Through all of it, the service kept serving and its records are whole.
    let (_, out, _) = d.cli(&["status", &name, "--json"]);
    let st = json(&out);
    assert_eq!(st["state"], "ready");
    assert_eq!(
        st["version"], 2,
        "only the one good redeploy made a version"
    );
    let uploads = std::fs::read_dir(d.state_dir().join("uploads"))
        .unwrap()
        .count();
    assert_eq!(uploads, 0, "refused uploads are removed");
}

/// One GET of `/slow` through the gateway; `None` when the connection
/// failed.
fn try_get(port: u16, host: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!("GET /slow HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

/// What four clients saw while `act` ran: requests answered, the failures,
/// and the bodies (versions) that answered.
struct Load {
    served: u64,
    failures: Vec<Option<(u16, String)>>,
    seen: std::collections::BTreeSet<String>,
}

fn under_load(port: u16, host: &str, act: impl FnOnce()) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok_count = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (stop, ok_count, failures, seen) = (
                stop.clone(),
                ok_count.clone(),
                failures.clone(),
                seen.clone(),
            );
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match try_get(port, host) {
                        Some((200, body)) => {
                            ok_count.fetch_add(1, Ordering::SeqCst);
                            seen.lock().unwrap().insert(body);
                        }
                        other => failures.lock().unwrap().push(other),
                    }
                }
            });
        }
        act();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
    });
    let load = Load {
        served: ok_count.load(Ordering::SeqCst),
        failures: std::mem::take(&mut *failures.lock().unwrap()),
        seen: std::mem::take(&mut *seen.lock().unwrap()),
    };
    assert!(
        load.failures.is_empty(),
        "{} of {} failed: {:?}",
        load.failures.len(),
        load.served,
        &load.failures[..load.failures.len().min(5)]
    );
    assert!(
        load.served > 20,
        "the load generator ran ({} requests)",
        load.served
    );
    load
}

/// Waits until no replaced version of `name` drains any more.
fn wait_drained(d: &Up, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = d.cli(&["status", name, "--json"]);
        if json(&out)["draining"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old versions never stopped: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn zero_failed_requests_across_redeploys_under_load() {
    let name = unique("load");
    let a = app(&name, "v1");
    let d = Up::serve(None, &[]);
    let (ok, _, err) = deploy(&d, a.path(), &[]);
    assert!(ok, "{err}");
    let host = format!("{name}.localhost");
    let load = under_load(d.port.unwrap(), &host, || {
        for v in ["v2", "v3"] {
            std::thread::sleep(Duration::from_millis(300));
            set_version(&a, v);
            let (ok, _, err) = deploy(&d, a.path(), &[]);
            assert!(ok, "{err}");
        }
    });
    for v in ["v1", "v2", "v3"] {
        assert!(load.seen.contains(v), "{v} never answered: {:?}", load.seen);
    }
    // The replaced versions were drained and stopped.
    wait_drained(&d, &name);
}

/// `skiff rollback` serves an earlier version's image again, without a
/// build, with no request failing across the switch; by default the one
/// before the serving one, or the version named. What cannot be rolled
/// back to is refused, and the serving version stays.
#[test]
fn rollback_switches_to_an_earlier_image_with_zero_failed_requests() {
    let name = unique("back");
    let a = app(&name, "v1");
    let d = Up::serve(None, &[]);
    for v in ["v1", "v2", "v3"] {
        set_version(&a, v);
        let (ok, _, err) = deploy(&d, a.path(), &[]);
        assert!(ok, "{err}");
    }
    let versions = |state: &str| -> Vec<i64> {
        let (_, out, _) = d.cli(&["status", &name, "--json"]);
        let status = json(&out);
        let all = status["versions"].as_array().cloned().unwrap_or_default();
        all.iter()
            .filter(|v| v["state"] == state)
            .filter_map(|v| v["id"].as_i64())
            .collect()
    };
    // Newest first: v2, then v1.
    let replaced = versions("replaced");
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    let host = format!("{name}.localhost");
    let mut rolled = Vec::new();
    let load = under_load(d.port.unwrap(), &host, || {
        std::thread::sleep(Duration::from_millis(300));
        // The version before the serving one: v2's image.
        rolled.push(d.cli(&["rollback", &name]));
        std::thread::sleep(Duration::from_millis(300));
        rolled.push(d.cli(&["rollback", &name, &replaced[1].to_string()]));
    });
    for (status, out, err) in &rolled {
        assert!(status.success(), "{out}{err}");
    }
    assert!(
        rolled[0].2.contains("serves the earlier image"),
        "{:?}",
        rolled[0]
    );
    assert_eq!(body(&d, &name), (200, "v1".to_string()));
    for v in ["v1", "v2", "v3"] {
        assert!(load.seen.contains(v), "{v} never answered: {:?}", load.seen);
    }
    // No build: the versions record no build time.
    let (_, out, _) = d.cli(&["status", &name, "--json"]);
    let newest = &json(&out)["versions"][0];
    assert_eq!(newest["state"], "ready", "{out}");
    assert!(newest["build_ms"].is_null(), "{out}");
    wait_drained(&d, &name);

    // Refusals name the reason; the serving version stays.
    let serving = versions("ready")[0];
    for (args, says) in [
        (
            vec!["rollback", &name, "999999"],
            "it has no version 999999",
        ),
        (
            vec!["rollback", "no-such-service"],
            "no service named \"no-such-service\"",
        ),
    ] {
        let (status, out, err) = d.cli(&args);
        assert!(!status.success(), "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let serving_str = serving.to_string();
    let (status, _, err) = d.cli(&["rollback", &name, &serving_str]);
    assert!(!status.success());
    assert!(err.contains("is the one serving"), "{err}");
    assert_eq!(body(&d, &name), (200, "v1".to_string()));
}

#[test]
fn a_directory_without_a_manifest_deploys_with_flags() {
    let d = Up::serve(None, &[]);
    let parent = tempfile::tempdir().unwrap();
    let dir_name = unique("No_Manifest");
    let dir = parent.path().join(&dir_name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("app.py"), APP).unwrap();
    std::fs::write(dir.join("version.txt"), "flags").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out, err) = deploy(&d, &dir, &["--start", "python3 app.py", "--port", "9000"]);
    assert!(ok, "{err}");
    // The name comes from the directory, as `skiff up` derives it.
    let name = dir_name.to_lowercase().replace('_', "-");
    assert!(out.contains(&format!("http://{name}.localhost:")), "{out}");
    assert_eq!(body(&d, &name), (200, "flags".into()));
    let (_, out, _) = d.cli(&["status", &name, "--json"]);
    assert_eq!(json(&out)["port"], 9000);
}
