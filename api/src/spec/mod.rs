//! The job spec.
//!
//! Parsing goes through `serde_path_to_error`, so a bad value is reported with its dotted path
//! (`train.lr: invalid type: string "x", expected f64`); `validate` then checks the relations
//! between fields and also names the field it rejects.

mod overrides;
mod types;

pub use overrides::apply_override;
pub use types::*;

/// An invalid job spec. `field` is the dotted path of the offending key (empty when the document
/// itself does not parse).
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError { field: field.into(), message: message.into() }
    }
}

impl JobSpec {
    /// Parses a TOML spec, applies `key=value` overrides (TOML literals, or bare strings), and
    /// validates the result.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // Where: the line and column of the error's start (the message alone does not say).
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            });
            SpecError::new("", format!("not valid TOML{}: {}", at.unwrap_or_default(), e.message().trim_end()))
        })?;
        // Overrides retried as plain text, each with the error its literal reading gave.
        let mut as_text: Vec<(&str, SpecError)> = Vec::new();
        loop {
            let mut d = doc.clone();
            for o in overrides {
                apply_override(&mut d, o, as_text.iter().any(|(t, _)| *t == o.as_str()))?;
            }
            match Self::deserialize_table(d) {
                // Validation errors are the user's values being wrong, not misread: as they are.
                Ok(spec) => {
                    spec.validate()?;
                    return Ok(spec);
                }
                // `--set data.train=2024` or `--set name=2024-06-01` parse as TOML literals; if the
                // key wants a string, take the value as written.
                Err(err) => {
                    let names_field = |o: &str| o.split_once('=').is_some_and(|(k, _)| k.trim() == err.field);
                    if let Some(i) = as_text.iter().position(|(t, _)| names_field(t)) {
                        // Read as text it fails too: the literal reading's error says more.
                        return Err(as_text.swap_remove(i).1);
                    }
                    match overrides.iter().find(|o| names_field(o)) {
                        Some(o) => as_text.push((o, err)),
                        None => return Err(err),
                    }
                }
            }
        }
    }

    /// Reads a parsed TOML table into a spec, without checking the relations between fields.
    fn deserialize_table(doc: toml::Table) -> Result<JobSpec, SpecError> {
        serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| path_error(e.path().to_string(), e.inner().to_string()))
    }

    /// Deserialises an already parsed TOML table.
    pub fn from_toml_table(doc: toml::Table) -> Result<JobSpec, SpecError> {
        let spec = Self::deserialize_table(doc)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a JSON spec (the REST API's body) and validates it.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        // serde would read a struct from an array too: a spec is an object.
        if !text.trim_start().starts_with('{') {
            return Err(SpecError::new("", "not valid JSON for a spec: it must be a JSON object ({…})"));
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            if e.inner().is_data() {
                path_error(e.path().to_string(), e.inner().to_string())
            } else {
                // A syntax error has no field to name.
                SpecError::new("", format!("not valid JSON: {}", e.inner()))
            }
        })?;
        // Text after the document (a second object, a stray character) is a mistake in the
        // request, not something to ignore.
        de.end().map_err(|e| SpecError::new("", format!("not valid JSON: {e} after the spec")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as TOML, as stored in a run directory.
    pub fn to_toml(&self) -> Result<String, SpecError> {
        toml::to_string_pretty(self).map_err(|e| SpecError::new("", format!("cannot be written as TOML: {e}")))
    }
}

/// serde reports an unknown field at its parent's path; append the field's own name so the path
/// names the key the user wrote.
fn path_error(path: String, message: String) -> SpecError {
    let path = if path == "." { String::new() } else { path };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(name) = rest.split('`').next() {
            let full = if path.is_empty() {
                name.to_string()
            } else if path == name || path.ends_with(&format!(".{name}")) {
                path
            } else {
                format!("{path}.{name}")
            };
            return SpecError::new(full, message);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some(name) = rest.split('`').next() {
            let full = if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
            return SpecError::new(full, message);
        }
    }
    SpecError::new(path, message)
}

/// The example spec of the REST API's document as TOML (`Content-Type: application/toml`); the
/// same spec as `example_request`.
pub const EXAMPLE_TOML: &str = r#"name = "tiny-gpt2"

[model]
path = "examples/tiny-gpt2/model"
init = "auto"

[data]
train = "examples/data/corpus.txt"
tokenizer = "examples/data/tokenizer.json"
seq_len = 128

[train]
steps = 300
global_batch_size = 16
micro_batch_size = 8
lr = 3e-3
min_lr = 3e-4
warmup_steps = 15
schedule = "cosine"

[resources]
devices = "cpu:1"

[checkpoint]
every = 100
keep = 2

[restart]
max_restarts = 2
"#;

/// The example spec of the REST API's document: a request's body, as JSON.
pub(crate) fn example_request() -> serde_json::Value {
    serde_json::json!({
        "name": "tiny-gpt2",
        "model": {"path": "examples/tiny-gpt2/model", "init": "auto"},
        "data": {"train": "examples/data/corpus.txt", "tokenizer": "examples/data/tokenizer.json", "seq_len": 128},
        "train": {"steps": 300, "global_batch_size": 16, "micro_batch_size": 8, "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 15, "schedule": "cosine"},
        "resources": {"devices": "cpu:1"},
        "checkpoint": {"every": 100, "keep": 2},
        "restart": {"max_restarts": 2}
    })
}

/// The same spec as a job stores it (see `Job::spec`): paths absolute, defaults filled in.
pub(crate) fn example_stored() -> serde_json::Value {
    let mut spec = example_request();
    for (section, key) in [("model", "path"), ("data", "train"), ("data", "tokenizer")] {
        let path = spec[section][key].as_str().map(|p| format!("/srv/gantry/{p}"));
        spec[section][key] = path.into();
    }
    let spec = JobSpec::from_json(&spec.to_string()).expect("the example spec is valid");
    serde_json::to_value(spec).expect("a spec is JSON")
}

#[cfg(test)]
mod tests;
