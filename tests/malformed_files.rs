//! Crafted malformed GGUF and safetensors files: each must be rejected by the pre-validators with
//! the specific error variant, never a panic. The files are built byte by byte here; the valid ones
//! are also checked against candle's and safetensors' own readers.

use std::io::Cursor;

use metal_candle::loader::gguf_validate::{
    ggml_type_info, ggml_type_name, validate_gguf, GgufFormatError as G, GgufLimits,
    SUPPORTED_TYPES,
};
use metal_candle::loader::safetensors_validate::{
    validate_safetensors, SafetensorsFormatError as S,
};

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer.

const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

/// One encoded KV: key, value type, value payload.
fn kv(key: &[u8], type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, key);
    out.extend_from_slice(&type_id.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn kv_u32(key: &str, v: u32) -> Vec<u8> {
    kv(key.as_bytes(), T_U32, &v.to_le_bytes())
}

fn kv_str(key: &str, v: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    put_str(&mut payload, v.as_bytes());
    kv(key.as_bytes(), T_STRING, &payload)
}

/// Array payload: element type, length, then the raw element bytes.
fn array_payload(elem_type: u32, len: u64, elems: &[u8]) -> Vec<u8> {
    let mut out = elem_type.to_le_bytes().to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(elems);
    out
}

#[derive(Clone)]
struct Tensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    type_id: u32,
    /// `None`: the correct running padded offset.
    offset: Option<u64>,
}

fn tensor(name: &str, dims: &[u64], type_id: u32) -> Tensor {
    Tensor {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        type_id,
        offset: None,
    }
}

#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Tensor>,
    /// The alignment used for the layout (declare it with a `general.alignment` KV).
    alignment: u64,
}

fn pad(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// Data size of a well-formed tensor, 0 for types or dims the writer cannot size.
fn n_bytes(t: &Tensor) -> u64 {
    let Some(info) = ggml_type_info(t.type_id) else {
        return 0;
    };
    let Some(&ne0) = t.dims.first() else { return 0 };
    let rest = t
        .dims
        .iter()
        .skip(1)
        .try_fold(1u64, |a, &d| a.checked_mul(d));
    let row = (ne0 / info.block_size).checked_mul(info.type_size);
    match rest.and_then(|r| row?.checked_mul(r)) {
        Some(n) if n < (1 << 24) => n,
        _ => 0,
    }
}

impl Gguf {
    fn new() -> Self {
        Gguf {
            magic: *b"GGUF",
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    /// A small valid model: assorted metadata and tensors of four types whose sizes need padding.
    fn valid() -> Self {
        let mut tokens = Vec::new();
        for t in ["<s>", "</s>", "hello", "wörld"] {
            put_str(&mut tokens, t.as_bytes());
        }
        let scores: Vec<u8> = [0.0f32, -1.0, -2.5, -3.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let mut g = Gguf::new();
        g.kvs = vec![
            kv_str("general.architecture", "llama"),
            kv_u32("llama.block_count", 1),
            kv(b"general.file_type", T_U64, &7u64.to_le_bytes()),
            kv(b"tokenizer.ggml.add_bos_token", T_BOOL, &[1]),
            kv(
                b"tokenizer.ggml.tokens",
                T_ARRAY,
                &array_payload(T_STRING, 4, &tokens),
            ),
            kv(
                b"tokenizer.ggml.scores",
                T_ARRAY,
                &array_payload(T_F32, 4, &scores),
            ),
        ];
        g.tensors = vec![
            tensor("token_embd.weight", &[8, 3], F32),
            tensor("blk.0.attn_q.weight", &[32, 3], Q8_0),
            tensor("output_norm.weight", &[5], F16),
            tensor("blk.0.ffn_down.weight", &[256, 2], Q4_K),
        ];
        g
    }

    fn build(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            out.extend_from_slice(kv);
        }
        let mut running = 0u64;
        let mut layout = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            let offset = t.offset.unwrap_or(running);
            out.extend_from_slice(&offset.to_le_bytes());
            layout.push((offset, n_bytes(t)));
            running = pad(offset + n_bytes(t), self.alignment);
        }
        let data_start = pad(out.len() as u64, self.alignment);
        // No padding after the last tensor, so every strict prefix of a valid file is invalid.
        let data_end = layout.iter().map(|&(o, n)| o + n).max().unwrap_or(0);
        out.resize((data_start + data_end) as usize, 0);
        for (i, &(o, n)) in layout.iter().enumerate() {
            for b in 0..n {
                out[(data_start + o + b) as usize] =
                    (i as u8).wrapping_mul(31).wrapping_add(b as u8);
            }
        }
        out
    }
}

fn check(bytes: &[u8]) -> Result<metal_candle::loader::gguf_validate::GgufSummary, G> {
    validate_gguf(bytes, &GgufLimits::default())
}

fn gguf_err(g: &Gguf) -> G {
    match check(&g.build()) {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => e,
    }
}

fn with_kv(extra: Vec<u8>) -> Gguf {
    let mut g = Gguf::valid();
    g.kvs.push(extra);
    g
}

fn with_tensor(t: Tensor) -> Gguf {
    let mut g = Gguf::valid();
    g.tensors.insert(1, t);
    g
}

// ---------------------------------------------------------------------------------------------
// Valid GGUF files.

#[test]
fn gguf_valid_file_validates_and_candle_reads_it() {
    let bytes = Gguf::valid().build();
    let s = check(&bytes).unwrap();
    assert_eq!(s.version, 3);
    assert_eq!(s.alignment, 32);
    assert_eq!(s.n_kv, 6);
    assert_eq!(s.data_offset % 32, 0);
    let names: Vec<&str> = s.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_q.weight",
            "output_norm.weight",
            "blk.0.ffn_down.weight"
        ]
    );
    let sizes: Vec<u64> = s.tensors.iter().map(|t| t.n_bytes).collect();
    assert_eq!(sizes, [96, 102, 10, 288]);
    let offsets: Vec<u64> = s.tensors.iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 96, 224, 256]);
    assert_eq!(s.tensors[0].dims, [8, 3]);

    let mut reader = Cursor::new(&bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    assert_eq!(content.tensor_data_offset, s.data_offset);
    for t in &s.tensors {
        let q = content
            .tensor(&mut reader, &t.name, &candle_core::Device::Cpu)
            .unwrap();
        let mut dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        dims.reverse();
        assert_eq!(q.shape().dims(), dims.as_slice());
    }
}

