//! Pre-validation of GGUF bytes before candle parses them.
//!
//! candle 0.11.1's reader trusts several fields it should not (see `RELIABILITY.md`): it divides by
//! `general.alignment` unchecked, computes tensor sizes with wrapping products, accepts zero-sized
//! dims, the byte-swapped magic `FUGG` and version 1, silently keeps the last of duplicated keys and
//! tensor names, ignores tensor offsets that overlap or leave gaps, and stores every metadata array
//! element as a 32-byte `Value`. [`validate_gguf`] walks the same bytes with bounds checks on every
//! read and rejects all of that, following the rules of llama.cpp's `gguf.cpp` (`gguf_init_from_file_impl`).
//!
//! Layout (v2/v3, little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` KV count,
//! the KVs (`string` key, `u32` value type, value), the tensor infos (`string` name, `u32` n_dims,
//! n_dims × `u64` ne, `u32` ggml type, `u64` offset), padding to the alignment, then the data.

use std::collections::HashSet;

use candle_core::quantized::gguf_file::{TensorInfo as CandleTensorInfo, Value as CandleValue};

/// The only magic we accept: the bytes `GGUF` as written by llama.cpp (candle also takes `FUGG`).
const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// GGUF versions candle reads with `u64` counts; version 1 used `u32` counts and is rejected.
const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];

/// Alignment of the data section when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
const ALIGNMENT_KEY: &str = "general.alignment";

/// `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// `GGML_MAX_NAME` (64) less its NUL: the longest tensor name ggml can store, in bytes.
pub const MAX_TENSOR_NAME_BYTES: u64 = 63;

/// How much of an invalid UTF-8 string an error message quotes (lossily decoded).
const QUOTE_BYTES: usize = 64;

/// Nesting bound for arrays of arrays. candle stops at 64; nothing real nests at all, and each
/// level costs a stack frame here.
const MAX_ARRAY_DEPTH: u32 = 8;

/// What candle spends on one decoded metadata value (the `Value` enum), per KV or array element.
const VALUE_BYTES: u64 = std::mem::size_of::<CandleValue>() as u64;

/// What candle spends on one `String` or `Vec` header, before its heap bytes.
const STRING_BYTES: u64 = std::mem::size_of::<String>() as u64;

/// What candle spends on one `TensorInfo` before its shape's heap bytes.
const TENSOR_INFO_BYTES: u64 = std::mem::size_of::<CandleTensorInfo>() as u64;

/// Allocator bookkeeping per heap allocation and hash-table slack per map entry: an estimate, so
/// many tiny strings are not charged as free.
const ALLOC_OVERHEAD: u64 = 16;

/// Smallest KV on disk: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Smallest tensor info on disk: name length, n_dims, one dim, type, offset.
const MIN_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// GGUF metadata value type ids (`enum gguf_type`).
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// The ggml storage types candle 0.11.1 can load from a GGUF file, by name.
///
/// `GgmlDType::from_u32` also parses Q8_1 and Q8_K, but `ggml_file::qtensor_from_ggml` rejects
/// both when the tensor is read, so they are not listed (nor loadable).
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Facts about one ggml storage type, from ggml's `type_traits` table.
///
/// `block_size` is the number of elements per block and `type_size` the bytes per block, so a row
/// of `ne[0]` elements takes `ne[0] / block_size * type_size` bytes. `candle_supported` says
/// whether candle 0.11.1 can load a tensor of this type (see [`SUPPORTED_TYPES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlTypeInfo {
    /// The ggml type name, e.g. `"Q4_K"`.
    pub name: &'static str,
    /// Elements per quantization block (1 for plain float and int types).
    pub block_size: u64,
    /// Bytes one block takes on disk.
    pub type_size: u64,
    /// Whether candle 0.11.1 can load a tensor stored in this type.
    pub candle_supported: bool,
}

const fn ty(name: &'static str, block_size: u64, type_size: u64, candle: bool) -> GgmlTypeInfo {
    GgmlTypeInfo {
        name,
        block_size,
        type_size,
        candle_supported: candle,
    }
}

