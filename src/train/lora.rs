//! Trainable LoRA factors on a frozen base, and the PEFT directory they are saved as.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::recompute::GradCheckpoint;
use super::TrainError;
use crate::adapter::{permute_rows, AdapterOptions, LoraAdapter};
use crate::error::{Error, Result};
use crate::model::linear::{ActiveLora, LoraDropout, LoraWeights, Projection};
use crate::Model;

/// Name the trained adapter is attached under in the training snapshot.
const TRAIN_ADAPTER: &str = "train";

/// Which projections get adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These projections in every layer.
    List(Vec<Projection>),
    /// All seven projections (PEFT's `all-linear` for these models: every linear but lm_head).
    AllLinear,
}

impl Targets {
    /// `all-linear`, or a comma-separated list of `q_proj`, `self_attn.q_proj`, `attn_q`, ….
    /// Errors: [`TrainError::UnknownTarget`], [`TrainError::NoTargets`].
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim() == "all-linear" {
            return Ok(Self::AllLinear);
        }
        let mut list = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let p = Projection::from_name(name)
                .or_else(|| Projection::ALL.into_iter().find(|p| p.hf_name().rsplit('.').next() == Some(name)))
                .ok_or_else(|| TrainError::UnknownTarget { name: name.to_string() })?;
            if !list.contains(&p) {
                list.push(p);
            }
        }
        if list.is_empty() {
            return Err(TrainError::NoTargets.into());
        }
        list.sort();
        Ok(Self::List(list))
    }

    /// The targeted projections, in HF module order.
    pub fn projections(&self) -> Vec<Projection> {
        match self {
            Self::AllLinear => Projection::ALL.to_vec(),
            Self::List(l) => l.clone(),
        }
    }
}

