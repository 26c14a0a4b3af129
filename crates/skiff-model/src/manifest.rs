//! `skiff.toml`: parsing, validation with every problem reported at once, and
//! command-line overrides.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

use crate::name::ServiceName;
use crate::units::{format_size, parse_duration, parse_size};
use crate::{DEFAULT_PORT, MANIFEST_FILE};

/// How the platform runs a service (docs/contract.md §2 and §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Short-lived HTTP, read-only file system but `/tmp`, CPU suspended while idle.
    Serverless,
    /// Long-lived: writable file system, streaming, no request timeout.
    Persistent,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "serverless" => Some(Self::Serverless),
            "persistent" => Some(Self::Persistent),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serverless => "serverless",
            Self::Persistent => "persistent",
        }
    }
}

/// The `[limits]` table. Defaults are those of the README.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Memory of one instance, in bytes (cgroup memory limit).
    pub memory: u64,
    /// How long one request may run.
    pub request_timeout: Duration,
    /// Largest response body the gateway passes on, in bytes.
    pub max_response: u64,
    /// Largest request body the gateway passes on, in bytes.
    pub max_request: u64,
    /// Most instances of one service at once.
    pub max_instances: u32,
    /// Requests in flight one instance takes before another is started.
    pub concurrency: u32,
    /// Serverless: freeze the CPU this long after the last request ends.
    pub idle_suspend: Duration,
    /// Stop an idle instance entirely after this long (scale to zero).
    pub idle_stop: Duration,
    /// How long a request waits for a free instance when all are busy.
    pub queue_timeout: Duration,
    /// How many requests may wait for a free instance at once.
    pub max_queue: u32,
    /// How long the start command has to make the port answer.
    pub start_timeout: Duration,
    /// How long the build command may run before it is stopped.
    pub build_timeout: Duration,
    /// CPU time of one instance, in cores (cgroup CPU quota).
    pub cpu: f64,
    /// Size of the instance's private `/tmp`, in bytes.
    pub tmp_size: u64,
    /// Most processes and threads one instance may have.
    pub pids: u32,
    /// The most a build may write into its layer, in bytes.
    pub build_disk: u64,
    /// Persistent mode: the most the writable layer may hold, in bytes.
    pub disk: u64,
    /// Open files per process inside an instance (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 512 << 20,
            request_timeout: Duration::from_secs(15 * 60),
            max_response: 6 << 20,
            max_request: 6 << 20,
            max_instances: 10,
            concurrency: 80,
            idle_suspend: Duration::ZERO,
            idle_stop: Duration::from_secs(5 * 60),
            queue_timeout: Duration::from_secs(30),
            max_queue: 1000,
            start_timeout: Duration::from_secs(60),
            build_timeout: Duration::from_secs(30 * 60),
            cpu: 1.0,
            tmp_size: 512 << 20,
            pids: 1024,
            build_disk: 4 << 30,
            disk: 1 << 30,
            open_files: 65536,
        }
    }
}

/// A service, fully resolved from the manifest and the command line.
/// Serialised as the platform records a deployed version.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSpec {
    pub name: ServiceName,
    /// The source directory, absolute.
    pub source: PathBuf,
    /// Runs as root at build time, through `bash -c`.
    pub build: Option<String>,
    /// Runs as the non-root user, through `bash -c`.
    pub start: String,
    pub port: u16,
    pub mode: Mode,
    /// `[env]`, passed to build and start.
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    /// Where the start command came from when neither skiff.toml nor
    /// `--start` gave one (e.g. "the web: line of Procfile").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_from: Option<String>,
    /// A language runtime beside the base image's (`runtime = "node@22"`):
    /// the Node.js major version, installed in a layer of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    /// `runtime = "python@3.11"`: another Python than the default base's,
    /// from the base image of the Debian release that has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// `node` was not asked for: the service has a package.json and got
    /// [`NODE_LTS`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_by_default: bool,
}

/// Fields given on the command line; each one wins over the manifest.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub build: Option<String>,
    pub start: Option<String>,
    pub port: Option<u32>,
    pub mode: Option<String>,
}

