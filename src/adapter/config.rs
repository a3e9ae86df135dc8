//! `adapter_config.json` (PEFT `LoraConfig`), parsed strictly.
//!
//! Target matching follows PEFT 0.21 `check_target_module_exists`: a string is a regex that must
//! match the whole module name; a list matches a module whose name equals an entry or ends with
//! `.entry`, and only then does `layers_to_transform` restrict the layer. `rank_pattern` /
//! `alpha_pattern` keys are regexes tried in file order against the end of the module name after
//! a dot (`get_pattern_key`: `(.*\.)?(key)$`).

use regex::Regex;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::AdapterError;
use crate::model::linear::Projection;

/// Default upper bound on a LoRA rank.
pub const DEFAULT_MAX_RANK: usize = 1024;

/// Largest `|lora_alpha|` accepted (also every `alpha_pattern` value and a GGUF adapter's
/// `adapter.lora.alpha`). Real adapters use 1..=2·r; this leaves room for any rank up to
/// [`DEFAULT_MAX_RANK`] many times over, while rejecting values like 1e308 or −9.2e18 that make
/// the scale `alpha / r` overflow the logits or flatten the distribution. A negative alpha
/// (subtracting an adapter, as PEFT computes it) is accepted within the range. Since r ≥ 1,
/// the scale `alpha / r` (or `alpha / √r`) is then finite and at most this large too.
pub const MAX_LORA_ALPHA: f64 = 65_536.0;

type Res<T> = std::result::Result<T, AdapterError>;

/// Which modules an adapter targets: a list (exact or `.suffix` match) or one regex.
#[derive(Debug, Clone)]
pub enum TargetModules {
    /// Module names or name suffixes (`q_proj`, `self_attn.o_proj`).
    List(Vec<String>),
    /// A regex matched against the whole module name.
    Regex(Regex),
}

impl TargetModules {
    fn matches(&self, module: &str) -> bool {
        match self {
            Self::List(list) => list.iter().any(|t| suffix_match(module, t)),
            Self::Regex(re) => re.is_match(module),
        }
    }
}

/// `module == target` or `module` ends with `.target`.
fn suffix_match(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|head| head.ends_with('.'))
}

/// The parts of a PEFT `LoraConfig` that change the computation.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scaling `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// The targeted modules.
    pub target_modules: TargetModules,
    /// Modules excluded from the targets.
    pub exclude_modules: Option<TargetModules>,
    /// Layers a list target applies to (`None`: all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides, in file order.
    pub rank_pattern: Vec<(Regex, usize)>,
    /// Per-module alpha overrides, in file order.
    pub alpha_pattern: Vec<(Regex, f64)>,
    /// PEFT's flag for Conv1D-style (in, out) base weights. LoRA A/B are always nn.Linear
    /// (`(r, in)`, `(out, r)`), and PEFT resets the flag for nn.Linear bases, so it changes nothing.
    pub fan_in_fan_out: bool,
}

