use super::*;

fn check(text: &str, o: &Overrides) -> Result<ServiceSpec, ManifestError> {
    parse(
        Some(text),
        Path::new("/src/hello/skiff.toml"),
        Path::new("/src/hello"),
        o,
    )
}

#[test]
fn full_manifest_from_interface_md() {
    let spec = check(
        r#"
name = "hello"
build = "pip install -r requirements.txt"
start = "python3 app.py"
port = 8080
mode = "serverless"

[env]
GREETING = "hi"
DEBUG = 1

[limits]
memory = "512MiB"
request_timeout = "15m"
max_response = "6MiB"
max_instances = 10
concurrency = 80
idle_suspend = "0s"
idle_stop = "5m"
"#,
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.name.as_str(), "hello");
    assert_eq!(
        spec.build.as_deref(),
        Some("pip install -r requirements.txt")
    );
    assert_eq!(spec.start, "python3 app.py");
    assert_eq!(spec.port, 8080);
    assert_eq!(spec.mode, Mode::Serverless);
    assert_eq!(spec.env["GREETING"], "hi");
    assert_eq!(spec.env["DEBUG"], "1");
    assert_eq!(spec.limits, Limits::default());
    assert_eq!(spec.limits.max_response, 6_291_456);
}

#[test]
fn disk_limits_default_and_parse() {
    let spec = check("start = \"x\"", &Overrides::default()).unwrap();
    assert_eq!(spec.limits.build_disk, 4 << 30);
    assert_eq!(spec.limits.disk, 1 << 30);
    assert_eq!(spec.limits.open_files, 65536);
    let spec = check(
        "start = \"x\"\n[limits]\nbuild_disk = \"10GiB\"\ndisk = \"64MiB\"",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.limits.build_disk, 10 << 30);
    assert_eq!(spec.limits.disk, 64 << 20);
    // A version recorded before these limits existed reads with defaults.
    let mut old = toml::Table::try_from(&spec.limits).unwrap();
    old.remove("build_disk");
    old.remove("disk");
    let read: Limits = old.try_into().unwrap();
    assert_eq!((read.build_disk, read.disk), (4 << 30, 1 << 30));
}

#[test]
fn defaults_and_derived_name() {
    let spec = check("start = \"./server\"", &Overrides::default()).unwrap();
    assert_eq!(spec.name.as_str(), "hello");
    assert_eq!(spec.port, 8080);
    assert_eq!(spec.mode, Mode::Serverless);
    assert!(spec.build.is_none());
}

#[test]
fn overrides_win_and_allow_no_manifest() {
    let o = Overrides {
        name: Some("other".into()),
        start: Some("node index.js".into()),
        port: Some(3000),
        mode: Some("persistent".into()),
        build: Some("npm install".into()),
    };
    let spec = check("name = \"hello\"\nstart = \"x\"\nport = 1", &o).unwrap();
    assert_eq!(spec.name.as_str(), "other");
    assert_eq!(spec.start, "node index.js");
    assert_eq!(spec.port, 3000);
    assert_eq!(spec.mode, Mode::Persistent);
    assert_eq!(spec.build.as_deref(), Some("npm install"));

    let spec = parse(None, Path::new("/s/a/skiff.toml"), Path::new("/s/a"), &o).unwrap();
    assert_eq!(spec.start, "node index.js");
}

#[test]
fn reports_every_problem_at_once_with_position() {
    let err = check(
        "name = \"Bad_Name\"\nstart = \"\"\nport = 0\nprot = 1\n[limits]\nmemory = \"lots\"\n",
        &Overrides::default(),
    )
    .unwrap_err();
    let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields.len(), 5, "{err}");
    for f in ["name", "start", "port", "prot", "limits.memory"] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    let text = err.to_string();
    assert!(
        text.starts_with("/src/hello/skiff.toml has 5 problems:"),
        "{text}"
    );
    assert!(
        text.contains("skiff.toml:3:8: port: 0 is not a usable port; use a number from 1 to 65535"),
        "{text}"
    );
    assert!(
        text.contains("unknown field `prot`; did you mean `port`?"),
        "{text}"
    );
    assert!(text.contains("skiff.toml:6:10: limits.memory"), "{text}");
}

