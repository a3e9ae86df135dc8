//! Pre-validation of safetensors headers before the bytes are used.
//!
//! safetensors 0.8.0 adds `buffer_end + 8 + n` unchecked (a debug-build panic for offsets near
//! 2^64) and parses the header into a `HashMap`, so a JSON object with a duplicated tensor name
//! silently keeps the last entry. [`validate_safetensors`] parses the header with its own serde
//! visitors that record every entry in order, then applies the format's rules with checked
//! arithmetic.
//!
//! Layout: `u64` little-endian header length `N`, `N` bytes of UTF-8 JSON
//! (`{"__metadata__": {..}, "<name>": {"dtype", "shape", "data_offsets": [begin, end]}, ..}`),
//! then the data, with offsets relative to its start.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Length of the little-endian header-size prefix.
const N_LEN: usize = 8;

/// safetensors' own `MAX_HEADER_SIZE`.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The reserved header key for free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// No real tensor has more dims; longer shape lists are rejected without being stored.
const MAX_SHAPE_DIMS: usize = 64;

/// Every dtype safetensors 0.8 knows, with its size in bits (`Dtype::bitsize`).
const DTYPES: [(&str, usize); 22] = [
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// One tensor entry that passed validation: its name, dtype name as written (`"BF16"`), shape,
/// and `[begin, end)` byte range relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsTensorSummary {
    /// The tensor's name, as the header's JSON key spells it.
    pub name: String,
    /// The dtype name as written in the header, e.g. `"BF16"`.
    pub dtype: String,
    /// The tensor's dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The `[begin, end)` byte range of its data, relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

/// A structural defect in a safetensors file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsFormatError {
    /// The file is shorter than the 8-byte header length prefix.
    #[error("file of {file_len} bytes is too short for the 8-byte header length")]
    HeaderTooSmall {
        /// The file's length in bytes.
        file_len: u64,
    },

    /// The header length prefix exceeds safetensors' 100 MB limit.
    #[error("header length {len} exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// The header length the prefix claims, in bytes.
        len: u64,
        /// The limit, in bytes.
        max: u64,
    },

    /// The header length prefix points past the end of the file.
    #[error("header length {len} runs past the end of the {file_len}-byte file")]
    HeaderPastEof {
        /// The header length the prefix claims, in bytes.
        len: u64,
        /// The file's length in bytes.
        file_len: u64,
    },

    /// The header bytes are not valid UTF-8.
    #[error("header is not valid UTF-8 (valid up to byte {valid_up_to})")]
    HeaderNotUtf8 {
        /// How many leading header bytes are valid UTF-8.
        valid_up_to: usize,
    },

    /// The header is not valid JSON.
    #[error("header is not valid JSON: {source}")]
    InvalidJson {
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// The header's JSON is not an object.
    #[error("header is not a JSON object")]
    HeaderNotObject,

    /// `__metadata__` is not a JSON object.
    #[error("`__metadata__` is not an object of strings")]
    MetadataNotObject,

    /// A `__metadata__` value that is not a string.
    #[error("`__metadata__` key `{key}` does not have a string value")]
    MetadataValueNotString {
        /// The metadata key.
        key: String,
    },

    /// A `__metadata__` key that occurs twice.
    #[error("`__metadata__` key `{key}` appears more than once")]
    DuplicateMetadataKey {
        /// The repeated key.
        key: String,
    },

    /// A tensor name that occurs twice in the header.
    #[error("tensor `{name}` appears more than once")]
    DuplicateTensor {
        /// The repeated tensor name.
        name: String,
    },

    /// A tensor entry whose value is not a JSON object.
    #[error("tensor `{name}` is not a JSON object")]
    TensorNotObject {
        /// The tensor's name.
        name: String,
    },

    /// A tensor entry with the same field twice.
    #[error("tensor `{name}` has field `{field}` more than once")]
    DuplicateField {
        /// The tensor's name.
        name: String,
        /// The repeated field name.
        field: String,
    },

    /// A tensor entry without `dtype`, `shape` or `data_offsets`.
    #[error("tensor `{name}` lacks field `{field}`")]
    MissingField {
        /// The tensor's name.
        name: String,
        /// The missing field name.
        field: &'static str,
    },

    /// A tensor field of the wrong JSON type or form.
    #[error("tensor `{name}` has a malformed `{field}`")]
    BadField {
        /// The tensor's name.
        name: String,
        /// The malformed field's name.
        field: &'static str,
    },

    /// A dtype name safetensors 0.8 does not define.
    #[error("tensor `{name}` has unknown dtype `{dtype}`")]
    UnknownDtype {
        /// The tensor's name.
        name: String,
        /// The dtype name found.
        dtype: String,
    },

    /// A tensor whose `data_offsets` begin after they end.
    #[error("tensor `{name}` has data_offsets [{begin}, {end}] with begin after end")]
    BadOffsets {
        /// The tensor's name.
        name: String,
        /// The start offset, relative to the data section.
        begin: u64,
        /// The end offset, relative to the data section.
        end: u64,
    },

    /// A tensor whose data runs past the end of the file.
    #[error("tensor `{name}` data ends at {end} but the data section has {data_len} bytes")]
    DataTruncated {
        /// The tensor's name.
        name: String,
        /// The end offset of its data, relative to the data section.
        end: u64,
        /// The data section's length in bytes.
        data_len: u64,
    },

    /// A tensor whose element count or byte size does not fit in 64 bits.
    #[error("tensor `{name}`: element count or byte size overflows")]
    SizeOverflow {
        /// The tensor's name.
        name: String,
    },

    /// A tensor of a sub-byte dtype whose bits do not fill whole bytes.
    #[error("tensor `{name}` of sub-byte dtype does not fill whole bytes")]
    PartialByte {
        /// The tensor's name.
        name: String,
    },

    /// A tensor whose byte range does not match its shape and dtype.
    #[error(
        "tensor `{name}` needs {expected} bytes by shape and dtype, data_offsets span {found}"
    )]
    SizeMismatch {
        /// The tensor's name.
        name: String,
        /// Bytes the shape and dtype call for.
        expected: u64,
        /// Bytes its `data_offsets` span.
        found: u64,
    },

    /// Two tensors whose byte ranges overlap.
    #[error("tensor `{name}` overlaps tensor `{other}`")]
    Overlap {
        /// The later tensor, by offset.
        name: String,
        /// The tensor it overlaps (the one before it by offset).
        other: String,
    },

    /// Bytes between two tensors that no tensor covers.
    #[error("tensor `{name}` starts at {found}, leaving a gap after byte {expected}")]
    Gap {
        /// The tensor after the gap.
        name: String,
        /// Where the previous tensor ends, relative to the data section.
        expected: u64,
        /// Where this tensor starts, relative to the data section.
        found: u64,
    },

    /// Bytes after the last tensor that no tensor covers.
    #[error("tensors cover {covered} bytes but the data section has {data_len}")]
    TrailingData {
        /// Bytes the tensors cover from the start of the data section.
        covered: u64,
        /// The data section's length in bytes.
        data_len: u64,
    },
}