impl PeftConfig {
    /// Parses and checks `adapter_config.json` text; ranks must be in `1..=max_rank`.
    pub fn parse(text: &str, max_rank: usize) -> Res<Self> {
        let map: Map<String, Value> = serde_json::from_str(text).map_err(|source| AdapterError::InvalidJson { source })?;
        reject_unsupported(&map)?;
        let r = rank(required(&map, "r")?, "r", max_rank)?;
        let lora_alpha = alpha(required(&map, "lora_alpha")?, "lora_alpha")?;
        dropout(map.get("lora_dropout"))?;
        let target_modules = targets(required(&map, "target_modules")?, "target_modules")?;
        let exclude_modules = match map.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(v) => Some(targets(v, "exclude_modules")?),
        };
        let patterns: OrderedPatterns = serde_json::from_str(text).map_err(|source| AdapterError::InvalidJson { source })?;
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: flag(&map, "use_rslora")?,
            target_modules,
            exclude_modules,
            layers_to_transform: layers(map.get("layers_to_transform"))?,
            rank_pattern: patterns.ranks(max_rank)?,
            alpha_pattern: patterns.alphas()?,
            fan_in_fan_out: flag(&map, "fan_in_fan_out")?,
        })
    }

    /// Whether PEFT would put a LoRA layer on `module` (`model.layers.3.self_attn.q_proj`) of layer
    /// `layer`.
    pub fn targets(&self, module: &str, layer: usize) -> bool {
        if self.exclude_modules.as_ref().is_some_and(|e| e.matches(module)) {
            return false;
        }
        match &self.target_modules {
            TargetModules::Regex(re) => re.is_match(module),
            TargetModules::List(_) => {
                self.target_modules.matches(module)
                    && self.layers_to_transform.as_ref().is_none_or(|l| l.contains(&layer))
            }
        }
    }

    /// `(rank, scaling)` of `module`: patterns override `r` / `lora_alpha`; scaling is
    /// `alpha / r`, or `alpha / √r` with rsLoRA (PEFT `LoraLayer.update_layer`).
    pub fn rank_and_scaling(&self, module: &str) -> (usize, f64) {
        let r = first_match(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        let denom = if self.use_rslora { (r as f64).sqrt() } else { r as f64 };
        (r, alpha / denom)
    }

    /// Checks every target names something the base has: each list entry (or the regex) must
    /// match at least one projection of the `n_layers` layers, and none may name the embeddings or
    /// lm_head.
    pub fn check_targets(&self, n_layers: usize) -> Res<()> {
        let sites: Vec<String> = (0..n_layers)
            .flat_map(|l| Projection::ALL.map(|p| module_name(l, p)))
            .collect();
        let unsupported = ["model.embed_tokens", "lm_head"];
        let entries: Vec<(String, TargetModules)> = match &self.target_modules {
            TargetModules::List(list) => list.iter().map(|t| (t.clone(), TargetModules::List(vec![t.clone()]))).collect(),
            TargetModules::Regex(re) => vec![(re.as_str().to_string(), self.target_modules.clone())],
        };
        for (name, t) in entries {
            if unsupported.iter().any(|u| t.matches(u)) {
                return Err(AdapterError::UnsupportedTarget { target: name });
            }
            if !sites.iter().any(|s| t.matches(s)) {
                return Err(AdapterError::UnknownTarget { target: name });
            }
        }
        Ok(())
    }
}

/// HF module name of projection `p` in layer `layer`: `model.layers.3.self_attn.q_proj`.
pub fn module_name(layer: usize, p: Projection) -> String {
    format!("model.layers.{layer}.{}", p.hf_name())
}

fn first_match<T: Copy>(patterns: &[(Regex, T)], module: &str) -> Option<T> {
    patterns.iter().find(|(re, _)| re.is_match(module)).map(|(_, v)| *v)
}

/// Fields whose non-default values select PEFT features metal-candle does not implement.
fn reject_unsupported(map: &Map<String, Value>) -> Res<()> {
    let unsupported = |field: &'static str, v: &Value| AdapterError::Unsupported { field, value: v.to_string() };
    if let Some(v) = map.get("peft_type").filter(|v| v.as_str() != Some("LORA")) {
        return Err(unsupported("peft_type", v));
    }
    if let Some(v) = map.get("bias").filter(|v| !v.is_null() && v.as_str() != Some("none")) {
        return Err(unsupported("bias", v));
    }
    for field in ["use_dora", "lora_bias", "use_qalora", "use_bdlora"] {
        if let Some(v) = map.get(field).filter(|v| !v.is_null() && v.as_bool() != Some(false)) {
            return Err(unsupported(field, v));
        }
    }
    let non_empty = |v: &&Value| match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    };
    for field in [
        "modules_to_save",
        "layer_replication",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "target_parameters",
    ] {
        if let Some(v) = map.get(field).filter(non_empty) {
            return Err(unsupported(field, v));
        }
    }
    check_layers_pattern(map.get("layers_pattern"))
}

