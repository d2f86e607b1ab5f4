//! `--set key=value` overrides on a parsed TOML document.

use super::SpecError;

/// Sets the dotted `key` to `value`, parsed as a TOML literal when it is one (`3e-4`, `true`,
/// `"text"`, `[1, 2]`) and taken as a bare string otherwise (`cpu:2`, `data/train.bin`), or always
/// when `as_text`.
pub fn apply_override(doc: &mut toml::Table, assignment: &str, as_text: bool) -> Result<(), SpecError> {
    let (key, raw) =
        assignment.split_once('=').ok_or_else(|| SpecError::new("", format!("override `{assignment}` is not of the form key=value")))?;
    let key = key.trim();
    let raw = raw.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(SpecError::new(key, "not a valid dotted key"));
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) if !as_text => t.remove("v").expect("the key was just written"),
        _ => toml::Value::String(raw.to_string()),
    };
    let mut table = doc;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| SpecError::new(parts[..=i].join("."), "is a value, not a section"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