/// Looks up a ggml type id (`enum ggml_type` in ggml.h); `None` for ids that were never assigned
/// or whose support was removed from GGUF files (4, 5, 31–33, 36–38).
pub fn ggml_type_info(type_id: u32) -> Option<GgmlTypeInfo> {
    // Sizes from ggml-common.h block structs; candle's k_quants asserts the same for its types.
    let info = match type_id {
        0 => ty("F32", 1, 4, true),
        1 => ty("F16", 1, 2, true),
        2 => ty("Q4_0", 32, 18, true),
        3 => ty("Q4_1", 32, 20, true),
        6 => ty("Q5_0", 32, 22, true),
        7 => ty("Q5_1", 32, 24, true),
        8 => ty("Q8_0", 32, 34, true),
        9 => ty("Q8_1", 32, 36, false),
        10 => ty("Q2_K", 256, 84, true),
        11 => ty("Q3_K", 256, 110, true),
        12 => ty("Q4_K", 256, 144, true),
        13 => ty("Q5_K", 256, 176, true),
        14 => ty("Q6_K", 256, 210, true),
        15 => ty("Q8_K", 256, 292, false),
        16 => ty("IQ2_XXS", 256, 66, false),
        17 => ty("IQ2_XS", 256, 74, false),
        18 => ty("IQ3_XXS", 256, 98, false),
        19 => ty("IQ1_S", 256, 50, false),
        20 => ty("IQ4_NL", 32, 18, false),
        21 => ty("IQ3_S", 256, 110, false),
        22 => ty("IQ2_S", 256, 82, false),
        23 => ty("IQ4_XS", 256, 136, false),
        24 => ty("I8", 1, 1, false),
        25 => ty("I16", 1, 2, false),
        26 => ty("I32", 1, 4, false),
        27 => ty("I64", 1, 8, false),
        28 => ty("F64", 1, 8, false),
        29 => ty("IQ1_M", 256, 56, false),
        30 => ty("BF16", 1, 2, true),
        34 => ty("TQ1_0", 256, 54, false),
        35 => ty("TQ2_0", 256, 66, false),
        39 => ty("MXFP4", 32, 17, false),
        _ => return None,
    };
    Some(info)
}

/// The ggml name of a type id (`"Q4_K"`, `"IQ4_NL"`), whether or not candle supports it; `None`
/// for ids ggml does not define.
pub fn ggml_type_name(type_id: u32) -> Option<&'static str> {
    ggml_type_info(type_id).map(|info| info.name)
}

/// Bounds on what an untrusted GGUF header may make us (and then candle) allocate.
///
/// `max_metadata_bytes` is a budget for the memory candle will spend decoding the metadata and
/// tensor infos: every KV and every array element is charged as one candle `Value` (32 bytes),
/// plus string bytes and per-allocation overhead. The other fields bound single counts and lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLimits {
    /// Memory budget for decoding the metadata and tensor infos, in bytes.
    pub max_metadata_bytes: u64,
    /// Most elements one metadata array may declare.
    pub max_array_len: u64,
    /// Longest string (key, value or tensor name) accepted, in bytes.
    pub max_string_len: u64,
    /// Most tensors the header may declare.
    pub max_tensors: u64,
    /// Most metadata entries the header may declare.
    pub max_kv: u64,
}

impl Default for GgufLimits {
    /// 64 MiB of metadata (a 256k vocabulary with scores and token types costs about 30 MiB),
    /// arrays up to 16 Mi elements, strings up to 64 MiB (some files embed a whole
    /// `tokenizer.json`), and up to 1 Mi tensors and KVs; the budget is what binds in practice.
    fn default() -> Self {
        GgufLimits {
            max_metadata_bytes: 64 << 20,
            max_array_len: 1 << 24,
            max_string_len: 64 << 20,
            max_tensors: 1 << 20,
            max_kv: 1 << 20,
        }
    }
}

/// One tensor info that passed validation.
///
/// `name` is as candle will key it (trailing NULs removed), `dims` are in ggml order (`ne[0]`, the
/// contiguous row length, first), `offset` is relative to [`GgufSummary::data_offset`], and
/// `n_bytes` is the exact unpadded size of its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorSummary {
    /// The tensor's name as candle keys it.
    pub name: String,
    /// The shape in ggml order, `ne[0]` (the row length) first.
    pub dims: Vec<u64>,
    /// The ggml type id (`enum ggml_type`); see [`ggml_type_info`].
    pub type_id: u32,
    /// Where the tensor's data starts, relative to [`GgufSummary::data_offset`].
    pub offset: u64,
    /// Exact size of the tensor's data in bytes, without padding.
    pub n_bytes: u64,
}

/// The structure of a GGUF file that passed [`validate_gguf`].
///
/// `data_offset` is the absolute file offset of the data section; `tensors` are in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    /// The GGUF version (2 or 3).
    pub version: u32,
    /// Alignment of the data section and of every tensor, in bytes.
    pub alignment: u64,
    /// Absolute file offset where the data section starts.
    pub data_offset: u64,
    /// The tensor infos, in file order.
    pub tensors: Vec<GgufTensorSummary>,
    /// How many metadata entries the header holds.
    pub n_kv: u64,
}

