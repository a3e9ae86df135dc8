//! The input side of the quantizer: an HF directory or a GGUF file, as a list of GGUF tensors
//! (llama.cpp names and layout) that are read one at a time, plus the metadata to write.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use super::mix::MixModel;
use crate::config::hf::parse_hf_config;
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::loader::gguf::{gguf_name, GgufFile};
use crate::loader::safetensors::SafetensorsWeights;
use crate::loader::weights::WeightSource;
use crate::model::linear::Projection;

/// Where a tensor's values come from.
pub(crate) enum Origin {
    /// An HF safetensors tensor; `permute_heads` reorders rows to llama.cpp's interleaved RoPE
    /// layout (`convert_hf_to_gguf.py`, `LlamaModel.permute`) with that many heads.
    Hf { name: String, permute_heads: Option<usize> },
    /// A tensor of the input GGUF (same name).
    Gguf,
    /// Values computed here (`rope_freqs.weight`).
    Values(Vec<f32>),
}

/// One tensor of the output, before its type is chosen.
pub(crate) struct Planned {
    pub name: String,
    /// Candle order: rows first.
    pub dims: Vec<usize>,
    pub origin: Origin,
    pub layer: Option<usize>,
    pub proj: Option<Projection>,
}

/// An opened input model.
// One value per quantize run: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Input {
    Hf { dir: PathBuf, weights: SafetensorsWeights, raw: Json, config: ModelConfig },
    Gguf { file: GgufFile },
}

impl Input {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let config = parse_hf_config(&text, &cfg_path)?;
            let raw = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
            let weights = SafetensorsWeights::open(path, DType::F32, &Device::Cpu)?;
            Ok(Self::Hf { dir: path.to_path_buf(), weights, raw, config })
        } else if path.is_file() {
            Ok(Self::Gguf { file: GgufFile::open(path)? })
        } else {
            Err(Error::NotAModel { path: path.to_path_buf(), reason: "no such file or directory".into() })
        }
    }

    /// The output tensors in file order.
    pub fn plan(&self) -> Result<Vec<Planned>> {
        match self {
            Self::Hf { config, .. } => Ok(hf_plan(config)),
            Self::Gguf { file } => {
                let mut infos: Vec<_> = file.content().tensor_infos.iter().collect();
                infos.sort_by_key(|(_, i)| i.offset);
                Ok(infos
                    .into_iter()
                    .map(|(name, info)| {
                        let (layer, proj) = parse_block_name(name).map_or((None, None), |(l, p)| (Some(l), p));
                        Planned { name: name.clone(), dims: info.shape.dims().to_vec(), origin: Origin::Gguf, layer, proj }
                    })
                    .collect())
            }
        }
    }

    /// The facts the type rules need.
    pub fn mix_model(&self, plan: &[Planned]) -> Result<MixModel> {
        let tied = !plan.iter().any(|p| p.name == "output.weight");
        let (n_layers, heads, kv) = match self {
            Self::Hf { config, .. } => (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads),
            Self::Gguf { file } => {
                let md = &file.content().metadata;
                let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
                let get = |k: &str| md.get(&format!("{arch}.{k}")).and_then(|v| v.to_u64().or_else(|_| v.to_u32().map(u64::from)).ok());
                let n = get("block_count").unwrap_or(0) as usize;
                let h = get("attention.head_count").unwrap_or(1) as usize;
                (n, h, get("attention.head_count_kv").map_or(h, |v| v as usize))
            }
        };
        Ok(MixModel { n_layers, n_gqa: heads / kv.max(1), tied_embeddings: tied })
    }

    /// The tensor's values in f32 (HF layout already permuted for GGUF), on the CPU.
    pub fn read_f32(&self, p: &Planned) -> Result<Tensor> {
        match (&p.origin, self) {
            (Origin::Hf { name, .. }, Self::Hf { weights, .. }) => weights.tensor(name, &p.dims),
            (Origin::Gguf, Self::Gguf { file }) => Ok(file.qtensor(&p.name, &Device::Cpu)?.dequantize(&Device::Cpu)?),
            (Origin::Values(v), _) => Ok(Tensor::from_slice(v, p.dims.as_slice(), &Device::Cpu)?),
            _ => Err(Error::MissingTensor { path: self.path().to_path_buf(), name: p.name.clone() }),
        }
    }

    /// The stored bytes and type of a GGUF input tensor (written unchanged when its type is kept).
    pub fn raw_gguf(&self, p: &Planned) -> Result<Option<(&[u8], GgmlDType)>> {
        match (&p.origin, self) {
            (Origin::Gguf, Self::Gguf { file }) => Ok(Some(file.raw(&p.name)?)),
            _ => Ok(None),
        }
    }

    /// The tensor's values as f32, row-major. Dense F32/F16/BF16 data is widened straight from
    /// the memory map (one f32 copy of the tensor, never a second); other types are dequantized.
    pub fn read_values(&self, p: &Planned) -> Result<Vec<f32>> {
        let dense = match (&p.origin, self) {
            (Origin::Hf { name, .. }, Self::Hf { weights, .. }) => {
                let (bytes, dtype, shape) = weights.raw(name)?;
                if shape != p.dims.as_slice() {
                    return Err(Error::ShapeMismatch { path: self.path().to_path_buf(), name: name.clone(), expected: p.dims.clone(), got: shape.to_vec() });
                }
                match dtype {
                    "F32" => Some((bytes, GgmlDType::F32)),
                    "F16" => Some((bytes, GgmlDType::F16)),
                    "BF16" => Some((bytes, GgmlDType::BF16)),
                    _ => None,
                }
            }
            (Origin::Gguf, Self::Gguf { file }) => {
                let (bytes, t) = file.raw(&p.name)?;
                matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16).then_some((bytes, t))
            }
            (Origin::Values(v), _) => return Ok(v.clone()),
            _ => None,
        };
        match dense {
            Some((bytes, t)) => Ok(widen(bytes, t)),
            None => Ok(self.read_f32(p)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        }
    }

    /// Evicts the tensor's file pages once it is written (peak RSS: one tensor, not the file).
    pub fn release(&self, p: &Planned) {
        match (&p.origin, self) {
            (Origin::Hf { name, .. }, Self::Hf { weights, .. }) => weights.release(name),
            (Origin::Gguf, Self::Gguf { file }) => file.release(&p.name),
            _ => {}
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Hf { dir, .. } => dir,
            Self::Gguf { file } => file.path(),
        }
    }

    /// Metadata of the output, without the file-type keys (added by the caller).
    pub fn metadata(&self) -> Result<Vec<(String, Value)>> {
        match self {
            Self::Hf { dir, raw, config, .. } => {
                let mut md = hf_metadata(dir, config);
                md.extend(super::vocab::tokenizer_metadata(dir, raw)?);
                Ok(md)
            }
            Self::Gguf { file } => {
                let mut md: Vec<(String, Value)> = file
                    .content()
                    .metadata
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "general.file_type" | "general.quantization_version" | "general.alignment" | "general.quantized_by"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // A stable order: architecture first (llama.cpp readers expect it early), then by key.
                md.sort_by(|a, b| (a.0 != "general.architecture", &a.0).cmp(&(b.0 != "general.architecture", &b.0)));
                Ok(md)
            }
        }
    }
}

