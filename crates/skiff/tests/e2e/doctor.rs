//! `skiff doctor` (and `status`, `logs`): each common error, made for real
//! by a small app on a real daemon, shows up with its cause and its fix;
//! a healthy app gets no finding; starts are timed phase by phase.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{unique, App, Up};

fn doctor(d: &Up, name: &str) -> Value {
    let (status, out, err) = d.cli(&["doctor", name, "--json"]);
    assert!(status.success(), "skiff doctor failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Waits until doctor reports a finding of `kind` (log lines and events
/// are stored a moment after they happen); returns it.
fn finding(d: &Up, name: &str, kind: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doc = doctor(d, name);
        if let Some(f) = doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["kind"] == kind)
        {
            return f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} finding for {name}: {doc:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has(f: &Value, field: &str, text: &str) {
    let value = f[field].as_str().unwrap_or_default();
    assert!(
        value.contains(text),
        "{field} should contain {text:?}: {f:#}"
    );
}

fn deploy(d: &Up, app: &App) -> (bool, String) {
    let (status, _, err) = d.deploy(app);
    (status.success(), err)
}

/// A raw request through the gateway; the status code.
fn request(d: &Up, name: &str, head: &str) -> u16 {
    send(
        d,
        &format!("{head}\r\nHost: {name}.localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// A whole raw request through the gateway; the status code.
fn send(d: &Up, req: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", d.port.unwrap())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const SERVER: &str = r#"
import os, time, multiprocessing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok"
        if self.path == "/save":
            open("/app/data.txt", "w").write("x")
        elif self.path == "/load":
            open("/app/data.txt").read()
        elif self.path == "/lock":
            multiprocessing.Lock()
        elif self.path == "/big":
            body = b"x" * (7 << 20)
        elif self.path == "/slow":
            time.sleep(3)
        elif self.path == "/eat":
            hog = bytearray(512 << 20)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

fn server_app(name: &str, extra: &str) -> App {
    App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 app.py\"\n{extra}"),
        &[("app.py", SERVER)],
    )
}

#[test]
fn run_time_errors_in_the_output_are_diagnosed() {
    let d = Up::serve(None, &[]);
    let name = unique("dr-out");
    assert!(deploy(&d, &server_app(&name, "")).0);
    for _ in 0..3 {
        request(&d, &name, "GET /save HTTP/1.1");
    }
    request(&d, &name, "GET /lock HTTP/1.1");

    let f = finding(&d, &name, "ReadOnlyFileSystem");
    has(&f, "what", "/app/data.txt");
    has(&f, "fix", "/tmp/data.txt");
    has(&f, "evidence", "Read-only file system");
    assert!(
        f["count"].as_u64().unwrap() >= 3,
        "counted, not repeated: {f:#}"
    );
    let f = finding(&d, &name, "SharedMemory");
    has(&f, "fix", "pipes or sockets");

    // Shown once each, in the human output too, with the evidence.
    let (_, out, _) = d.cli(&["doctor", &name]);
    assert_eq!(
        out.matches("/app/data.txt, outside /tmp").count(),
        1,
        "{out}"
    );
    assert!(out.contains("evidence:") && out.contains("fix:"), "{out}");
    // Status points at them; logs explain them under the first such line.
    let (_, out, _) = d.cli(&["status", &name]);
    assert!(
        out.contains("diagnosis") && out.contains("/app/data.txt"),
        "{out}"
    );
    let (_, out, _) = d.cli(&["logs", &name]);
    assert_eq!(
        out.matches("^ skiff: The service tried to write /app/data.txt")
            .count(),
        1,
        "{out}"
    );

    // Build-user vs run-user: a file the build made as root, for root only.
    // (A persistent service may change what its build made: its layers are
    // idmapped; a serverless one only reads the image.)
    let owner = unique("dr-owner");
    let app = App::new(
        &format!(
            "name = \"{owner}\"\n\
             build = \"echo root > /app/data.txt && chmod 600 /app/data.txt\"\n\
             start = \"exec python3 app.py\"\n"
        ),
        &[("app.py", SERVER)],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    request(&d, &owner, "GET /load HTTP/1.1");
    let f = finding(&d, &owner, "RunUserPermission");
    has(&f, "what", "/app/data.txt");
    has(&f, "why", "build runs as root");
}

#[test]
fn failed_starts_are_diagnosed() {
    let d = Up::serve(None, &[]);
    for (start, kind, what, fix) in [
        (
            "python3 -c 'import flask'",
            "MissingPythonModule",
            "flask",
            "requirements.txt",
        ),
        (
            "gunicorn app:app",
            "CommandNotFound",
            "gunicorn",
            "build command",
        ),
        (
            "exec python3 -m http.server 80",
            "PrivilegedPort",
            "below 1024",
            "$PORT",
        ),
        (
            "apt-get install -y jq",
            "RootOnlyCommand",
            "apt-get",
            "build command",
        ),
        (
            "exec python3 -m http.server 3000 --bind 127.0.0.1",
            "PortNotListening",
            "listening on 127.0.0.1:3000, expected 0.0.0.0:8080",
            "0.0.0.0",
        ),
    ] {
        let name = unique("dr-start");
        let app = App::new(
            &format!("name = \"{name}\"\nstart = {start:?}\n[limits]\nstart_timeout = \"2s\"\n"),
            &[],
        );
        let (ok, err) = deploy(&d, &app);
        assert!(!ok, "{start}: the deploy must fail");
        let f = finding(&d, &name, kind);
        has(&f, "what", what);
        has(&f, "fix", fix);
        // The deploy's own output said it too.
        assert!(err.contains(fix) || err.contains(what), "{start}: {err}");
    }
}

#[test]
fn gateway_refusals_and_out_of_memory_kills_are_diagnosed() {
    let d = Up::serve(None, &[]);
    let name = unique("dr-gw");
    let app = server_app(
        &name,
        // /tmp's size counts on top of the memory limit (a full /tmp must
        // give ENOSPC, not a kill): small here, so 512 MiB are too many.
        "[limits]\nrequest_timeout = \"1s\"\nmemory = \"128MiB\"\ntmp_size = \"16MiB\"\n",
    );
    assert!(deploy(&d, &app).0);

    assert_eq!(request(&d, &name, "GET /big HTTP/1.1"), 502);
    let f = finding(&d, &name, "ResponseTooLarge");
    has(&f, "fix", "object storage");
    has(&f, "evidence", "6MiB");

    assert_eq!(request(&d, &name, "GET /slow HTTP/1.1"), 504);
    let f = finding(&d, &name, "RequestTimeout");
    has(&f, "fix", "mode = \"persistent\"");
    has(&f, "evidence", "1s");

    let ws = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    assert_eq!(request(&d, &name, ws), 501);
    let f = finding(&d, &name, "StreamingNeedsPersistent");
    has(&f, "fix", "mode = \"persistent\"");

    assert_eq!(request(&d, &name, "GET /eat HTTP/1.1"), 502);
    let f = finding(&d, &name, "OutOfMemory");
    has(&f, "what", "128MiB");
    has(&f, "fix", "memory = ");
    // The service still serves: the next request gets a new instance.
    assert_eq!(request(&d, &name, "GET / HTTP/1.1"), 200);
}

#[test]
fn a_healthy_app_gets_no_finding_and_timed_starts() {
    let d = Up::serve(None, &[]);
    let name = unique("dr-ok");
    assert!(deploy(&d, &server_app(&name, "")).0);
    for _ in 0..5 {
        assert_eq!(request(&d, &name, "GET / HTTP/1.1"), 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    let doc = doctor(&d, &name);
    assert_eq!(doc["findings"].as_array().unwrap().len(), 0, "{doc:#}");
    let start = &doc["starts"][0];
    let phases: Vec<f64> = [
        "sandbox_ready_ms",
        "process_started_ms",
        "port_listening_ms",
        "first_answer_ms",
    ]
    .iter()
    .map(|p| start[p].as_f64().unwrap())
    .collect();
    assert!(phases[0] > 0.0, "{start}");
    assert!(
        phases.windows(2).all(|w| w[0] <= w[1]),
        "phases in order: {start}"
    );
    let (_, out, _) = d.cli(&["doctor", &name]);
    assert!(
        out.contains("No known problem found") && out.contains("port listening"),
        "{out}"
    );
    let (_, out, _) = d.cli(&["status", &name]);
    assert!(out.contains("first answer"), "{out}");
}

/// A real scheduler (APScheduler, from PyPI) ticking every second in a
/// background thread, as people put into web apps.
const CRON: &str = r#"
import logging, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from apscheduler.schedulers.background import BackgroundScheduler
logging.basicConfig(level=logging.WARNING)
def tick():
    print("tick", flush=True)
scheduler = BackgroundScheduler()
scheduler.add_job(tick, "interval", seconds=1, misfire_grace_time=1, coalesce=False)
scheduler.start()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn background_work_stalled_by_cpu_suspension_is_diagnosed() {
    let d = Up::serve(None, &[]);
    let name = unique("dr-cron");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"python3 -m venv .venv && .venv/bin/pip install -q apscheduler==3.11.0\"\n\
             start = \"exec .venv/bin/python app.py\"\n"
        ),
        &[("app.py", CRON)],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    assert_eq!(request(&d, &name, "GET / HTTP/1.1"), 200);
    // Frozen between requests: the scheduler's runs are missed meanwhile.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(request(&d, &name, "GET / HTTP/1.1"), 200);
    let f = finding(&d, &name, "BackgroundWorkStalled");
    has(&f, "evidence", "was missed by");
    has(&f, "why", "only while a request is in flight");
    has(&f, "fix", "mode = \"persistent\"");

    // The fix works: persistent, the same app misses nothing.
    let kept = unique("dr-cron-kept");
    let (status, _, err) = d.cli(&[
        "deploy",
        app.path().to_str().unwrap(),
        "--name",
        &kept,
        "--mode",
        "persistent",
    ]);
    assert!(status.success(), "{err}");
    assert_eq!(request(&d, &kept, "GET / HTTP/1.1"), 200);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(request(&d, &kept, "GET / HTTP/1.1"), 200);
    let (_, out, _) = d.cli(&["logs", &kept]);
    assert!(
        out.matches("| tick").count() >= 3,
        "the scheduler ran: {out}"
    );
    let doc = doctor(&d, &kept);
    assert_eq!(doc["findings"].as_array().unwrap().len(), 0, "{doc:#}");
}

/// A POST with a JSON body through the gateway; the status code.
fn post_json(d: &Up, name: &str, path: &str, body: &str) -> u16 {
    send(
        d,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {name}.localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// json-server (from npm), as people use it for a quick API: it answers a
/// POST, then writes its database file and logs the request. With the CPU
/// suspended at once, the write and its error would surface only when the
/// next request thaws the instance; the doctor says so.
#[test]
fn work_after_answering_is_diagnosed_on_json_server() {
    let d = Up::serve(None, &[]);
    let name = unique("dr-after");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"npm install --no-audit --no-fund json-server@0.17.4\"\n\
             start = \"exec node_modules/.bin/json-server --host 0.0.0.0 --port $PORT db.json\"\n"
        ),
        &[("db.json", "{\"posts\": []}\n")],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    // Reading writes nothing; its request log lines (written after
    // answering too) are no work of the service's.
    assert_eq!(request(&d, &name, "GET /posts HTTP/1.1"), 200);
    std::thread::sleep(Duration::from_millis(300));
    let doc = doctor(&d, &name);
    assert_eq!(doc["findings"].as_array().unwrap().len(), 0, "{doc:#}");

    // The check gives the work 50 ms; on a loaded machine json-server may
    // not get the CPU that soon, and the next checked answer (the third)
    // tries again.
    for _ in 0..2 {
        assert_eq!(post_json(&d, &name, "/posts", r#"{"title":"x"}"#), 201);
        std::thread::sleep(Duration::from_millis(500));
        let doc = doctor(&d, &name);
        if doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "WorkAfterAnswer")
        {
            break;
        }
    }
    let f = finding(&d, &name, "WorkAfterAnswer");
    has(&f, "evidence", "EROFS");
    has(&f, "evidence", "after answering");
    has(&f, "why", "as soon as its answer is sent");
    has(&f, "fix", "before sending the answer");
    // And what failed is named on its own.
    let f = finding(&d, &name, "ReadOnlyFileSystem");
    has(&f, "what", "db.json");
}

/// A small HTTP server in plain Ruby (Debian's, installed by the build):
/// `/save` writes beside the app in a thread, whose uncaught error Ruby
/// reports in its own words.
const RUBY_APP: &str = r#"
require "socket"
server = TCPServer.new("0.0.0.0", Integer(ENV.fetch("PORT")))
loop do
  client = server.accept
  request = client.gets.to_s
  while (line = client.gets) && line != "\r\n"; end
  if request.include?("/save")
    Thread.new { File.write("/app/data.txt", "x") }.join rescue nil
  end
  client.write "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
  client.close
end
"#;

/// The troubleshooter on Ruby's and PHP's own output (each from Debian's
/// packages, installed by the build): a write beside the app, and a
/// dependency the image lacks.
#[test]
fn ruby_and_php_failures_are_named_in_their_own_words() {
    let d = Up::serve(None, &[]);
    let apt = "apt-get update -qq && apt-get install -y -qq --no-install-recommends";

    let ruby = unique("dr-ruby");
    let app = App::new(
        &format!("name = \"{ruby}\"\nbuild = \"{apt} ruby\"\nstart = \"exec ruby app.rb\"\n"),
        &[("app.rb", RUBY_APP)],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    assert_eq!(request(&d, &ruby, "GET /save HTTP/1.1"), 200);
    let f = finding(&d, &ruby, "ReadOnlyFileSystem");
    has(&f, "what", "/app/data.txt");
    has(&f, "evidence", "Errno::EROFS");

    let gem = unique("dr-gem");
    let app = App::new(
        &format!(
            "name = \"{gem}\"\nbuild = \"{apt} ruby\"\nstart = \"exec ruby -e 'require \\\"sinatra\\\"'\"\n\
             [limits]\nstart_timeout = \"5s\"\n"
        ),
        &[],
    );
    let (ok, _) = deploy(&d, &app);
    assert!(!ok, "the start must fail");
    let f = finding(&d, &gem, "MissingDependency");
    has(&f, "what", "sinatra");
    has(&f, "fix", "bundle install");

    // PHP's built-in server with index.php as its router, from Debian's php-cli.
    let php_app = |name: &str, index: &str| {
        App::new(
            &format!(
                "name = \"{name}\"\nbuild = \"{apt} php-cli\"\n\
                 start = \"exec php -d log_errors=1 -S 0.0.0.0:$PORT index.php\"\n"
            ),
            &[("index.php", index)],
        )
    };
    let php = unique("dr-php");
    let app = php_app(
        &php,
        "<?php\nif ($_SERVER['REQUEST_URI'] === '/save') { file_put_contents('/app/cache.txt', 'x'); }\necho 'ok';\n",
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    assert_eq!(request(&d, &php, "GET /save HTTP/1.1"), 200);
    let f = finding(&d, &php, "ReadOnlyFileSystem");
    has(&f, "what", "/app/cache.txt");

    let composer = unique("dr-composer");
    let app = php_app(
        &composer,
        "<?php\nrequire __DIR__ . '/vendor/autoload.php';\necho 'ok';\n",
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");
    request(&d, &composer, "GET / HTTP/1.1");
    let f = finding(&d, &composer, "MissingDependency");
    has(&f, "what", "vendor/autoload.php");
    has(&f, "fix", "composer install");
}

/// A Java HTTP server (the JDK's own `com.sun.net.httpserver`), compiled by
/// the build with Debian's JDK: each path fails one way, and the handler
/// prints what it caught, as services do.
const JAVA_APP: &str = r#"
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

public class App {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(System.getenv("PORT"));
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 0);
        server.createContext("/", exchange -> {
            String path = exchange.getRequestURI().getPath();
            int status = 200;
            try {
                if (path.equals("/save")) {
                    Files.writeString(Path.of("/app/data.txt"), "x");
                } else if (path.equals("/grow")) {
                    List<byte[]> held = new ArrayList<>();
                    while (true) {
                        held.add(new byte[1 << 20]);
                    }
                } else if (path.equals("/listen")) {
                    HttpServer.create(new InetSocketAddress(80), 0);
                }
            } catch (Throwable e) {
                e.printStackTrace();
                status = 500;
            }
            exchange.sendResponseHeaders(status, -1);
            exchange.close();
        });
        server.start();
    }
}
"#;

/// The troubleshooter on the JVM's own output: a write beside the app, a
/// heap smaller than the work (the fix relates -Xmx to limits.memory), a
/// privileged port, and a main class that is not on the class path.
#[test]
fn java_failures_are_named_in_its_own_words() {
    let d = Up::serve(None, &[]);
    let build = "apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                 default-jdk-headless && javac App.java";
    let java = unique("dr-java");
    let app = App::new(
        &format!(
            "name = \"{java}\"\nbuild = \"{build}\"\nstart = \"exec java -Xmx32m -cp /app App\"\n"
        ),
        &[("App.java", JAVA_APP)],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");

    assert_eq!(request(&d, &java, "GET /save HTTP/1.1"), 500);
    let f = finding(&d, &java, "ReadOnlyFileSystem");
    has(&f, "what", "/app/data.txt");
    has(&f, "evidence", "Read-only file system");

    assert_eq!(request(&d, &java, "GET /grow HTTP/1.1"), 500);
    let f = finding(&d, &java, "OutOfMemory");
    has(&f, "what", "Java heap space");
    has(&f, "fix", "-XX:MaxRAMPercentage");

    assert_eq!(request(&d, &java, "GET /listen HTTP/1.1"), 500);
    let f = finding(&d, &java, "PrivilegedPort");
    has(&f, "evidence", "BindException");

    // The same image started with a class that is not there.
    let missing = unique("dr-jclass");
    let app = App::new(
        &format!(
            "name = \"{missing}\"\nbuild = \"{build}\"\n\
             start = \"exec java -cp /app com.example.Main\"\n[limits]\nstart_timeout = \"5s\"\n"
        ),
        &[("App.java", JAVA_APP)],
    );
    let (ok, _) = deploy(&d, &app);
    assert!(!ok, "the start must fail");
    let f = finding(&d, &missing, "MissingDependency");
    has(&f, "what", "com.example.Main");
    has(&f, "fix", "java -jar");
}

/// A Go HTTP server from the standard library, compiled by the build with
/// Debian's Go: each path fails one way and logs the error, as services do.
const GO_APP: &str = r#"
package main

import (
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/save", func(w http.ResponseWriter, r *http.Request) {
		if err := os.WriteFile("/app/data.txt", []byte("x"), 0o644); err != nil {
			log.Printf("save: %v", err)
		}
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, 1024)
		if _, err := io.ReadAll(r.Body); err != nil {
			log.Printf("upload: %v", err)
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
		}
	})
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond)
		if _, err := w.Write([]byte("late")); err != nil {
			log.Printf("slow: %v", err)
		}
	})
	mux.Handle("/slow", http.TimeoutHandler(slow, 50*time.Millisecond, "timeout"))
	mux.HandleFunc("/listen", func(w http.ResponseWriter, r *http.Request) {
		if _, err := net.Listen("tcp", ":80"); err != nil {
			log.Print(err)
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})
	log.Fatal(http.ListenAndServe(":"+os.Getenv("PORT"), mux))
}
"#;

/// The troubleshooter on Go's own output: a write beside the app, a body
/// over the service's own MaxBytesReader, a handler past its own
/// TimeoutHandler, and a privileged port.
#[test]
fn go_failures_are_named_in_its_own_words() {
    let d = Up::serve(None, &[]);
    let go = unique("dr-go");
    // The slow handler writes after its TimeoutHandler answered: the
    // instance stays unfrozen a while so that the write is seen.
    let app = App::new(
        &format!(
            "name = \"{go}\"\n\
             build = \"apt-get update -qq && apt-get install -y -qq --no-install-recommends \
             golang-go && HOME=/tmp GOCACHE=/tmp/go-cache go build -o server main.go\"\n\
             start = \"exec ./server\"\n[limits]\nidle_suspend = \"5s\"\n"
        ),
        &[("main.go", GO_APP)],
    );
    let (ok, err) = deploy(&d, &app);
    assert!(ok, "{err}");

    assert_eq!(request(&d, &go, "GET /save HTTP/1.1"), 200);
    let f = finding(&d, &go, "ReadOnlyFileSystem");
    has(&f, "what", "/app/data.txt");

    assert_eq!(post_json(&d, &go, "/upload", &"x".repeat(4096)), 413);
    let f = finding(&d, &go, "RequestTooLarge");
    has(&f, "evidence", "http: request body too large");
    has(&f, "fix", "MaxBytesReader");

    assert_eq!(request(&d, &go, "GET /slow HTTP/1.1"), 503);
    let f = finding(&d, &go, "RequestTimeout");
    has(&f, "evidence", "http: Handler timeout");

    assert_eq!(request(&d, &go, "GET /listen HTTP/1.1"), 200);
    let f = finding(&d, &go, "PrivilegedPort");
    has(&f, "what", "port 80");
}
