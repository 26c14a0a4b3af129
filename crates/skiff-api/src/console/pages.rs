//! The console's pages: what each shows, gathered from the same typed
//! records the API answers with, rendered by askama templates
//! (`templates/console/`), which escape every value.

use std::time::{Duration, SystemTime};

use askama::Template;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use skiff_runtime::diagnose::Diagnoser;
use skiff_runtime::store::{LogQuery, LogRecord, LogSource};

use super::charts::{self, Line};
use crate::server::{rfc3339, Api, ApiBody};
use crate::types;

/// Log lines a service page shows at first.
const PAGE_LOG_LINES: u32 = 200;
/// Request records a service page shows.
const PAGE_REQUESTS: u32 = 50;

/// What an action did, shown once on the next page.
#[derive(Debug, Clone)]
pub(crate) struct Flash {
    pub class: &'static str,
    pub text: String,
}

impl Flash {
    pub fn ok(text: String) -> Self {
        Self { class: "ok", text }
    }

    pub fn error(text: String) -> Self {
        Self {
            class: "error",
            text,
        }
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct Login {
    token_file: String,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/message.html")]
struct Message<'a> {
    title: &'a str,
    text: &'a str,
}

#[derive(Template)]
#[template(path = "console/services.html")]
struct Services {
    csrf: String,
    flash: Option<Flash>,
    services: Vec<Row>,
}

struct Row {
    name: String,
    state: String,
    version: String,
    running: usize,
    suspended: usize,
    starting: usize,
    rate: String,
    errors: String,
    url: String,
}

#[derive(Template)]
#[template(path = "console/service.html")]
struct Service {
    csrf: String,
    flash: Option<Flash>,
    s: types::ServiceStatus,
    version: String,
    rate: String,
    errors: String,
    rollback_to: Vec<i64>,
    charts: Vec<Chart>,
    findings: Vec<types::Finding>,
    waterfall: String,
    logs: Vec<LogView>,
    last_log: i64,
    requests: Vec<types::RequestLine>,
}

struct Chart {
    title: &'static str,
    svg: String,
}

/// One log line as a page shows it, with the finding it first showed.
#[derive(Debug, serde::Serialize)]
pub(crate) struct LogView {
    at: String,
    tag: String,
    line: String,
    /// stderr and the platform's notes, shown dimmer.
    quiet: bool,
    finding: Option<FindingView>,
}

#[derive(Debug, serde::Serialize)]
struct FindingView {
    what: String,
    why: String,
    fix: String,
}

/// The lines of one live stream, diagnosed as they come.
#[derive(Debug, Default)]
pub(crate) struct LiveLines {
    diagnoser: Diagnoser,
}

impl LiveLines {
    fn view(&mut self, l: &LogRecord) -> LogView {
        let finding = (l.source == LogSource::Run)
            .then(|| self.diagnoser.observe(&l.line, SystemTime::now()).cloned())
            .flatten()
            .map(|f| FindingView {
                what: f.what,
                why: f.why.to_string(),
                fix: f.fix,
            });
        let tag = match (l.source, &l.instance) {
            (LogSource::Build, _) => "build".to_string(),
            (LogSource::Platform, _) => "skiff".to_string(),
            (_, Some(i)) => i.clone(),
            _ => "run".to_string(),
        };
        LogView {
            at: rfc3339(l.at),
            tag,
            line: l.line.clone(),
            quiet: l.stream.as_deref() == Some("stderr") || l.source == LogSource::Platform,
            finding,
        }
    }

    /// A line as the live stream's JSON.
    pub fn event(&mut self, l: &LogRecord) -> String {
        serde_json::to_string(&self.view(l)).unwrap_or_default()
    }
}

/// A page: HTML that is neither cached nor framed, with no inline script
/// or style.
fn html(status: StatusCode, body: Result<String, askama::Error>) -> Response<ApiBody> {
    let (status, body) = match body {
        Ok(b) => (status, b),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "<!doctype html><p>The page could not be made: {}</p>",
                charts::escape(&e.to_string())
            ),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        )
        .header("x-frame-options", "DENY")
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "same-origin")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

pub(crate) fn login(api: &Api, error: Option<String>, status: StatusCode) -> Response<ApiBody> {
    let page = Login {
        token_file: api.token_file(),
        error,
    };
    html(status, page.render())
}

pub(crate) fn message(status: StatusCode, title: &str, text: &str) -> Response<ApiBody> {
    html(status, Message { title, text }.render())
}

pub(crate) fn not_found() -> Response<ApiBody> {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page, or no such service (it may have been removed).",
    )
}

/// Requests per second and the share of 5xx answers over the last minute.
fn rates(api: &Api, name: &str) -> (String, String) {
    match api
        .platform()
        .history()
        .recent(name, Duration::from_secs(60))
    {
        Some((requests, errors, span)) => {
            let per_second = requests as f64 / span.as_secs_f64().max(1.0);
            let share = if requests == 0 {
                "–".to_string()
            } else {
                format!("{:.1}%", 100.0 * errors as f64 / requests as f64)
            };
            (format!("{per_second:.2}/s"), share)
        }
        None => ("–".into(), "–".into()),
    }
}

