//! The web console, served by the daemon under `/console` on the control
//! API's address: server-rendered pages (askama templates compiled into
//! the binary) that read without JavaScript, and a little script that
//! adds live log lines (server-sent events).
//!
//! **Signing in.** With the API token, in a form; the daemon answers with
//! a session cookie (`HttpOnly`, `SameSite=Strict`, `Path=/console`,
//! random, held in memory for 12 hours, at most 64 at once). The API's
//! own routes never accept the cookie: they take the bearer token only.
//!
//! **Cross-site requests.** Every action is a POST whose form carries the
//! session's own random token (`csrf`), compared in constant time; a
//! browser sends the cookie with no request another site starts
//! (`SameSite=Strict`), and a POST whose `Origin` is not this address is
//! refused. Pages forbid framing and inline script or style (a content
//! security policy), so the charts are SVG elements the stylesheet
//! colours.

mod charts;
mod pages;

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::server::{same_token, Api, ApiBody};

/// The session cookie's name.
const COOKIE: &str = "skiff_console";
/// How long a session lasts.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; a new one beyond this replaces the oldest.
const MAX_SESSIONS: usize = 64;
/// The largest form the console reads.
const MAX_FORM: usize = 4096;

const CSS: &str = include_str!("../../assets/console.css");
const JS: &str = include_str!("../../assets/console.js");

/// The console's signed-in browsers.
#[derive(Debug, Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Session>>);

#[derive(Debug)]
struct Session {
    /// The token every form of this session carries.
    csrf: String,
    expires: Instant,
    /// What the last action did, shown once on the next page.
    flash: Option<pages::Flash>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: its id (the cookie) and its form token.
    fn create(&self) -> std::io::Result<(String, String)> {
        let (id, csrf) = (random_hex(32)?, random_hex(32)?);
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_LIFE,
                flash: None,
            },
        );
        Ok((id, csrf))
    }

    /// The form token of a live session.
    fn csrf(&self, id: &str) -> Option<String> {
        let sessions = self.lock();
        let s = sessions.get(id)?;
        (s.expires > Instant::now()).then(|| s.csrf.clone())
    }

    fn set_flash(&self, id: &str, flash: pages::Flash) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(flash);
        }
    }

    fn take_flash(&self, id: &str) -> Option<pages::Flash> {
        self.lock().get_mut(id)?.flash.take()
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// `n` random bytes from the kernel, as hex.
fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `path` is the console's.
pub(crate) fn owns(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// Serves one request under `/console`.
pub(crate) async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["console", "assets", "console.css"]) => return asset(CSS, "text/css"),
        ("GET", ["console", "assets", "console.js"]) => return asset(JS, "text/javascript"),
        ("GET", ["console", "login"]) => return pages::login(&api, None, StatusCode::OK),
        ("POST", ["console", "login"]) => return login(&api, req).await,
        _ => {}
    }
    let session = session(&api, &req);
    let Some((csrf, id)) = session else {
        return see_other("/console/login");
    };
    if method == Method::POST {
        if !same_origin(&req) {
            return pages::message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form was sent from another site. Use the console's own pages.",
            );
        }
        let form = match read_form(req).await {
            Ok(f) => f,
            Err(status) => {
                return pages::message(status, "Refused", "The form was too large or unreadable.")
            }
        };
        let sent = form.get("csrf").map(String::as_str).unwrap_or("");
        if !same_token(sent.as_bytes(), csrf.as_bytes()) {
            return pages::message(
                StatusCode::FORBIDDEN,
                "Refused",
                "The form's token does not match your session (it may have expired). Reload the page and try again.",
            );
        }
        return match segments.as_slice() {
            ["console", "logout"] => {
                api.sessions().remove(&id);
                let mut r = see_other("/console/login");
                r.headers_mut().insert(
                    header::SET_COOKIE,
                    HeaderValue::from_static(
                        "skiff_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
                    ),
                );
                r
            }
            ["console", "services", name, "rollback"] => {
                let flash = pages::rollback(&api, name, form.get("version")).await;
                api.sessions().set_flash(&id, flash);
                see_other(&format!("/console/services/{name}"))
            }
            ["console", "services", name, "remove"] => {
                if form.get("confirm").map(String::as_str) != Some("yes") {
                    api.sessions().set_flash(
                        &id,
                        pages::Flash::error("Tick the box to confirm the removal.".into()),
                    );
                    return see_other(&format!("/console/services/{name}"));
                }
                match pages::remove(&api, name).await {
                    Ok(flash) => {
                        api.sessions().set_flash(&id, flash);
                        see_other("/console")
                    }
                    Err(flash) => {
                        api.sessions().set_flash(&id, flash);
                        see_other(&format!("/console/services/{name}"))
                    }
                }
            }
            _ => pages::not_found(),
        };
    }
    if method != Method::GET {
        return pages::message(
            StatusCode::METHOD_NOT_ALLOWED,
            "Not allowed",
            "The console's pages are read with GET and changed with their forms.",
        );
    }
    let flash = api.sessions().take_flash(&id);
    let page = match segments.as_slice() {
        ["console"] => Page::Services,
        ["console", "services", name] => Page::Service(name.to_string()),
        ["console", "services", name, "live"] => return live(api.clone(), name, &req, id),
        _ => return pages::not_found(),
    };
    // The pages read the records (SQLite): off the async workers.
    tokio::task::spawn_blocking(move || match page {
        Page::Services => pages::services(&api, &csrf, flash),
        Page::Service(name) => pages::service(&api, &name, &csrf, flash),
    })
    .await
    .unwrap_or_else(|e| {
        pages::message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The page could not be made",
            &e.to_string(),
        )
    })
}

