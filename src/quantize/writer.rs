//! A streaming GGUF v3 writer: the header (metadata and every tensor's info, with offsets computed
//! from shapes and types) first, then each tensor's data as it is produced, aligned to
//! [`ALIGNMENT`]. candle's `gguf_file::write` needs every tensor in memory at once; this needs one.
//!
//! The file is written to a temporary name in the output's directory and renamed over the output
//! only when complete ([`GgufWriter::finish`]); dropping an unfinished writer removes it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Tensor data alignment (GGUF `general.alignment` default).
pub const ALIGNMENT: usize = 32;
const GGUF_MAGIC: u32 = 0x4655_4747;
const GGUF_VERSION: u32 = 3;

/// One tensor's entry in the header. `dims` are in candle order (rows first); GGUF stores them
/// reversed (`ne[0]` = row length).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The GGUF tensor name.
    pub name: String,
    /// Its shape, rows first.
    pub dims: Vec<usize>,
    /// Its type in the file.
    pub dtype: GgmlDType,
}

impl TensorInfo {
    /// Bytes of the tensor's data (without padding).
    pub fn size(&self) -> usize {
        let n: usize = self.dims.iter().product();
        n / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Writes one GGUF file, tensor data streamed in header order.
pub struct GgufWriter {
    out: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    sizes: Vec<usize>,
    next: usize,
    /// Renamed onto `out`: nothing to clean up.
    done: bool,
}

fn padding(n: usize) -> usize {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

impl GgufWriter {
    /// Creates the temporary file beside `out` and writes the header.
    ///
    /// Errors: [`Error::QuantizeWrite`] (nothing is left behind).
    pub fn create(out: &Path, metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Result<Self> {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|source| Error::QuantizeWrite { path: out.to_path_buf(), source })?;
        let mut w = Self {
            out: out.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            sizes: tensors.iter().map(TensorInfo::size).collect(),
            next: 0,
            done: false,
        };
        let header = encode_header(metadata, tensors)?;
        w.write_bytes(&header)?;
        Ok(w)
    }

    fn fail(&self, source: std::io::Error) -> Error {
        Error::QuantizeWrite { path: self.out.clone(), source }
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let res = match self.file.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Err(std::io::Error::other("writer already finished")),
        };
        res.map_err(|e| self.fail(e))
    }

    /// Writes the next tensor's data, given in consecutive parts; together they must have the
    /// size its header entry promised.
    pub fn write_tensor(&mut self, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let want = self.sizes.get(self.next).copied();
        if want != Some(len) {
            let msg = format!("tensor {} has {len} bytes, its header entry says {want:?}", self.next);
            return Err(self.fail(std::io::Error::other(msg)));
        }
        for part in parts {
            self.write_bytes(part)?;
        }
        self.write_bytes(&vec![0u8; padding(len)])?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file onto the output path.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.sizes.len() {
            let msg = format!("{} of {} tensors written", self.next, self.sizes.len());
            return Err(self.fail(std::io::Error::other(msg)));
        }
        let Some(buf) = self.file.take() else {
            return Err(self.fail(std::io::Error::other("writer already finished")));
        };
        let file = buf.into_inner().map_err(|e| e.into_error()).map_err(|e| self.fail(e))?;
        file.sync_all().map_err(|e| self.fail(e))?;
        let len = file.metadata().map_err(|e| self.fail(e))?.len();
        drop(file);
        std::fs::rename(&self.tmp, &self.out).map_err(|e| self.fail(e))?;
        self.done = true;
        Ok(len)
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // Unfinished (an error or a panic on the way, including a failed final flush): leave no
        // partial file.
        drop(self.file.take());
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_string(buf, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, type_id);
            if items.iter().any(|i| type_id(i) != elem) {
                return Err(Error::InvalidParameter {
                    name: "metadata",
                    reason: format!("array `{key}` mixes value types"),
                });
            }
            buf.extend_from_slice(&elem.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, key, item)?;
            }
        }
    }
    Ok(())
}

/// The bytes before the first tensor's data: magic, version, counts, metadata, tensor infos,
/// padding to [`ALIGNMENT`].
pub fn encode_header(metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
    buf.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut buf, key);
        buf.extend_from_slice(&type_id(value).to_le_bytes());
        put_value(&mut buf, key, value)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut buf, &t.name);
        buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        buf.extend_from_slice(&(offset as u64).to_le_bytes());
        let size = t.size();
        offset += size + padding(size);
    }
    buf.resize(buf.len() + padding(buf.len()), 0);
    Ok(buf)
}

/// GGML's type number (`enum ggml_type`); candle keeps its own mapping crate-private.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}