#[test]
fn gguf_version_2_and_larger_alignment_validate() {
    let mut g = Gguf::valid();
    g.version = 2;
    g.alignment = 64;
    g.kvs.push(kv_u32("general.alignment", 64));
    let bytes = g.build();
    let s = check(&bytes).unwrap();
    assert_eq!((s.version, s.alignment), (2, 64));
    assert_eq!(s.data_offset % 64, 0);
    let offsets: Vec<u64> = s.tensors.iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 128, 256, 320]);
    let mut reader = Cursor::new(&bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    assert_eq!(content.tensor_data_offset, s.data_offset);
}

#[test]
fn gguf_written_by_candle_validates() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 64.0, &dev)
        .unwrap()
        .reshape((2, 32))
        .unwrap();
    let b = Tensor::arange(0f32, 512.0, &dev)
        .unwrap()
        .reshape((2, 256))
        .unwrap();
    let qa = QTensor::quantize(&a, GgmlDType::Q8_0).unwrap();
    let qb = QTensor::quantize(&b, GgmlDType::Q4K).unwrap();
    let qc = QTensor::quantize(&a, GgmlDType::F16).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let vocab = gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()); 3]);
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(
        &mut out,
        &[
            ("general.architecture", &arch),
            ("tokenizer.ggml.tokens", &vocab),
        ],
        &[("a", &qa), ("b", &qb), ("c", &qc)],
    )
    .unwrap();
    let s = check(out.get_ref()).unwrap();
    assert_eq!(s.version, 2);
    assert_eq!(s.tensors.len(), 3);
    assert_eq!(s.tensors[1].dims, [256, 2]);
    assert_eq!(s.tensors[1].type_id, 12);
}

#[test]
fn gguf_type_table() {
    assert_eq!(ggml_type_name(20), Some("IQ4_NL"));
    assert_eq!(ggml_type_name(39), Some("MXFP4"));
    assert_eq!(ggml_type_name(4), None);
    assert_eq!(ggml_type_name(99), None);
    let q8 = ggml_type_info(8).unwrap();
    assert_eq!(
        (q8.block_size, q8.type_size, q8.candle_supported),
        (32, 34, true)
    );
    let bf16 = ggml_type_info(30).unwrap();
    assert_eq!(
        (bf16.block_size, bf16.type_size, bf16.candle_supported),
        (1, 2, true)
    );
    assert!(
        !ggml_type_info(9).unwrap().candle_supported,
        "candle cannot load Q8_1 tensors"
    );
    assert!(SUPPORTED_TYPES.contains("Q6_K"));
}