enum Page {
    Services,
    Service(String),
}

/// The request's live session: its form token and id. Any cookie of the
/// console's name that is a live session will do (a page on another host
/// under the same parent domain could add a cookie of that name, but not
/// a live one).
fn session(api: &Api, req: &Request<Incoming>) -> Option<(String, String)> {
    cookies(req).find_map(|id| Some((api.sessions().csrf(&id)?, id)))
}

/// `POST /console/login`: the token, in a form.
async fn login(api: &Api, req: Request<Incoming>) -> Response<ApiBody> {
    if !same_origin(&req) {
        return pages::message(
            StatusCode::FORBIDDEN,
            "Refused",
            "This sign-in was sent from another site. Sign in on the console's own page.",
        );
    }
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(status) => return pages::message(status, "Refused", "The form was too large."),
    };
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    if !same_token(token.as_bytes(), api.token().as_bytes()) {
        return pages::login(
            api,
            Some("That is not the API token. Copy it from the file named above.".into()),
            StatusCode::UNAUTHORIZED,
        );
    }
    let (id, _) = match api.sessions().create() {
        Ok(s) => s,
        Err(e) => {
            return pages::message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot sign in",
                &format!("No random bytes for a session: {e}."),
            )
        }
    };
    let mut r = see_other("/console");
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFE.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The session ids the request's cookies name.
fn cookies(req: &Request<Incoming>) -> impl Iterator<Item = String> + '_ {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// A POST from one of the console's own pages: its `Origin`, when the
/// browser sent one, names the host it was sent to (over http, or https
/// through a TLS proxy in front).
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let authority = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// A urlencoded form body, at most `MAX_FORM` bytes.
async fn read_form(req: Request<Incoming>) -> Result<HashMap<String, String>, StatusCode> {
    let body = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?
        .to_bytes();
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

fn asset(text: &'static str, kind: &'static str) -> Response<ApiBody> {
    Response::builder()
        .header(header::CONTENT_TYPE, format!("{kind}; charset=utf-8"))
        .header(header::CACHE_CONTROL, "max-age=300")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn see_other(to: &str) -> Response<ApiBody> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /console/services/{name}/live?after=ID`: the service's new log
/// lines as server-sent events, each with the diagnosis of the line when
/// it explains a known error. A comment every 15 s keeps it open; it ends
/// when the session does, or the service goes.
fn live(api: Arc<Api>, name: &str, req: &Request<Incoming>, session: String) -> Response<ApiBody> {
    if api.platform().status(name).is_none() {
        return pages::not_found();
    }
    // A reconnecting browser says where it was.
    let after = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            req.uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("after=")))
        })
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let platform = api.platform().clone();
    let name = name.to_string();
    tokio::spawn(async move {
        let store = platform.store().clone();
        let mut watch = store.log_watch();
        let mut last = after;
        let mut lines = pages::LiveLines::default();
        let mut beat = tokio::time::interval(Duration::from_secs(15));
        // The browser's `after` may be anything: at first, the newest
        // lines after it only.
        let mut first = Some(1000);
        loop {
            let next = store.logs(
                &name,
                &skiff_runtime::store::LogQuery {
                    after: Some(last),
                    limit: first.take(),
                    ..Default::default()
                },
            );
            for l in next.unwrap_or_default() {
                last = l.id;
                let event = format!("id: {}\ndata: {}\n\n", l.id, lines.event(&l));
                if tx.send(Bytes::from(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = watch.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
                _ = beat.tick() => {
                    if api.sessions().csrf(&session).is_none()
                        || platform.status(&name).is_none()
                        || tx.send(Bytes::from_static(b": still here\n\n")).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(crate::server::channel_body(rx))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
