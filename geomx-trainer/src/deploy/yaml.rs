//! A small YAML writer for the Kubernetes manifests: block mappings and sequences, strings plain
//! where that is unambiguous, double-quoted (JSON escapes, which YAML shares) otherwise, and
//! multi-line strings (the job file in the ConfigMap) as literal blocks.

use serde_json::Value;

/// The documents as one multi-document YAML stream (`---` before each).
pub fn documents(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&to_yaml(d));
    }
    out
}

/// One value as a YAML document (without the `---` marker).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => write_map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => write_seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other, 0));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// Keys written first, in this order, as Kubernetes manifests conventionally are; the rest follow
/// in the map's (sorted) order.
const FIRST: [&str; 4] = ["apiVersion", "kind", "metadata", "name"];

fn write_map(out: &mut String, m: &serde_json::Map<String, Value>, indent: usize) {
    let first = FIRST.iter().filter_map(|k| m.get_key_value(*k));
    let rest = m.iter().filter(|(k, _)| !FIRST.contains(&k.as_str()));
    for (i, (k, v)) in first.chain(rest).enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        out.push_str(&key(k));
        out.push(':');
        write_value_after(out, v, indent);
    }
}

fn write_seq(out: &mut String, a: &[Value], indent: usize) {
    for (i, v) in a.iter().enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        out.push('-');
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push(' ');
                write_map(out, m, indent + 2);
            }
            _ => write_value_after(out, v, indent),
        }
    }
}

/// Writes `v` after `key:` or `-` (no space written yet) at `indent`.
fn write_value_after(out: &mut String, v: &Value, indent: usize) {
    if is_block(v) {
        out.push('\n');
        pad(out, indent + 2);
        match v {
            Value::Object(m) => write_map(out, m, indent + 2),
            Value::Array(a) => write_seq(out, a, indent + 2),
            _ => unreachable!("is_block"),
        }
    } else {
        out.push(' ');
        out.push_str(&scalar(v, indent + 2));
        out.push('\n');
    }
}

fn scalar(v: &Value, indent: usize) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s, indent),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

/// Words YAML 1.1 or 1.2 would read as something other than a string.
fn reserved(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    )
}

fn plain_ok(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'/' || c == b'_')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'-'))
        && !reserved(s)
}

fn key(k: &str) -> String {
    if plain_ok(k) {
        k.to_string()
    } else {
        quoted(k)
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn string(s: &str, indent: usize) -> String {
    if plain_ok(s) {
        return s.to_string();
    }
    let literal_ok = s.contains('\n')
        && !s.starts_with([' ', '\n', '\t'])
        && s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control());
    if !literal_ok {
        return quoted(s);
    }
    let trailing = s.len() - s.trim_end_matches('\n').len();
    let chomp = match trailing {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let mut out = format!("|{chomp}\n");
    let body = &s[..s.len() - trailing];
    for line in body.split('\n') {
        if !line.is_empty() {
            pad(&mut out, indent);
            out.push_str(line);
        }
        out.push('\n');
    }
    // `|+` keeps the extra newlines as empty lines.
    for _ in 1..trailing {
        out.push('\n');
    }
    // The caller adds the final newline of the scalar.
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parses YAML back with an independent parser (yaml-rust2) into JSON.
    fn parse(text: &str) -> Vec<Value> {
        fn conv(y: &yaml_rust2::Yaml) -> Value {
            use yaml_rust2::Yaml;
            match y {
                Yaml::Real(r) => json!(r.parse::<f64>().unwrap()),
                Yaml::Integer(i) => json!(i),
                Yaml::String(s) => json!(s),
                Yaml::Boolean(b) => json!(b),
                Yaml::Array(a) => Value::Array(a.iter().map(conv).collect()),
                Yaml::Hash(h) => Value::Object(
                    h.iter()
                        .map(|(k, v)| (k.as_str().expect("string key").to_string(), conv(v)))
                        .collect(),
                ),
                Yaml::Null => Value::Null,
                other => panic!("unexpected {other:?}"),
            }
        }
        yaml_rust2::YamlLoader::load_from_str(text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .iter()
            .map(conv)
            .collect()
    }

    #[test]
    fn round_trips_through_an_independent_parser() {
        let doc = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "geomx-central", "labels": {"app.kubernetes.io/name": "geomx"}},
            "spec": {
                "completions": 2,
                "suspend": false,
                "template": {"spec": {
                    "containers": [{
                        "name": "geomx",
                        "command": ["geomx", "run", "--from-env", "--config", "/etc/geomx/job.toml"],
                        "env": [
                            {"name": "GEOMX_TIER", "value": "central"},
                            {"name": "A", "value": "0"},
                            {"name": "B", "value": "yes"},
                            {"name": "C", "value": "x: y # z"},
                            {"name": "D", "value": ""},
                            {"name": "E", "value": "1.5"},
                            {"name": "F", "value": " lead"},
                            {"name": "G", "value": "tab\there \"q\" \\ é"},
                            {"name": "H", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        ],
                        "resources": {"limits": {"nvidia.com/gpu": 1, "cpu": "500m"}},
                    }],
                    "volumes": [],
                    "nodeSelector": {},
                    "ratio": 0.25,
                    "nothing": null,
                    "nested": [[1, 2], [], ["a"]],
                }},
            },
            "data": {
                "job.toml": "[cluster]\nhost = \"127.0.0.1\"\n\n[model]\n  indented = 1\n",
                "two": "a\nb\n\n\n",
                "none": "a\nb",
                "lead": "\nfirst line empty\n",
                "cr": "a\r\nb\n",
            },
        });
        let text = to_yaml(&doc);
        assert_eq!(parse(&text), vec![doc.clone()], "{text}");
        let text = documents(&[doc.clone(), json!({"kind": "Service"})]);
        assert_eq!(parse(&text), vec![doc, json!({"kind": "Service"})]);
    }

    #[test]
    fn readable_where_unambiguous() {
        let text = to_yaml(&json!({
            "kind": "ConfigMap",
            "data": {"job.toml": "a = 1\nb = 2\n"},
            "values": ["plain-name", "0", "true", "10.0.0.1", "a b"],
        }));
        assert_eq!(
            text,
            "kind: ConfigMap\ndata:\n  job.toml: |\n    a = 1\n    b = 2\nvalues:\n  - plain-name\n  \
             - \"0\"\n  - \"true\"\n  - \"10.0.0.1\"\n  - \"a b\"\n"
        );
    }
}