/// A new adapter's shape: PEFT `LoraConfig(r, lora_alpha, target_modules, use_rslora)`.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    /// The projections that get adapters.
    pub targets: Targets,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA alpha (scale alpha/r, or alpha/√r with rsLoRA).
    pub alpha: f64,
    /// Scale by alpha/√r (PEFT `use_rslora`).
    pub rslora: bool,
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA (PEFT `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    fn check(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(TrainError::ZeroRank.into());
        }
        if !self.alpha.is_finite() || self.alpha.abs() > crate::adapter::config::MAX_LORA_ALPHA {
            return Err(TrainError::InvalidOption { name: "alpha", reason: format!("{} is out of range", self.alpha) }.into());
        }
        Ok(())
    }
}

/// One adapted projection: A (r, in) and B (out, r) as trainable variables.
#[derive(Debug, Clone)]
pub struct LoraSite {
    /// Decoder layer index.
    pub layer: usize,
    /// The projection.
    pub proj: Projection,
    /// A, (r, in).
    pub a: Var,
    /// B, (out, r).
    pub b: Var,
    /// The scale applied to B·A.
    pub scaling: f64,
}

/// What `adapter_config.json` says when saved.
#[derive(Debug, Clone)]
enum SavedConfig {
    New(LoraSpec),
    /// The `--init` adapter's own config, kept as it was (patterns and all).
    Copied(serde_json::Value),
}

/// LoRA factors attached to a snapshot of a frozen base. The snapshot is a clone of the base
/// (shared weights, its own adapter slots), so models serving the same base are not disturbed.
#[derive(Debug)]
pub struct TrainableLora {
    model: Model,
    sites: Vec<LoraSite>,
    config: SavedConfig,
    /// `lora_dropout` with the seed its masks derive from.
    dropout: Option<(Arc<LoraDropout>, u64)>,
    /// Which layers the backward recomputes.
    checkpoint: GradCheckpoint,
}

impl TrainableLora {
    /// A new adapter as PEFT initialises it: A Kaiming-uniform with a = √5 (uniform in
    /// ±1/√in), B zero; `seed` fixes A.
    ///
    /// Errors: [`TrainError::ZeroRank`], [`TrainError::UnsupportedDtype`] for a non-f32 model.
    pub fn new(base: &Model, spec: &LoraSpec, seed: u64) -> Result<Self> {
        spec.check()?;
        check_dtype(base)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sites = Vec::new();
        for layer in 0..base.layers().len() {
            for proj in spec.targets.projections() {
                let (out, inp) = base.layers()[layer].projection(proj).weight().dims();
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), base.device())?)?;
                let b = Var::zeros((out, spec.rank), DType::F32, base.device())?;
                sites.push(LoraSite { layer, proj, a, b, scaling: spec.scaling() });
            }
        }
        Self::attach(base, sites, SavedConfig::New(spec.clone()))
    }

    /// Starts from an existing PEFT adapter directory (`--init`): its factors become the
    /// variables, its config is saved unchanged. Errors: those of [`LoraAdapter::load`].
    pub fn from_peft(base: &Model, dir: &Path) -> Result<Self> {
        check_dtype(base)?;
        let adapter = LoraAdapter::load(dir, base, &AdapterOptions::default())?;
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
        let sites = adapter
            .modules()
            .iter()
            .map(|m| {
                Ok(LoraSite {
                    layer: m.layer,
                    proj: m.proj,
                    a: Var::from_tensor(&m.weights.a().to_dtype(DType::F32)?)?,
                    b: Var::from_tensor(&m.weights.b().to_dtype(DType::F32)?)?,
                    scaling: m.weights.scaling(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::attach(base, sites, SavedConfig::Copied(config))
    }

    /// The same adapter with PEFT's `lora_dropout` `p` on the LoRA input of every site during
    /// training (0: none, the default); masks derive from `seed` and the step
    /// ([`TrainableLora::begin_forward`]). Errors: [`TrainError::InvalidOption`] `dropout`
    /// outside [0, 1).
    pub fn with_dropout(self, p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(TrainError::InvalidOption { name: "dropout", reason: format!("{p} is not in [0, 1)") }.into());
        }
        let Self { model, sites, config, checkpoint, .. } = self;
        let base = model;
        let dropout = (p > 0.0).then(|| (Arc::new(LoraDropout::new(p)), seed));
        Ok(Self::attach_with(&base, sites, config, dropout)?.with_grad_checkpoint(checkpoint))
    }

    /// The same adapter with its gradients computed under `checkpoint` (default
    /// [`GradCheckpoint::Off`]: every layer's graph kept). The gradients do not depend on it,
    /// only time and memory do.
    pub fn with_grad_checkpoint(mut self, checkpoint: GradCheckpoint) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// Which layers the backward recomputes ([`TrainableLora::with_grad_checkpoint`]).
    pub fn grad_checkpoint(&self) -> GradCheckpoint {
        self.checkpoint
    }

    /// The dropout probability (0 without dropout).
    pub fn dropout(&self) -> f64 {
        self.dropout.as_ref().map_or(0.0, |(d, _)| d.p())
    }

    /// Seeds the dropout masks of the next forward from (seed, `step`, `micro`), and turns
    /// dropout on (`train`) or off (evaluation). No-op without dropout.
    pub fn begin_forward(&self, step: usize, micro: usize, train: bool) {
        if let Some((d, seed)) = &self.dropout {
            d.reseed(seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407) ^ (micro as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
            d.set_active(train);
        }
    }

    /// Starts layer `layer` of the current forward: see [`LoraDropout::begin_layer`].
    pub fn begin_layer(&self, layer: usize) {
        if let Some((d, _)) = &self.dropout {
            d.begin_layer(layer);
        }
    }

    fn attach(base: &Model, sites: Vec<LoraSite>, config: SavedConfig) -> Result<Self> {
        Self::attach_with(base, sites, config, None)
    }

    fn attach_with(base: &Model, sites: Vec<LoraSite>, config: SavedConfig, dropout: Option<(Arc<LoraDropout>, u64)>) -> Result<Self> {
        let mut model = base.clone();
        for layer in model.layers_mut() {
            for p in Projection::ALL {
                layer.projection_mut(p).set_adapters(Vec::new())?;
            }
        }
        for s in &sites {
            let mut weights = LoraWeights::new(s.a.as_tensor().clone(), s.b.as_tensor().clone(), s.scaling)?;
            if let Some((d, _)) = &dropout {
                weights = weights.with_dropout(d.clone());
            }
            let active = ActiveLora { name: TRAIN_ADAPTER.into(), weights: Arc::new(weights), scale: 1.0, merged: false };
            let layer = model.layers_mut().get_mut(s.layer).ok_or(TrainError::InvalidOption {
                name: "layer",
                reason: format!("the base has no layer {}", s.layer),
            })?;
            layer.projection_mut(s.proj).set_adapters(vec![active])?;
        }
        Ok(Self { model, sites, config, dropout, checkpoint: GradCheckpoint::default() })
    }

    /// The training snapshot: the base with the variables attached (its forward is
    /// differentiable with respect to them).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The adapted projections, sorted by (layer, projection).
    pub fn sites(&self) -> &[LoraSite] {
        &self.sites
    }

    /// Every variable: A then B of each site, in [`TrainableLora::sites`] order.
    pub fn vars(&self) -> Vec<Var> {
        self.sites.iter().flat_map(|s| [s.a.clone(), s.b.clone()]).collect()
    }

    /// Gradients of `loss` aligned with [`TrainableLora::vars`] (zeros where a variable does not
    /// reach the loss).
    pub fn grads(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let store = loss.backward()?;
        self.vars()
            .iter()
            .map(|v| Ok(match store.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.zeros_like()?,
            }))
            .collect()
    }

    /// The PEFT save name of every tensor (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)
    /// with its value in HF layout, f32: what [`TrainableLora::save_peft`] writes.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let cfg = self.model.config();
        let mut out = HashMap::new();
        for s in &self.sites {
            let prefix = format!("base_model.model.model.layers.{}.{}", s.layer, s.proj.hf_name());
            let b = s.b.as_tensor().clone();
            // A llama-arch GGUF base keeps q/k rows interleaved; PEFT files hold HF's layout.
            let b = match s.proj {
                Projection::Q if cfg.rope_interleaved => permute_rows(&b, cfg.num_attention_heads, false)?,
                Projection::K if cfg.rope_interleaved => permute_rows(&b, cfg.num_key_value_heads, false)?,
                _ => b,
            };
            out.insert(format!("{prefix}.lora_A.weight"), s.a.as_tensor().clone());
            out.insert(format!("{prefix}.lora_B.weight"), b);
        }
        Ok(out)
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (each to a temporary
    /// file renamed into place), readable by PEFT and [`LoraAdapter::load`].
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let weights = dir.join("adapter_model.safetensors");
        let tmp = dir.join("adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&self.tensors()?, &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
        let config = match &self.config {
            SavedConfig::Copied(v) => v.clone(),
            SavedConfig::New(spec) => new_config(spec, self.dropout()),
        };
        let text = serde_json::to_string_pretty(&config).map_err(|e| TrainError::InvalidOption { name: "config", reason: e.to_string() })?;
        let path = dir.join("adapter_config.json");
        let tmp = dir.join("adapter_config.json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(())
    }
}

fn check_dtype(base: &Model) -> Result<()> {
    if base.dtype() != DType::F32 {
        return Err(TrainError::UnsupportedDtype { dtype: format!("{:?}", base.dtype()) }.into());
    }
    Ok(())
}

/// PEFT 0.21's `LoraConfig` fields for a new plain LoRA adapter.
fn new_config(spec: &LoraSpec, dropout: f64) -> serde_json::Value {
    let mut targets: Vec<&str> = spec
        .targets
        .projections()
        .iter()
        .map(|p| p.hf_name().rsplit('.').next().unwrap_or(p.hf_name()))
        .collect();
    targets.sort();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora,
        "target_modules": targets,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "base_model_name_or_path": null,
        "revision": null
    })
}