#[test]
fn bad_values_table() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "start = \"x\"\nport = 70000",
            "port",
            "70000 is not a usable port",
        ),
        (
            "start = \"x\"\nport = \"8080\"",
            "port",
            "expected a number",
        ),
        ("start = 3", "start", "expected a string"),
        ("name = \"x\"", "start", "no start command"),
        ("start = \"  \"", "start", "the start command is empty"),
        (
            "start = \"x\"\nmode = \"fast\"",
            "mode",
            "\"fast\" is not a mode",
        ),
        (
            "start = \"x\"\n[env]\nPORT = \"1\"",
            "env.PORT",
            "set `port = ...` instead",
        ),
        (
            "start = \"x\"\n[env]\n1A = \"1\"",
            "env.1A",
            "not a valid environment variable name",
        ),
        (
            "start = \"x\"\nenv = 3",
            "env",
            "write it as a [env] section",
        ),
        (
            "start = \"x\"\n[limits]\nmax_instances = 0",
            "limits.max_instances",
            "out of range",
        ),
        (
            "start = \"x\"\n[limits]\nidle_stop = \"5\"",
            "limits.idle_stop",
            "has no unit",
        ),
        (
            "start = \"x\"\n[limits]\nrequest_timeout = \"0s\"",
            "limits.request_timeout",
            "cannot be 0",
        ),
        (
            "start = \"x\"\n[limits]\nmemory = \"1MiB\"",
            "limits.memory",
            "too small",
        ),
        (
            "start = \"x\"\n[limits]\nbuild_disk = \"1MiB\"",
            "limits.build_disk",
            "too small; the least is 64MiB",
        ),
        (
            "start = \"x\"\n[limits]\ndisk = \"lots\"",
            "limits.disk",
            "is not a size",
        ),
        (
            "start = \"x\"\n[limits]\nopen_files = 8",
            "limits.open_files",
            "use at least 64",
        ),
        (
            "start = \"x\"\n[limits]\nopen_files = 2000000",
            "limits.open_files",
            "out of range",
        ),
        (
            "start = \"x\"\n[limits]\ncpu = -1",
            "limits.cpu",
            "not a CPU share",
        ),
        (
            "start = \"x\"\n[limits]\nconcurency = 5",
            "limits.concurency",
            "did you mean `concurrency`?",
        ),
    ];
    for (text, field, needle) in cases {
        let err = check(text, &Overrides::default()).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{text:?}: {err}");
        assert_eq!(err.problems[0].field, *field, "{text:?}: {err}");
        assert!(err.problems[0].message.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn syntax_error_names_line() {
    let err = check("start = \"x\"\nport = = 3\n", &Overrides::default()).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].field, "syntax");
    assert_eq!(err.problems[0].position.map(|p| p.0), Some(2), "{err}");
}

#[test]
fn bad_flags_are_named() {
    let o = Overrides {
        port: Some(0),
        name: Some("UPPER".into()),
        mode: Some("x".into()),
        start: Some("".into()),
        ..Default::default()
    };
    let err = check("start = \"ok\"", &o).unwrap_err();
    let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["--name", "--start", "--port", "--mode"], "{err}");
}

#[test]
fn missing_source_dir_is_explained() {
    let err = load(
        Path::new("/nonexistent/skiff-test-dir"),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot read /nonexistent/skiff-test-dir"),
        "{err}"
    );
}

#[test]
fn a_start_command_is_taken_from_procfile_or_package_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let load = || crate::load(d, &Overrides::default());
    // Nothing declares one: the error says where it could come from.
    let err = load().unwrap_err().to_string();
    assert!(
        err.contains("Procfile") && err.contains("package.json"),
        "{err}"
    );
    std::fs::write(
        d.join("package.json"),
        r#"{"scripts": {"start": "node server.js"}}"#,
    )
    .unwrap();
    let spec = load().unwrap();
    assert_eq!(spec.start, "npm start");
    assert!(spec
        .start_from
        .as_deref()
        .unwrap()
        .contains("node server.js"));
    // A Procfile's web: line wins over package.json.
    std::fs::write(
        d.join("Procfile"),
        "release: ./migrate\nweb: gunicorn app:app --bind 0.0.0.0:$PORT\n",
    )
    .unwrap();
    let spec = load().unwrap();
    assert_eq!(spec.start, "gunicorn app:app --bind 0.0.0.0:$PORT");
    assert_eq!(
        spec.start_from.as_deref(),
        Some("the web: line of Procfile")
    );
    // The manifest and --start win over both, and nothing is said.
    std::fs::write(d.join("skiff.toml"), "start = \"./server\"\n").unwrap();
    let spec = load().unwrap();
    assert_eq!((spec.start.as_str(), spec.start_from), ("./server", None));
    let o = Overrides {
        start: Some("./other".into()),
        ..Default::default()
    };
    std::fs::remove_file(d.join("skiff.toml")).unwrap();
    let spec = crate::load(d, &o).unwrap();
    assert_eq!((spec.start.as_str(), spec.start_from), ("./other", None));
}

