//! The document and the router agree: every documented operation is served (and answers as
//! documented), no other method is served on a documented path, the routes that want a token
//! are those the document marks, the documented page limits are the enforced ones, the document
//! says what clients rely on, and `/v1/openapi.json` serves it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

use super::AppState;
use crate::auth::{Auth, Role, Tokens};
use crate::cli::DaemonArgs;
use crate::config::DaemonConfig;
use crate::metrics::Metrics;
use crate::service::JobService;
use crate::supervisor::{lease, Supervisor};

/// The methods a request may have (axum serves `HEAD` wherever it serves `GET`, as HTTP asks).
const METHODS: [Method; 9] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS, Method::TRACE, Method::CONNECT];

/// The daemon's router on a fresh SQLite store that holds one queued job (`job`), with or
/// without tokens; its supervisor does not run, so jobs stay as the requests leave them.
struct Daemon {
    router: Router,
    job: i64,
    _store: crate::testing::Guard,
    _data_dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(tokens: bool) -> Daemon {
        let data_dir = tempfile::tempdir().unwrap();
        let tokens = tokens.then(|| {
            let path = data_dir.path().join("tokens.toml");
            crate::auth::new_token("alice", Role::User, Some(&path)).unwrap();
            path
        });
        let args = DaemonArgs {
            config: None,
            http: None,
            grpc: None,
            metrics: None,
            database_url: None,
            data_dir: Some(data_dir.path().to_path_buf()),
            devices: None,
            heartbeat_timeout: None,
            metrics_retention: None,
            stall_timeout: None,
            tokens: tokens.clone(),
            insecure: false,
            tls_cert: None,
            tls_key: None,
            read_roots: Vec::new(),
            max_connections: None,
            read_timeout: None,
        };
        let config = Arc::new(DaemonConfig::resolve(&args).unwrap());
        let (store, guard) = crate::testing::sqlite_store().await;
        let metrics = Metrics::new();
        let keys = Arc::new(crate::auth::worker::WorkerKeys::open(&config.data_dir, "test").unwrap());
        let held = Arc::new(lease::Lease::new(lease::this_process("http://127.0.0.1:0")));
        let supervisor = Supervisor::new(store.clone(), config.clone(), metrics.clone(), "/nonexistent/gantry".into(), held, keys);
        let service = JobService::new(store.clone(), supervisor, config.clone());
        let auth = Arc::new(match &tokens {
            Some(path) => Auth::Tokens(Tokens::load(path).unwrap()),
            None => Auth::Open,
        });
        let spec = gantry_api::JobSpec::from_toml("[model]\npath = \"m/tiny\"\n[data]\ntrain = \"d.bin\"\n", &[]).unwrap();
        let job = store.create_job(&spec, &config.runs_root).await.unwrap().job.id;
        let router = super::router(AppState { service, metrics, auth }, true);
        Daemon { router, job, _store: guard, _data_dir: data_dir }
    }

    /// Status, headers and body; a body that has not ended within 10 s fails the test.
    async fn call(&self, method: Method, uri: &str, content: Option<(&str, String)>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method.clone()).uri(uri);
        let body = match content {
            Some((media_type, body)) => {
                req = req.header(header::CONTENT_TYPE, media_type);
                Body::from(body)
            }
            None => Body::empty(),
        };
        let resp = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let read = axum::body::to_bytes(body, usize::MAX);
        let body = tokio::time::timeout(Duration::from_secs(10), read).await.unwrap_or_else(|_| panic!("{method} {uri} ends")).unwrap();
        (parts.status, parts.headers, body.to_vec())
    }

    /// `path` with its parameters filled in: the job's id.
    fn uri(&self, path: &str) -> String {
        let uri = path.replace("{id}", &self.job.to_string());
        assert!(!uri.contains('{'), "{path} has a parameter this test does not know");
        uri
    }
}

/// The generated document, as JSON.
fn document() -> Value {
    serde_json::to_value(super::document()).unwrap()
}

/// Every documented operation: (method, path template, operation).
fn operations(doc: &Value) -> Vec<(Method, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, op) in item.as_object().unwrap() {
            if let Some(m) = METHODS.iter().find(|m| m.as_str().eq_ignore_ascii_case(key)) {
                ops.push((m.clone(), path.clone(), op.clone()));
            }
        }
    }
    assert!(!ops.is_empty());
    ops
}

/// What a `$ref` points at (anything else as it is).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = r.strip_prefix('#').and_then(|p| doc.pointer(p)).unwrap_or_else(|| panic!("{r} does not resolve"));
            resolve(doc, target)
        }
        None => v,
    }
}