// ---------------------------------------------------------------------------------------------
// Header.

#[test]
fn gguf_magic_fugg() {
    let mut g = Gguf::valid();
    g.magic = *b"FUGG";
    assert!(matches!(gguf_err(&g), G::BadMagic { found } if &found == b"FUGG"));
}

#[test]
fn gguf_version_1() {
    let mut g = Gguf::valid();
    g.version = 1;
    assert!(matches!(gguf_err(&g), G::UnsupportedVersion { version: 1 }));
}

#[test]
fn gguf_version_big_endian() {
    let mut g = Gguf::valid();
    g.version = 3u32.swap_bytes();
    assert!(matches!(gguf_err(&g), G::UnsupportedVersion { .. }));
}

#[test]
fn gguf_absurd_tensor_and_kv_counts() {
    let mut bytes = Gguf::valid().build();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        check(&bytes),
        Err(G::TooManyTensors {
            count: u64::MAX,
            ..
        })
    ));
    let mut bytes = Gguf::valid().build();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        check(&bytes),
        Err(G::TooManyKv {
            count: u64::MAX,
            ..
        })
    ));
    // Within the limits but far more than the file holds.
    let mut bytes = Gguf::valid().build();
    bytes[16..24].copy_from_slice(&1000u64.to_le_bytes());
    assert!(matches!(check(&bytes), Err(G::Truncated { .. })));
}

#[test]
fn gguf_every_prefix_is_an_error() {
    let bytes = Gguf::valid().build();
    for len in 0..bytes.len() {
        assert!(
            check(&bytes[..len]).is_err(),
            "prefix of {len} bytes validated"
        );
    }
    assert!(check(&bytes).is_ok());
}

#[test]
fn gguf_truncated_header_is_truncated() {
    let bytes = Gguf::valid().build();
    assert!(matches!(
        check(&bytes[..3]),
        Err(G::Truncated { what: "magic", .. })
    ));
    assert!(matches!(check(&bytes[..30]), Err(G::Truncated { .. })));
}

// ---------------------------------------------------------------------------------------------
// Metadata.

#[test]
fn gguf_duplicate_key() {
    let g = with_kv(kv_str("general.architecture", "qwen2"));
    assert!(matches!(gguf_err(&g), G::DuplicateKey { key } if key == "general.architecture"));
}

#[test]
fn gguf_duplicate_key_after_nul_trimming() {
    // candle trims trailing NULs, so this is the same key to it.
    let g = with_kv(kv(b"llama.block_count\0", T_U32, &2u32.to_le_bytes()));
    assert!(matches!(gguf_err(&g), G::DuplicateKey { key } if key == "llama.block_count"));
}

#[test]
fn gguf_invalid_utf8_key() {
    let g = with_kv(kv(b"general.\xff\xfe", T_U32, &1u32.to_le_bytes()));
    assert!(matches!(
        gguf_err(&g),
        G::InvalidUtf8 {
            what: "metadata key",
            ..
        }
    ));
}

#[test]
fn gguf_invalid_utf8_string_value() {
    let mut payload = Vec::new();
    put_str(&mut payload, b"caf\xc3");
    let g = with_kv(kv(b"general.name", T_STRING, &payload));
    assert!(matches!(
        gguf_err(&g),
        G::InvalidUtf8 {
            what: "metadata string value",
            ..
        }
    ));
}

#[test]
fn gguf_huge_string_length() {
    let g = with_kv(kv(b"general.name", T_STRING, &u64::MAX.to_le_bytes()));
    assert!(matches!(
        gguf_err(&g),
        G::StringTooLong { len: u64::MAX, .. }
    ));
    // Below the limit but past the end of the file.
    let g = with_kv(kv(b"general.name", T_STRING, &(1u64 << 20).to_le_bytes()));
    assert!(matches!(gguf_err(&g), G::Truncated { .. }));
}