/// Only the standard decoder layer container (`layers`) exists in our models.
fn check_layers_pattern(v: Option<&Value>) -> Res<()> {
    let ok = match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty() || s == "layers",
        Some(Value::Array(a)) => a.iter().all(|x| x.as_str() == Some("layers")),
        Some(_) => false,
    };
    if ok {
        return Ok(());
    }
    Err(AdapterError::Unsupported {
        field: "layers_pattern",
        value: v.map(Value::to_string).unwrap_or_default(),
    })
}

fn required<'a>(map: &'a Map<String, Value>, field: &'static str) -> Res<&'a Value> {
    map.get(field).filter(|v| !v.is_null()).ok_or(AdapterError::MissingField { field })
}

fn invalid(field: &str, expected: &'static str, got: &Value) -> AdapterError {
    AdapterError::InvalidField {
        field: field.to_string(),
        expected,
        got: got.to_string(),
    }
}

fn rank(v: &Value, field: &str, max: usize) -> Res<usize> {
    let r = v.as_i64().ok_or_else(|| invalid(field, "an integer", v))?;
    match usize::try_from(r) {
        Ok(r) if (1..=max).contains(&r) => Ok(r),
        _ => Err(AdapterError::RankOutOfRange { field: field.to_string(), rank: r, max }),
    }
}

fn number(v: &Value, field: &str) -> Res<f64> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| invalid(field, "a finite number", v))
}

/// A finite alpha with `|alpha| ≤ MAX_LORA_ALPHA`.
fn alpha(v: &Value, field: &str) -> Res<f64> {
    let a = number(v, field)?;
    check_alpha(a, field)?;
    Ok(a)
}

/// `|alpha| ≤ MAX_LORA_ALPHA` (finite): shared with GGUF adapters' `adapter.lora.alpha`.
pub(crate) fn check_alpha(a: f64, field: &str) -> Res<()> {
    if a.is_finite() && a.abs() <= MAX_LORA_ALPHA {
        return Ok(());
    }
    Err(AdapterError::InvalidField {
        field: field.to_string(),
        expected: "a number in [-65536, 65536]",
        got: a.to_string(),
    })
}

/// `lora_dropout` (training only, but a value outside [0, 1) means a damaged file): absent,
/// null, or a number in [0, 1).
fn dropout(v: Option<&Value>) -> Res<()> {
    let field = "lora_dropout";
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(x) => match x.as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => Ok(()),
            _ => Err(invalid(field, "a number in [0, 1)", x)),
        },
    }
}

fn flag(map: &Map<String, Value>, field: &str) -> Res<bool> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| invalid(field, "a boolean", v)),
    }
}

/// A list of names, `"all-linear"` (every projection), or a regex (full match).
fn targets(v: &Value, field: &str) -> Res<TargetModules> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(TargetModules::List(
            Projection::ALL.iter().map(|p| p.hf_name().to_string()).collect(),
        )),
        Value::String(s) => Ok(TargetModules::Regex(compile(&format!("^(?:{s})$"), field)?)),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| invalid(field, "a list of strings", v)))
            .collect::<Res<Vec<_>>>()
            .map(TargetModules::List),
        _ => Err(invalid(field, "a non-empty list of module names or a regex string", v)),
    }
}

fn compile(pattern: &str, field: &str) -> Res<Regex> {
    Regex::new(pattern).map_err(|source| AdapterError::InvalidRegex {
        field: field.to_string(),
        source,
    })
}

/// `layers_to_transform`: null, one index, or a list of indices.
fn layers(v: Option<&Value>) -> Res<Option<Vec<usize>>> {
    let field = "layers_to_transform";
    let index = |x: &Value| x.as_u64().and_then(|i| usize::try_from(i).ok()).ok_or_else(|| invalid(field, "a layer index or a list of them", x));
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => a.iter().map(index).collect::<Res<Vec<_>>>().map(Some),
        Some(x) => index(x).map(|i| Some(vec![i])),
    }
}

