//! The control API server: REST + JSON over HTTP/1.1 on loopback (unless
//! told otherwise), every call authenticated with the daemon's token.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/services` | list |
//! | `POST /v1/deploy?name=&build=&start=&port=&mode=` | body: a tar of the source; answers an NDJSON progress stream |
//! | `GET /v1/services/{name}` | status |
//! | `DELETE /v1/services/{name}` | remove |
//! | `GET /v1/services/{name}/logs?since=&tail=&follow=` | NDJSON log lines |
//! | `GET /v1/services/{name}/requests?since=&tail=&follow=` | NDJSON request records |
//! | `GET /v1/services/{name}/doctor` | findings with evidence, start phases |
//! | `POST /v1/services/{name}/rollback?version=` | an earlier version's image serves again |
//! | `GET /metrics` | the platform's metrics (OpenMetrics text, which Prometheus reads) |
//! | `GET /openapi.json` | this API's description (no token needed) |

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use skiff_gateway::{ConnectionLimits, ConnectionTable};
use skiff_model::Overrides;
use skiff_runtime::diagnose::{Diagnoser, Disks};
use skiff_runtime::store::{LogQuery, LogRecord, LogSource, RequestRecord};
use skiff_runtime::Level;
use skiff_runtime::{DeployError, Event, Handle, LiveStatus, Phase};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::warn;

use crate::archive;
use crate::console;
use crate::failure::Failure;
use crate::types::{self, ApiError, DeployMessage};

/// The OpenAPI description served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route: method and path pattern (`{name}` is a service name). The
/// OpenAPI test checks this list against `openapi.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/services"),
    ("POST", "/v1/deploy"),
    ("GET", "/v1/services/{name}"),
    ("DELETE", "/v1/services/{name}"),
    ("GET", "/v1/services/{name}/logs"),
    ("GET", "/v1/services/{name}/requests"),
    ("GET", "/v1/services/{name}/doctor"),
    ("POST", "/v1/services/{name}/rollback"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// Log lines answered when the caller asks for no particular tail.
const DEFAULT_TAIL: u32 = 1000;
/// The most request records one call answers before following: each
/// is read into memory first.
const MAX_REQUESTS_ANSWERED: u32 = 10_000;
/// Connections served at once, and from one address; more are closed at
/// once. The API's callers are the CLI and scripts of the platform's
/// operators, one connection per call (a `logs -f` holds one): 32 from one
/// address is plenty, and idle connections from one address cannot lock
/// the others out.
const CONNECTIONS: ConnectionLimits = ConnectionLimits {
    total: 256,
    per_address: 32,
};
/// A caller must send a request's head within this, and a connection is
/// closed when idle this long between requests: a caller that holds a
/// connection without using it (without the token, too) is cut off soon.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The bearer token every call must present.
    pub token: String,
    /// Where uploads are unpacked (under the state directory).
    pub uploads: PathBuf,
    /// Largest upload accepted, in bytes.
    pub max_upload: u64,
}

pub(crate) struct Api {
    platform: Handle,
    config: ApiConfig,
    next_upload: AtomicU64,
    /// The console's signed-in browsers.
    sessions: console::Sessions,
}

pub(crate) type ApiBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    platform: Handle,
    config: ApiConfig,
    shutdown: impl Future<Output = ()>,
) {
    if let Err(e) = std::fs::create_dir_all(&config.uploads) {
        warn!("cannot create {}: {e}", config.uploads.display());
    }
    let api = Arc::new(Api {
        platform,
        config,
        next_upload: AtomicU64::new(0),
        sessions: console::Sessions::default(),
    });
    tokio::pin!(shutdown);
    let connections = ConnectionTable::new();
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: the connection
                    // stays queued; wait a little, log now and then.
                    if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
                        warn!("control API: cannot accept a connection: {e}; retrying");
                        warned = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        // Beyond a cap a connection is closed at once: idle connections
        // must not take the descriptors the gateway and sandboxes need,
        // nor one caller's the slots of another.
        let Ok(slot) = connections.admit(peer.ip(), CONNECTIONS) else {
            drop(stream);
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder
                .http1_only()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = conn {
                tracing::debug!("control API connection: {e}");
            }
        });
    }
}

