//! A focused JSON Schema validator for plugin parameters.
//!
//! Plugins declare small, flat parameter objects, so instead of a full JSON Schema engine (and
//! its dependency tree) the host validates this documented subset of draft 2020-12:
//! `type` (a name or a list of names: object, array, string, number, integer, boolean, null),
//! `properties`, `required`, `additionalProperties` (boolean or schema), `items`, `enum`,
//! `const`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minLength`,
//! `maxLength`, `minItems`, `maxItems`; annotations (`title`, `description`, `default`,
//! `examples`, `$schema`, `$id`, `$comment`) are ignored. A schema using any other keyword is
//! refused when the plugin is loaded, so a constraint is never silently skipped.

use serde_json::Value;

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
];
const TYPES: &[&str] = &[
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// A violation: where (`eps`, `sizes[2]`, or empty for the whole object) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub reason: String,
}

/// Checks that `schema` only uses the supported subset, well-formed. Returns the offending
/// location and reason.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_at(schema, "#")
}

fn check_at(s: &Value, at: &str) -> Result<(), String> {
    let obj = match s {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{at}: a schema must be an object or a boolean")),
    };
    for (k, v) in obj {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!(
                "{at}: keyword `{k}` is not supported by the adverse host (see the SDK README)"
            ));
        }
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for n in names {
                    if !n.as_str().is_some_and(|t| TYPES.contains(&t)) {
                        return Err(format!("{at}/type: unknown type {n}"));
                    }
                }
            }
            "properties" => {
                let props = v
                    .as_object()
                    .ok_or_else(|| format!("{at}/properties must be an object"))?;
                for (name, sub) in props {
                    check_at(sub, &format!("{at}/properties/{name}"))?;
                }
            }
            "required" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
                return Err(format!("{at}/required must be an array of names"));
            }
            "additionalProperties" | "items" => check_at(v, &format!("{at}/{k}"))?,
            "enum" if !v.is_array() => return Err(format!("{at}/enum must be an array")),
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !v.is_number() => {
                return Err(format!("{at}/{k} must be a number"));
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" if !v.is_u64() => {
                return Err(format!("{at}/{k} must be a non-negative integer"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v
            .as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.is_finite()),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Validates `value` against a schema that passed [`check_schema`]; returns every violation.
pub fn validate(schema: &Value, value: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    validate_at(schema, value, "", &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn validate_at(s: &Value, v: &Value, path: &str, out: &mut Vec<Violation>) {
    let mut fail = |reason: String| {
        out.push(Violation {
            path: path.to_string(),
            reason,
        })
    };
    let obj = match s {
        Value::Bool(true) => return,
        Value::Bool(false) => return fail("is not allowed".into()),
        Value::Object(o) => o,
        _ => return,
    };
    if let Some(t) = obj.get("type") {
        let names: Vec<&str> = match t {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            other => other.as_str().into_iter().collect(),
        };
        if !names.iter().any(|n| type_matches(n, v)) {
            // A type error makes the other keywords meaningless.
            return fail(format!("must be of type {}, got {v}", names.join(" or ")));
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum")
        && !options.contains(v)
    {
        let opts: Vec<String> = options.iter().map(Value::to_string).collect();
        fail(format!("must be one of {}, got {v}", opts.join(", ")));
    }
    if let Some(c) = obj.get("const")
        && c != v
    {
        fail(format!("must be {c}, got {v}"));
    }
    if let Some(x) = v.as_f64() {
        let bound = |k: &str| obj.get(k).and_then(Value::as_f64);
        if let Some(m) = bound("minimum").filter(|&m| x < m) {
            fail(format!("must be >= {m}, got {v}"));
        }
        if let Some(m) = bound("maximum").filter(|&m| x > m) {
            fail(format!("must be <= {m}, got {v}"));
        }
        if let Some(m) = bound("exclusiveMinimum").filter(|&m| x <= m) {
            fail(format!("must be > {m}, got {v}"));
        }
        if let Some(m) = bound("exclusiveMaximum").filter(|&m| x >= m) {
            fail(format!("must be < {m}, got {v}"));
        }
    }
    let count = |k: &str| obj.get(k).and_then(Value::as_u64);
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as u64;
        if let Some(m) = count("minLength").filter(|&m| n < m) {
            fail(format!("must have at least {m} characters"));
        }
        if let Some(m) = count("maxLength").filter(|&m| n > m) {
            fail(format!("must have at most {m} characters"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(m) = count("minItems").filter(|&m| n < m) {
            fail(format!("must have at least {m} items"));
        }
        if let Some(m) = count("maxItems").filter(|&m| n > m) {
            fail(format!("must have at most {m} items"));
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, it) in items.iter().enumerate() {
                validate_at(item_schema, it, &format!("{path}[{i}]"), out);
            }
        }
    }
    if let Some(map) = v.as_object() {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            for name in req.iter().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    out.push(Violation {
                        path: join(path, name),
                        reason: "is required".into(),
                    });
                }
            }
        }
        for (k, val) in map {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate_at(sub, val, &join(path, k), out),
                None => match obj.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        out.push(Violation {
                            path: join(path, k),
                            reason: format!(
                                "is not a parameter of this plugin (known: {})",
                                known.join(", ")
                            ),
                        });
                    }
                    Some(sub) => validate_at(sub, val, &join(path, k), out),
                    None => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "eps": {"type": "number", "minimum": 0, "maximum": 255, "description": "step"},
                "steps": {"type": "integer", "exclusiveMinimum": 0},
                "norm": {"enum": ["l2", "linf"]},
                "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 3},
                "name": {"type": "string", "minLength": 2}
            },
            "required": ["eps"],
            "additionalProperties": false
        })
    }

    fn paths(v: &[Violation]) -> Vec<&str> {
        v.iter().map(|x| x.path.as_str()).collect()
    }

    #[test]
    fn accepts_valid_parameters() {
        check_schema(&schema()).unwrap();
        let ok = json!({"eps": 4, "steps": 10, "norm": "l2", "sizes": [1, 2], "name": "ab"});
        assert_eq!(validate(&schema(), &ok), vec![]);
        assert_eq!(validate(&json!(true), &json!({"x": 1})), vec![]);
    }

    #[test]
    fn names_the_parameter_and_the_rule() {
        let v = validate(&schema(), &json!({"eps": -1}));
        assert_eq!(paths(&v), vec!["eps"]);
        assert!(v[0].reason.contains(">= 0"), "{:?}", v);
        let v = validate(
            &schema(),
            &json!({"eps": 1, "steps": 0, "norm": "l1", "sizes": [1, 0, 2, 3], "name": "a", "epz": 2}),
        );
        assert_eq!(
            paths(&v),
            vec!["epz", "name", "norm", "sizes", "sizes[1]", "steps"]
        );
        assert!(
            v[0].reason.contains("not a parameter") && v[0].reason.contains("eps"),
            "{v:?}"
        );
        let v = validate(&schema(), &json!({}));
        assert_eq!(
            v,
            vec![Violation {
                path: "eps".into(),
                reason: "is required".into()
            }]
        );
        let v = validate(&schema(), &json!({"eps": "4"}));
        assert!(v[0].reason.contains("type number"), "{v:?}");
        assert_eq!(validate(&json!({"type": "integer"}), &json!(2.5)).len(), 1);
        assert_eq!(validate(&json!({"type": "integer"}), &json!(2.0)).len(), 0);
        assert_eq!(validate(&schema(), &json!([1])).len(), 1);
    }

    #[test]
    fn refuses_schemas_outside_the_subset() {
        assert!(
            check_schema(&json!({"type": "object", "patternProperties": {}}))
                .unwrap_err()
                .contains("patternProperties")
        );
        assert!(
            check_schema(&json!({"properties": {"a": {"type": "float"}}}))
                .unwrap_err()
                .contains("#/properties/a/type")
        );
        assert!(check_schema(&json!({"minimum": "3"})).is_err());
        assert!(check_schema(&json!(3)).is_err());
    }
}
