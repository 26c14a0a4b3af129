//! What the platform shows of its services. `GET /metrics` as its real
//! consumer reads it: a Prometheus server (Debian's `prometheus`, which
//! `.ci/run` unpacks) scrapes the daemon with its token, and its own query
//! API then answers with skiff's series. And the request log, as `skiff
//! logs --requests` prints it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

/// Where `.ci/run` unpacks Debian's package (`dpkg-deb -x`: no service is
/// installed or started), unless `prometheus` is on the PATH.
const UNPACKED: &str = "/opt/skiff-ci/prometheus/usr/bin/prometheus";

fn prometheus_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let unpacked = PathBuf::from(UNPACKED);
        assert!(
            unpacked.is_file(),
            "no prometheus binary: install Debian's `prometheus`, or unpack it as .ci/run \
             does (apt-get download prometheus && dpkg-deb -x prometheus_*.deb \
             /opt/skiff-ci/prometheus)"
        );
        unpacked
    })
}

/// A Prometheus server of the test's own, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second with the token in
    /// `token_file`.
    fn scraping(target: &str, token_file: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: skiff\n    authorization:\n      \
                 credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
                token_file.display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The result of an instant query, as Prometheus's JSON.
    fn query(&self, query: &str) -> String {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        // Not listening yet while it starts: no answer then.
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let head = format!(
            "GET /api/v1/query?query={q} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let mut raw = String::new();
        if s.write_all(head.as_bytes()).is_err() || s.read_to_string(&mut raw).is_err() {
            return String::new();
        }
        raw.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_string())
    }

    /// Waits until `query` has a result whose value satisfies `ok`; returns
    /// the last answer either way.
    fn wait_for(&self, query: &str, ok: impl Fn(f64) -> bool) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last = String::new();
        while Instant::now() < deadline {
            last = self.query(query);
            if first_value(&last).is_some_and(&ok) {
                return (true, last);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        (false, last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first sample in an instant query's JSON answer.
fn first_value(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let sample = v.pointer("/data/result/0/value/1")?;
    sample.as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_starts_thaws_and_instances_per_service() {
    let name = unique("metrics");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n"),
        &[("app.py", TICKER_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    // Frozen between requests (idle_suspend 0s): each one thaws it.
    for _ in 0..5 {
        assert_eq!(up.get(&host(&name), "/").status, 200);
    }
    // One the gateway answers itself, for no service.
    assert_eq!(up.get(&host("no-such-service"), "/").status, 404);
    // Behind the token like the rest of the API.
    let (status, _) = up.api("GET", "/metrics", b"", Some("wrong"));
    assert_eq!(status, 401);
    let (status, text) = up.api("GET", "/metrics", b"", None);
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(&format!("faas_coldstarts_total{{faas_name=\"{name}\"}} 1")),
        "{text}"
    );

    let state = up.state_dir();
    let target = std::fs::read_to_string(state.join("api-address")).unwrap();
    let prometheus = Prometheus::scraping(target.trim(), &state.join("api-token"));
    let label = format!("{{faas_name=\"{name}\"}}");
    let (ok, last) = prometheus.wait_for(&format!("faas_coldstarts_total{label}"), |v| v == 1.0);
    assert!(ok, "Prometheus has no cold start of {name}: {last}");
    let (ok, last) = prometheus
        .wait_for(&format!("skiff_thaw_duration_seconds_count{label}"), |v| {
            v >= 4.0
        });
    assert!(ok, "Prometheus has no thaws of {name}: {last}");
    let (ok, last) = prometheus.wait_for(&format!("sum(skiff_instances{label})"), |v| v == 1.0);
    assert!(ok, "Prometheus has no instance of {name}: {last}");
    let (ok, last) = prometheus.wait_for(&format!("faas_init_duration_seconds_sum{label}"), |v| {
        v > 0.0 && v < 60.0
    });
    assert!(ok, "Prometheus has no start duration of {name}: {last}");
    // The gateway's counts: the answers by class, their durations, and
    // its own refusal (for no service: no `faas_name`).
    let answers = format!("faas_invocations_total{{faas_name=\"{name}\",status_class=\"2xx\"}}");
    let (ok, last) = prometheus.wait_for(&answers, |v| v >= 5.0);
    assert!(ok, "Prometheus has not the answers of {name}: {last}");
    let (ok, last) = prometheus
        .wait_for(&format!("faas_invoke_duration_seconds_count{label}"), |v| {
            v >= 5.0
        });
    assert!(ok, "Prometheus has not the durations of {name}: {last}");
    let (ok, last) = prometheus.wait_for(
        "skiff_gateway_refusals_total{reason=\"unknown-service\",faas_name=\"\"}",
        |v| v == 1.0,
    );
    assert!(ok, "Prometheus has not the refusal: {last}");
    // Each instance's use, from its groups: a Python process's memory,
    // and the CPU time of its start.
    let (ok, last) = prometheus
        .wait_for(&format!("sum(skiff_instance_memory_bytes{label})"), |v| {
            v > 1e6
        });
    assert!(ok, "Prometheus has not the memory of {name}: {last}");
    let (ok, last) = prometheus.wait_for(
        &format!("sum(skiff_instance_cpu_seconds_total{label})"),
        |v| v > 0.01,
    );
    assert!(ok, "Prometheus has not the CPU of {name}: {last}");
    // The scrape itself is healthy (Prometheus's own `up` series).
    let (ok, last) = prometheus.wait_for("up{job=\"skiff\"}", |v| v == 1.0);
    assert!(ok, "{last}");
    drop(up);
}

#[test]
fn every_request_is_in_the_request_log_with_its_id_and_what_it_woke() {
    let name = unique("reqlog");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 app.py\"\n[limits]\nidle_stop = \"1s\"\n"
        ),
        &[("app.py", TICKER_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    // The deploy's instance is suspended at once (idle_suspend 0s): the
    // first request thaws it. The service gets the id the client gets.
    let thawed = up.get(&host(&name), "/request-id");
    assert_eq!(thawed.status, 200, "{thawed:?}");
    let made = thawed.header("x-request-id").expect("an id in the answer");
    assert_eq!(
        thawed.body, made,
        "the service received the id the client got"
    );
    // Stopped when idle: the next request starts an instance, with an
    // id the client chose.
    assert!(
        up.wait_output(
            &format!("{name}: stopped idle instance"),
            Duration::from_secs(15)
        ),
        "{}",
        up.stderr()
    );
    let cold = up.get_with(
        &host(&name),
        "/request-id?from=zero",
        "X-Request-Id: e2e-chosen-1\r\n",
    );
    assert_eq!(cold.body, "e2e-chosen-1", "{cold:?}");
    assert_eq!(cold.header("x-request-id"), Some("e2e-chosen-1"));
    // One the gateway answers itself is recorded too.
    assert_eq!(up.get(&host(&name), "/exit?code=3").status, 502);

    // The records reach the store within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let (status, out, err) = up.cli(&["logs", &name, "--requests", "--json"]);
        assert!(status.success(), "{out}{err}");
        let records: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if records.len() >= 3 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(records.len(), 3, "{records:#?}");
    let (first, second, broken) = (&records[0], &records[1], &records[2]);
    assert_eq!(first["path"], "/request-id");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert_eq!(first["request_id"], made);
    assert_eq!(first["wake"], "thawed", "{first}");
    assert_eq!(first["bytes_out"], made.len() as u64);
    assert!(
        first["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{first}"
    );
    assert_eq!(second["path"], "/request-id?from=zero");
    assert_eq!(second["request_id"], "e2e-chosen-1");
    assert_eq!(second["wake"], "cold", "{second}");
    for r in [first, second] {
        assert!(
            r["instance"].as_str().is_some_and(|i| i.contains(&name)),
            "{r}"
        );
    }
    assert_ne!(first["instance"], second["instance"], "a new instance");
    assert_eq!(broken["status"], 502);
    assert_eq!(broken["error"], "upstream-failed", "{broken}");
    // Read by people: one line per request.
    let (_, out, _) = up.cli(&["logs", &name, "--requests", "--tail", "1"]);
    assert!(out.contains(" GET /exit?code=3 502 "), "{out}");
    assert!(out.contains("(upstream-failed)"), "{out}");
    drop(up);
}