/// Binds the API's address, saying what to do when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen for the control API on {addr}: {e}; pick another address with --api \
             (another skiff may be running there)"
        )
    })
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// The one place a failure becomes an HTTP answer.
fn answer(failure: Failure) -> Response<ApiBody> {
    json(
        failure.status(),
        &ApiError {
            error: failure.to_string(),
            kind: failure.kind().into(),
        },
    )
}

/// A body fed by a channel: one NDJSON line per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Response<ApiBody> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(channel_body(rx))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A body that sends what comes through `rx` as it comes.
pub(crate) fn channel_body(rx: mpsc::Receiver<Bytes>) -> ApiBody {
    ChannelBody(rx).boxed()
}

fn line<T: serde::Serialize>(value: &T) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guess was right.
pub(crate) fn same_token(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

impl Api {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ApiBody> {
        let path = req.uri().path().to_string();
        // The console signs in with a cookie of its own (`console.rs`);
        // the API's routes take the bearer token only.
        if console::owns(&path) {
            return console::handle(self.clone(), req).await;
        }
        if req.method() == Method::GET && path == "/openapi.json" {
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())).boxed())
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
        }
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same_token(t.trim().as_bytes(), self.config.token.as_bytes()));
        if !authorized {
            // Closed after the answer: a connection serves no caller
            // without the token for longer than one request.
            let mut answer = answer(Failure::Unauthorized);
            answer.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return answer;
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["v1", "services"]) => self.list(),
            ("POST", ["v1", "deploy"]) => self.deploy(req).await,
            ("GET", ["v1", "services", name]) => self.status(name),
            ("DELETE", ["v1", "services", name]) => self.remove(name).await,
            ("GET", ["v1", "services", name, "logs"]) => {
                let q = query(&req);
                self.logs(name, &q)
            }
            ("GET", ["v1", "services", name, "requests"]) => {
                let q = query(&req);
                self.requests(name, &q)
            }
            ("GET", ["v1", "services", name, "doctor"]) => self.doctor(name),
            ("GET", ["metrics"]) => self.metrics(),
            ("POST", ["v1", "services", name, "rollback"]) => {
                let q = query(&req);
                self.rollback(name, &q).await
            }
            (_, ["metrics"])
            | (_, ["v1", "services", _, "rollback"])
            | (_, ["v1", "services"])
            | (_, ["v1", "deploy"])
            | (_, ["v1", "services", _])
            | (_, ["v1", "services", _, "logs"])
            | (_, ["v1", "services", _, "requests"])
            | (_, ["v1", "services", _, "doctor"]) => answer(Failure::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
            }),
            _ => answer(Failure::NotFound {
                path: path.to_string(),
            }),
        }
    }

    /// `POST /v1/services/{name}/rollback?version=N`: answers once the
    /// earlier image serves (or why it does not).
    async fn rollback(&self, name: &str, q: &[(String, String)]) -> Response<ApiBody> {
        let to = match q.iter().find(|(k, _)| k == "version") {
            None => None,
            Some((_, v)) => match v.parse::<i64>() {
                Ok(v) if v > 0 => Some(v),
                _ => {
                    return answer(Failure::BadVersion(format!(
                        "version must be a version number, e.g. version=3, not {v:?}"
                    )))
                }
            },
        };
        if self.platform.status(name).is_none() {
            return answer(Failure::UnknownService(name.to_string()));
        }
        match self.platform.rollback(name, to).await {
            Ok(d) => json(
                StatusCode::OK,
                &types::RolledBack {
                    version: d.version,
                    url: d.url,
                },
            ),
            Err(e) => answer(Failure::Rollback(e)),
        }
    }

    /// `GET /metrics`: behind the token like the rest (it names every
    /// service and how it is used); Prometheus sends it from a file.
    fn metrics(&self) -> Response<ApiBody> {
        Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(self.platform.metrics())).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
    }

    pub(crate) fn platform(&self) -> &Handle {
        &self.platform
    }

    pub(crate) fn sessions(&self) -> &console::Sessions {
        &self.sessions
    }

    pub(crate) fn token(&self) -> &str {
        &self.config.token
    }

    /// Where the daemon wrote the token (next to the uploads, in the
    /// state directory), for the console's sign-in page.
    pub(crate) fn token_file(&self) -> String {
        self.config
            .uploads
            .parent()
            .map(|state| state.join("api-token").display().to_string())
            .unwrap_or_else(|| "api-token in the state directory".into())
    }

    pub(crate) fn summary(&self, s: &LiveStatus) -> types::ServiceSummary {
        types::ServiceSummary {
            name: s.name.clone(),
            state: s.state.as_str().into(),
            url: s.url.clone(),
            mode: s.spec.as_ref().map(|s| s.mode.as_str().to_string()),
            version: s.version,
            instances: types::Instances {
                running: s.instances.running,
                suspended: s.instances.suspended,
                starting: s.instances.starting,
            },
            deploying: s.deploying.map(|(v, _)| v),
            error: s.failed.clone(),
        }
    }

    fn list(&self) -> Response<ApiBody> {
        match self.platform.list() {
            Ok(list) => json(
                StatusCode::OK,
                &types::ServiceList {
                    services: list.iter().map(|s| self.summary(s)).collect(),
                },
            ),
            Err(e) => answer(e.into()),
        }
    }

    fn unknown(&self, name: &str) -> Response<ApiBody> {
        answer(Failure::UnknownService(name.to_string()))
    }

    fn status(&self, name: &str) -> Response<ApiBody> {
        match self.service_status(name) {
            Some(status) => json(StatusCode::OK, &status),
            None => self.unknown(name),
        }
    }

    /// What `GET /v1/services/{name}` answers (and the console shows).
    pub(crate) fn service_status(&self, name: &str) -> Option<types::ServiceStatus> {
        let live = self.platform.status(name)?;
        let store = self.platform.store();
        let versions = store.versions(name, 10).unwrap_or_default();
        let events = store.events(name, 200).unwrap_or_default();
        let errors: Vec<_> = events.iter().filter(|e| e.level == Level::Error).collect();
        let recent_errors: Vec<types::Event> = errors[errors.len().saturating_sub(5)..]
            .iter()
            .map(|e| types::Event {
                at: rfc3339(e.at),
                level: e.level.as_str().to_string(),
                kind: e.kind.as_str().to_string(),
                message: e.message.clone(),
            })
            .collect();
        let diagnosis = diagnose(store, name);
        let spec = live
            .spec
            .clone()
            .or_else(|| versions.first().map(|v| v.spec.clone()));
        let status = types::ServiceStatus {
            summary: self.summary(&live),
            start: spec.as_ref().map(|s| s.start.clone()),
            build: spec.as_ref().and_then(|s| s.build.clone()),
            port: spec.as_ref().map(|s| s.port),
            draining: live.draining,
            versions: versions
                .iter()
                .map(|v| types::Version {
                    id: v.id,
                    state: v.state.as_str().into(),
                    created_at: rfc3339(v.created_at),
                    finished_at: v.finished_at.map(rfc3339),
                    error: v.error.clone(),
                    build_ms: v.build.map(|d| d.as_millis() as u64),
                    sandbox_ms: v.sandbox.map(|d| d.as_millis() as u64),
                    app_ms: v.app.map(|d| d.as_millis() as u64),
                })
                .collect(),
            recent_errors,
            findings: diagnosis.findings,
            last_start: store.starts(name, 1).unwrap_or_default().first().map(start),
        };
        Some(status)
    }

    fn doctor(&self, name: &str) -> Response<ApiBody> {
        match self.doctor_report(name) {
            Some(report) => json(StatusCode::OK, &report),
            None => self.unknown(name),
        }
    }

    /// What `GET /v1/services/{name}/doctor` answers (and the console
    /// shows).
    pub(crate) fn doctor_report(&self, name: &str) -> Option<types::Doctor> {
        let live = self.platform.status(name)?;
        let store = self.platform.store();
        let diagnosis = diagnose(store, name);
        Some(types::Doctor {
            service: name.to_string(),
            state: live.state.as_str().into(),
            findings: diagnosis.findings,
            starts: store
                .starts(name, 5)
                .unwrap_or_default()
                .iter()
                .map(start)
                .collect(),
            log_lines: diagnosis.log_lines,
            events: diagnosis.events,
            version: diagnosis.version,
        })
    }

    async fn remove(&self, name: &str) -> Response<ApiBody> {
        match self.platform.remove(name).await {
            Ok(()) => json(
                StatusCode::OK,
                &types::Removed {
                    removed: name.into(),
                },
            ),
            Err(e) => answer(e.into()),
        }
    }

    fn logs(&self, name: &str, q: &[(String, String)]) -> Response<ApiBody> {
        let store = self.platform.store().clone();
        let watch = store.log_watch();
        self.records(name, q, watch, u32::MAX, move |name, q| {
            let lines = store.logs(name, q)?;
            Ok(lines.iter().map(|l| (l.id, line(&log_line(l)))).collect())
        })
    }

    /// `GET /v1/services/{name}/requests`: the request log, as `logs`.
    fn requests(&self, name: &str, q: &[(String, String)]) -> Response<ApiBody> {
        let store = self.platform.store().clone();
        let watch = store.request_watch();
        self.records(name, q, watch, MAX_REQUESTS_ANSWERED, move |name, q| {
            let records = store.requests(name, q)?;
            Ok(records
                .iter()
                .map(|r| (r.id, line(&request_line(r))))
                .collect())
        })
    }

    /// A service's stored records as NDJSON (`since`, `tail`; at most
    /// `cap` of them), then, with `follow`, each new one as `watch`
    /// announces it. `fetch` reads the records a query matches, as (id,
    /// line).
    fn records<F>(
        &self,
        name: &str,
        q: &[(String, String)],
        mut watch: tokio::sync::watch::Receiver<i64>,
        cap: u32,
        fetch: F,
    ) -> Response<ApiBody>
    where
        F: Fn(&str, &LogQuery) -> Result<Vec<(i64, Bytes)>, skiff_runtime::store::StoreError>
            + Send
            + 'static,
    {
        if self.platform.status(name).is_none() {
            return self.unknown(name);
        }
        let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let since = match get("since").map(parse_since).transpose() {
            Ok(s) => s,
            Err(e) => return answer(Failure::BadSince(e)),
        };
        let tail = match get("tail").map(str::parse::<u32>).transpose() {
            Ok(t) => t,
            Err(_) => return answer(Failure::BadTail),
        };
        let follow = matches!(get("follow"), Some("1" | "true" | "yes"));
        // The mark is taken before the first query: a record stored after
        // it is either in that answer or announced by the watch later.
        let mark = *watch.borrow_and_update();
        let first = LogQuery {
            after: None,
            since,
            limit: Some(
                tail.unwrap_or(if since.is_some() { cap } else { DEFAULT_TAIL })
                    .min(cap),
            ),
        };
        let lines = match fetch(name, &first) {
            Ok(l) => l,
            Err(e) => return answer(e.into()),
        };
        let (tx, rx) = mpsc::channel(64);
        let platform = self.platform.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut last = mark;
            for (id, l) in lines {
                last = last.max(id);
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            // A removed service ends the stream; checked on its own clock,
            // not reset by other services' records.
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = check.tick() => {
                        if platform.status(&name).is_none() { return }
                        continue;
                    }
                }
                let next = fetch(
                    &name,
                    &LogQuery {
                        after: Some(last),
                        ..Default::default()
                    },
                );
                for (id, l) in next.unwrap_or_default() {
                    last = id;
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
            }
        });
        ndjson_response(rx)
    }

    async fn deploy(self: Arc<Self>, req: Request<Incoming>) -> Response<ApiBody> {
        let q = query(&req);
        let get = |k: &str| {
            q.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let port = match get("port").map(|p| p.parse::<u32>()).transpose() {
            Ok(p) => p,
            Err(_) => {
                return answer(Failure::Manifest(
                    "port must be a number between 1 and 65535".into(),
                ))
            }
        };
        let overrides = Overrides {
            name: get("name"),
            build: get("build"),
            start: get("start"),
            port,
            mode: get("mode"),
        };
        let max = self.config.max_upload;
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > max) {
            return too_big(max);
        }
        let n = self.next_upload.fetch_add(1, Ordering::SeqCst);
        // Removed when dropped: on every path, also when the client goes
        // away and hyper drops this future mid-upload.
        let staging = Staging(
            self.config
                .uploads
                .join(format!("{}-{n}", std::process::id())),
        );
        let result = self.receive(req, &staging.0, &overrides).await;
        let (spec, unpacked) = match result {
            Ok(r) => r,
            Err(response) => {
                staging.remove().await;
                return response;
            }
        };
        let name = spec.name.to_string();
        if let Some((version, _)) = self.platform.status(&name).and_then(|s| s.deploying) {
            staging.remove().await;
            return answer(Failure::DeployInProgress {
                service: name,
                version,
            });
        }
        let (tx, rx) = mpsc::channel(256);
        let platform = self.platform.clone();
        let events = platform.subscribe();
        let _ = tx
            .send(line(&DeployMessage::Accepted {
                service: name.clone(),
                files: unpacked.files,
                bytes: unpacked.bytes,
            }))
            .await;
        // The deploy goes on when the client goes away: it is the
        // platform's, not the connection's.
        tokio::spawn(async move {
            let deploying = platform.deploy(&spec);
            let forwarding = forward_events(events, &name, &tx);
            tokio::pin!(deploying);
            tokio::pin!(forwarding);
            let result = tokio::select! {
                r = &mut deploying => r,
                _ = &mut forwarding => deploying.await,
            };
            // The image store has its own copy by now; gone before the
            // answer says the deploy is over.
            staging.remove().await;
            let message = match result {
                Ok(d) => DeployMessage::Ready {
                    version: d.version,
                    url: d.url,
                    sandbox_ms: d.report.sandbox.as_secs_f64() * 1000.0,
                    app_ms: d.report.app.as_secs_f64() * 1000.0,
                },
                Err(e) => DeployMessage::Failed {
                    findings: deploy_findings(&e),
                    error: e.to_string(),
                    serving: platform.status(&name).and_then(|s| s.version),
                },
            };
            // A client that stopped reading must not hold the task forever.
            let _ = tokio::time::timeout(Duration::from_secs(30), tx.send(line(&message))).await;
        });
        ndjson_response(rx)
    }

    /// Spools the upload to disk (at most `max_upload` bytes), unpacks it
    /// and reads its manifest.
    async fn receive(
        &self,
        req: Request<Incoming>,
        staging: &Path,
        overrides: &Overrides,
    ) -> Result<(skiff_model::ServiceSpec, archive::Unpacked), Response<ApiBody>> {
        let internal = |e: std::io::Error| {
            answer(Failure::State(format!(
                "cannot store the upload under {}: {e}",
                staging.display()
            )))
        };
        let src = staging.join("src");
        tokio::fs::create_dir_all(&src).await.map_err(internal)?;
        let tar_path = staging.join("upload.tar");
        let mut file = tokio::fs::File::create(&tar_path).await.map_err(internal)?;
        let mut body = req.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| answer(Failure::UploadInterrupted(e.to_string())))?;
            if let Ok(data) = frame.into_data() {
                received += data.len() as u64;
                if received > self.config.max_upload {
                    return Err(too_big(self.config.max_upload));
                }
                file.write_all(&data).await.map_err(internal)?;
            }
        }
        file.flush().await.map_err(internal)?;
        drop(file);
        let unpack_to = src.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&tar_path)?;
            archive::unpack(
                std::io::BufReader::new(f),
                &unpack_to,
                &archive::Limits::default(),
            )
            .map_err(std::io::Error::other)
        })
        .await
        .map_err(|e| internal(std::io::Error::other(e)))?
        .map_err(|e| answer(Failure::BadArchive(e.to_string())))?;
        let spec = skiff_model::load(&src, overrides).map_err(|e| {
            // The staging path means nothing to the caller: name the
            // manifest as it is in their source directory.
            let prefix = format!("{}/", src.display());
            answer(Failure::Manifest(e.to_string().replace(&prefix, "")))
        })?;
        Ok((spec, unpacked))
    }
}

