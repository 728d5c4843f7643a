//! What a QEMU's QMP schema offers, read from `query-qmp-schema`: bitback
//! passes newer, optional arguments only where the schema lists them.

use serde_json::Value;

use crate::qmp::{self, Qmp};

/// The members of `blockdev-backup`'s `x-perf` argument (`BackupPerf`,
/// QEMU 6.0 and newer; `min-cluster-size` since 9.2). Empty when this QEMU
/// has no `x-perf`.
pub async fn backup_perf_members(qmp: &Qmp) -> qmp::Result<Vec<String>> {
    let schema = qmp.execute_raw("query-qmp-schema", Value::Null).await?;
    Ok(argument_members(&schema, "blockdev-backup", "x-perf"))
}

/// In a `query-qmp-schema` reply: the member names of the object type of
/// `command`'s argument `argument`. Empty when any link is missing.
pub fn argument_members(schema: &Value, command: &str, argument: &str) -> Vec<String> {
    let Some(entries) = schema.as_array() else {
        return Vec::new();
    };
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    };
    let members = |entry: &Value| -> Vec<Value> {
        entry
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let arg_type = entries
        .iter()
        .find(|e| {
            e.get("meta-type").and_then(Value::as_str) == Some("command")
                && e.get("name").and_then(Value::as_str) == Some(command)
        })
        .and_then(|c| c.get("arg-type"))
        .and_then(Value::as_str)
        .and_then(find);
    let Some(arg_type) = arg_type else {
        return Vec::new();
    };
    let member_type = members(arg_type)
        .into_iter()
        .find(|m| m.get("name").and_then(Value::as_str) == Some(argument))
        .and_then(|m| m.get("type").and_then(Value::as_str).map(str::to_string));
    match member_type.as_deref().and_then(find) {
        Some(t) if t.get("meta-type").and_then(Value::as_str) == Some("object") => members(t)
            .iter()
            .filter_map(|m| m.get("name").and_then(Value::as_str).map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(with_perf: bool) -> Value {
        let mut args = vec![
            json!({"name": "device", "type": "str"}),
            json!({"name": "target", "type": "str"}),
        ];
        if with_perf {
            args.push(json!({"name": "x-perf", "default": null, "type": "101"}));
        }
        json!([
            {"name": "blockdev-backup", "meta-type": "command", "arg-type": "19", "ret-type": "0"},
            {"name": "19", "meta-type": "object", "members": args},
            {"name": "101", "meta-type": "object", "members": [
                {"name": "use-copy-range", "type": "bool"},
                {"name": "max-workers", "type": "int"},
            ]},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
        ])
    }

    #[test]
    fn finds_the_members_of_an_argument() {
        assert_eq!(
            argument_members(&schema(true), "blockdev-backup", "x-perf"),
            ["use-copy-range", "max-workers"]
        );
    }

    #[test]
    fn a_missing_link_gives_nothing() {
        assert!(argument_members(&schema(false), "blockdev-backup", "x-perf").is_empty());
        assert!(argument_members(&schema(true), "drive-backup", "x-perf").is_empty());
        assert!(argument_members(&schema(true), "blockdev-backup", "device").is_empty());
        assert!(argument_members(&json!({"not": "a list"}), "blockdev-backup", "x").is_empty());
    }
}