pub(crate) fn services(api: &Api, csrf: &str, flash: Option<Flash>) -> Response<ApiBody> {
    let list = match api.platform().list() {
        Ok(l) => l,
        Err(e) => {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot list the services",
                &e.to_string(),
            )
        }
    };
    let services = list
        .iter()
        .map(|live| {
            let s = api.summary(live);
            let (rate, errors) = rates(api, &s.name);
            Row {
                version: s.version.map_or("–".into(), |v| v.to_string()),
                state: s.state,
                running: s.instances.running,
                suspended: s.instances.suspended,
                starting: s.instances.starting,
                rate,
                errors,
                url: s.url,
                name: s.name,
            }
        })
        .collect();
    let page = Services {
        csrf: csrf.into(),
        flash,
        services,
    };
    html(StatusCode::OK, page.render())
}

pub(crate) fn service(
    api: &Api,
    name: &str,
    csrf: &str,
    flash: Option<Flash>,
) -> Response<ApiBody> {
    let Some(s) = api.service_status(name) else {
        return not_found();
    };
    let store = api.platform().store();
    let (rate, errors) = rates(api, name);
    // Versions that served before the serving one: what a rollback may
    // choose (the API says why one cannot, e.g. its image is gone).
    let rollback_to = s
        .versions
        .iter()
        .filter(|v| v.state == "replaced" && Some(v.id) != s.summary.version)
        .map(|v| v.id)
        .collect();
    let minutes = api.platform().history().minutes(name);
    let series = |f: &dyn Fn(&skiff_runtime::history::Minute) -> Option<f64>| {
        minutes.iter().map(f).collect::<Vec<_>>()
    };
    let span = match minutes.len() {
        0 => "an hour ago".to_string(),
        n => format!("{n} min ago"),
    };
    let span = span.as_str();
    let charts = vec![
        Chart {
            title: "Requests per minute",
            svg: charts::line_chart(
                "Requests per minute",
                "req",
                &[Line {
                    label: "requests",
                    class: "s1",
                    values: series(&|m| Some(m.requests as f64)),
                }],
                span,
            ),
        },
        Chart {
            title: "Latency",
            svg: charts::line_chart(
                "Latency p50 and p99",
                "ms",
                &[
                    Line {
                        label: "p50",
                        class: "s1",
                        values: series(&|m| m.p50_ms),
                    },
                    Line {
                        label: "p99",
                        class: "s2",
                        values: series(&|m| m.p99_ms),
                    },
                ],
                span,
            ),
        },
        Chart {
            title: "Errors (5xx) per minute",
            svg: charts::line_chart(
                "Errors per minute",
                "err",
                &[Line {
                    label: "errors",
                    class: "s3",
                    values: series(&|m| Some(m.errors as f64)),
                }],
                span,
            ),
        },
        Chart {
            title: "Instances",
            svg: charts::line_chart(
                "Instances",
                "inst",
                &[Line {
                    label: "instances",
                    class: "s4",
                    values: series(&|m| Some(m.instances as f64)),
                }],
                span,
            ),
        },
    ];
    // The diagnosis `status` made (the same as `doctor`'s), and the
    // starts `doctor` shows.
    let findings = s.findings.clone();
    let starts: Vec<types::Start> = store
        .starts(name, 5)
        .unwrap_or_default()
        .iter()
        .map(crate::server::start)
        .collect();
    let waterfall = if starts.is_empty() {
        String::new()
    } else {
        charts::waterfall(&starts)
    };
    let records = store
        .logs(
            name,
            &LogQuery {
                limit: Some(PAGE_LOG_LINES),
                ..Default::default()
            },
        )
        .unwrap_or_default();
    let mut live = LiveLines::default();
    let logs = records.iter().map(|l| live.view(l)).collect();
    let last_log = records
        .last()
        .map(|l| l.id)
        .unwrap_or_else(|| *store.log_watch().borrow());
    let mut requests: Vec<types::RequestLine> = store
        .requests(
            name,
            &LogQuery {
                limit: Some(PAGE_REQUESTS),
                ..Default::default()
            },
        )
        .unwrap_or_default()
        .iter()
        .map(crate::server::request_line)
        .collect();
    requests.reverse();
    let page = Service {
        csrf: csrf.into(),
        flash,
        version: s.summary.version.map_or("none".into(), |v| v.to_string()),
        s,
        rate,
        errors,
        rollback_to,
        charts,
        findings,
        waterfall,
        logs,
        last_log,
        requests,
    };
    html(StatusCode::OK, page.render())
}

/// The rollback button: switches to `version`, or says why not.
pub(crate) async fn rollback(api: &Api, name: &str, version: Option<&String>) -> Flash {
    let to = match version.map(|v| v.parse::<i64>()) {
        Some(Ok(v)) if v > 0 => Some(v),
        None => None,
        _ => return Flash::error("Choose a version number to roll back to.".into()),
    };
    match api.platform().rollback(name, to).await {
        Ok(d) => Flash::ok(format!(
            "Rolled back: version {} now serves, with the image and settings of {}.",
            d.version,
            to.map_or("the version before".into(), |v| format!("version {v}"))
        )),
        Err(e) => Flash::error(format!("Not rolled back: {e}")),
    }
}

/// The remove button.
pub(crate) async fn remove(api: &Api, name: &str) -> Result<Flash, Flash> {
    match api.platform().remove(name).await {
        Ok(()) => Ok(Flash::ok(format!("Removed {name}."))),
        Err(e) => Err(Flash::error(format!("Not removed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        let page = Message {
            title: "<b>x</b>",
            text: "a \"quoted\" & <script>",
        }
        .render()
        .unwrap();
        assert!(page.contains("&#60;b&#62;x&#60;/b&#62;"), "{page}");
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("/console/assets/console.css"));
    }
}