fn too_big(max: u64) -> Response<ApiBody> {
    answer(Failure::UploadTooLarge { max })
}

/// An upload's staging directory, removed when dropped (or at once,
/// with `remove`).
struct Staging(PathBuf);

impl Staging {
    /// Removes the directory off the async threads; done when this is.
    async fn remove(mut self) {
        let dir = std::mem::take(&mut self.0);
        let removed = tokio::task::spawn_blocking(move || {
            skiff_runtime::remove_tree(&dir).map_err(|e| (dir, e))
        });
        if let Ok(Err((dir, e))) = removed.await {
            warn!("removing {}: {e}", dir.display());
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.0);
        if dir.as_os_str().is_empty() {
            // Removed already (`remove`).
            return;
        }
        let remove = move || {
            if let Err(e) = skiff_runtime::remove_tree(&dir) {
                warn!("removing {}: {e}", dir.display());
            }
        };
        // A large tree is removed off the async threads when there are any.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Sends the deploy's progress for `service` until the channel closes.
async fn forward_events(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    service: &str,
    tx: &mpsc::Sender<Bytes>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                let msg = DeployMessage::Progress {
                    message: format!("({n} lines of output skipped: too fast to send)"),
                };
                if tx.send(line(&msg)).await.is_err() {
                    return;
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let msg = match event {
            Event::BaseImage { line } => DeployMessage::Progress {
                message: format!("base image: {line}"),
            },
            Event::BaseImageReady {
                built_in: Some(d), ..
            } => DeployMessage::Progress {
                message: format!("base image ready in {:.0}s", d.as_secs_f64()),
            },
            Event::BuildStarted { service: s } if s == service => DeployMessage::Progress {
                message: "building".into(),
            },
            Event::BuildFinished {
                service: s,
                elapsed,
                layer_size,
                ..
            } if s == service => DeployMessage::Progress {
                message: match elapsed {
                    Some(d) => format!(
                        "built in {:.1}s (image layer {})",
                        d.as_secs_f64(),
                        skiff_model::format_amount(layer_size)
                    ),
                    None => "same source and build command as before: reusing the image".into(),
                },
            },
            Event::Starting {
                service: s,
                instance,
            } if s == service => DeployMessage::Progress {
                message: format!("starting instance {instance}"),
            },
            Event::Log {
                service: s,
                phase,
                line,
                ..
            } if s == service => DeployMessage::Log {
                source: match phase {
                    Phase::Build => "build",
                    Phase::Run => "run",
                }
                .into(),
                line,
            },
            _ => continue,
        };
        if tx.send(line(&msg)).await.is_err() {
            return;
        }
    }
}

pub(crate) fn request_line(r: &RequestRecord) -> types::RequestLine {
    types::RequestLine {
        id: r.id,
        at: rfc3339(r.at),
        request_id: r.request_id.clone(),
        method: r.method.clone(),
        path: r.path.clone(),
        status: r.status,
        duration_ms: r.duration.as_secs_f64() * 1000.0,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        instance: r.instance.clone(),
        wake: r.wake.clone(),
        error: r.error.clone(),
    }
}

fn log_line(l: &LogRecord) -> types::LogLine {
    types::LogLine {
        id: l.id,
        at: rfc3339(l.at),
        source: l.source.as_str().into(),
        stream: l.stream.clone(),
        instance: l.instance.clone(),
        version: l.version,
        line: l.line.clone(),
    }
}

/// Log lines and events the diagnosis looks at.
const DIAGNOSIS_LINES: u32 = 5000;
const DIAGNOSIS_EVENTS: u32 = 2000;

struct Diagnosis {
    findings: Vec<types::Finding>,
    log_lines: usize,
    events: usize,
    /// The version the findings are about.
    version: Option<i64>,
}

/// The service's findings: its recent run output and the platform's events
/// about it (gateway refusals, out-of-memory kills, failed starts), newest
/// first, each once with its count.
fn diagnose(store: &skiff_runtime::store::Store, name: &str) -> Diagnosis {
    // The version diagnosed: the serving one, else the last deployed. What
    // earlier versions printed or met is theirs, not this one's.
    let record = store
        .service(name)
        .ok()
        .flatten()
        .and_then(|s| s.current)
        .and_then(|v| store.version(v).ok().flatten())
        .or_else(|| store.versions(name, 1).ok()?.into_iter().next());
    let since = record.as_ref().map(|v| v.created_at);
    let lines: Vec<_> = store
        .logs(
            name,
            &LogQuery {
                limit: Some(DIAGNOSIS_LINES),
                since,
                ..Default::default()
            },
        )
        .unwrap_or_default()
        .into_iter()
        .filter(|l| match (l.version, &record) {
            (Some(v), Some(r)) => v == r.id,
            _ => true,
        })
        .collect();
    let events: Vec<_> = store
        .events(name, DIAGNOSIS_EVENTS)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| since.is_none_or(|t| e.at >= t))
        .collect();
    // A full disk is explained with the version's limits.
    let version = record.as_ref().map(|r| r.id);
    let spec = record.map(|v| v.spec);
    let mut d = spec.map_or_else(Diagnoser::default, |spec| {
        Diagnoser::with_disks(Disks {
            persistent: spec.mode == skiff_model::Mode::Persistent,
            tmp_size: spec.limits.tmp_size,
            disk: spec.limits.disk,
        })
    });
    let mut log_lines = 0;
    for l in lines.iter().filter(|l| l.source == LogSource::Run) {
        log_lines += 1;
        d.observe(&l.line, l.at);
    }
    for e in &events {
        d.observe_event(&e.kind, &e.message, e.at);
    }
    let mut found: Vec<_> = d.findings().collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.last_seen));
    Diagnosis {
        findings: found.into_iter().map(finding).collect(),
        log_lines,
        events: events.len(),
        version,
    }
}