/// `blk.N.attn_q.weight` → (N, Some(Q)); other `blk.N.*` tensors → (N, None).
fn parse_block_name(name: &str) -> Option<(usize, Option<Projection>)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let proj = match rest {
        "attn_q.weight" => Some(Projection::Q),
        "attn_k.weight" => Some(Projection::K),
        "attn_v.weight" => Some(Projection::V),
        "attn_output.weight" => Some(Projection::O),
        "ffn_gate.weight" => Some(Projection::Gate),
        "ffn_up.weight" => Some(Projection::Up),
        "ffn_down.weight" => Some(Projection::Down),
        _ => None,
    };
    Some((layer, proj))
}

const HF_PROJ: [(&str, Projection); 7] = [
    ("self_attn.q_proj", Projection::Q),
    ("self_attn.k_proj", Projection::K),
    ("self_attn.v_proj", Projection::V),
    ("self_attn.o_proj", Projection::O),
    ("mlp.gate_proj", Projection::Gate),
    ("mlp.up_proj", Projection::Up),
    ("mlp.down_proj", Projection::Down),
];

/// The GGUF tensors of an HF model, in llama.cpp's converter order.
pub(crate) fn hf_plan(c: &ModelConfig) -> Vec<Planned> {
    let (h, hd, nh, nkv, inter) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
    let llama = matches!(c.arch, Arch::Llama | Arch::Mistral);
    let mut plan = Vec::new();
    if let Some(freqs) = rope_factors(c) {
        let dims = vec![freqs.len()];
        plan.push(Planned { name: "rope_freqs.weight".into(), dims, origin: Origin::Values(freqs), layer: None, proj: None });
    }
    let mut hf = |hf_name: String, dims: Vec<usize>, permute: Option<usize>, layer: Option<usize>, proj: Option<Projection>| {
        if let Some(name) = gguf_name(&hf_name) {
            plan.push(Planned { name, dims, origin: Origin::Hf { name: hf_name, permute_heads: permute }, layer, proj });
        }
    };
    hf("model.embed_tokens.weight".into(), vec![c.vocab_size, h], None, None, None);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        hf(format!("{p}input_layernorm.weight"), vec![h], None, Some(l), None);
        for (module, proj) in HF_PROJ {
            let (out, inp) = match proj {
                Projection::Q => (nh * hd, h),
                Projection::K | Projection::V => (nkv * hd, h),
                Projection::O => (h, nh * hd),
                Projection::Gate | Projection::Up => (inter, h),
                Projection::Down => (h, inter),
            };
            let permute = match proj {
                Projection::Q if llama => Some(nh),
                Projection::K if llama => Some(nkv),
                _ => None,
            };
            hf(format!("{p}{module}.weight"), vec![out, inp], permute, Some(l), Some(proj));
            let bias = match proj {
                Projection::Q | Projection::K | Projection::V => c.qkv_bias,
                Projection::O => c.o_bias,
                _ => c.mlp_bias,
            };
            if bias {
                hf(format!("{p}{module}.bias"), vec![out], permute, Some(l), None);
            }
        }
        if c.qk_norm {
            hf(format!("{p}self_attn.q_norm.weight"), vec![hd], None, Some(l), None);
            hf(format!("{p}self_attn.k_norm.weight"), vec![hd], None, Some(l), None);
        }
        hf(format!("{p}post_attention_layernorm.weight"), vec![h], None, Some(l), None);
    }
    hf("model.norm.weight".into(), vec![h], None, None, None);
    if !c.tie_word_embeddings {
        hf("lm_head.weight".into(), vec![c.vocab_size, h], None, None, None);
    }
    plan
}

