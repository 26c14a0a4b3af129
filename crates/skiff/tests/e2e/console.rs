//! The web console in a real browser: headless Chromium (Debian's
//! `chromium-headless-shell`, or `chromium`), driven over the DevTools
//! protocol on a pipe, signs in, sees a deployed service, opens it, watches
//! a log line appear after a request, rolls back and sees the version
//! change. Screenshots of each step are kept as test artifacts (under
//! the target directory's `console-screenshots`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

/// The browser: `chromium-headless-shell` or `chromium` on the PATH.
fn browser() -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    ["chromium-headless-shell", "chromium"]
        .iter()
        .flat_map(|name| std::env::split_paths(&paths).map(move |d| d.join(name)))
        .find(|p| p.is_file())
        .expect(
            "no headless Chromium: install Debian's chromium-headless-shell \
             (apt-get install chromium-headless-shell), as .ci/run does",
        )
}

/// A browser driven over the DevTools protocol: commands go to its fd 3,
/// answers and events come from its fd 4, each a JSON text ended by NUL.
struct Browser {
    child: Child,
    commands: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let profile = tempfile::tempdir().unwrap();
        // The shell gives the browser our pipes as fds 3 and 4 (no unsafe
        // code for a pre-exec), and its own stdin and stdout nothing.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(browser())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // Anything not on loopback would go to a port nobody
                // listens on: the test reaches no other address.
                "--proxy-server=http://127.0.0.1:9",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the browser");
        let commands = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut message = Vec::new();
            while out.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop_if(|b| *b == 0);
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut b = Self {
            child,
            commands,
            messages,
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let id = target["targetId"].as_str().expect("a target").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    /// Sends a command (to the page, once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .expect("write to the browser");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method}: {m}");
                return m["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    fn wait_for(&mut self, expression: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            );
            if r["result"]["value"] == json!(true) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.loaded();
    }

    /// Waits for the page the browser is on to have loaded.
    fn loaded(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            self.wait_for(
                "document.readyState === 'complete'",
                Duration::from_secs(20)
            ),
            "the page did not load"
        );
    }