type Result<T> = std::result::Result<T, SafetensorsFormatError>;

/// Validates a whole safetensors file held in memory; returns its tensors sorted by offset.
///
/// Checks: the 8-byte header length fits the file and is at most 100 MB; the header is UTF-8 JSON
/// (nothing but whitespace after it) holding an object; `__metadata__`, if present, is null or an
/// object of strings; every other key is a tensor (names and fields unique — duplicates are
/// errors, not last-wins) with a known dtype, a shape of non-negative integers, and
/// `data_offsets` `[begin, end]` with `begin ≤ end ≤` data length; the shape's element count times
/// the dtype size equals `end − begin` (checked products); and the tensors tile the data section
/// exactly — no overlap, no gap, no trailing bytes — as safetensors itself requires.
///
/// Errors: the first defect found, as a [`SafetensorsFormatError`]. Never panics.
pub fn validate_safetensors(bytes: &[u8]) -> Result<Vec<SafetensorsTensorSummary>> {
    let (header, data_len) = split_header(bytes)?;
    let mut de = serde_json::Deserializer::from_str(header);
    let parsed = Node::deserialize(&mut de).and_then(|node| de.end().map(|()| node));
    let entries = match parsed.map_err(|source| SafetensorsFormatError::InvalidJson { source })? {
        Node::Object(entries) => entries,
        _ => return Err(SafetensorsFormatError::HeaderNotObject),
    };
    let mut names: HashSet<&str> = HashSet::new();
    let mut tensors = Vec::new();
    for (name, value) in &entries {
        if !names.insert(name) {
            return Err(if name == METADATA_KEY {
                SafetensorsFormatError::DuplicateMetadataKey { key: name.clone() }
            } else {
                SafetensorsFormatError::DuplicateTensor { name: name.clone() }
            });
        }
        if name == METADATA_KEY {
            check_metadata(value)?;
        } else {
            tensors.push(check_tensor(name, value, data_len)?);
        }
    }
    check_tiling(&mut tensors, data_len)?;
    Ok(tensors)
}

