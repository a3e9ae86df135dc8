//! PEFT adapters from disk: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Key names: `base_model.model.<module>.lora_A.weight` (A: `[r, in]`) and `.lora_B.weight`
//! (B: `[out, r]`), `<module>` = `model.layers.N.self_attn.q_proj` etc.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{module_name, PeftConfig};
use super::lora::{adapter_error, prepare, AdapterOptions, LoraAdapter, RawModule};
use super::AdapterError;
use crate::error::{Error, Result};
use crate::loader::safetensors_validate::{validate_safetensors, SafetensorsTensorSummary};
use crate::model::linear::Projection;
use crate::Model;

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PICKLE_FILE: &str = "adapter_model.bin";
const KEY_PREFIX: &str = "base_model.model.";

/// Loads the PEFT adapter in `dir` for `model`.
pub(crate) fn load(dir: &Path, model: &Model, opts: &AdapterOptions) -> Result<LoraAdapter> {
    let err = |e: AdapterError| adapter_error(dir, e);
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(err(AdapterError::MissingConfig));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let cfg = PeftConfig::parse(&text, opts.max_rank).map_err(err)?;
    let n_layers = model.layers().len();
    cfg.check_targets(n_layers).map_err(err)?;
    let bytes = read_weights(dir)?;
    let summaries = validate_safetensors(&bytes).map_err(|source| err(AdapterError::MalformedSafetensors { source }))?;
    let data_start = 8 + header_len(&bytes);
    let pairs = group_tensors(&summaries, &cfg, n_layers).map_err(err)?;
    let mut modules = Vec::with_capacity(pairs.len());
    for ((layer, proj), (a, b)) in pairs {
        let module = module_name(layer, proj);
        let (rank, scaling) = cfg.rank_and_scaling(&module);
        let raw = RawModule {
            layer,
            proj,
            a: tensor(&bytes, data_start, a, dir)?,
            b: tensor(&bytes, data_start, b, dir)?,
            a_name: a.name.clone(),
            b_name: b.name.clone(),
            rank,
            scaling,
        };
        modules.push(prepare(model, dir, raw, false)?);
    }
    LoraAdapter::from_modules(dir.to_path_buf(), model, modules)
}

/// The weights file's bytes; a pickle-only adapter is refused without being opened.
fn read_weights(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        let e = if dir.join(PICKLE_FILE).is_file() { AdapterError::PickleOnly } else { AdapterError::MissingWeights };
        return Err(adapter_error(dir, e));
    }
    std::fs::read(&path).map_err(|e| Error::io(&path, e))
}

/// The 8-byte little-endian header length (already checked by the validator).
fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

type Pairs<'a> = BTreeMap<(usize, Projection), (&'a SafetensorsTensorSummary, &'a SafetensorsTensorSummary)>;

/// Pairs every targeted module's lora_A with its lora_B. Any other tensor, a module the config does
/// not target, a half pair or a targeted module without tensors is an error.
fn group_tensors<'a>(summaries: &'a [SafetensorsTensorSummary], cfg: &PeftConfig, n_layers: usize) -> std::result::Result<Pairs<'a>, AdapterError> {
    type Half<'a> = (Option<&'a SafetensorsTensorSummary>, Option<&'a SafetensorsTensorSummary>);
    let mut halves: BTreeMap<(usize, Projection), Half<'a>> = BTreeMap::new();
    for s in summaries {
        let unexpected = || AdapterError::UnexpectedTensor { tensor: s.name.clone() };
        let (layer, proj, is_a) = parse_key(&s.name).ok_or_else(unexpected)?;
        if layer >= n_layers || !cfg.targets(&module_name(layer, proj), layer) {
            return Err(unexpected());
        }
        let slot = halves.entry((layer, proj)).or_default();
        let half = if is_a { &mut slot.0 } else { &mut slot.1 };
        if half.replace(s).is_some() {
            return Err(unexpected());
        }
    }
    let mut pairs = BTreeMap::new();
    for layer in 0..n_layers {
        for proj in Projection::ALL {
            let module = module_name(layer, proj);
            if !cfg.targets(&module, layer) {
                continue;
            }
            match halves.get(&(layer, proj)) {
                Some((Some(a), Some(b))) => {
                    pairs.insert((layer, proj), (*a, *b));
                }
                Some((Some(_), None)) => return Err(AdapterError::MissingLoraB { module }),
                Some((None, Some(_))) => return Err(AdapterError::MissingLoraA { module }),
                _ => return Err(AdapterError::TargetWithoutTensors { module }),
            }
        }
    }
    Ok(pairs)
}

/// `base_model.model.model.layers.N.<proj>.lora_{A,B}.weight` → (N, proj, is_A).
fn parse_key(name: &str) -> Option<(usize, Projection, bool)> {
    let rest = name.strip_prefix(KEY_PREFIX)?.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok().filter(|_| layer.bytes().all(|b| b.is_ascii_digit()))?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    let proj = Projection::ALL.into_iter().find(|p| p.hf_name() == module)?;
    Some((layer, proj, is_a))
}

/// The tensor `s` as an f32-convertible CPU tensor of its own dtype.
fn tensor(bytes: &[u8], data_start: usize, s: &SafetensorsTensorSummary, dir: &Path) -> Result<Tensor> {
    let dtype = match s.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(adapter_error(dir, AdapterError::UnsupportedDtype { tensor: s.name.clone(), dtype: other.to_string() }))
        }
    };
    let (begin, end) = s.data_offsets;
    let data = bytes
        .get(data_start + begin..data_start + end)
        .ok_or_else(|| adapter_error(dir, AdapterError::UnexpectedTensor { tensor: s.name.clone() }))?;
    let t = Tensor::from_raw_buffer(data, dtype, &s.shape, &Device::Cpu)?;
    // Adapters are small: every value is checked, always.
    match crate::model::finite::first_bad_value(&t)? {
        Some(index) => Err(Error::NonFiniteTensor { path: dir.join(WEIGHTS_FILE), name: s.name.clone(), index }),
        None => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_parse() {
        let k = "base_model.model.model.layers.12.mlp.down_proj.lora_B.weight";
        assert_eq!(parse_key(k), Some((12, Projection::Down, false)));
        assert_eq!(parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), Some((0, Projection::Q, true)));
        assert_eq!(parse_key("base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight"), None);
        assert_eq!(parse_key("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"), None);
    }
}