#[test]
fn gguf_unknown_value_type() {
    let g = with_kv(kv(b"general.weird", 13, &[0; 8]));
    assert!(matches!(
        gguf_err(&g),
        G::UnknownValueType { type_id: 13, .. }
    ));
    let g = with_kv(kv(
        b"general.weird",
        T_ARRAY,
        &array_payload(77, 1, &[0; 8]),
    ));
    assert!(matches!(
        gguf_err(&g),
        G::UnknownValueType { type_id: 77, .. }
    ));
}

#[test]
fn gguf_bad_bool() {
    let g = with_kv(kv(b"general.flag", T_BOOL, &[2]));
    assert!(matches!(gguf_err(&g), G::BadBool { value: 2, .. }));
    let g = with_kv(kv(
        b"general.flags",
        T_ARRAY,
        &array_payload(T_BOOL, 3, &[0, 1, 7]),
    ));
    assert!(matches!(gguf_err(&g), G::BadBool { value: 7, .. }));
}

#[test]
fn gguf_huge_array_length() {
    let g = with_kv(kv(
        b"tokenizer.ggml.merges",
        T_ARRAY,
        &array_payload(T_U8, u64::MAX, &[]),
    ));
    assert!(matches!(
        gguf_err(&g),
        G::ArrayTooLong { len: u64::MAX, .. }
    ));
    // Within the length limit but not present in the file.
    let g = with_kv(kv(
        b"tokenizer.ggml.merges",
        T_ARRAY,
        &array_payload(T_STRING, 1 << 24, &[]),
    ));
    assert!(matches!(
        gguf_err(&g),
        G::Truncated {
            what: "metadata array",
            ..
        }
    ));
}

#[test]
fn gguf_16_mib_array_exceeds_the_metadata_budget() {
    // 16 MiB on disk, ~512 MiB as candle `Value`s.
    let len = 16u64 << 20;
    let g = with_kv(kv(
        b"general.blob",
        T_ARRAY,
        &array_payload(T_U8, len, &vec![0; len as usize]),
    ));
    match gguf_err(&g) {
        G::MetadataBudget { used, budget } => {
            assert_eq!(budget, 64 << 20);
            assert!(used >= len * 32, "charged only {used}");
        }
        e => panic!("unexpected {e:?}"),
    }
    // The same array passes with a budget that covers it.
    let limits = GgufLimits {
        max_metadata_bytes: 1 << 30,
        ..GgufLimits::default()
    };
    assert!(validate_gguf(&g.build(), &limits).is_ok());
}

#[test]
fn gguf_many_small_strings_are_charged() {
    let mut elems = Vec::new();
    for _ in 0..1000 {
        put_str(&mut elems, b"tok");
    }
    let g = with_kv(kv(
        b"tokenizer.ggml.tokens2",
        T_ARRAY,
        &array_payload(T_STRING, 1000, &elems),
    ));
    let limits = GgufLimits {
        max_metadata_bytes: 32_000,
        ..GgufLimits::default()
    };
    assert!(matches!(
        validate_gguf(&g.build(), &limits),
        Err(G::MetadataBudget { .. })
    ));
}

#[test]
fn gguf_nested_arrays() {
    // [[1, 2], [3]] as u32s is allowed.
    let mut inner = array_payload(T_U32, 2, &[1, 0, 0, 0, 2, 0, 0, 0]);
    inner.extend(array_payload(T_U32, 1, &[3, 0, 0, 0]));
    let g = with_kv(kv(
        b"general.nested",
        T_ARRAY,
        &array_payload(T_ARRAY, 2, &inner),
    ));
    assert!(check(&g.build()).is_ok());
    // 100 levels deep is not.
    let mut payload = array_payload(T_U8, 0, &[]);
    for _ in 0..100 {
        payload = array_payload(T_ARRAY, 1, &payload);
    }
    let g = with_kv(kv(b"general.deep", T_ARRAY, &payload));
    assert!(matches!(gguf_err(&g), G::ArrayTooDeep { .. }));
}

// ---------------------------------------------------------------------------------------------
// Alignment.

#[test]
fn gguf_alignment_zero() {
    let g = with_kv(kv_u32("general.alignment", 0));
    assert!(matches!(gguf_err(&g), G::BadAlignment { alignment: 0 }));
}

#[test]
fn gguf_alignment_three() {
    let g = with_kv(kv_u32("general.alignment", 3));
    assert!(matches!(gguf_err(&g), G::BadAlignment { alignment: 3 }));
}

#[test]
fn gguf_alignment_as_string() {
    let g = with_kv(kv_str("general.alignment", "32"));
    assert!(matches!(
        gguf_err(&g),
        G::AlignmentNotU32 { type_id: T_STRING }
    ));
}

