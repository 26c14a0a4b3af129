//! The troubleshooter against a corpus of realistic output, one file per
//! case, per stack (`tests/corpus/<stack>/<case>.log`), in the spirit of
//! rust-analyzer's data-driven tests. A file starts with what it expects,
//! then `---`, then the output as the service would print it:
//!
//! ```text
//! expect: ReadOnlyFileSystem
//! what: /app/data.json
//! fix: /tmp
//! ---
//! Error: EROFS: read-only file system, open '/app/data.json'
//! ```
//!
//! `expect: nothing` (the `healthy` stack: start-up and request logs of
//! common servers) means no finding at all. Otherwise exactly one finding,
//! of that kind, whose `what` and `fix` contain the given texts: one event
//! gives one finding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use skiff_core::diagnose::{Diagnoser, Finding};

struct Case {
    path: PathBuf,
    stack: String,
    expect: Option<String>,
    what: Vec<String>,
    fix: Vec<String>,
    output: String,
}

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases = Vec::new();
    let mut stacks: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    stacks.sort();
    for dir in stacks {
        let stack = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let (head, output) = text
                .split_once("\n---\n")
                .unwrap_or_else(|| panic!("{}: no `---` line after the header", path.display()));
            let mut case = Case {
                path: path.clone(),
                stack: stack.clone(),
                expect: None,
                what: Vec::new(),
                fix: Vec::new(),
                output: output.to_string(),
            };
            for line in head.lines() {
                let (key, value) = line
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("{}: bad header line {line:?}", path.display()));
                match key {
                    "expect" if value == "nothing" => {}
                    "expect" => case.expect = Some(value.to_string()),
                    "what" => case.what.push(value.to_string()),
                    "fix" => case.fix.push(value.to_string()),
                    other => panic!("{}: unknown header {other:?}", path.display()),
                }
            }
            cases.push(case);
        }
    }
    cases
}

fn findings(output: &str) -> Vec<Finding> {
    let mut d = Diagnoser::default();
    let at = SystemTime::now();
    for line in output.lines() {
        d.observe(line, at);
    }
    d.findings().cloned().collect()
}

#[test]
fn every_case_of_the_corpus_gives_its_finding_and_healthy_output_none() {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let found = findings(&case.output);
        let name = case.path.display();
        match &case.expect {
            None if found.is_empty() => {}
            None => failures.push(format!(
                "{name}: expected nothing, found {:?}",
                found.iter().map(|f| (f.kind, &f.what)).collect::<Vec<_>>()
            )),
            Some(kind) => {
                if found.len() != 1 || found[0].kind.as_str() != kind {
                    failures.push(format!(
                        "{name}: expected one {kind}, found {:?}",
                        found
                            .iter()
                            .map(|f| (f.kind, &f.what, &f.evidence))
                            .collect::<Vec<_>>()
                    ));
                    continue;
                }
                let f = &found[0];
                for w in &case.what {
                    if !f.what.contains(w.as_str()) {
                        failures.push(format!("{name}: what {:?} lacks {w:?}", f.what));
                    }
                }
                for x in &case.fix {
                    if !f.fix.contains(x.as_str()) {
                        failures.push(format!("{name}: fix {:?} lacks {x:?}", f.fix));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every row of the word rules is reached: each stack it names has a case
/// with a line that this row, and no earlier one, recognises.
#[test]
fn every_word_rule_has_a_case_in_each_of_its_stacks() {
    let cases = cases();
    let mut missing = Vec::new();
    for (row, (stacks, kind, subject)) in skiff_core::diagnose::word_rules().enumerate() {
        for stack in stacks.split(", ").filter(|s| *s != "any") {
            let covered = cases.iter().any(|c| {
                c.stack == stack
                    && c.expect.as_deref() == Some(kind.as_str())
                    && c.output
                        .lines()
                        .any(|l| skiff_core::diagnose::word_rule_of(l) == Some(row))
            });
            if !covered {
                missing.push(format!("{kind:?} ({subject}) has no case in {stack}"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The corpus's size, by finding and stack, as the README states it.
#[test]
fn the_readme_states_the_corpus_as_it_is() {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for case in cases() {
        let kind = case.expect.unwrap_or_else(|| "nothing".into());
        *counts.entry((kind, case.stack)).or_default() += 1;
    }
    let stacks = ["python", "node", "ruby", "java", "php", "go", "healthy"];
    let mut kinds: Vec<&String> = counts.keys().map(|(k, _)| k).collect();
    kinds.dedup();
    let mut table = format!("| finding | {} |\n|---|", stacks.join(" | "));
    table.push_str(&"---|".repeat(stacks.len()));
    table.push('\n');
    for kind in kinds {
        let row: Vec<String> = stacks
            .iter()
            .map(|s| {
                counts
                    .get(&(kind.clone(), s.to_string()))
                    .map_or("".to_string(), |n| n.to_string())
            })
            .collect();
        table.push_str(&format!("| {kind} | {} |\n", row.join(" | ")));
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    assert!(
        readme.contains(&table),
        "README.md should carry the corpus's table:\n{table}"
    );
}