    /// A PNG of the whole page, saved as `dir/name.png`.
    fn screenshot(&mut self, dir: &Path, name: &str) -> PathBuf {
        let height = self
            .eval("document.documentElement.scrollHeight")
            .as_f64()
            .unwrap_or(900.0);
        let shot = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": height.min(4000.0), "scale": 1}
            }),
        );
        let png = base64_decode(shot["data"].as_str().expect("image data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshots' encoding).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut n) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// A service that prints a line for each request it answers.
const LOGGING_APP: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        print("answered GET", self.path, flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
}

#[test]
fn the_console_signs_in_shows_a_service_its_live_logs_and_rolls_back() {
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let name = unique("console");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n"),
        &[("app.py", LOGGING_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    // A second version, so there is one to roll back to.
    std::fs::write(app.path().join("VERSION"), "2").unwrap();
    let (status, out, err) = up.deploy(&app);
    assert!(status.success(), "{out}{err}");
    for _ in 0..3 {
        assert_eq!(up.get(&host(&name), "/").status, 200);
    }
    let state = up.state_dir();
    let api = std::fs::read_to_string(state.join("api-address")).unwrap();
    let console = format!("http://{}/console", api.trim());
    let token = std::fs::read_to_string(state.join("api-token")).unwrap();

    let mut b = Browser::start();
    // Signed out, the console sends the browser to its sign-in page.
    b.goto(&console);
    assert_eq!(b.eval("location.pathname"), "/console/login");
    b.screenshot(&shots, "1-sign-in");
    // A wrong token is refused with what to do.
    b.eval("document.getElementById('token').value = 'not-the-token'; document.querySelector('form').requestSubmit()");
    b.loaded();
    let said = b.eval("document.querySelector('.flash.error').textContent");
    assert!(
        said.as_str()
            .is_some_and(|s| s.contains("not the API token")),
        "{said}"
    );
    // The right one signs in.
    let fill = format!(
        "document.getElementById('token').value = {}; document.querySelector('form').requestSubmit()",
        json!(token.trim())
    );
    b.eval(&fill);
    assert!(
        b.wait_for("location.pathname === '/console'", Duration::from_secs(10)),
        "not signed in: {}",
        b.eval("document.body.innerText")
    );
    b.loaded();
    let listed = b.eval("[...document.querySelectorAll('a.service-link')].map(a => a.textContent)");
    assert_eq!(listed, json!([name]), "the services page lists the service");
    b.screenshot(&shots, "2-services");

    // Its page: the serving version, and the log lines so far.
    b.eval("document.querySelector('a.service-link').click()");
    assert!(b.wait_for(
        &format!("location.pathname === '/console/services/{name}'"),
        Duration::from_secs(10)
    ));
    b.loaded();
    assert_eq!(
        b.eval("document.getElementById('serving-version').textContent"),
        "2"
    );
    // A request's log line shows up without a reload (server-sent events).
    let path = format!("/live-{}", std::process::id());
    assert_eq!(up.get(&host(&name), &path).status, 200);
    let shows =
        format!("document.getElementById('live-logs').textContent.includes('answered GET {path}')");
    assert!(
        b.wait_for(&shows, Duration::from_secs(15)),
        "the request's log line did not appear: {}",
        b.eval("document.getElementById('live-logs').textContent")
    );
    // And the request in the request log, after a reload (its record
    // reaches the store within moments).
    let recorded = format!(
        "!!document.querySelector('table.requests') && \
         document.querySelector('table.requests').textContent.includes('GET {path}')"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        b.goto(&format!("{console}/services/{name}"));
        if b.eval(&recorded) == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request is not in the page's request log"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    b.screenshot(&shots, "3-service");

    // Roll back to version 1: a new version on its image serves.
    b.eval("document.getElementById('version').value = '1'; document.getElementById('rollback').click()");
    assert!(
        b.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('.flash')",
            Duration::from_secs(60)
        ),
        "no answer to the rollback"
    );
    let flash = b.eval("document.querySelector('.flash').textContent");
    assert!(
        flash
            .as_str()
            .is_some_and(|f| f.contains("Rolled back: version 3 now serves")),
        "{flash}"
    );
    assert_eq!(
        b.eval("document.getElementById('serving-version').textContent"),
        "3"
    );
    b.screenshot(&shots, "4-rolled-back");
    let (status, out, _) = up.cli(&["status", &name, "--json"]);
    assert!(status.success());
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["version"], 3, "{status}");
    drop(b);
    drop(up);
}

/// One request to the console (`head` whole but for `Host`,
/// `Content-Length` and `Connection`): status, header fields, body.
fn console_request(api: &str, head: &str, body: &str) -> Response {
    let mut s = std::net::TcpStream::connect(api).expect("connect to the control API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "{head}Host: {api}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// What a browser of another site, or a caller without the session's form
/// token, cannot do; and the API's routes never take the console's cookie.
#[test]
fn the_console_refuses_forged_actions_and_the_api_ignores_its_cookie() {
    let name = unique("forged");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n"),
        &[("app.py", LOGGING_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let state = up.state_dir();
    let api = std::fs::read_to_string(state.join("api-address")).unwrap();
    let api = api.trim();
    let token = std::fs::read_to_string(state.join("api-token")).unwrap();
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";

    // Signed out: every page sends to the sign-in page; no action runs.
    let r = console_request(api, "GET /console HTTP/1.1\r\n", "");
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/console/login"))
    );
    let remove = format!("POST /console/services/{name}/remove HTTP/1.1\r\n{form}");
    let r = console_request(api, &remove, "confirm=yes");
    assert_eq!(r.status, 303, "{r:?}");
    // A wrong token signs nobody in.
    let login = format!("POST /console/login HTTP/1.1\r\n{form}");
    let r = console_request(api, &login, "token=guess");
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    // Nor a sign-in another site's page sends.
    let body = format!("token={}", token.trim());
    let r = console_request(
        api,
        &format!("{login}Origin: http://evil.example\r\n"),
        &body,
    );
    assert_eq!(r.status, 403, "{r:?}");
    // Signed in: a strict, script-proof session cookie.
    let r = console_request(api, &login, &body);
    assert_eq!(r.status, 303, "{r:?}");
    let cookie = r
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();
    let page = console_request(
        api,
        &format!("GET /console/services/{name} HTTP/1.1\r\nCookie: {session}\r\n"),
        "",
    );
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a form token in the page")
        .to_string();

    // The cookie alone does nothing: no form token, a wrong one, or
    // another site's page, and the service stays.
    let with_cookie = format!("{remove}Cookie: {session}\r\n");
    for (head, body) in [
        (with_cookie.clone(), "confirm=yes".to_string()),
        (with_cookie.clone(), "confirm=yes&csrf=0000".to_string()),
        (
            format!("{with_cookie}Origin: http://evil.example\r\n"),
            format!("confirm=yes&csrf={csrf}"),
        ),
    ] {
        let r = console_request(api, &head, &body);
        assert_eq!(r.status, 403, "{body}: {r:?}");
    }
    assert_eq!(up.get(&host(&name), "/").status, 200, "the service stays");
    // The API's routes want the bearer token, whatever cookie comes.
    let r = console_request(
        api,
        &format!("DELETE /v1/services/{name} HTTP/1.1\r\nCookie: {session}\r\n"),
        "",
    );
    assert_eq!(r.status, 401, "{r:?}");

    // With its form token, from its own page, the action runs.
    let r = console_request(
        api,
        &format!("{with_cookie}Origin: http://{api}\r\n"),
        &format!("confirm=yes&csrf={csrf}"),
    );
    assert_eq!((r.status, r.header("location")), (303, Some("/console")));
    let (_, list, _) = up.cli(&["ls"]);
    assert!(!list.contains(&name), "{list}");
    // Signed out, the session is gone.
    let signed_out = console_request(
        api,
        &format!("POST /console/logout HTTP/1.1\r\n{form}Cookie: {session}\r\n"),
        &format!("csrf={csrf}"),
    );
    assert_eq!(signed_out.status, 303);
    let r = console_request(
        api,
        &format!("GET /console HTTP/1.1\r\nCookie: {session}\r\n"),
        "",
    );
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/console/login"))
    );
    drop(up);
}