/// Returns the header text and the length of the data section after it.
fn split_header(bytes: &[u8]) -> Result<(&str, u64)> {
    let file_len = len_u64(bytes.len());
    let prefix: [u8; N_LEN] = bytes
        .get(..N_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(SafetensorsFormatError::HeaderTooSmall { file_len })?;
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES {
        return Err(SafetensorsFormatError::HeaderTooLarge {
            len,
            max: MAX_HEADER_BYTES,
        });
    }
    let past_eof = SafetensorsFormatError::HeaderPastEof { len, file_len };
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| len.checked_add(N_LEN))
        .ok_or(SafetensorsFormatError::HeaderTooLarge {
            len,
            max: MAX_HEADER_BYTES,
        })?;
    let header = bytes.get(N_LEN..end).ok_or(past_eof)?;
    let header =
        std::str::from_utf8(header).map_err(|e| SafetensorsFormatError::HeaderNotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
    let data_len = len_u64(bytes.len().saturating_sub(end));
    Ok((header, data_len))
}

fn check_metadata(value: &Node) -> Result<()> {
    let entries = match value {
        Node::Null => return Ok(()),
        Node::Object(entries) => entries,
        _ => return Err(SafetensorsFormatError::MetadataNotObject),
    };
    let mut keys: HashSet<&str> = HashSet::new();
    for (key, value) in entries {
        if !keys.insert(key) {
            return Err(SafetensorsFormatError::DuplicateMetadataKey { key: key.clone() });
        }
        if !matches!(value, Node::Str(_)) {
            return Err(SafetensorsFormatError::MetadataValueNotString { key: key.clone() });
        }
    }
    Ok(())
}

/// Checks one tensor entry on its own: fields, dtype, offsets within the data, size agreement.
fn check_tensor(name: &str, value: &Node, data_len: u64) -> Result<SafetensorsTensorSummary> {
    let Node::Object(fields) = value else {
        return Err(SafetensorsFormatError::TensorNotObject {
            name: name.to_owned(),
        });
    };
    let mut seen: HashSet<&str> = HashSet::new();
    for (field, _) in fields {
        if !seen.insert(field) {
            return Err(SafetensorsFormatError::DuplicateField {
                name: name.to_owned(),
                field: field.clone(),
            });
        }
    }
    let get = |field: &'static str| {
        fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v)
            .ok_or_else(|| SafetensorsFormatError::MissingField {
                name: name.to_owned(),
                field,
            })
    };
    let bad = |field: &'static str| SafetensorsFormatError::BadField {
        name: name.to_owned(),
        field,
    };
    let Node::Str(dtype) = get("dtype")? else {
        return Err(bad("dtype"));
    };
    let bits = DTYPES
        .iter()
        .find(|(d, _)| d == dtype)
        .map(|&(_, bits)| bits)
        .ok_or_else(|| SafetensorsFormatError::UnknownDtype {
            name: name.to_owned(),
            dtype: dtype.clone(),
        })?;
    let shape = match get("shape")? {
        Node::Nums(nums) => to_usizes(nums).ok_or_else(|| bad("shape"))?,
        _ => return Err(bad("shape")),
    };
    let (begin, end) = match get("data_offsets")? {
        Node::Nums(nums) => match nums.as_slice() {
            [Some(begin), Some(end)] => (*begin, *end),
            _ => return Err(bad("data_offsets")),
        },
        _ => return Err(bad("data_offsets")),
    };
    check_span(name, &shape, bits, begin, end, data_len)?;
    let overflow = || SafetensorsFormatError::SizeOverflow {
        name: name.to_owned(),
    };
    let begin_usize = usize::try_from(begin).map_err(|_| overflow())?;
    let end_usize = usize::try_from(end).map_err(|_| overflow())?;
    Ok(SafetensorsTensorSummary {
        name: name.to_owned(),
        dtype: dtype.clone(),
        shape,
        data_offsets: (begin_usize, end_usize),
    })
}