/// A structural defect in a GGUF file. Offsets are absolute byte positions in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufFormatError {
    /// The file does not start with `GGUF`.
    #[error("bad magic {found:02x?} (expected \"GGUF\")")]
    BadMagic {
        /// The first four bytes of the file.
        found: [u8; 4],
    },

    /// The GGUF version is not 2 or 3.
    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version the header states.
        version: u32,
    },

    /// `name` is the metadata key or tensor the bytes belong to, when known.
    #[error("file is truncated: {what}{} at offset {offset} runs past the end", of_name(.name))]
    Truncated {
        /// What was being read (a count, a key, a value, a tensor info field).
        what: &'static str,
        /// Where the read started.
        offset: u64,
        /// The metadata key or tensor name the read belongs to, if known.
        name: Option<String>,
    },

    /// The header declares more tensors than [`GgufLimits::max_tensors`].
    #[error("header declares {count} tensors (limit {max})")]
    TooManyTensors {
        /// The tensor count the header declares.
        count: u64,
        /// The limit in force.
        max: u64,
    },

    /// The header declares more metadata entries than [`GgufLimits::max_kv`].
    #[error("header declares {count} metadata entries (limit {max})")]
    TooManyKv {
        /// The metadata entry count the header declares.
        count: u64,
        /// The limit in force.
        max: u64,
    },

    /// `name` is the metadata key or tensor the string belongs to, when known.
    #[error("{what}{} at offset {offset} is {len} bytes long (limit {max})", of_name(.name))]
    StringTooLong {
        /// Which kind of string it is (metadata key, string value, tensor name).
        what: &'static str,
        /// Where the string's length prefix starts.
        offset: u64,
        /// The length in bytes the prefix claims.
        len: u64,
        /// The limit in force ([`GgufLimits::max_string_len`]).
        max: u64,
        /// The metadata key or tensor the string belongs to, if known.
        name: Option<String>,
    },

    /// `text` is the start of the string, decoded lossily; `name` is the metadata key a string
    /// value belongs to, when known.
    #[error("{what}{} at offset {offset} is not valid UTF-8: {text:?}", of_name(.name))]
    InvalidUtf8 {
        /// Which kind of string it is (metadata key, string value, tensor name).
        what: &'static str,
        /// Where the string's length prefix starts.
        offset: u64,
        /// The start of the string, decoded lossily.
        text: String,
        /// The metadata key the string value belongs to, if known.
        name: Option<String>,
    },

    /// An empty metadata key or tensor name (`what` says which).
    #[error("{what} at offset {offset} is empty")]
    EmptyName {
        /// Whether it is a metadata key or a tensor name.
        what: &'static str,
        /// Where the empty string's length prefix starts.
        offset: u64,
    },

    /// llama.cpp's reader refuses names that do not fit ggml's `GGML_MAX_NAME` buffer.
    #[error("tensor name `{name}` is {len} bytes long (ggml's limit is {max})")]
    TensorNameTooLong {
        /// The tensor's name.
        name: String,
        /// Its length in bytes.
        len: u64,
        /// ggml's limit, [`MAX_TENSOR_NAME_BYTES`].
        max: u64,
    },

    /// A metadata value type id outside GGUF's `enum gguf_type`.
    #[error("metadata `{key}` has unknown value type {type_id}")]
    UnknownValueType {
        /// The metadata key.
        key: String,
        /// The value type id found.
        type_id: u32,
    },

    /// A bool metadata value stored as a byte other than 0 or 1.
    #[error("metadata `{key}` has a bool byte {value} (expected 0 or 1)")]
    BadBool {
        /// The metadata key.
        key: String,
        /// The byte found.
        value: u8,
    },

    /// A metadata array longer than [`GgufLimits::max_array_len`].
    #[error("metadata `{key}` is an array of {len} elements (limit {max})")]
    ArrayTooLong {
        /// The metadata key.
        key: String,
        /// The element count the array declares.
        len: u64,
        /// The limit in force.
        max: u64,
    },

    /// Metadata arrays of arrays nested too deeply.
    #[error("metadata `{key}` nests arrays deeper than {max}")]
    ArrayTooDeep {
        /// The metadata key.
        key: String,
        /// The deepest nesting allowed.
        max: u32,
    },

    /// Decoding the metadata would cost more memory than [`GgufLimits::max_metadata_bytes`].
    #[error("metadata would need about {used} bytes of memory (budget {budget})")]
    MetadataBudget {
        /// Estimated bytes candle would allocate so far.
        used: u64,
        /// The budget in force.
        budget: u64,
    },

    /// A metadata key that occurs twice (after trailing-NUL trimming).
    #[error("metadata key `{key}` appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },

    /// `general.alignment` is stored with a type other than `u32`.
    #[error("`general.alignment` has value type {type_id} (expected u32, type 4)")]
    AlignmentNotU32 {
        /// The value type id found.
        type_id: u32,
    },

    /// `general.alignment` is zero or not a power of two.
    #[error("`general.alignment` is {alignment} (expected a non-zero power of two)")]
    BadAlignment {
        /// The value found.
        alignment: u64,
    },

    /// A tensor name that occurs twice.
    #[error("tensor `{name}` appears more than once")]
    DuplicateTensor {
        /// The repeated tensor name.
        name: String,
    },

    /// A tensor info with zero dimensions.
    #[error("tensor `{name}` has no dimensions")]
    NoDims {
        /// The tensor's name.
        name: String,
    },

    /// A tensor with more than ggml's four dimensions.
    #[error("tensor `{name}` has {n_dims} dimensions (at most 4)")]
    TooManyDims {
        /// The tensor's name.
        name: String,
        /// The dimension count the info declares.
        n_dims: u32,
    },

    /// A tensor with a dimension of size zero.
    #[error("tensor `{name}` has a zero dimension in {dims:?}")]
    ZeroDim {
        /// The tensor's name.
        name: String,
        /// Its shape in ggml order.
        dims: Vec<u64>,
    },

    /// A tensor dimension above `i64::MAX`.
    #[error("tensor `{name}` has a dimension above i64::MAX in {dims:?}")]
    DimTooLarge {
        /// The tensor's name.
        name: String,
        /// Its shape in ggml order.
        dims: Vec<u64>,
    },

    /// A tensor whose element count or byte size does not fit in 64 bits.
    #[error("tensor `{name}`: element count or byte size overflows")]
    SizeOverflow {
        /// The tensor's name.
        name: String,
    },

    /// A tensor stored in a ggml type candle 0.11.1 cannot load.
    #[error(
        "tensor `{name}` has type {} which candle 0.11 cannot load (supported: {supported})",
        type_label(*.type_id, *.type_name)
    )]
    UnsupportedType {
        /// The tensor's name.
        name: String,
        /// The ggml type id found.
        type_id: u32,
        /// The ggml name of that id, if ggml defines it.
        type_name: Option<&'static str>,
        /// The types candle can load ([`SUPPORTED_TYPES`]).
        supported: &'static str,
    },

    /// A tensor whose row length is not a whole number of quantization blocks.
    #[error(
        "tensor `{name}`: row length ne[0] = {ne0} is not a multiple of the block size {block}"
    )]
    RowNotBlockMultiple {
        /// The tensor's name.
        name: String,
        /// The row length `ne[0]`, in elements.
        ne0: u64,
        /// The type's block size, in elements.
        block: u64,
    },

    /// A tensor data offset that is not where the previous tensors end, padded to the alignment.
    #[error("tensor `{name}` has data offset {found}, expected {expected} (gap, overlap or misalignment)")]
    BadOffset {
        /// The tensor's name.
        name: String,
        /// The offset the previous tensors imply, relative to the data section.
        expected: u64,
        /// The offset the tensor info states.
        found: u64,
    },

    /// The data section's start, rounded up to the alignment, overflows 64 bits.
    #[error("data section start overflows (header ends at {header_end}, alignment {alignment})")]
    DataOffsetOverflow {
        /// Where the tensor infos end, in bytes.
        header_end: u64,
        /// The alignment in force.
        alignment: u64,
    },

    /// A tensor's data runs past the end of the file.
    #[error("tensor `{name}` data ends at byte {needed} but the file has {file_len} bytes")]
    DataTruncated {
        /// The tensor's name.
        name: String,
        /// The absolute offset where its data ends.
        needed: u64,
        /// The file's length in bytes.
        file_len: u64,
    },
}