/// Checks a JSON value against a schema of the document: its type, enum values, documented and
/// required properties, array items, through references (enough to catch a body whose shape
/// drifted from its schema; not a full JSON Schema validator).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if value.is_null() {
        assert!(types.is_empty() || types.contains(&"null"), "{at} is null but its schema says {types:?}");
        return;
    }
    let is = |t: &str| match t {
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    };
    assert!(types.is_empty() || types.iter().any(|t| is(t)), "{at} = {value} is not {types:?}");
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        assert!(values.contains(value), "{at} = {value} is not one of {values:?}");
    }
    if let Some(alternatives) = schema.get("oneOf").or(schema.get("anyOf")).and_then(Value::as_array) {
        let not_null: Vec<&Value> = alternatives.iter().filter(|a| resolve(doc, a)["type"] != "null").collect();
        if let [only] = not_null[..] {
            conforms(doc, only, value, at);
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        let object = value.as_object().unwrap_or_else(|| panic!("{at} = {value} is not an object"));
        for (key, v) in object {
            let property = properties.get(key).unwrap_or_else(|| panic!("{at}.{key} is not documented"));
            conforms(doc, property, v, &format!("{at}.{key}"));
        }
        for key in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            assert!(object.contains_key(key), "{at}.{key} is required but missing from {value}");
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"));
        }
    }
}

/// Checks an answer against its operation's documented responses: the status is documented, the
/// body has a documented media type, a JSON body conforms to its schema, and the documented
/// headers are there.
fn answers_as_documented(doc: &Value, what: &str, op: &Value, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    let response = op["responses"].get(status.as_str()).unwrap_or_else(|| panic!("{what} answered {status}, which is not documented"));
    let response = resolve(doc, response);
    for name in response["headers"].as_object().into_iter().flatten().map(|(name, _)| name) {
        assert!(headers.contains_key(name.as_str()), "{what} {status}: the documented header {name} is missing");
    }
    let Some(content) = response["content"].as_object() else {
        assert!(body.is_empty(), "{what} {status} has a body, but none is documented");
        return;
    };
    let media_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap()).unwrap_or("");
    let documented = content.get(media_type).unwrap_or_else(|| panic!("{what} {status}: {media_type} is not among {:?}", content.keys()));
    if media_type == "application/json" {
        let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what} {status}: not JSON: {e}"));
        conforms(doc, &documented["schema"], &value, &format!("{what} {status} body"));
    }
}

/// The error of a JSON answer, if it is one.
fn error_of(body: &[u8]) -> Option<gantry_api::ApiError> {
    serde_json::from_slice(body).ok()
}

/// The router's fallback: a path no route matches.
fn is_fallback(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::NOT_FOUND && error_of(body).is_some_and(|e| e.message.starts_with("no such route"))
}

/// The example spec, its paths made absolute so that it passes admission.
fn example_toml() -> String {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    gantry_api::spec::EXAMPLE_TOML.replace("\"examples/", &format!("\"{examples}"))
}

#[tokio::test]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    let d = Daemon::start(false).await;
    let doc = document();
    let ops = operations(&doc);
    for (method, path, op) in &ops {
        let what = format!("{method} {path}");
        let body = (method == Method::POST && path == "/v1/jobs").then(|| ("application/toml", example_toml()));
        let (status, headers, body) = d.call(method.clone(), &d.uri(path), body).await;
        assert!(!is_fallback(status, &body) && status != StatusCode::METHOD_NOT_ALLOWED, "{what} is documented but not served: {status}");
        answers_as_documented(&doc, &what, op, status, &headers, &body);
        if method == Method::POST && path == "/v1/jobs" {
            assert_eq!(status, StatusCode::CREATED, "the example spec is submitted: {}", String::from_utf8_lossy(&body));
        }
    }
    // The answers the loop above did not get: a followed log, a deletion, a missing job, a spec
    // that is refused.
    let op = |m: Method, p: &str| ops.iter().find(|(om, op, _)| *om == m && op == p).map(|(_, _, o)| o).unwrap();
    let logs = format!("/v1/jobs/{}/logs?follow=true", d.job);
    let (status, headers, body) = d.call(Method::GET, &logs, None).await;
    answers_as_documented(&doc, "GET /v1/jobs/{id}/logs?follow=true", op(Method::GET, "/v1/jobs/{id}/logs"), status, &headers, &body);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    assert!(String::from_utf8_lossy(&body).contains("event: end"), "the cancelled job's stream ends");
    for (status_wanted, method, path) in
        [(204, Method::DELETE, "/v1/jobs/{id}"), (404, Method::GET, "/v1/jobs/{id}"), (404, Method::POST, "/v1/jobs/{id}/cancel")]
    {
        let (status, headers, body) = d.call(method.clone(), &d.uri(path), None).await;
        assert_eq!(status.as_u16(), status_wanted, "{method} {path}");
        answers_as_documented(&doc, &format!("{method} {path}"), op(method.clone(), path), status, &headers, &body);
    }
    for (media_type, spec) in
        [("application/json", "{}".to_string()), ("application/json", "[]".to_string()), ("application/toml", "x".into())]
    {
        let (status, headers, body) = d.call(Method::POST, "/v1/jobs", Some((media_type, spec))).await;
        assert!(status.is_client_error(), "{status}");
        answers_as_documented(&doc, "POST /v1/jobs", op(Method::POST, "/v1/jobs"), status, &headers, &body);
    }
    let (status, headers, body) = d.call(Method::GET, "/v1/jobs/x", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    answers_as_documented(&doc, "GET /v1/jobs/x", op(Method::GET, "/v1/jobs/{id}"), status, &headers, &body);
}