#[test]
fn gguf_alignment_as_u64() {
    // candle would silently ignore this and use 32.
    let g = with_kv(kv(b"general.alignment", T_U64, &64u64.to_le_bytes()));
    assert!(matches!(
        gguf_err(&g),
        G::AlignmentNotU32 { type_id: T_U64 }
    ));
}

// ---------------------------------------------------------------------------------------------
// Tensor infos.

#[test]
fn gguf_duplicate_tensor_name() {
    let g = with_tensor(tensor("token_embd.weight", &[8], F32));
    assert!(matches!(gguf_err(&g), G::DuplicateTensor { name } if name == "token_embd.weight"));
}

#[test]
fn gguf_invalid_utf8_tensor_name() {
    let mut t = tensor("x", &[8], F32);
    t.name = b"blk.\xc0.weight".to_vec();
    assert!(matches!(
        gguf_err(&with_tensor(t)),
        G::InvalidUtf8 {
            what: "tensor name",
            ..
        }
    ));
}

#[test]
fn gguf_zero_dim() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[4, 0], F32));
    assert!(
        matches!(gguf_err(&g), G::ZeroDim { name, dims } if name == "blk.0.bad.weight" && dims == [4, 0])
    );
}

#[test]
fn gguf_five_dims() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[1, 1, 1, 1, 1], F32));
    assert!(matches!(gguf_err(&g), G::TooManyDims { n_dims: 5, .. }));
}

#[test]
fn gguf_no_dims() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[], F32));
    assert!(matches!(gguf_err(&g), G::NoDims { .. }));
}

#[test]
fn gguf_dim_above_i64_max() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[1 << 63], F32));
    assert!(matches!(gguf_err(&g), G::DimTooLarge { .. }));
}

#[test]
fn gguf_wrapped_q8_0_size() {
    // 2^32 · 2^32 · 2 elements: wraps to 0 in u64, which candle would load as an empty tensor.
    let g = with_tensor(tensor("blk.0.bad.weight", &[1 << 32, 1 << 32, 2], Q8_0));
    assert!(matches!(gguf_err(&g), G::SizeOverflow { name } if name == "blk.0.bad.weight"));
    // 2^63 elements fit a u64 but not ggml's int64_t element count.
    let g = with_tensor(tensor("blk.0.bad.weight", &[1 << 32, 1 << 31], Q8_0));
    assert!(matches!(gguf_err(&g), G::SizeOverflow { .. }));
}

#[test]
fn gguf_unknown_type_id() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[32], 99));
    let e = gguf_err(&g);
    assert!(
        matches!(&e, G::UnsupportedType { name, type_id: 99, type_name: None, .. } if name == "blk.0.bad.weight"),
        "{e:?}"
    );
    assert!(e.to_string().contains("99"));
}