fn of_name(name: &Option<String>) -> String {
    match name {
        Some(name) => format!(" of `{name}`"),
        None => String::new(),
    }
}

/// Attaches the metadata key or tensor name to a read error that lacks one.
fn within(err: GgufFormatError, owner: &str) -> GgufFormatError {
    match err {
        GgufFormatError::Truncated { what, offset, name: None } => GgufFormatError::Truncated {
            what,
            offset,
            name: Some(owner.to_owned()),
        },
        GgufFormatError::StringTooLong { what, offset, len, max, name: None } => GgufFormatError::StringTooLong {
            what,
            offset,
            len,
            max,
            name: Some(owner.to_owned()),
        },
        GgufFormatError::InvalidUtf8 { what, offset, text, name: None } => GgufFormatError::InvalidUtf8 {
            what,
            offset,
            text,
            name: Some(owner.to_owned()),
        },
        other => other,
    }
}

fn type_label(type_id: u32, type_name: Option<&'static str>) -> String {
    match type_name {
        Some(name) => format!("{name} (id {type_id})"),
        None => format!("unknown id {type_id}"),
    }
}

/// Validates a whole GGUF file held in memory and summarises its structure.
///
/// Checks, in file order: magic `GGUF`; version 2 or 3; tensor and KV counts within `limits`;
/// every KV (non-empty bounded UTF-8 key, unique after candle's trailing-NUL trimming, known
/// value type, bools 0/1, bounded UTF-8 strings, arrays bounded in length and depth and no longer
/// than the rest of the file can hold) while charging the metadata budget; `general.alignment`,
/// if present, a `u32` non-zero power of two; every tensor info (unique non-empty UTF-8 name of
/// at most [`MAX_TENSOR_NAME_BYTES`], 1..=4 dims, each non-zero and ≤ i64::MAX, a type candle can load,
/// `ne[0]` a multiple of its block, element count ≤ i64::MAX and byte size by checked products);
/// each tensor offset equal to the running sum of the previous sizes padded to the alignment;
/// and all tensor data inside the file.
///
/// Errors: the first defect found, as a [`GgufFormatError`]. Never panics or allocates more than a
/// small multiple of the header's size.
pub fn validate_gguf(bytes: &[u8], limits: &GgufLimits) -> Result<GgufSummary, GgufFormatError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let version = read_preamble(&mut cur)?;
    let n_tensors = cur.u64("tensor count")?;
    let n_kv = cur.u64("metadata count")?;
    if n_tensors > limits.max_tensors {
        return Err(GgufFormatError::TooManyTensors {
            count: n_tensors,
            max: limits.max_tensors,
        });
    }
    if n_kv > limits.max_kv {
        return Err(GgufFormatError::TooManyKv {
            count: n_kv,
            max: limits.max_kv,
        });
    }
    // Counts the file cannot possibly hold are truncation, reported before misparsing anything.
    let min_header = n_kv
        .checked_mul(MIN_KV_BYTES)
        .zip(n_tensors.checked_mul(MIN_INFO_BYTES))
        .and_then(|(kvs, infos)| kvs.checked_add(infos));
    if min_header.is_none_or(|n| n > cur.remaining()) {
        return Err(cur.truncated("metadata and tensor infos"));
    }
    let mut budget = Budget {
        used: 0,
        limit: limits.max_metadata_bytes,
    };
    let alignment = read_kvs(&mut cur, n_kv, limits, &mut budget)?;
    let infos = read_tensor_infos(&mut cur, n_tensors, limits, &mut budget)?;
    let header_end = cur.offset();
    let data_offset = pad(header_end, alignment).ok_or(GgufFormatError::DataOffsetOverflow {
        header_end,
        alignment,
    })?;
    check_data_layout(&infos, alignment, data_offset, cur.len())?;
    Ok(GgufSummary {
        version,
        alignment,
        data_offset,
        tensors: infos,
        n_kv,
    })
}