#[tokio::test]
async fn no_undocumented_method_is_served_on_a_documented_path() {
    let d = Daemon::start(false).await;
    let doc = document();
    let ops = operations(&doc);
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p, _)| p).collect();
    for path in paths {
        let documented: Vec<&Method> = ops.iter().filter(|(_, p, _)| p == path).map(|(m, _, _)| m).collect();
        for method in METHODS.iter().filter(|m| !documented.contains(m)) {
            if *method == Method::HEAD && documented.contains(&&Method::GET) {
                continue;
            }
            let (status, _, body) = d.call(method.clone(), &d.uri(path), None).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is not documented but answered {status}");
            if *method != Method::HEAD {
                assert_eq!(error_of(&body).map(|e| e.code), Some(gantry_api::ErrorCode::BadRequest), "{method} {path}: the API's shape");
            }
        }
    }
    // Outside the API's paths: the fallback, in the API's shape.
    let (status, _, body) = d.call(Method::GET, "/v1/nope", None).await;
    assert!(is_fallback(status, &body), "{status}");
}

#[tokio::test]
async fn the_operations_that_want_a_token_are_those_the_document_marks() {
    let d = Daemon::start(true).await;
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        let (status, headers, body) = d.call(method.clone(), &d.uri(&path), None).await;
        let security = op.get("security").and_then(Value::as_array);
        let wants_token = security.is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        if wants_token {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what} without a token");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer", "{what}");
            answers_as_documented(&doc, &what, &op, status, &headers, &body);
            // `{}`: the scheme applies only on a daemon with tokens.
            assert_eq!(security.unwrap(), &vec![serde_json::json!({"bearer": []}), serde_json::json!({})], "{what}");
        } else {
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{what} is documented as open");
        }
    }
}

#[tokio::test]
async fn the_documented_page_limits_are_the_enforced_ones() {
    let d = Daemon::start(false).await;
    let doc = document();
    let mut checked = 0;
    for (method, path, op) in operations(&doc) {
        let Some(limit) = op["parameters"].as_array().into_iter().flatten().find(|p| p["name"] == "limit" && p["in"] == "query") else {
            continue;
        };
        let (min, max) = (limit["schema"]["minimum"].as_i64().unwrap(), limit["schema"]["maximum"].as_i64().unwrap());
        let default = limit["schema"]["default"].as_i64().unwrap();
        assert!((min..=max).contains(&default), "{path}: default {default}");
        for (n, ok) in [(min - 1, false), (min, true), (max, true), (max + 1, false)] {
            let (status, _, _) = d.call(method.clone(), &format!("{}?limit={n}", d.uri(&path)), None).await;
            assert_eq!(status.is_success(), ok, "{method} {path}?limit={n}: {status}");
        }
        // Unknown parameters are refused, as documented.
        let (status, _, _) = d.call(method.clone(), &format!("{}?limt=1", d.uri(&path)), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}?limt=1");
        checked += 1;
    }
    assert_eq!(checked, 3, "jobs, metrics and logs are paged");
}

#[tokio::test]
async fn the_served_document_is_the_generated_one() {
    let d = Daemon::start(false).await;
    let (status, headers, body) = d.call(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, document());
}