#[test]
fn gguf_iq4_nl_type() {
    let g = with_tensor(tensor("blk.0.attn_k.weight", &[32, 2], 20));
    let e = gguf_err(&g);
    assert!(
        matches!(
            &e,
            G::UnsupportedType {
                type_id: 20,
                type_name: Some("IQ4_NL"),
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("blk.0.attn_k.weight") && msg.contains("IQ4_NL"),
        "{msg}"
    );
    assert!(msg.contains(SUPPORTED_TYPES), "{msg}");
}

#[test]
fn gguf_other_unsupported_types() {
    for (id, name) in [
        (9, "Q8_1"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (26, "I32"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ] {
        let g = with_tensor(tensor("blk.0.x.weight", &[256], id));
        assert!(
            matches!(gguf_err(&g), G::UnsupportedType { type_name: Some(n), .. } if n == name),
            "{name}"
        );
    }
}

#[test]
fn gguf_row_not_block_multiple() {
    let g = with_tensor(tensor("blk.0.bad.weight", &[16, 2], Q8_0));
    assert!(matches!(
        gguf_err(&g),
        G::RowNotBlockMultiple {
            ne0: 16,
            block: 32,
            ..
        }
    ));
    // ne[0] is what must divide, not the element count (candle only checks the latter).
    let g = with_tensor(tensor("blk.0.bad.weight", &[128, 2], Q4_K));
    assert!(matches!(
        gguf_err(&g),
        G::RowNotBlockMultiple {
            ne0: 128,
            block: 256,
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------------
// Data layout.

fn with_offset(index: usize, offset: u64) -> Gguf {
    let mut g = Gguf::valid();
    g.tensors[index].offset = Some(offset);
    g
}

#[test]
fn gguf_misaligned_offset() {
    let g = with_offset(1, 97);
    assert!(matches!(
        gguf_err(&g),
        G::BadOffset { name, expected: 96, found: 97 } if name == "blk.0.attn_q.weight"
    ));
}

#[test]
fn gguf_overlapping_offsets() {
    let g = with_offset(1, 0);
    assert!(matches!(
        gguf_err(&g),
        G::BadOffset {
            expected: 96,
            found: 0,
            ..
        }
    ));
}

#[test]
fn gguf_gap_between_tensors() {
    let g = with_offset(2, 256);
    assert!(matches!(
        gguf_err(&g),
        G::BadOffset {
            expected: 224,
            found: 256,
            ..
        }
    ));
}

#[test]
fn gguf_truncated_data() {
    let bytes = Gguf::valid().build();
    let e = check(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(
        matches!(&e, G::DataTruncated { name, file_len, needed } if name == "blk.0.ffn_down.weight" && *needed == *file_len + 1),
        "{e:?}"
    );
}

#[test]
fn gguf_header_only_is_truncated_data() {
    let mut g = Gguf::valid();
    g.tensors.truncate(1);
    let bytes = g.build();
    let s = check(&bytes).unwrap();
    let e = check(&bytes[..s.data_offset as usize]).unwrap_err();
    assert!(matches!(e, G::DataTruncated { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// A tiny safetensors writer.

fn st(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..data_len).map(|i| i as u8));
    out
}

const ST_VALID: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;

fn st_err(header: &str, data_len: usize) -> S {
    match validate_safetensors(&st(header, data_len)) {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e,
    }
}

#[test]
fn st_valid_file_validates_and_safetensors_reads_it() {
    let bytes = st(ST_VALID, 22);
    let tensors = validate_safetensors(&bytes).unwrap();
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors[0].name, "a");
    assert_eq!(tensors[0].dtype, "F32");
    assert_eq!(tensors[0].shape, [2, 2]);
    assert_eq!(tensors[0].data_offsets, (0, 16));
    assert_eq!(tensors[1].name, "b");
    assert_eq!(tensors[1].data_offsets, (16, 22));
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(parsed.len(), 2);
}

#[test]
fn st_written_by_safetensors_validates() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let a = vec![0u8; 24];
    let b = vec![1u8; 6];
    let views = [
        ("w", TensorView::new(Dtype::F16, vec![3, 4], &a).unwrap()),
        ("bias", TensorView::new(Dtype::U8, vec![6], &b).unwrap()),
        (
            "empty",
            TensorView::new(Dtype::F32, vec![0, 4], &[]).unwrap(),
        ),
    ];
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let bytes = safetensors::serialize(views, meta).unwrap();
    let tensors = validate_safetensors(&bytes).unwrap();
    assert_eq!(tensors.len(), 3);
}

#[test]
fn st_metadata_null_and_empty_header() {
    assert!(validate_safetensors(&st(r#"{"__metadata__":null}"#, 0))
        .unwrap()
        .is_empty());
    assert!(validate_safetensors(&st("{}   ", 0)).unwrap().is_empty());
}

#[test]
fn st_every_prefix_is_an_error() {
    let bytes = st(ST_VALID, 22);
    for len in 0..bytes.len() {
        assert!(
            validate_safetensors(&bytes[..len]).is_err(),
            "prefix of {len} bytes validated"
        );
    }
}

#[test]
fn st_too_small() {
    assert!(matches!(
        validate_safetensors(&[1, 2, 3]),
        Err(S::HeaderTooSmall { file_len: 3 })
    ));
}

#[test]
fn st_header_length_past_eof() {
    let mut bytes = st(ST_VALID, 22);
    let past = (bytes.len() as u64) - 7;
    bytes[..8].copy_from_slice(&past.to_le_bytes());
    assert!(matches!(
        validate_safetensors(&bytes),
        Err(S::HeaderPastEof { .. })
    ));
}

#[test]
fn st_header_length_huge() {
    let mut bytes = st(ST_VALID, 22);
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        validate_safetensors(&bytes),
        Err(S::HeaderTooLarge { len: u64::MAX, .. })
    ));
}

#[test]
fn st_bad_json() {
    assert!(matches!(
        st_err(r#"{"a":{"dtype":"F32","#, 0),
        S::InvalidJson { .. }
    ));
    assert!(matches!(st_err(r#"{} trailing"#, 0), S::InvalidJson { .. }));
    assert!(matches!(st_err(r#"[1, 2]"#, 0), S::HeaderNotObject));
}

#[test]
fn st_header_not_utf8() {
    let mut bytes = st(r#"{"a":1}"#, 0);
    bytes[10] = 0xff;
    assert!(matches!(
        validate_safetensors(&bytes),
        Err(S::HeaderNotUtf8 { valid_up_to: 2 })
    ));
}

#[test]
fn st_offsets_near_2_pow_64() {
    // safetensors 0.8 computes `end + 8 + n` for these and panics in debug builds.
    let h = r#"{"a":{"dtype":"U8","shape":[18446744073709551607],"data_offsets":[0,18446744073709551607]}}"#;
    assert!(matches!(
        st_err(h, 0),
        S::DataTruncated {
            end: 18446744073709551607,
            ..
        }
    ));
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}}"#;
    assert!(matches!(
        st_err(h, 0),
        S::BadOffsets {
            begin: u64::MAX,
            end: 0,
            ..
        }
    ));
    // Beyond u64 is not an offset at all.
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}}"#;
    assert!(matches!(
        st_err(h, 1),
        S::BadField {
            field: "data_offsets",
            ..
        }
    ));
}

#[test]
fn st_shape_product_overflow() {
    let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::SizeOverflow { name } if name == "a"));
}

#[test]
fn st_shape_size_mismatch() {
    let h = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#;
    assert!(matches!(
        st_err(h, 16),
        S::SizeMismatch {
            expected: 24,
            found: 16,
            ..
        }
    ));
}

#[test]
fn st_sub_byte_partial() {
    let h = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
    assert!(matches!(st_err(h, 2), S::PartialByte { .. }));
}

#[test]
fn st_overlap() {
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    assert!(matches!(st_err(h, 24), S::Overlap { name, other } if name == "b" && other == "a"));
}

#[test]
fn st_gap_and_trailing_data() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
    assert!(matches!(
        st_err(h, 24),
        S::Gap {
            expected: 8,
            found: 16,
            ..
        }
    ));
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        st_err(h, 12),
        S::TrailingData {
            covered: 8,
            data_len: 12
        }
    ));
}

#[test]
fn st_duplicate_names() {
    // serde_json (and so safetensors) would silently keep the second entry.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::DuplicateTensor { name } if name == "a"));
}

#[test]
fn st_duplicate_field_and_metadata_key() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"shape":[1],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::DuplicateField { field, .. } if field == "shape"));
    let h = r#"{"__metadata__":{"k":"1","k":"2"}}"#;
    assert!(matches!(st_err(h, 0), S::DuplicateMetadataKey { key } if key == "k"));
    let h = r#"{"__metadata__":{},"__metadata__":{}}"#;
    assert!(matches!(st_err(h, 0), S::DuplicateMetadataKey { .. }));
}

#[test]
fn st_unknown_dtype() {
    let h = r#"{"a":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(
        matches!(st_err(h, 8), S::UnknownDtype { name, dtype } if name == "a" && dtype == "Q4_K")
    );
}

#[test]
fn st_malformed_fields() {
    let h = r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::BadField { field: "shape", .. }));
    let h = r#"{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::BadField { field: "shape", .. }));
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}"#;
    assert!(matches!(
        st_err(h, 8),
        S::BadField {
            field: "data_offsets",
            ..
        }
    ));
    let h = r#"{"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}"#;
    assert!(matches!(st_err(h, 8), S::BadField { field: "dtype", .. }));
    let h = r#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#;
    assert!(matches!(
        st_err(h, 8),
        S::MissingField { field: "shape", .. }
    ));
    let h = r#"{"a":[1,2,3]}"#;
    assert!(matches!(st_err(h, 0), S::TensorNotObject { .. }));
}

#[test]
fn st_malformed_metadata() {
    assert!(
        matches!(st_err(r#"{"__metadata__":{"n":1}}"#, 0), S::MetadataValueNotString { key } if key == "n")
    );
    assert!(matches!(
        st_err(r#"{"__metadata__":[1]}"#, 0),
        S::MetadataNotObject
    ));
}