/// Llama 3 RoPE scaling as llama.cpp bakes it (`convert_hf_to_gguf.py`,
/// `LlamaModel.generate_extra_tensors`): per-frequency divisors, computed in f32 like its torch
/// code so the values are the same bits.
fn rope_factors(c: &ModelConfig) -> Option<Vec<f32>> {
    let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) = &c.rope_scaling
    else {
        return None;
    };
    let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
    let old = *original_max_position_embeddings as f32;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let (theta, dim) = (c.rope_theta as f32, c.head_dim as f32);
    let factors = (0..c.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / dim);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// The architecture's llama.cpp keys (`convert_hf_to_gguf.py`, `gguf.constants.Keys`).
fn hf_metadata(dir: &Path, c: &ModelConfig) -> Vec<(String, Value)> {
    let arch = match c.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    let name = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
    let u = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
    ];
    let mut put = |k: &str, v: Value| md.push((format!("{arch}.{k}"), v));
    put("block_count", u(c.num_hidden_layers));
    put("context_length", u(c.max_position_embeddings));
    put("embedding_length", u(c.hidden_size));
    put("feed_forward_length", u(c.intermediate_size));
    put("attention.head_count", u(c.num_attention_heads));
    put("attention.head_count_kv", u(c.num_key_value_heads));
    put("rope.freq_base", Value::F32(c.rope_theta as f32));
    put("attention.layer_norm_rms_epsilon", Value::F32(c.rms_norm_eps as f32));
    if c.arch == Arch::Qwen3 || c.head_dim * c.num_attention_heads != c.hidden_size || arch == "llama" {
        put("attention.key_length", u(c.head_dim));
        put("attention.value_length", u(c.head_dim));
    }
    put("vocab_size", u(c.vocab_size));
    if arch == "llama" {
        put("rope.dimension_count", u(c.head_dim));
    }
    // llama.cpp's converter drops Mistral's window (its llama graph has none); our loader reads
    // the key, so the file keeps HF's numerics past the window.
    if let Some(Some(w)) = c.layer_windows.first() {
        if c.layer_windows.iter().all(|x| *x == Some(*w)) {
            put("attention.sliding_window", u(*w));
        }
    }
    md
}

/// Little-endian F32/F16/BF16 bytes → f32, in parallel chunks.
fn widen(bytes: &[u8], t: GgmlDType) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let width = if t == GgmlDType::F32 { 4 } else { 2 };
    let mut out = vec![0f32; bytes.len() / width];
    out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * width)).for_each(|(dst, src)| {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(width)) {
            *d = match (t, s) {
                (GgmlDType::F32, &[a, b, c, e]) => f32::from_le_bytes([a, b, c, e]),
                (GgmlDType::F16, &[a, b]) => half::f16::from_le_bytes([a, b]).to_f32(),
                (_, &[a, b]) => half::bf16::from_le_bytes([a, b]).to_f32(),
                _ => 0.0,
            };
        }
    });
    out
}
