//! Downloads from the Hugging Face Hub (feature `hub`), into hf-hub's usual cache
//! (`$HF_HOME`, `~/.cache/huggingface`). Offline, these fail with [`Error::Hub`]; pass a local path
//! to [`crate::load_model`] instead.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};

fn repo_api(repo_id: &str, revision: Option<&str>, progress: bool) -> Result<hf_hub::api::sync::ApiRepo> {
    let api = ApiBuilder::from_env().with_progress(progress).build().map_err(|e| Error::Hub {
        repo: repo_id.to_string(),
        reason: e.to_string(),
    })?;
    let repo = match revision {
        Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::new(repo_id.to_string(), RepoType::Model),
    };
    Ok(api.repo(repo))
}

fn get(api: &hf_hub::api::sync::ApiRepo, repo_id: &str, file: &str) -> Result<PathBuf> {
    api.get(file).map_err(|e| Error::Hub {
        repo: repo_id.to_string(),
        reason: format!("{file}: {e}"),
    })
}

/// Downloads (or finds in the cache) one file of a model repository, e.g. a GGUF, showing a
/// progress bar when `progress` is set. Returns its local path.
pub fn download_file(repo_id: &str, revision: Option<&str>, file: &str, progress: bool) -> Result<PathBuf> {
    let api = repo_api(repo_id, revision, progress)?;
    get(&api, repo_id, file)
}

/// Downloads a safetensors model: `config.json`, the weights (sharded or not), the tokenizer files
/// if present. Returns the snapshot directory to pass to [`crate::load_model`].
pub fn download_model_dir(repo_id: &str, revision: Option<&str>, progress: bool) -> Result<PathBuf> {
    let api = repo_api(repo_id, revision, progress)?;
    let config = get(&api, repo_id, "config.json")?;
    for optional in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let _ = api.get(optional);
    }
    match api.get("model.safetensors.index.json") {
        Ok(index_path) => {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.clone(), source })?;
            let mut shards: Vec<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                get(&api, repo_id, shard)?;
            }
        }
        Err(_) => {
            get(&api, repo_id, "model.safetensors")?;
        }
    }
    config.parent().map(PathBuf::from).ok_or_else(|| Error::Hub {
        repo: repo_id.to_string(),
        reason: "download has no parent directory".into(),
    })
}