/// `begin ≤ end ≤ data_len` and `product(shape) × bits / 8 == end − begin`, all checked.
fn check_span(
    name: &str,
    shape: &[usize],
    bits: usize,
    begin: u64,
    end: u64,
    data_len: u64,
) -> Result<()> {
    if begin > end {
        return Err(SafetensorsFormatError::BadOffsets {
            name: name.to_owned(),
            begin,
            end,
        });
    }
    if end > data_len {
        return Err(SafetensorsFormatError::DataTruncated {
            name: name.to_owned(),
            end,
            data_len,
        });
    }
    let n_bits = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(bits))
        .ok_or_else(|| SafetensorsFormatError::SizeOverflow {
            name: name.to_owned(),
        })?;
    if n_bits % 8 != 0 {
        return Err(SafetensorsFormatError::PartialByte {
            name: name.to_owned(),
        });
    }
    let expected = len_u64(n_bits / 8);
    let found = end.saturating_sub(begin);
    if expected != found {
        return Err(SafetensorsFormatError::SizeMismatch {
            name: name.to_owned(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Sorts by offset and requires the tensors to cover `[0, data_len)` exactly once.
fn check_tiling(tensors: &mut [SafetensorsTensorSummary], data_len: u64) -> Result<()> {
    tensors.sort_by_key(|t| t.data_offsets);
    let mut covered = 0u64;
    let mut prev: Option<&SafetensorsTensorSummary> = None;
    for t in tensors.iter() {
        let (begin, end) = (len_u64(t.data_offsets.0), len_u64(t.data_offsets.1));
        if begin < covered {
            return Err(SafetensorsFormatError::Overlap {
                name: t.name.clone(),
                other: prev.map(|p| p.name.clone()).unwrap_or_default(),
            });
        }
        if begin > covered {
            return Err(SafetensorsFormatError::Gap {
                name: t.name.clone(),
                expected: covered,
                found: begin,
            });
        }
        covered = end;
        prev = Some(t);
    }
    if covered != data_len {
        return Err(SafetensorsFormatError::TrailingData { covered, data_len });
    }
    Ok(())
}

fn to_usizes(nums: &[Option<u64>]) -> Option<Vec<usize>> {
    nums.iter()
        .map(|n| n.and_then(|n| usize::try_from(n).ok()))
        .collect()
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A JSON value classified just enough for the header rules. Objects keep every entry in order,
/// duplicates included; arrays keep (at most [`MAX_SHAPE_DIMS`] + 1) non-negative integers, with
/// `None` for any other element.
#[derive(Debug)]
enum Node {
    Object(Vec<(String, Node)>),
    Nums(Vec<Option<u64>>),
    Str(String),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Node::Object(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Node, A::Error> {
        let mut nums = Vec::new();
        while let Some(n) = seq.next_element::<MaybeU64>()? {
            if nums.len() <= MAX_SHAPE_DIMS {
                nums.push(n.0);
            }
        }
        // An over-long list keeps one `None` past the limit, so it fails every numeric check.
        if nums.len() > MAX_SHAPE_DIMS {
            nums.truncate(MAX_SHAPE_DIMS);
            nums.push(None);
        }
        Ok(Node::Nums(nums))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Node, E> {
        Ok(Node::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Node, E> {
        Ok(Node::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Node, E> {
        Ok(Node::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Node, E> {
        Ok(Node::Other)
    }
}

/// An array element: `Some` for a JSON integer in `0..=u64::MAX`, `None` for anything else (which
/// is consumed without being stored).
struct MaybeU64(Option<u64>);

impl<'de> Deserialize<'de> for MaybeU64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(MaybeU64Visitor)
    }
}

struct MaybeU64Visitor;

impl<'de> Visitor<'de> for MaybeU64Visitor {
    type Value = MaybeU64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(u64::try_from(v).ok()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(None))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<MaybeU64, E> {
        Ok(MaybeU64(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<MaybeU64, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MaybeU64(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<MaybeU64, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(MaybeU64(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_sizes_match_safetensors() {
        for (name, bits) in DTYPES {
            let json = format!("\"{name}\"");
            let dtype: safetensors::Dtype = serde_json::from_str(&json).expect(name);
            assert_eq!(dtype.bitsize(), bits, "{name}");
        }
    }

    #[test]
    fn long_shape_is_rejected_without_storing_it() {
        let dims = vec!["1"; 10_000].join(",");
        let header = format!(r#"{{"t":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.push(0);
        let err = validate_safetensors(&bytes).unwrap_err();
        assert!(
            matches!(err, SafetensorsFormatError::BadField { field: "shape", .. }),
            "{err}"
        );
    }
}