fn read_preamble(cur: &mut Cursor<'_>) -> Result<u32, GgufFormatError> {
    let magic = cur.take(4, "magic")?;
    let found: [u8; 4] = magic.try_into().map_err(|_| cur.truncated("magic"))?;
    if found != GGUF_MAGIC {
        return Err(GgufFormatError::BadMagic { found });
    }
    let version = cur.u32("version")?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(GgufFormatError::UnsupportedVersion { version });
    }
    Ok(version)
}

/// Reads all KVs; returns the data alignment they declare (or the default).
fn read_kvs(
    cur: &mut Cursor<'_>,
    n_kv: u64,
    limits: &GgufLimits,
    budget: &mut Budget,
) -> Result<u64, GgufFormatError> {
    let mut keys: HashSet<&str> = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key_offset = cur.offset();
        let key = candle_name(cur.string(limits.max_string_len, "metadata key")?);
        if key.is_empty() {
            return Err(GgufFormatError::EmptyName {
                what: "metadata key",
                offset: key_offset,
            });
        }
        // candle keeps a `HashMap<String, Value>`: key header + bytes, one `Value`, map slack.
        budget.charge(
            STRING_BYTES
                .saturating_add(len_u64(key.len()))
                .saturating_add(VALUE_BYTES)
                .saturating_add(2 * ALLOC_OVERHEAD),
        )?;
        if !keys.insert(key) {
            return Err(GgufFormatError::DuplicateKey {
                key: key.to_owned(),
            });
        }
        let type_id = cur.u32("metadata value type").map_err(|e| within(e, key))?;
        if key == ALIGNMENT_KEY {
            // llama.cpp requires u32 here; candle would silently fall back to 32 for u64/f32/....
            if type_id != TYPE_U32 {
                return Err(GgufFormatError::AlignmentNotU32 { type_id });
            }
            alignment = u64::from(cur.u32("general.alignment").map_err(|e| within(e, key))?);
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(GgufFormatError::BadAlignment { alignment });
            }
        } else {
            skip_value(cur, type_id, key, limits, budget, 0).map_err(|e| within(e, key))?;
        }
    }
    Ok(alignment)
}

