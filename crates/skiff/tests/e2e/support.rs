//! Drives the real `skiff` binary like a user: starts it on a free port with
//! temporary state, reads what it prints, sends HTTP through its gateway.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

/// The platform's tests need real namespaces, mounts and cgroups.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests start real sandboxes and must run as root"
    );
}

/// A test service: a directory with files and a skiff.toml.
pub struct App {
    pub dir: tempfile::TempDir,
}

impl App {
    pub fn new(manifest: &str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-app-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("skiff.toml"), manifest).expect("write manifest");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write app file");
        }
        // The sandbox user must be able to read the source.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A running `skiff up`.
pub struct Up {
    pub child: Child,
    state: PathBuf,
    _temp_state: Option<tempfile::TempDir>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<(bool, String)>,
    pub port: Option<u16>,
}

/// A unique name for a test's service, so tests never see each other's leftovers.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl Up {
    /// Starts `skiff up` on `dirs` with a free gateway port and new state.
    pub fn start(dirs: &[&Path], extra: &[&str]) -> Self {
        let state = tempfile::Builder::new()
            .prefix("skiff-state-")
            .tempdir()
            .expect("tempdir");
        let path = state.path().to_path_buf();
        Self::start_in(dirs, &path, extra, Some(state))
    }

    /// Starts `skiff up` on `dirs` with a free gateway port and the given state.
    pub fn start_in(
        dirs: &[&Path],
        state: &Path,
        extra: &[&str],
        temp: Option<tempfile::TempDir>,
    ) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec!["up".into()];
        args.extend(dirs.iter().map(|d| d.as_os_str().to_owned()));
        Self::launch(&[], args, state, extra, temp)
    }

    /// Starts `skiff up` on `dirs` with new state, run through `wrapper`
    /// (a command that runs the rest of its arguments, e.g. `prlimit`).
    pub fn start_wrapped(wrapper: &[&str], dirs: &[&Path], extra: &[&str]) -> Self {
        let state = tempfile::Builder::new()
            .prefix("skiff-state-")
            .tempdir()
            .expect("tempdir");
        let path = state.path().to_path_buf();
        let mut args: Vec<std::ffi::OsString> = vec!["up".into()];
        args.extend(dirs.iter().map(|d| d.as_os_str().to_owned()));
        Self::launch(wrapper, args, &path, extra, Some(state))
    }

    /// Starts `skiff serve` (the daemon) with free ports on `state`, or on
    /// new temporary state; returns once it serves.
    pub fn serve(state: Option<&Path>, extra: &[&str]) -> Self {
        let (path, temp) = match state {
            Some(s) => (s.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("skiff-state-")
                    .tempdir()
                    .expect("tempdir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut up = Self::launch(&[], vec!["serve".into()], &path, extra, temp);
        assert!(
            up.wait_output("control API on", Duration::from_secs(30)),
            "skiff serve did not start:\n{}",
            up.stderr()
        );
        let line = up.stderr();
        let port = line
            .split("serving services on http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        up.port = port;
        assert!(up.port.is_some(), "no gateway port in {line:?}");
        up
    }

    /// Runs a client command (`skiff ARGS --state STATE`) against this
    /// platform; returns its exit status, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        cli_at(&self.state, args)
    }

    /// The process id of the platform.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn launch(
        wrapper: &[&str],
        args: Vec<std::ffi::OsString>,
        state: &Path,
        extra: &[&str],
        temp: Option<tempfile::TempDir>,
    ) -> Self {
        require_root();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(SKIFF);
                cmd
            }
            None => Command::new(SKIFF),
        };
        cmd.args(args)
            .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--state"])
            .arg(state)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start skiff");
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        for (is_out, reader, store) in [
            (
                true,
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                stdout.clone(),
            ),
            (
                false,
                Box::new(child.stderr.take().unwrap()),
                stderr.clone(),
            ),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    store.lock().unwrap().push(line.clone());
                    let _ = tx.send((is_out, line));
                }
            });
        }
        Self {
            child,
            state: state.to_path_buf(),
            _temp_state: temp,
            stdout,
            stderr,
            lines,
            port: None,
        }
    }

    /// Waits until `n` service URLs were printed (or skiff ended); returns them.
    pub fn wait_urls(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut urls = Vec::new();
        while urls.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((true, line)) if line.starts_with("http://") => {
                    let port = line
                        .trim_end_matches('/')
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok());
                    self.port = port;
                    urls.push(line);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        urls
    }

    /// Waits for a line of output (either stream) containing `needle`.
    pub fn wait_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.stderr().contains(needle) || self.stdout().contains(needle) {
            return true;
        }
        while let Ok((_, line)) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for skiff to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "skiff did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to skiff and waits for it to exit.
    pub fn signal_and_wait(&mut self, sig: Signal) -> ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        self.wait_exit(Duration::from_secs(30))
    }

    /// A request to the control API with the daemon's token (or `token`),
    /// over plain HTTP/1.1: status and body.
    pub fn api(&self, method: &str, path: &str, body: &[u8], token: Option<&str>) -> (u16, String) {
        let addr = std::fs::read_to_string(self.state.join("api-address")).expect("api-address");
        let own = std::fs::read_to_string(self.state.join("api-token")).expect("api-token");
        let token = token.unwrap_or(own.trim());
        let mut s = TcpStream::connect(addr.trim()).expect("connect to the control API");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let body = if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    pub fn get(&self, host: &str, path: &str) -> Response {
        http_get(self.port.expect("no gateway port yet"), host, path)
    }

    /// `get` with more header fields (`Name: value\r\n` each).
    pub fn get_with(&self, host: &str, path: &str, extra: &str) -> Response {
        http_get_with(self.port.expect("no gateway port yet"), host, path, extra)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    /// `skiff deploy APP` against this platform: status, stdout, stderr.
    pub fn deploy(&self, app: &App) -> (ExitStatus, String, String) {
        self.cli(&["deploy", app.path().to_str().unwrap()])
    }

    /// `path` as the platform sees it: the disks of image layers are
    /// mounted in its own mount namespace only. (Not through a wrapper.)
    pub fn platform_view(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid()))
            .join(path.strip_prefix("/").unwrap_or(path))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed assertion must not leave a platform running: SIGTERM
        // makes skiff stop its instances and remove their cgroups.
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs a client command (`skiff ARGS --state STATE`) against the platform
/// on `state`; returns its exit status, stdout and stderr.
pub fn cli_at(state: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(SKIFF)
        .args(args)
        .arg("--state")
        .arg(state)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the skiff CLI");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP/1.1 GET to the gateway on loopback with the given Host.
pub fn http_get(port: u16, host: &str, path: &str) -> Response {
    http_get_with(port, host, path, "")
}

/// `http_get` with more header fields (`extra`: `Name: value\r\n` each).
pub fn http_get_with(port: u16, host: &str, path: &str, extra: &str) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to gateway");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Cgroup directories on this host whose name contains `needle`.
pub fn cgroups_named(needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for controller in ["memory", "pids", "cpu", "unified"] {
        let dir = Path::new("/sys/fs/cgroup").join(controller).join("skiff");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(needle) {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

/// Processes on this host whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

/// Host mounts whose mount point or source mentions `needle`.
pub fn mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A service that tells which instance answered (a token made at start),
/// counts ticks of a background thread, answers slowly, exits, and writes
/// to /tmp or next to its code, all on demand.
pub const TICKER_APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

TOKEN = os.urandom(6).hex()
ticks = 0

def ticker():
    global ticks
    while True:
        time.sleep(0.01)
        ticks += 1

threading.Thread(target=ticker, daemon=True).start()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/slow":
            time.sleep(int(q["ms"]) / 1000)
        if u.path == "/exit":
            os._exit(int(q["code"]))
        if u.path == "/tmp-write":
            open("/tmp/mark", "w").write(TOKEN)
        if u.path == "/append":
            with open("/app/data.txt", "a") as f:
                f.write(q["v"] + "\n")
        if u.path == "/tmp-read":
            body = open("/tmp/mark").read() if os.path.exists("/tmp/mark") else "none"
        elif u.path == "/read":
            body = open("/app/data.txt").read() if os.path.exists("/app/data.txt") else ""
        elif u.path == "/ticks":
            body = str(ticks)
        elif u.path == "/request-id":
            body = self.headers.get("x-request-id", "none")
        else:
            body = TOKEN
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;