fn finding(f: &skiff_runtime::diagnose::Finding) -> types::Finding {
    types::Finding {
        kind: f.kind.as_str().to_string(),
        what: f.what.clone(),
        why: f.why.to_string(),
        fix: f.fix.clone(),
        evidence: f.evidence.clone(),
        count: f.count,
        first_seen: rfc3339(f.first_seen),
        last_seen: rfc3339(f.last_seen),
    }
}

pub(crate) fn start(s: &skiff_runtime::store::StartRecord) -> types::Start {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    types::Start {
        instance: s.instance.clone(),
        version: s.version,
        at: rfc3339(s.at),
        sandbox_ready_ms: ms(s.phases.sandbox_ready),
        process_started_ms: ms(s.phases.process_started),
        port_listening_ms: ms(s.phases.port_listening),
        first_answer_ms: ms(s.phases.first_answer),
    }
}

/// What the troubleshooter finds in a failed deploy: the service's own
/// output that the error quotes (its build's or its start's last lines).
/// The error's own words are for the user, not for the rules; what it says
/// of the platform's checks (the port, the memory limit) is in the error
/// already, and the version's typed events are the doctor's to read.
fn deploy_findings(e: &DeployError) -> Vec<types::Finding> {
    let mut d = Diagnoser::default();
    let now = SystemTime::now();
    for line in e.output() {
        d.observe(line, now);
    }
    d.findings().map(finding).collect()
}

/// `since`: a point in time (RFC 3339) or a duration back from now
/// (`10m`, `2h`).
fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(d) = skiff_model::parse_duration(s) {
        return Ok(SystemTime::now() - d);
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!(
            "since={s:?} is neither a duration (e.g. 10m, 2h) nor a time (e.g. \
             2026-11-28T06:00:00Z)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }

    #[test]
    fn since_takes_durations_and_times() {
        let t = parse_since("10m").unwrap();
        let ago = SystemTime::now().duration_since(t).unwrap();
        assert!(ago >= Duration::from_secs(599) && ago <= Duration::from_secs(601));
        let t = parse_since("2026-11-28T06:00:00Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-28T06:00:00.000Z");
        assert!(parse_since("yesterday").unwrap_err().contains("neither"));
    }
}