/// One thing wrong with a manifest: where, which field, what is wrong and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column in the file, when the problem has a place there.
    pub position: Option<(usize, usize)>,
    /// The field, e.g. `port` or `limits.memory`, or `--port` for a flag.
    pub field: String,
    /// What is wrong and what to do, in one or two sentences.
    pub message: String,
}

/// Everything wrong with a service's configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file (it may not exist when everything came from flags).
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} has {} problem{}:",
            self.file.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.position {
                Some((line, col)) => write!(
                    f,
                    "\n  {}:{line}:{col}: {}: {}",
                    self.file.display(),
                    p.field,
                    p.message
                )?,
                None => write!(f, "\n  {}: {}", p.field, p.message)?,
            }
        }
        Ok(())
    }
}

const TOP_FIELDS: &[&str] = &[
    "name", "build", "start", "port", "mode", "runtime", "env", "limits",
];

/// Node.js majors a service may ask for (`runtime = "node@22"`), from the
/// npm registry's `node` package; the base image's own is 20.
pub const NODE_MAJORS: std::ops::RangeInclusive<u32> = 18..=25;
/// The Node.js a service with a package.json gets when it names no runtime:
/// the current long-term-support version.
pub const NODE_LTS: u32 = 22;
/// The Python the default base image provides (Debian 13's).
pub const BASE_PYTHON: &str = "3.13";
/// The Pythons a service may ask for (`runtime = "python@3.11"`): each is
/// the python3 of a Debian release skiff makes a base image of.
pub const PYTHONS: &[&str] = &["3.13", "3.11"];
const LIMIT_FIELDS: &[&str] = &[
    "memory",
    "request_timeout",
    "max_response",
    "max_request",
    "max_instances",
    "concurrency",
    "idle_suspend",
    "idle_stop",
    "queue_timeout",
    "max_queue",
    "start_timeout",
    "build_timeout",
    "cpu",
    "tmp_size",
    "pids",
    "build_disk",
    "disk",
    "open_files",
];
/// Variables the platform sets itself; `[env]` may not override them.
const RESERVED_ENV: &[(&str, &str)] = &[
    (
        "PORT",
        "set `port = ...` instead; skiff passes it to the service as PORT",
    ),
    ("HOME", "HOME is always /tmp, the only writable directory"),
];

/// Reads `DIR/skiff.toml` (if present) and applies `overrides`.
pub fn load(dir: &Path, overrides: &Overrides) -> Result<ServiceSpec, ManifestError> {
    let source = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let file = source.join(MANIFEST_FILE);
    let fail = |message: String| ManifestError {
        file: file.clone(),
        problems: vec![Problem {
            position: None,
            field: "source directory".into(),
            message,
        }],
    };
    match std::fs::metadata(&source) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(fail(format!(
                "{} is a file; give the directory that holds the service's source",
                source.display()
            )))
        }
        Err(e) => {
            return Err(fail(format!(
                "cannot read {}: {e}; check the path you passed to skiff",
                source.display()
            )))
        }
    }
    let text = match read_source_file(&source, MANIFEST_FILE) {
        Ok(t) => t,
        Err(e) => {
            return Err(ManifestError {
                file: file.clone(),
                problems: vec![Problem {
                    position: None,
                    field: MANIFEST_FILE.into(),
                    message: format!("cannot read the file: {e}"),
                }],
            })
        }
    };
    parse_with(
        text.as_deref(),
        &file,
        &source,
        overrides,
        SourceFacts::read(&source),
    )
}

/// The file `name` at the top of a source directory, read without
/// following a link (the source may be an upload, and skiff runs as root):
/// `None` when absent; an error for a link, a directory or anything but a
/// regular file. At most 1 MiB is read.
pub fn read_source_file(source: &Path, name: &str) -> std::io::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(source.join(name))
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(std::io::Error::other(format!(
                "{name} is a symbolic link; skiff reads it only as a regular file"
            )))
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{name} is not a regular file"
        )));
    }
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// What the source directory itself shows besides its manifest, read once
/// by [`load`] (so that [`parse_with`] does no I/O).
#[derive(Debug, Clone, Default)]
pub struct SourceFacts {
    /// A start command the source declares, and where ([`detect_start`]).
    pub start: Option<(String, String)>,
    /// It has a `package.json`: a Node.js service, which gets
    /// [`NODE_LTS`] when it names no runtime.
    pub package_json: bool,
}

