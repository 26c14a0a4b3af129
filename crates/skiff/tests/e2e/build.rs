//! Builds: the build command runs as root and its writes become the
//! service's read-only image, reused while nothing changes.

use std::path::Path;
use std::time::Duration;

use crate::sandbox::{host, PROBE_APP};
use crate::support::*;
use crate::FIRST_START;

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

#[test]
fn python_with_a_virtualenv_served_by_gunicorn() {
    let mut up = Up::start(&[&example("python-gunicorn")], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let r = up.get("python-gunicorn.localhost", "/");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("hello from gunicorn"), "{r:?}");
    let err = up.stderr();
    assert!(err.contains("skiff: built python-gunicorn in"), "{err}");
    // The build's output was shown, marked as the build's.
    assert!(
        up.stdout().contains("python-gunicorn build | "),
        "{}",
        up.stdout()
    );
}

#[test]
fn node_with_npm_install_on_a_port_from_the_manifest() {
    let mut up = Up::start(&[&example("node-npm")], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let r = up.get("node-npm.localhost", "/");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("node says 2m on port 3000"), "{r:?}");
}

#[test]
fn apt_get_in_the_build_and_its_program_at_run_time() {
    let name = unique("apt");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"apt-get update && apt-get install -y --no-install-recommends jq\"\n\
             start = \"jq --version > /tmp/version && exec python3 -m http.server $PORT --directory /tmp\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let r = up.get(&host(&name), "/version");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("jq-"), "{r:?}");
    // apt's package lists and downloads were dropped from the image.
    let images = up.state_dir().join("images");
    let img = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("img-"))
        .expect("an image layer");
    let upper = up.platform_view(&img.path().join("disk/upper"));
    let lists = upper.join("var/lib/apt/lists");
    let left: Vec<_> = std::fs::read_dir(&lists)
        .map(|d| d.flatten().filter(|e| e.path().is_file()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "apt lists kept in the image: {left:?}");
    assert!(upper.join("usr/bin/jq").exists());
}

/// Commands start with SIGPIPE at its default, as from a shell: skiff
/// itself ignores it, and an ignored signal would stay ignored across exec
/// (`yes` would then fail with "Broken pipe" instead of ending quietly).
#[test]
fn a_pipeline_that_stops_reading_ends_quietly_in_builds_and_services() {
    let name = unique("sigpipe");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"yes | head -n 1 > /app/first\"\n\
             start = \"yes | head -n 1 > /tmp/first && exec python3 probe.py\"\n"
        ),
        &[("probe.py", PROBE_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let h = host(&name);
    for path in ["/app/first", "/tmp/first"] {
        let r = up.get(&h, &format!("/read?path={path}"));
        assert!(r.body.contains("read 2 bytes"), "{path}: {}", r.body);
    }
    assert!(!up.stdout().contains("Broken pipe"), "{}", up.stdout());
}

#[test]
fn files_the_build_made_are_visible_but_not_writable_at_run_time() {
    let name = unique("buildfiles");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"mkdir -p /opt/data && echo built > /opt/data/file && echo here > /app/made-by-build\"\n\
             start = \"exec python3 probe.py\"\n"
        ),
        &[("probe.py", PROBE_APP)],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let h = host(&name);
    for path in ["/opt/data/file", "/app/made-by-build"] {
        let r = up.get(&h, &format!("/read?path={path}"));
        assert!(
            r.body.contains("read "),
            "{path} should be readable: {}",
            r.body
        );
        let w = up.get(&h, &format!("/write?path={path}"));
        assert!(
            w.body.contains("Read-only file system"),
            "{path}: {}",
            w.body
        );
    }
    // The user's source directory was not touched by the build.
    assert!(!app.path().join("made-by-build").exists());
}

#[test]
fn a_failing_build_fails_the_deploy_clearly_and_keeps_nothing() {
    let name = unique("badbuild");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nbuild = \"echo compiling; echo 'error: no such crate' >&2; exit 4\"\n\
             start = \"python3 -m http.server $PORT\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert!(!up.wait_exit(FIRST_START).success());
    let err = up.stderr();
    assert!(
        err.contains("The build command failed (exit code 4)"),
        "{err}"
    );
    assert!(err.contains("| compiling"), "{err}");
    assert!(err.contains("| error: no such crate"), "{err}");
    assert!(err.contains("build = \"...\" in skiff.toml"), "{err}");
    assert!(!err.contains("starting"), "nothing may start: {err}");
    let images = up.state_dir().join("images");
    let layers: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("img-"))
        .collect();
    assert!(layers.is_empty(), "a failed build left {layers:?}");
    assert!(cgroups_named(&name).is_empty());
}

#[test]
fn a_build_past_its_timeout_is_stopped() {
    let name = unique("slowbuild");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nbuild = \"sleep 600\"\nstart = \"true\"\n[limits]\nbuild_timeout = \"2s\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert!(!up.wait_exit(FIRST_START).success());
    let err = up.stderr();
    assert!(err.contains("longer than the build timeout of 2s"), "{err}");
    assert!(
        cgroups_named(&name).is_empty(),
        "{:?}",
        cgroups_named(&name)
    );
    assert!(processes_with("sleep 600").is_empty());
}

#[test]
fn same_source_reuses_the_image_and_a_changed_file_rebuilds() {
    let name = unique("cached");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nbuild = \"echo BUILD-RAN; cp version /opt/version\"\n\
             start = \"exec python3 -m http.server $PORT --directory /opt\"\n"
        ),
        &[("version", "one")],
    );
    let state = tempfile::tempdir().unwrap();
    let run = |expect: &str, built: bool| {
        let mut up = Up::start_in(&[app.path()], state.path(), &[], None);
        assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
        let r = up.get(&host(&name), "/version");
        assert_eq!(r.body, expect, "{r:?}");
        assert!(up.wait_output("is ready", Duration::from_secs(10)));
        assert_eq!(up.stdout().contains("BUILD-RAN"), built, "{}", up.stdout());
        let reused = up.stderr().contains("reusing the built image");
        assert_eq!(reused, !built, "{}", up.stderr());
    };
    run("one", true);
    run("one", false);
    std::fs::write(app.path().join("version"), "two").unwrap();
    run("two", true);
    // The first image is no longer serving, and kept for a rollback.
    let layers = std::fs::read_dir(state.path().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("img-"))
        .count();
    assert_eq!(layers, 2);
}