/// Walks one value of `type_id`, charging its heap cost (the `Value` itself is charged by the
/// caller).
fn skip_value(
    cur: &mut Cursor<'_>,
    type_id: u32,
    key: &str,
    limits: &GgufLimits,
    budget: &mut Budget,
    depth: u32,
) -> Result<(), GgufFormatError> {
    match type_id {
        TYPE_BOOL => check_bools(cur.take(1, "metadata bool")?, key),
        TYPE_STRING => {
            let s = cur.string(limits.max_string_len, "metadata string value")?;
            budget.charge(len_u64(s.len()).saturating_add(ALLOC_OVERHEAD))
        }
        TYPE_ARRAY => skip_array(cur, key, limits, budget, depth),
        _ => {
            let size = fixed_size(type_id).ok_or_else(|| GgufFormatError::UnknownValueType {
                key: key.to_owned(),
                type_id,
            })?;
            cur.take(size, "metadata value").map(|_| ())
        }
    }
}

fn skip_array(
    cur: &mut Cursor<'_>,
    key: &str,
    limits: &GgufLimits,
    budget: &mut Budget,
    depth: u32,
) -> Result<(), GgufFormatError> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufFormatError::ArrayTooDeep {
            key: key.to_owned(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    let elem_type = cur.u32("metadata array type")?;
    let min_elem_size =
        min_disk_size(elem_type).ok_or_else(|| GgufFormatError::UnknownValueType {
            key: key.to_owned(),
            type_id: elem_type,
        })?;
    let start = cur.offset();
    let len = cur.u64("metadata array length")?;
    if len > limits.max_array_len {
        return Err(GgufFormatError::ArrayTooLong {
            key: key.to_owned(),
            len,
            max: limits.max_array_len,
        });
    }
    // Reject lengths the file cannot hold before charging or looping over them.
    let min_bytes = len.checked_mul(min_elem_size);
    if min_bytes.is_none_or(|n| n > cur.remaining()) {
        return Err(GgufFormatError::Truncated {
            what: "metadata array",
            offset: start,
            name: Some(key.to_owned()),
        });
    }
    // candle decodes every element into its own `Value`.
    budget.charge(
        len.saturating_mul(VALUE_BYTES)
            .saturating_add(ALLOC_OVERHEAD),
    )?;
    match elem_type {
        TYPE_BOOL => check_bools(cur.take(len, "metadata array")?, key),
        TYPE_STRING | TYPE_ARRAY => {
            for _ in 0..len {
                skip_value(cur, elem_type, key, limits, budget, depth.saturating_add(1))?;
            }
            Ok(())
        }
        _ => cur
            .take(min_bytes.unwrap_or(u64::MAX), "metadata array")
            .map(|_| ()),
    }
}

fn check_bools(bytes: &[u8], key: &str) -> Result<(), GgufFormatError> {
    match bytes.iter().find(|&&b| b > 1) {
        Some(&value) => Err(GgufFormatError::BadBool {
            key: key.to_owned(),
            value,
        }),
        None => Ok(()),
    }
}

/// On-disk size of a fixed-size value type.
fn fixed_size(type_id: u32) -> Option<u64> {
    match type_id {
        TYPE_U8 | TYPE_I8 | TYPE_BOOL => Some(1),
        TYPE_U16 | TYPE_I16 => Some(2),
        TYPE_U32 | TYPE_I32 | TYPE_F32 => Some(4),
        TYPE_U64 | TYPE_I64 | TYPE_F64 => Some(8),
        _ => None,
    }
}

/// Smallest on-disk size of one value of a type: a length prefix for strings, type and length for
/// arrays. `None` for unknown types.
fn min_disk_size(type_id: u32) -> Option<u64> {
    match type_id {
        TYPE_STRING => Some(8),
        TYPE_ARRAY => Some(12),
        _ => fixed_size(type_id),
    }
}

fn read_tensor_infos(
    cur: &mut Cursor<'_>,
    n_tensors: u64,
    limits: &GgufLimits,
    budget: &mut Budget,
) -> Result<Vec<GgufTensorSummary>, GgufFormatError> {
    // Never reserve more than the file can hold.
    let cap = n_tensors.min(cur.remaining() / MIN_INFO_BYTES);
    let mut infos = Vec::with_capacity(usize::try_from(cap).unwrap_or(0));
    let mut names: HashSet<&str> = HashSet::new();
    for _ in 0..n_tensors {
        let name = read_tensor_name(cur, limits)?;
        let (dims, type_id, offset) = read_tensor_fields(cur, name).map_err(|e| within(e, name))?;
        let n_dims = len_u64(dims.len());
        // candle keeps a `HashMap<String, TensorInfo>` with a `Shape` (a `Vec<usize>`) each.
        budget.charge(
            STRING_BYTES
                .saturating_add(len_u64(name.len()))
                .saturating_add(TENSOR_INFO_BYTES)
                .saturating_add(n_dims * 8)
                .saturating_add(3 * ALLOC_OVERHEAD),
        )?;
        if !names.insert(name) {
            return Err(GgufFormatError::DuplicateTensor {
                name: name.to_owned(),
            });
        }
        let n_bytes = tensor_n_bytes(name, &dims, type_id)?;
        infos.push(GgufTensorSummary {
            name: name.to_owned(),
            dims,
            type_id,
            offset,
            n_bytes,
        });
    }
    Ok(infos)
}

/// A tensor name: non-empty UTF-8 of at most [`MAX_TENSOR_NAME_BYTES`] (llama.cpp checks the
/// length as stored, before candle trims trailing NULs).
fn read_tensor_name<'a>(cur: &mut Cursor<'a>, limits: &GgufLimits) -> Result<&'a str, GgufFormatError> {
    let offset = cur.offset();
    let raw = cur.string(limits.max_string_len, "tensor name")?;
    let name = candle_name(raw);
    if name.is_empty() {
        return Err(GgufFormatError::EmptyName {
            what: "tensor name",
            offset,
        });
    }
    let len = len_u64(raw.len());
    if len > MAX_TENSOR_NAME_BYTES {
        return Err(GgufFormatError::TensorNameTooLong {
            name: name.to_owned(),
            len,
            max: MAX_TENSOR_NAME_BYTES,
        });
    }
    Ok(name)
}