impl SourceFacts {
    pub fn read(source: &Path) -> Self {
        Self {
            start: detect_start(source),
            package_json: std::fs::symlink_metadata(source.join("package.json"))
                .is_ok_and(|m| m.is_file()),
        }
    }
}

/// Frameworks whose pages talk to the server over WebSocket (or
/// long-lived streams): as they name themselves in a start command or as a
/// dependency.
const STREAMING_FRAMEWORKS: &[(&str, &str)] = &[
    ("streamlit", "Streamlit"),
    ("gradio", "Gradio"),
    ("python-socketio", "Socket.IO"),
    ("flask-socketio", "Socket.IO"),
    ("socket.io", "Socket.IO"),
    ("channels", "Django Channels"),
    ("websockets", "websockets"),
    ("ws", "ws"),
    ("nicegui", "NiceGUI"),
    ("reflex", "Reflex"),
];

/// Why a serverless `spec` will not work for a browser user, when its
/// start command or dependencies show a framework that needs long-lived
/// connections, which a serverless service refuses; `None` otherwise or in
/// persistent mode. For a warning at deploy time.
pub fn streaming_hint(spec: &ServiceSpec) -> Option<String> {
    if spec.mode == Mode::Persistent {
        return None;
    }
    let read = |name: &str| -> String {
        read_source_file(&spec.source, name)
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let start = spec.start.to_ascii_lowercase();
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    // Dependency names as Python and npm list them.
    let mut deps: Vec<String> = read("requirements.txt")
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            (!l.starts_with('#')).then(|| {
                l.split(|c: char| "=<>!~[; ".contains(c))
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
        })
        .collect();
    if let Ok(package) = serde_json::from_str::<serde_json::Value>(&read("package.json")) {
        for key in ["dependencies", "devDependencies"] {
            if let Some(d) = package.get(key).and_then(|d| d.as_object()) {
                deps.extend(d.keys().cloned());
            }
        }
    }
    deps.extend(
        words(&read("pyproject.toml"))
            .into_iter()
            .filter(|w| STREAMING_FRAMEWORKS.iter().any(|(n, _)| n == w) && w.len() > 2),
    );
    let first_word = words(&start);
    let (_, framework) = STREAMING_FRAMEWORKS
        .iter()
        .find(|(name, _)| first_word.iter().any(|w| w == name) || deps.iter().any(|d| d == name))?;
    Some(format!(
        "{framework} keeps a WebSocket (or streaming) connection open to each browser, and \
         a serverless service refuses those (501): pages would wait forever. Set mode = \
         \"persistent\" in skiff.toml."
    ))
}

/// A start command the source itself declares, for a manifest without
/// one: a `Procfile`'s `web:` line (Heroku's and Cloud Foundry's
/// convention), else `npm start` when `package.json` has `scripts.start`.
/// With where it came from.
pub fn detect_start(source: &Path) -> Option<(String, String)> {
    let read = |name: &str| read_source_file(source, name).ok().flatten();
    if let Some(procfile) = read("Procfile") {
        let web = procfile
            .lines()
            .find_map(|l| l.trim().strip_prefix("web:").map(str::trim))
            .filter(|c| !c.is_empty());
        if let Some(command) = web {
            return Some((command.to_string(), "the web: line of Procfile".into()));
        }
    }
    let package: serde_json::Value = serde_json::from_str(&read("package.json")?).ok()?;
    let script = package.get("scripts")?.get("start")?.as_str()?.trim();
    (!script.is_empty()).then(|| {
        (
            "npm start".to_string(),
            format!("package.json's scripts.start, {script:?}"),
        )
    })
}

/// Validates manifest text (or its absence) plus overrides. `file` is used for
/// messages only; `source` is the service's source directory.
pub fn parse(
    text: Option<&str>,
    file: &Path,
    source: &Path,
    overrides: &Overrides,
) -> Result<ServiceSpec, ManifestError> {
    parse_with(text, file, source, overrides, SourceFacts::default())
}

/// [`parse`], with what the source shows besides its manifest: a start
/// command for when neither the manifest nor `--start` gives one, and
/// whether it is a Node.js service.
pub fn parse_with(
    text: Option<&str>,
    file: &Path,
    source: &Path,
    overrides: &Overrides,
    facts: SourceFacts,
) -> Result<ServiceSpec, ManifestError> {
    let mut v = Validator {
        text: text.unwrap_or(""),
        spans: None,
        problems: Vec::new(),
        detected: facts.start,
        package_json: facts.package_json,
    };
    let table = match text {
        None => toml::Table::new(),
        Some(t) => match t.parse::<toml::Table>() {
            Ok(table) => {
                v.spans = toml::de::DeTable::parse(t).ok();
                table
            }
            Err(e) => {
                let position = e.span().map(|s| line_col(t, s.start));
                return Err(ManifestError {
                    file: file.to_path_buf(),
                    problems: vec![Problem {
                        position,
                        field: "syntax".into(),
                        message: format!(
                            "{}; fix the TOML syntax (strings need quotes, tables are [name])",
                            e.message().trim_end()
                        ),
                    }],
                });
            }
        },
    };
    let spec = v.validate(&table, source, overrides);
    match spec {
        Some(spec) if v.problems.is_empty() => Ok(spec),
        _ => Err(ManifestError {
            file: file.to_path_buf(),
            problems: v.problems,
        }),
    }
}

struct Validator<'a> {
    text: &'a str,
    spans: Option<toml::Spanned<toml::de::DeTable<'a>>>,
    problems: Vec<Problem>,
    /// A start command the source declares, and where (`detect_start`).
    detected: Option<(String, String)>,
    /// The source has a package.json (`SourceFacts`).
    package_json: bool,
}