#[tokio::test]
async fn the_dashboard_is_served_beside_the_api_but_left_out_of_its_document() {
    let d = Daemon::start(false).await;
    let doc = document();
    for path in crate::web::PAGES.into_iter().chain([crate::web::ASSETS_PATH]) {
        assert!(doc["paths"].get(path).is_none(), "{path} is the dashboard's, not the API's");
        let (status, _, _) = d.call(Method::GET, &d.uri(&path.replace("{file}", "app.js")), None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[test]
fn the_document_says_what_clients_rely_on() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["summary"].is_string() && doc["info"]["title"].is_string());
    let description = doc["info"]["description"].as_str().unwrap();
    assert!(!description.contains("empty body"), "errors have the API's shape everywhere");
    assert!(description.contains("2 MiB") && super::BODY_LIMIT_BYTES == 2 << 20, "the documented body limit is the enforced one");
    let schemas = &doc["components"]["schemas"];

    let job = &schemas["Job"]["properties"];
    for field in ["id", "state", "reason", "spec", "placement", "restarts", "step", "checkpoint_step", "owner", "memory_estimate"] {
        assert!(job.get(field).is_some(), "Job.{field} is documented");
    }
    // Every error code the API can answer is documented.
    use gantry_api::ErrorCode::*;
    let codes = [BadRequest, InvalidSpec, NotFound, Conflict, Unavailable, Internal, Unauthorized, Forbidden];
    let codes: BTreeSet<String> = codes.iter().map(|c| serde_json::to_value(c).unwrap().as_str().unwrap().to_string()).collect();
    let documented: BTreeSet<String> =
        schemas["ErrorCode"]["enum"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    assert_eq!(documented, codes);
    let all_schemas = serde_json::to_string(schemas).unwrap();
    for key in ["max_restarts", "global_batch_size", "micro_batch_size", "devices", "every"] {
        assert!(all_schemas.contains(&format!("\"{key}\"")), "spec key {key} is documented");
    }
    // `Devices` is a string on the wire, whatever its Rust shape.
    assert_eq!(schemas["Devices"]["type"], "string");
    assert_eq!(schemas["Devices"]["default"], "cpu:1");
    // The wrappers keep the shapes the CLI reads.
    for (name, keys) in [("JobMetrics", ["job_id", "steps"]), ("JobEvents", ["job_id", "events"]), ("JobLogs", ["job_id", "lines"])] {
        let required: BTreeSet<&str> = schemas[name]["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(required, keys.into_iter().collect(), "{name}");
    }
    assert_eq!(schemas["DeviceList"]["required"], serde_json::json!(["devices"]));

    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!((bearer["type"].as_str(), bearer["scheme"].as_str()), (Some("http"), Some("bearer")));
    assert!(bearer["description"].as_str().unwrap().contains("gantry token new"));

    let submit = &doc["paths"]["/v1/jobs"]["post"];
    let media_types: Vec<&str> = submit["requestBody"]["content"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(media_types, ["application/json", "application/toml"]);
    let toml_example = submit["requestBody"]["content"]["application/toml"]["example"].as_str().unwrap();
    assert!(gantry_api::JobSpec::from_toml(toml_example, &[]).is_ok(), "the TOML example is a spec");
    assert!(submit["responses"]["201"]["headers"].get("Location").is_some());
    assert_eq!(
        doc["paths"]["/v1/whoami"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/WhoAmI"
    );
    assert_eq!(
        doc["paths"]["/v1/jobs/{id}/checkpoints"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Checkpoints"
    );
    let logs = &doc["paths"]["/v1/jobs/{id}/logs"]["get"]["responses"]["200"]["content"];
    assert!(logs.get("text/event-stream").is_some() && logs.get("application/json").is_some());
    assert_eq!(doc["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["text/plain; charset=utf-8"]["example"], "ok\n");

    // Every operation is named, summarised, described and tagged with a declared tag; every
    // error it documents has the API's shape (but readiness, which is plain text for probes).
    let tags: BTreeSet<&str> = doc["tags"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        assert!(ids.insert(op["operationId"].as_str().unwrap().to_string()), "{what}: operationId is unique");
        for key in ["summary", "description"] {
            assert!(op[key].as_str().is_some_and(|s| !s.is_empty()), "{what} has a {key}");
        }
        assert!(op["tags"].as_array().unwrap().iter().all(|t| tags.contains(t.as_str().unwrap())), "{what}: tags are declared");
        for (status, response) in op["responses"].as_object().unwrap() {
            if status.starts_with('4') || (status.starts_with('5') && path != "/readyz") {
                let schema = &resolve(&doc, response)["content"]["application/json"]["schema"];
                assert_eq!(schema["$ref"], "#/components/schemas/ApiError", "{what} {status}");
            }
        }
    }
    // Every reference resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(o) => {
                out.extend(o.get("$ref").and_then(Value::as_str));
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 50);
    for r in all {
        resolve(&doc, &serde_json::json!({ "$ref": r }));
    }
}
