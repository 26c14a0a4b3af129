//! Persistent mode: one instance always running, never frozen, restarted
//! when it dies, a writable layer kept across restarts, WebSocket proxied.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

const WS_SERVER: &str = r#"
const http = require("http");
const { WebSocketServer } = require("ws");
const server = http.createServer((req, res) => res.end("ok"));
const wss = new WebSocketServer({ server });
wss.on("connection", (ws) => ws.on("message", (m) => ws.send("echo: " + m)));
server.listen(Number(process.env.PORT), "0.0.0.0");
"#;

fn ws_app(name: &str, mode: &str) -> App {
    App::new(
        &format!(
            "name = \"{name}\"\nmode = \"{mode}\"\nbuild = \"npm install --no-audit --no-fund ws@8\"\n\
             start = \"node server.js\"\n"
        ),
        &[("server.js", WS_SERVER)],
    )
}

fn get_ok(up: &Up, name: &str, path: &str) -> String {
    let r = up.get(&host(name), path);
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r.body
}

#[test]
fn websocket_echo_through_the_gateway() {
    let name = unique("ws");
    let app = ws_app(&name, "persistent");
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let port = up.port.unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let request = format!("ws://{name}.localhost:{port}/")
            .into_client_request()
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(request, tcp)
            .await
            .expect("websocket handshake through the gateway");
        assert_eq!(resp.status(), 101);
        for text in ["hello", "second message"] {
            ws.send(Message::text(text)).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an echo")
                .expect("an open stream")
                .expect("a message");
            assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {text}"));
        }
        ws.close(None).await.unwrap();
    });
}

#[test]
fn websocket_to_a_serverless_service_is_refused_with_the_way_out() {
    let name = unique("wsless");
    let app = ws_app(&name, "serverless");
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let port = up.port.unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {name}.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert!(
        text.contains("x-skiff-error: streaming-needs-persistent"),
        "{text}"
    );
    assert!(text.contains("mode = \"persistent\""), "{text}");
}

#[test]
fn persistent_keeps_running_writes_and_restarts() {
    let name = unique("persist");
    let app = App::new(
        &format!("name = \"{name}\"\nmode = \"persistent\"\nstart = \"exec python3 app.py\"\n"),
        &[("app.py", TICKER_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());

    // Never frozen: its background thread runs while no request comes.
    let t1: u64 = get_ok(&up, &name, "/ticks").parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t2: u64 = get_ok(&up, &name, "/ticks").parse().unwrap();
    assert!(t2 - t1 > 25, "only {} ticks in 500 ms idle", t2 - t1);

    // Writable next to its code, and kept when the instance is restarted.
    get_ok(&up, &name, "/append?v=first");
    let token = get_ok(&up, &name, "/");
    let r = up.get(&host(&name), "/exit?code=3");
    assert_eq!(r.status, 502, "{r:?}");
    // Restarted without waiting for a request.
    assert!(
        up.wait_output(
            &format!("{name}: started instance"),
            Duration::from_secs(20)
        ),
        "{}",
        up.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = String::new();
    while Instant::now() < deadline {
        let r = up.get(&host(&name), "/");
        if r.status == 200 {
            again = r.body;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !again.is_empty() && again != token,
        "a new instance: {again:?} vs {token:?}"
    );
    get_ok(&up, &name, "/append?v=second");
    assert_eq!(get_ok(&up, &name, "/read"), "first\nsecond\n");
}