impl Validator<'_> {
    /// Where `path` (e.g. `["limits", "memory"]`) stands in the file: the value's position.
    fn position(&self, path: &[&str]) -> Option<(usize, usize)> {
        let spans = self.spans.as_ref()?;
        let mut table = spans.get_ref();
        let mut span = None;
        for (i, key) in path.iter().enumerate() {
            let value = table.get(*key)?;
            span = Some(value.span());
            if i + 1 < path.len() {
                match value.get_ref() {
                    toml::de::DeValue::Table(t) => table = t,
                    _ => return None,
                }
            }
        }
        span.map(|s| line_col(self.text, s.start))
    }

    fn problem(&mut self, path: &[&str], message: String) {
        let position = self.position(path);
        self.problems.push(Problem {
            position,
            field: path.join("."),
            message,
        });
    }

    fn flag_problem(&mut self, flag: &str, message: String) {
        self.problems.push(Problem {
            position: None,
            field: flag.into(),
            message,
        });
    }

    fn unknown_fields(&mut self, table: &toml::Table, prefix: &[&str], known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let mut path = prefix.to_vec();
                path.push(key);
                let hint = match closest(key, known) {
                    Some(k) => format!("did you mean `{k}`?"),
                    None => format!("known fields are: {}", known.join(", ")),
                };
                self.problem(&path, format!("unknown field `{key}`; {hint}"));
            }
        }
    }

    fn string(&mut self, table: &toml::Table, path: &[&str]) -> Option<String> {
        match table.get(*path.last()?)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(
                    path,
                    format!(
                        "expected a string in quotes, found {}; write {} = \"...\"",
                        other.type_str(),
                        path.last().unwrap_or(&"")
                    ),
                );
                None
            }
        }
    }

    fn validate(
        &mut self,
        table: &toml::Table,
        source: &Path,
        o: &Overrides,
    ) -> Option<ServiceSpec> {
        self.unknown_fields(table, &[], TOP_FIELDS);

        // name
        let name = match &o.name {
            Some(n) => ServiceName::parse(n)
                .map_err(|e| self.flag_problem("--name", e.to_string()))
                .ok(),
            None => match self.string(table, &["name"]) {
                Some(n) => ServiceName::parse(&n)
                    .map_err(|e| self.problem(&["name"], e.to_string()))
                    .ok(),
                None if table.contains_key("name") => None,
                None => {
                    let dir = source.file_name().map(|s| s.to_string_lossy().into_owned());
                    let derived = dir.as_deref().and_then(ServiceName::derive_from);
                    if derived.is_none() {
                        self.flag_problem(
                            "name",
                            "no name given and none can be made from the directory name; \
                             add name = \"my-service\" to skiff.toml or pass --name"
                                .into(),
                        );
                    }
                    derived
                }
            },
        };

        // build
        let build = match &o.build {
            Some(b) => Some(b.clone()),
            None => self.string(table, &["build"]),
        }
        .filter(|b| !b.trim().is_empty());

        // start
        let mut start_from = None;
        let start = match &o.start {
            Some(s) if s.trim().is_empty() => {
                self.flag_problem(
                    "--start",
                    "the start command is empty; pass the command that starts your server, \
                     e.g. --start \"python3 app.py\""
                        .into(),
                );
                None
            }
            Some(s) => Some(s.clone()),
            None => match self.string(table, &["start"]) {
                Some(s) if s.trim().is_empty() => {
                    self.problem(
                        &["start"],
                        "the start command is empty; set it to the command that starts your \
                         server, e.g. start = \"python3 app.py\""
                            .into(),
                    );
                    None
                }
                Some(s) => Some(s),
                None if table.contains_key("start") => None,
                None => match self.detected.take() {
                    Some((command, from)) => {
                        start_from = Some(from);
                        Some(command)
                    }
                    None => {
                        self.flag_problem(
                            "start",
                            "no start command; add start = \"<command that starts your \
                             server>\" to skiff.toml (or a web: line to a Procfile, or \
                             scripts.start to package.json), or pass --start"
                                .into(),
                        );
                        None
                    }
                },
            },
        };

        // port
        let port = match o.port {
            Some(p) => self.check_port(p as i64, None),
            None => match table.get("port") {
                None => Some(DEFAULT_PORT),
                Some(Value::Integer(p)) => self.check_port(*p, Some(&["port"])),
                Some(other) => {
                    self.problem(
                        &["port"],
                        format!(
                            "expected a number, found {}; write port = 8080 (no quotes)",
                            other.type_str()
                        ),
                    );
                    None
                }
            },
        };

        // mode
        let mode_str = match &o.mode {
            Some(m) => Some((m.clone(), true)),
            None => self.string(table, &["mode"]).map(|m| (m, false)),
        };
        let mode = match mode_str {
            None => Some(Mode::Serverless),
            Some((m, from_flag)) => match Mode::parse(&m) {
                Some(mode) => Some(mode),
                None => {
                    let msg = format!(
                        "{m:?} is not a mode; use \"serverless\" (the default) or \"persistent\""
                    );
                    if from_flag {
                        self.flag_problem("--mode", msg);
                    } else {
                        self.problem(&["mode"], msg);
                    }
                    None
                }
            },
        };

        let runtime = self.runtime(table);
        // A Node.js service (it has a package.json) that names no runtime
        // gets the current long-term-support Node.js, not the base image's
        // 20, which is past its end of life.
        let node_by_default = self.package_json && !table.contains_key("runtime");
        let env = self.env(table);
        let limits = self.limits(table);

        Some(ServiceSpec {
            name: name?,
            source: source.to_path_buf(),
            build,
            start: start?,
            port: port?,
            mode: mode?,
            env: env?,
            limits: limits?,
            start_from,
            node: runtime.as_ref()?.0.or(node_by_default.then_some(NODE_LTS)),
            python: runtime?.1,
            node_by_default,
        })
    }

    /// `runtime = "node@22"` or `"python@3.13"`: (Node.js major, Python);
    /// `(None, None)` for the default base's runtimes, `None` (and a
    /// problem) for anything else.
    fn runtime(&mut self, table: &toml::Table) -> Option<(Option<u32>, Option<String>)> {
        let Some(value) = self.string(table, &["runtime"]) else {
            return (!table.contains_key("runtime")).then_some((None, None));
        };
        let majors = format!("{} to {}", NODE_MAJORS.start(), NODE_MAJORS.end());
        let (lang, version) = value.split_once('@').unwrap_or((value.as_str(), ""));
        match lang {
            "node" => match version
                .split('.')
                .next()
                .and_then(|v| v.parse::<u32>().ok())
            {
                Some(major) if NODE_MAJORS.contains(&major) => Some((Some(major), None)),
                _ => {
                    self.problem(
                        &["runtime"],
                        format!(
                            "{value:?}: give a Node.js major version from {majors}, e.g. \
                             runtime = \"node@22\""
                        ),
                    );
                    None
                }
            },
            "python" if version.is_empty() || version == BASE_PYTHON => Some((None, None)),
            "python" if PYTHONS.contains(&version) => Some((None, Some(version.to_string()))),
            "python" => {
                self.problem(
                    &["runtime"],
                    format!(
                        "{value:?}: skiff provides Python {} (e.g. runtime = \"python@3.11\"; \
                         {BASE_PYTHON} is the default)",
                        PYTHONS.join(" and ")
                    ),
                );
                None
            }
            _ => {
                self.problem(
                    &["runtime"],
                    format!(
                        "{value:?} is not a runtime skiff knows; use \"node@<major>\" \
                         ({majors}) or \"python@<version>\" ({})",
                        PYTHONS.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn check_port(&mut self, p: i64, path: Option<&[&str]>) -> Option<u16> {
        if (1..=65535).contains(&p) {
            return Some(p as u16);
        }
        let msg = format!(
            "{p} is not a usable port; use a number from 1 to 65535, e.g. 8080 \
             (your server must listen on it)"
        );
        match path {
            Some(path) => self.problem(path, msg),
            None => self.flag_problem("--port", msg),
        }
        None
    }

    fn sub_table<'t>(
        &mut self,
        table: &'t toml::Table,
        key: &str,
    ) -> Option<Option<&'t toml::Table>> {
        match table.get(key) {
            None => Some(None),
            Some(Value::Table(t)) => Some(Some(t)),
            Some(other) => {
                self.problem(
                    &[key],
                    format!(
                        "expected a table, found {}; write it as a [{key}] section",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    fn env(&mut self, table: &toml::Table) -> Option<BTreeMap<String, String>> {
        let t = self.sub_table(table, "env")?;
        let mut env = BTreeMap::new();
        let mut ok = true;
        for (k, v) in t.into_iter().flatten() {
            let path = ["env", k.as_str()];
            let valid_name = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                self.problem(
                    &path,
                    format!(
                        "{k:?} is not a valid environment variable name; use letters, digits \
                         and '_', not starting with a digit"
                    ),
                );
                ok = false;
                continue;
            }
            if let Some((_, why)) = RESERVED_ENV.iter().find(|(r, _)| r == k) {
                self.problem(&path, format!("{k} is set by skiff; {why}"));
                ok = false;
                continue;
            }
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Boolean(b) => b.to_string(),
                other => {
                    self.problem(
                        &path,
                        format!(
                            "expected a string, found {}; environment values are text: \
                             {k} = \"...\"",
                            other.type_str()
                        ),
                    );
                    ok = false;
                    continue;
                }
            };
            if value.contains('\0') {
                self.problem(
                    &path,
                    "the value contains a NUL byte, which no environment can hold; remove it"
                        .into(),
                );
                ok = false;
                continue;
            }
            env.insert(k.clone(), value);
        }
        ok.then_some(env)
    }

    fn limits(&mut self, table: &toml::Table) -> Option<Limits> {
        let t = self.sub_table(table, "limits")?;
        let mut limits = Limits::default();
        let Some(t) = t else { return Some(limits) };
        self.unknown_fields(t, &["limits"], LIMIT_FIELDS);
        let before = self.problems.len();

        let size = |v: &mut Self, key: &str, min: u64| -> Option<u64> {
            let s = v.string(t, &["limits", key])?;
            match parse_size(&s) {
                Ok(n) if n >= min => Some(n),
                Ok(_) => {
                    v.problem(
                        &["limits", key],
                        format!("{s:?} is too small; the least is {}", format_size(min)),
                    );
                    None
                }
                Err(e) => {
                    v.problem(&["limits", key], e);
                    None
                }
            }
        };
        let duration = |v: &mut Self, key: &str| -> Option<Duration> {
            let s = v.string(t, &["limits", key])?;
            parse_duration(&s)
                .map_err(|e| v.problem(&["limits", key], e))
                .ok()
        };
        let count = |v: &mut Self, key: &str, max: i64| -> Option<u32> {
            match t.get(key)? {
                Value::Integer(n) if (1..=max).contains(n) => Some(*n as u32),
                Value::Integer(n) => {
                    v.problem(
                        &["limits", key],
                        format!("{n} is out of range; use a whole number from 1 to {max}"),
                    );
                    None
                }
                other => {
                    v.problem(
                        &["limits", key],
                        format!(
                            "expected a whole number, found {}; write {key} = 10 (no quotes)",
                            other.type_str()
                        ),
                    );
                    None
                }
            }
        };

        if let Some(n) = size(self, "memory", 16 << 20) {
            limits.memory = n;
        }
        if let Some(n) = size(self, "max_response", 1) {
            limits.max_response = n;
        }
        if let Some(n) = size(self, "max_request", 1) {
            limits.max_request = n;
        }
        if let Some(n) = size(self, "tmp_size", 1 << 20) {
            limits.tmp_size = n;
        }
        if let Some(n) = size(self, "build_disk", 64 << 20) {
            limits.build_disk = n;
        }
        if let Some(n) = size(self, "disk", 16 << 20) {
            limits.disk = n;
        }
        if let Some(d) = duration(self, "request_timeout") {
            limits.request_timeout = d;
        }
        if let Some(d) = duration(self, "idle_suspend") {
            limits.idle_suspend = d;
        }
        if let Some(d) = duration(self, "idle_stop") {
            limits.idle_stop = d;
        }
        if let Some(d) = duration(self, "queue_timeout") {
            limits.queue_timeout = d;
        }
        if let Some(d) = duration(self, "start_timeout") {
            limits.start_timeout = d;
        }
        if let Some(d) = duration(self, "build_timeout") {
            limits.build_timeout = d;
        }
        for (key, d) in [
            ("request_timeout", limits.request_timeout),
            ("start_timeout", limits.start_timeout),
            ("build_timeout", limits.build_timeout),
        ] {
            if t.contains_key(key) && d.is_zero() {
                self.problem(
                    &["limits", key],
                    format!("{key} cannot be 0; give a duration such as \"30s\""),
                );
            }
        }
        if let Some(n) = count(self, "max_instances", 1000) {
            limits.max_instances = n;
        }
        if let Some(n) = count(self, "concurrency", 100_000) {
            limits.concurrency = n;
        }
        if let Some(n) = count(self, "max_queue", 1_000_000) {
            limits.max_queue = n;
        }
        if let Some(n) = count(self, "pids", 1 << 20) {
            limits.pids = n;
        }
        // The kernel's own ceiling is fs.nr_open, 1 Mi by default.
        if let Some(n) = count(self, "open_files", 1 << 20) {
            if n < 64 {
                self.problem(
                    &["limits", "open_files"],
                    format!("{n} is too few for any runtime; use at least 64"),
                );
            } else {
                limits.open_files = n.into();
            }
        }
        match t.get("cpu") {
            None => {}
            Some(Value::Float(f)) if *f >= 0.01 && *f <= 1024.0 => limits.cpu = *f,
            Some(Value::Integer(i)) if (1..=1024).contains(i) => limits.cpu = *i as f64,
            Some(other) => self.problem(
                &["limits", "cpu"],
                format!(
                    "{other} is not a CPU share; write the number of cores, e.g. cpu = 0.5 or cpu = 2"
                ),
            ),
        }
        (self.problems.len() == before).then_some(limits)
    }
}

/// The known name closest to `key`, when it is close enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
