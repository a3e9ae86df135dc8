//! Python's `json.dumps` over minijinja values, for the templates' `tojson` filter.
//!
//! transformers replaces Jinja's `tojson` with `json.dumps(x, ensure_ascii=False, indent=None,
//! separators=None, sort_keys=False)` (`chat_template_utils.py`), so templates expect `", "` and
//! `": "` separators, raw non-ASCII text and no HTML escaping — unlike minijinja's own `tojson`.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// Formatting options of `json.dumps`.
struct Style {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// The `tojson` filter: `value | tojson(ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` with Python's defaults.
pub(crate) fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")),
        },
        None => None,
    };
    let (mut item_sep, key_sep) = (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string());
    let mut style = Style { indent, item_sep: String::new(), key_sep, ensure_ascii: false, sort_keys: false };
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [a, b] = <[String; 2]>::try_from(seps)
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings"))?;
        item_sep = a;
        style.key_sep = b;
    }
    style.item_sep = item_sep;
    style.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    style.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_value(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn write_value(out: &mut String, v: &Value, style: &Style, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(v)),
        ValueKind::String => write_str(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Map => write_map(out, v, style, level)?,
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, ('[', ']'), items.len(), style, level, |out, i| write_value(out, &items[i], style, level + 1))?;
        }
        _ => write_str(out, &v.to_string(), style.ensure_ascii),
    }
    Ok(())
}

fn write_map(out: &mut String, v: &Value, style: &Style, level: usize) -> Result<(), Error> {
    let mut entries: Vec<(String, Value)> =
        v.try_iter()?.map(|k| Ok((key_text(&k), v.get_item(&k)?))).collect::<Result<_, Error>>()?;
    if style.sort_keys {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
    write_container(out, ('{', '}'), entries.len(), style, level, |out, i| {
        write_str(out, &entries[i].0, style.ensure_ascii);
        out.push_str(&style.key_sep);
        write_value(out, &entries[i].1, style, level + 1)
    })
}

/// `[a, b]` or, with an indent, one item per line.
fn write_container(
    out: &mut String,
    (open, close): (char, char),
    n: usize,
    style: &Style,
    level: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &style.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, level + 1);
        item(out, i)?;
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// Python converts non-string keys: ints and floats as numbers, True/False/None as JSON words.
fn key_text(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Number => number(k),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        _ => k.to_string(),
    }
}

/// Python's `repr` of an int or float (`1`, `1.0`, `1e+20`, `NaN`, `Infinity`).
fn number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let Ok(x) = f64::try_from(v.clone()) else { return v.to_string() };
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}"); // shortest round-trip digits, e.g. "1.5e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    // repr switches to exponent notation outside 1e-4 ≤ |x| < 1e16.
    if (-4..16).contains(&exp) {
        let plain = format!("{x}");
        return if plain.contains('.') { plain } else { plain + ".0" };
    }
    format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(template: &str, ctx: Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(template, ctx).unwrap()
    }

    #[test]
    fn matches_python_json_dumps() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, true, null], "a": "é\"<>\n\u0001😀", "c": {}, "d": [], "e": 1e20}"#).unwrap();
        let ctx = minijinja::context! { v => v };
        // json.dumps(v, ensure_ascii=False)
        assert_eq!(
            dumps("{{ v | tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, true, null], "a": "é\"<>\n\u0001😀", "c": {}, "d": [], "e": 1e+20}"#
        );
        // json.dumps(v, ensure_ascii=True, sort_keys=True)
        assert_eq!(
            dumps("{{ v | tojson(ensure_ascii=true, sort_keys=true) }}", ctx.clone()),
            r#"{"a": "\u00e9\"<>\n\u0001\ud83d\ude00", "b": [1, 2.5, true, null], "c": {}, "d": [], "e": 1e+20}"#
        );
        // json.dumps({"x": [1, {"y": 2}]}, indent=2)
        let ctx = minijinja::context! { v => serde_json::from_str::<Value>(r#"{"x": [1, {"y": 2}], "z": []}"#).unwrap() };
        assert_eq!(
            dumps("{{ v | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"x\": [\n    1,\n    {\n      \"y\": 2\n    }\n  ],\n  \"z\": []\n}"
        );
        assert_eq!(dumps("{{ v | tojson(separators=[',', ':']) }}", ctx), r#"{"x":[1,{"y":2}],"z":[]}"#);
    }

    #[test]
    fn floats_use_python_repr() {
        let f = |x: f64| number(&Value::from(x));
        assert_eq!((f(1.0), f(0.1), f(1e16), f(1.5e-7), f(0.0001), f(-2.0)), ("1.0".into(), "0.1".into(), "1e+16".into(), "1.5e-07".into(), "0.0001".into(), "-2.0".into()));
    }
}
