//! Troubleshooting built in: each common error, made for real by a small
//! app, is explained with its cause and fix where the user looks (the
//! `skiff up` output); a healthy app gets no finding.

use std::time::Duration;

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

/// Starts an app whose start command fails; returns what skiff said.
fn failed_start(name: &str, start: &str) -> String {
    let app = App::new(&format!("name = \"{name}\"\nstart = {start:?}\n"), &[]);
    let mut up = Up::start(&[app.path()], &[]);
    assert!(!up.wait_exit(FIRST_START).success());
    up.stderr()
}

#[test]
fn a_missing_python_module_points_at_the_build() {
    let err = failed_start(&unique("nomod"), "python3 -c 'import flask'");
    assert!(
        err.contains("Diagnosis: Python cannot import \"flask\""),
        "{err}"
    );
    assert!(err.contains("add flask to requirements.txt"), "{err}");
}

#[test]
fn a_missing_command_points_at_the_build() {
    let err = failed_start(&unique("nocmd"), "gunicorn app:app");
    assert!(
        err.contains("Diagnosis: The command \"gunicorn\" is not in the image"),
        "{err}"
    );
    assert!(err.contains("Install it in the build command"), "{err}");
}

#[test]
fn a_privileged_port_is_explained() {
    let err = failed_start(&unique("port80"), "exec python3 -m http.server 80");
    assert!(err.contains("Diagnosis:"), "{err}");
    assert!(err.contains("ports below 1024 need root"), "{err}");
    assert!(err.contains("$PORT"), "{err}");
}

#[test]
fn shared_memory_is_explained() {
    let err = failed_start(
        &unique("shm"),
        "python3 -c 'import multiprocessing; multiprocessing.Lock()'",
    );
    assert!(
        err.contains("Diagnosis: The service tried to use shared memory"),
        "{err}"
    );
    assert!(err.contains("pipes or sockets"), "{err}");
}

#[test]
fn apt_get_in_the_start_command_is_explained() {
    let err = failed_start(&unique("apt"), "apt-get install -y jq");
    assert!(
        err.contains("Diagnosis: The start command runs apt-get, which needs root"),
        "{err}"
    );
    assert!(err.contains("build command, which runs as root"), "{err}");
}

#[test]
fn a_write_outside_tmp_at_run_time_names_the_path_once() {
    let name = unique("rofs");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n"),
        &[(
            "app.py",
            r#"
import os
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/save":
            open("/app/data.txt", "w").write("x")
        self.send_response(200)
        self.end_headers()
HTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#,
        )],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    for _ in 0..3 {
        let _ = up.get(&host(&name), "/save");
    }
    assert!(
        up.wait_output(
            "diagnosis: The service tried to write /app/data.txt, outside /tmp",
            Duration::from_secs(10)
        ),
        "{}",
        up.stderr()
    );
    assert!(up
        .stderr()
        .contains("Write files under /tmp instead (e.g. /tmp/data.txt)"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        up.stderr().matches("diagnosis:").count(),
        1,
        "shown once: {}",
        up.stderr()
    );
}

#[test]
fn a_healthy_app_gets_no_finding() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-python");
    let mut up = Up::start(&[&example], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    for _ in 0..3 {
        assert_eq!(
            up.get(&format!("hello-python.localhost:{}", up.port.unwrap()), "/")
                .status,
            200
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!up.stderr().contains("iagnosis"), "{}", up.stderr());
}