/// `rank_pattern` / `alpha_pattern` with their keys in file order (serde_json's `Map` sorts).
#[derive(Deserialize)]
struct OrderedPatterns {
    #[serde(default)]
    rank_pattern: Option<Ordered>,
    #[serde(default)]
    alpha_pattern: Option<Ordered>,
}

impl OrderedPatterns {
    fn ranks(&self, max: usize) -> Res<Vec<(Regex, usize)>> {
        self.entries(&self.rank_pattern, "rank_pattern", |v, f| rank(v, f, max))
    }

    fn alphas(&self) -> Res<Vec<(Regex, f64)>> {
        self.entries(&self.alpha_pattern, "alpha_pattern", alpha)
    }

    fn entries<T>(&self, map: &Option<Ordered>, field: &str, value: impl Fn(&Value, &str) -> Res<T>) -> Res<Vec<(Regex, T)>> {
        let Some(Ordered(items)) = map else { return Ok(Vec::new()) };
        items
            .iter()
            .map(|(k, v)| {
                let name = format!("{field}.{k}");
                Ok((compile(&format!(r"^(?:.*\.)?(?:{k})$"), &name)?, value(v, &name)?))
            })
            .collect()
    }
}

/// A JSON object as a list of entries in file order.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Ordered, A::Error> {
                let mut items = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    items.push(entry);
                }
                Ok(Ordered(items))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_targets_match_exact_names_and_dotted_suffixes() {
        let c = PeftConfig::parse(r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "mlp.up_proj"], "layers_to_transform": [1]}"#, 64).unwrap();
        assert!(c.targets("model.layers.1.self_attn.q_proj", 1));
        assert!(!c.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(c.targets("model.layers.1.mlp.up_proj", 1));
        assert!(!c.targets("model.layers.1.mlp.gate_proj", 1));
        assert!(!suffix_match("model.layers.1.self_attn.xq_proj", "q_proj"));
    }

    #[test]
    fn patterns_keep_file_order_and_scale_like_peft() {
        let text = r#"{"r": 4, "lora_alpha": 8, "target_modules": ".*proj", "use_rslora": true,
            "rank_pattern": {"z_proj": 2, "q_proj": 16, "layers.0.self_attn.q_proj": 1}}"#;
        let c = PeftConfig::parse(text, 64).unwrap();
        // "q_proj" comes before the more specific key in the file, so it wins (PEFT's first match).
        assert_eq!(c.rank_and_scaling("model.layers.0.self_attn.q_proj"), (16, 2.0));
        assert_eq!(c.rank_and_scaling("model.layers.0.self_attn.k_proj"), (4, 4.0));
        assert!(c.targets("model.layers.0.mlp.down_proj", 0));
    }

    /// Finite but absurd numbers (issue 18): alpha and alpha_pattern out of range, lora_dropout
    /// outside [0, 1), each an error naming the field.
    #[test]
    fn absurd_numbers_are_named() {
        let base = r#"{"r": 4, "lora_alpha": ALPHA, "target_modules": ["q_proj"], "lora_dropout": DROP, "alpha_pattern": {"q_proj": PAT}}"#;
        let parse = |alpha: &str, drop: &str, pat: &str| {
            PeftConfig::parse(&base.replace("ALPHA", alpha).replace("DROP", drop).replace("PAT", pat), 64)
        };
        let field_of = |r: Res<PeftConfig>| match r {
            Err(AdapterError::InvalidField { field, .. }) => field,
            other => panic!("expected InvalidField, got {other:?}"),
        };
        assert!(parse("8", "0.05", "16").is_ok());
        assert!(parse("-8", "0", "65536").is_ok());
        for alpha in ["1e308", "-9.2e18", "65537"] {
            assert_eq!(field_of(parse(alpha, "0", "1")), "lora_alpha", "alpha {alpha}");
        }
        assert_eq!(field_of(parse("8", "0", "1e300")), "alpha_pattern.q_proj");
        for drop in ["1", "-0.1", "1e9", "\"x\""] {
            assert_eq!(field_of(parse("8", drop, "1")), "lora_dropout", "dropout {drop}");
        }
    }
}