/// The rest of a tensor info: dims (1..=4 of them), ggml type, data offset.
fn read_tensor_fields(cur: &mut Cursor<'_>, name: &str) -> Result<(Vec<u64>, u32, u64), GgufFormatError> {
    let n_dims = cur.u32("tensor dimension count")?;
    if n_dims == 0 {
        return Err(GgufFormatError::NoDims {
            name: name.to_owned(),
        });
    }
    if n_dims > MAX_DIMS {
        return Err(GgufFormatError::TooManyDims {
            name: name.to_owned(),
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(MAX_DIMS as usize);
    for _ in 0..n_dims {
        dims.push(cur.u64("tensor dimension")?);
    }
    let type_id = cur.u32("tensor type")?;
    let offset = cur.u64("tensor offset")?;
    Ok((dims, type_id, offset))
}

/// Checks one tensor's dims and type; returns its data size in bytes (`ggml_nbytes`).
fn tensor_n_bytes(name: &str, dims: &[u64], type_id: u32) -> Result<u64, GgufFormatError> {
    if dims.contains(&0) {
        return Err(GgufFormatError::ZeroDim {
            name: name.to_owned(),
            dims: dims.to_vec(),
        });
    }
    let i64_max = i64::MAX.unsigned_abs();
    if dims.iter().any(|&d| d > i64_max) {
        return Err(GgufFormatError::DimTooLarge {
            name: name.to_owned(),
            dims: dims.to_vec(),
        });
    }
    let info = ggml_type_info(type_id)
        .filter(|info| info.candle_supported)
        .ok_or_else(|| GgufFormatError::UnsupportedType {
            name: name.to_owned(),
            type_id,
            type_name: ggml_type_name(type_id),
            supported: SUPPORTED_TYPES,
        })?;
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % info.block_size != 0 {
        return Err(GgufFormatError::RowNotBlockMultiple {
            name: name.to_owned(),
            ne0,
            block: info.block_size,
        });
    }
    let overflow = || GgufFormatError::SizeOverflow {
        name: name.to_owned(),
    };
    // ggml counts elements in int64_t; llama.cpp rejects files whose product exceeds INT64_MAX.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64_max)
        .ok_or_else(overflow)?;
    let row_bytes = (ne0 / info.block_size)
        .checked_mul(info.type_size)
        .ok_or_else(overflow)?;
    let n_bytes = dims
        .iter()
        .skip(1)
        .try_fold(row_bytes, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    // candle sizes buffers in `usize`.
    if usize::try_from(n_bytes).is_err() || usize::try_from(n_elements).is_err() {
        return Err(overflow());
    }
    Ok(n_bytes)
}

/// Applies llama.cpp's layout rule: tensor `i` starts at the sum of the sizes of tensors `0..i`,
/// each padded to the alignment, and every tensor's data lies inside the file.
fn check_data_layout(
    infos: &[GgufTensorSummary],
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<(), GgufFormatError> {
    let mut expected = 0u64;
    for info in infos {
        if info.offset != expected {
            return Err(GgufFormatError::BadOffset {
                name: info.name.clone(),
                expected,
                found: info.offset,
            });
        }
        let overflow = || GgufFormatError::SizeOverflow {
            name: info.name.clone(),
        };
        let end = expected.checked_add(info.n_bytes).ok_or_else(overflow)?;
        let needed = data_offset.checked_add(end).ok_or_else(overflow)?;
        if needed > file_len {
            return Err(GgufFormatError::DataTruncated {
                name: info.name.clone(),
                needed,
                file_len,
            });
        }
        expected = pad(end, alignment).ok_or_else(overflow)?;
    }
    Ok(())
}

/// Rounds `n` up to a multiple of `alignment` (non-zero), or `None` on overflow.
fn pad(n: u64, alignment: u64) -> Option<u64> {
    n.checked_next_multiple_of(alignment)
}

/// candle trims trailing NULs from every GGUF string ("in practice this happens"), so two names
/// differing only in those are the same key to it.
fn candle_name(s: &str) -> &str {
    s.trim_end_matches('\0')
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The running total of the metadata memory estimate.
struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    fn charge(&mut self, bytes: u64) -> Result<(), GgufFormatError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(GgufFormatError::MetadataBudget {
                used: self.used,
                budget: self.limit,
            });
        }
        Ok(())
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        len_u64(self.pos)
    }

    fn len(&self) -> u64 {
        len_u64(self.bytes.len())
    }

    fn remaining(&self) -> u64 {
        len_u64(self.bytes.len().saturating_sub(self.pos))
    }

    fn truncated(&self, what: &'static str) -> GgufFormatError {
        GgufFormatError::Truncated {
            what,
            offset: self.offset(),
            name: None,
        }
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufFormatError> {
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| self.truncated(what))?;
        self.pos = self.pos.saturating_add(slice.len());
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufFormatError> {
        let start = self.offset();
        let slice = self.take(N as u64, what)?;
        slice.try_into().map_err(|_| GgufFormatError::Truncated {
            what,
            offset: start,
            name: None,
        })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufFormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufFormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A `u64` length then that many UTF-8 bytes, at most `max`.
    fn string(&mut self, max: u64, what: &'static str) -> Result<&'a str, GgufFormatError> {
        let offset = self.offset();
        let len = self.u64(what)?;
        if len > max {
            return Err(GgufFormatError::StringTooLong {
                what,
                offset,
                len,
                max,
                name: None,
            });
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufFormatError::InvalidUtf8 {
            what,
            offset,
            text: String::from_utf8_lossy(&bytes[..bytes.len().min(QUOTE_BYTES)]).into_owned(),
            name: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn type_table_matches_candle() {
        let candle = [
            (0, GgmlDType::F32),
            (1, GgmlDType::F16),
            (2, GgmlDType::Q4_0),
            (3, GgmlDType::Q4_1),
            (6, GgmlDType::Q5_0),
            (7, GgmlDType::Q5_1),
            (8, GgmlDType::Q8_0),
            (9, GgmlDType::Q8_1),
            (10, GgmlDType::Q2K),
            (11, GgmlDType::Q3K),
            (12, GgmlDType::Q4K),
            (13, GgmlDType::Q5K),
            (14, GgmlDType::Q6K),
            (15, GgmlDType::Q8K),
            (30, GgmlDType::BF16),
        ];
        for (id, dtype) in candle {
            let info = ggml_type_info(id).expect("known id");
            assert_eq!(info.block_size, dtype.block_size() as u64, "{}", info.name);
            assert_eq!(info.type_size, dtype.type_size() as u64, "{}", info.name);
        }
    }

    #[test]
    fn supported_list_matches_table() {
        let listed: Vec<&str> = (0..64)
            .filter_map(ggml_type_info)
            .filter(|info| info.candle_supported)
            .map(|info| info.name)
            .collect();
        let mut expected: Vec<&str> = SUPPORTED_TYPES.split(", ").collect();
        let mut listed_sorted = listed.clone();
        listed_sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed_sorted, expected);
    }

    #[test]
    fn unsupported_type_message_names_everything() {
        let err = tensor_n_bytes("blk.0.attn_q.weight", &[32, 4], 20).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("blk.0.attn_q.weight"), "{msg}");
        assert!(msg.contains("IQ4_NL"), "{msg}");
        assert!(msg.contains(SUPPORTED_TYPES), "{msg}");
    }
}
