//! `openapi.json` and the code describe the same API: the same routes, and
//! every JSON shape with the same fields.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::server::{OPENAPI, ROUTES};
use crate::types::*;

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

/// Property names a schema declares (following `$ref` and `allOf`) and the
/// required ones.
fn schema_fields(doc: &Value, schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return schema_fields(doc, &doc["components"]["schemas"][name]);
    }
    let mut props = BTreeSet::new();
    let mut required = BTreeSet::new();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            let (p, r) = schema_fields(doc, part);
            props.extend(p);
            required.extend(r);
        }
    }
    if let Some(p) = schema.get("properties").and_then(Value::as_object) {
        props.extend(p.keys().cloned());
    }
    if let Some(r) = schema.get("required").and_then(Value::as_array) {
        required.extend(r.iter().filter_map(Value::as_str).map(str::to_string));
    }
    (props, required)
}

/// Checks a serialised value (every optional field set) against a schema.
fn check(doc: &Value, name: &str, schema: &Value, value: &impl serde::Serialize) {
    let json = serde_json::to_value(value).unwrap();
    let keys: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
    let (props, required) = schema_fields(doc, schema);
    assert_eq!(
        keys, props,
        "{name}: the code's fields vs openapi.json's properties"
    );
    assert!(
        required.is_subset(&keys),
        "{name}: openapi.json requires {:?}, the code has {keys:?}",
        required
    );
}

fn finding() -> Finding {
    Finding {
        kind: "ReadOnlyFileSystem".into(),
        what: "w".into(),
        why: "y".into(),
        fix: "f".into(),
        evidence: "e".into(),
        count: 1,
        first_seen: "t".into(),
        last_seen: "t".into(),
    }
}

fn start() -> Start {
    Start {
        instance: "web-1-1".into(),
        version: Some(1),
        at: "t".into(),
        sandbox_ready_ms: 1.0,
        process_started_ms: 2.0,
        port_listening_ms: 3.0,
        first_answer_ms: 4.0,
    }
}

fn summary() -> ServiceSummary {
    ServiceSummary {
        name: "web".into(),
        state: "ready".into(),
        url: "http://web.localhost:8000/".into(),
        mode: Some("serverless".into()),
        version: Some(1),
        instances: Instances::default(),
        deploying: Some(2),
        error: Some("e".into()),
    }
}

#[test]
fn every_route_is_described_and_every_description_is_served() {
    let doc = doc();
    let mut described = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            described.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(served, described);
}

#[test]
fn every_shape_matches_its_schema() {
    let doc = doc();
    let schemas = &doc["components"]["schemas"];
    check(
        &doc,
        "ServiceSummary",
        &schemas["ServiceSummary"],
        &summary(),
    );
    check(
        &doc,
        "ServiceList",
        &schemas["ServiceList"],
        &ServiceList { services: vec![] },
    );
    check(
        &doc,
        "Instances",
        &schemas["Instances"],
        &Instances::default(),
    );
    check(&doc, "Finding", &schemas["Finding"], &finding());
    check(
        &doc,
        "Version",
        &schemas["Version"],
        &Version {
            id: 1,
            state: "ready".into(),
            created_at: "t".into(),
            finished_at: Some("t".into()),
            error: Some("e".into()),
            build_ms: Some(1),
            sandbox_ms: Some(1),
            app_ms: Some(1),
        },
    );
    let event = Event {
        at: "t".into(),
        level: "error".into(),
        kind: "k".into(),
        message: "m".into(),
    };
    check(&doc, "Event", &schemas["Event"], &event);
    check(
        &doc,
        "ServiceStatus",
        &schemas["ServiceStatus"],
        &ServiceStatus {
            summary: summary(),
            start: Some("s".into()),
            build: Some("b".into()),
            port: Some(8080),
            draining: 0,
            versions: vec![],
            recent_errors: vec![event],
            findings: vec![finding()],
            last_start: Some(start()),
        },
    );
    check(&doc, "Start", &schemas["Start"], &start());
    check(
        &doc,
        "Doctor",
        &schemas["Doctor"],
        &Doctor {
            service: "web".into(),
            state: "ready".into(),
            findings: vec![finding()],
            starts: vec![start()],
            log_lines: 1,
            events: 1,
            version: Some(3),
        },
    );
    check(
        &doc,
        "LogLine",
        &schemas["LogLine"],
        &LogLine {
            id: 1,
            at: "t".into(),
            source: "run".into(),
            stream: Some("stdout".into()),
            instance: Some("i".into()),
            version: Some(1),
            line: "l".into(),
        },
    );
    check(
        &doc,
        "RequestLine",
        &schemas["RequestLine"],
        &RequestLine {
            id: 1,
            at: "t".into(),
            request_id: "r".into(),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: Some(2),
            instance: Some("i".into()),
            wake: Some("cold".into()),
            error: Some("unavailable".into()),
        },
    );
    check(
        &doc,
        "Removed",
        &schemas["Removed"],
        &Removed {
            removed: "web".into(),
        },
    );
    check(
        &doc,
        "ApiError",
        &schemas["ApiError"],
        &ApiError {
            error: "e".into(),
            kind: "k".into(),
        },
    );
}

#[test]
fn every_deploy_message_matches_its_variant() {
    let doc = doc();
    let variants = doc["components"]["schemas"]["DeployMessage"]["oneOf"]
        .as_array()
        .unwrap();
    let messages = [
        DeployMessage::Accepted {
            service: "web".into(),
            files: 1,
            bytes: 1,
        },
        DeployMessage::Progress {
            message: "m".into(),
        },
        DeployMessage::Log {
            source: "build".into(),
            line: "l".into(),
        },
        DeployMessage::Ready {
            version: 1,
            url: "u".into(),
            sandbox_ms: 1.0,
            app_ms: 1.0,
        },
        DeployMessage::Failed {
            error: "e".into(),
            findings: vec![finding()],
            serving: Some(1),
        },
    ];
    assert_eq!(
        messages.len(),
        variants.len(),
        "one schema per message type"
    );
    for m in &messages {
        let ty = serde_json::to_value(m).unwrap()["type"].clone();
        let schema = variants
            .iter()
            .find(|v| v["properties"]["type"]["const"] == ty)
            .unwrap_or_else(|| panic!("openapi.json has no DeployMessage of type {ty}"));
        check(&doc, &format!("DeployMessage {ty}"), schema, m);
    }
}