#[test]
fn frameworks_that_hold_connections_are_named_for_serverless_services() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("skiff.toml"), "start = \"streamlit run app.py\"\n").unwrap();
    let s = crate::load(d, &Overrides::default()).unwrap();
    assert!(crate::streaming_hint(&s).unwrap().contains("Streamlit"));
    // The same in persistent mode: nothing to say.
    std::fs::write(
        d.join("skiff.toml"),
        "start = \"streamlit run app.py\"\nmode = \"persistent\"\n",
    )
    .unwrap();
    assert!(crate::streaming_hint(&crate::load(d, &Overrides::default()).unwrap()).is_none());
    // A dependency shows it too.
    std::fs::write(d.join("skiff.toml"), "start = \"python3 app.py\"\n").unwrap();
    std::fs::write(
        d.join("requirements.txt"),
        "flask==3.0\nflask-socketio>=5\n",
    )
    .unwrap();
    let s = crate::load(d, &Overrides::default()).unwrap();
    assert!(crate::streaming_hint(&s).unwrap().contains("Socket.IO"));
    // An ordinary app: nothing.
    std::fs::write(
        d.join("requirements.txt"),
        "flask==3.0\n# websockets later\n",
    )
    .unwrap();
    let s = crate::load(d, &Overrides::default()).unwrap();
    assert_eq!(crate::streaming_hint(&s), None);
}

#[test]
fn a_runtime_is_a_node_major_or_the_base_python() {
    let spec = check(
        "start = \"x\"\nruntime = \"node@22\"",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(spec.node, Some(22));
    let spec = check(
        "start = \"x\"\nruntime = \"python@3.13\"",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!((spec.node, spec.python), (None, None));
    let spec = check(
        "start = \"x\"\nruntime = \"python@3.11\"",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!((spec.node, spec.python.as_deref()), (None, Some("3.11")));
    assert_eq!(
        check("start = \"x\"", &Overrides::default()).unwrap().node,
        None
    );
    for (value, needle) in [
        ("node@12", "from 18 to 25"),
        ("node@latest", "Node.js major version"),
        ("python@3.12", "skiff provides Python 3.13 and 3.11"),
        ("ruby@3", "not a runtime skiff knows"),
    ] {
        let err = check(
            &format!("start = \"x\"\nruntime = \"{value}\""),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(err.problems[0].field, "runtime", "{value}");
        assert!(err.problems[0].message.contains(needle), "{value}: {err}");
    }
}

#[test]
fn a_node_service_gets_the_current_lts_unless_it_names_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("skiff.toml"), "start = \"node server.js\"\n").unwrap();
    let spec = crate::load(d, &Overrides::default()).unwrap();
    assert_eq!(
        (spec.node, spec.node_by_default),
        (None, false),
        "no package.json"
    );
    std::fs::write(d.join("package.json"), "{}").unwrap();
    let spec = crate::load(d, &Overrides::default()).unwrap();
    assert_eq!(
        (spec.node, spec.node_by_default),
        (Some(crate::manifest::NODE_LTS), true)
    );
    std::fs::write(
        d.join("skiff.toml"),
        "start = \"node server.js\"\nruntime = \"python@3.13\"\n",
    )
    .unwrap();
    let spec = crate::load(d, &Overrides::default()).unwrap();
    assert_eq!(spec.node, None, "the manifest's choice");
}

#[test]
fn files_of_the_source_are_read_without_following_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(outside.path().join("secret"), "web: cat /etc/shadow\n").unwrap();
    // A Procfile that leads outside the source: not read, so no start.
    std::os::unix::fs::symlink(outside.path().join("secret"), d.join("Procfile")).unwrap();
    let err = crate::load(d, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no start command"), "{err}");
    // A skiff.toml that is a link: refused, saying so.
    std::os::unix::fs::symlink(outside.path().join("secret"), d.join("skiff.toml")).unwrap();
    let err = crate::load(d, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    // A package.json that is a link does not make a Node.js service.
    std::fs::remove_file(d.join("skiff.toml")).unwrap();
    std::fs::write(outside.path().join("package.json"), "{}").unwrap();
    std::os::unix::fs::symlink(outside.path().join("package.json"), d.join("package.json"))
        .unwrap();
    let o = Overrides {
        start: Some("./server".into()),
        ..Default::default()
    };
    assert_eq!(crate::load(d, &o).unwrap().node, None);
}
