//! Metal dispatch (feature `metal`): compiles each family's MSL source once per device, caches
//! pipelines by kernel name + function constants, and encodes the launches planned in
//! [`super::qmatmul::qmatmul_plan`] / [`super::attention::attn_plan`].

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Shape, Storage, Tensor};
use candle_metal_kernels::metal::{
    Buffer, ComputeCommandEncoder, ComputePipeline, ConstantValues, Library, Value,
};
use objc2::rc::Retained;
use objc2_metal::{MTLCompileOptions, MTLMathFloatingPointFunctions, MTLMathMode, MTLSize};

use super::abi::{self, Launch};
use super::attention::{attn_plan, kv_strides, AttnDims, FlashAttention};
use super::names::{ElemType, Family};
use super::qmatmul::{qmatmul_plan, qmatmul_variant, QMatMulOp};

type CResult<T> = candle_core::Result<T>;

/// Pipelines keyed by (device registry id, kernel name, function constants).
type PipelineKey = (u64, String, Vec<(usize, bool)>);

static LIBRARIES: OnceLock<Mutex<HashMap<(u64, Family), Library>>> = OnceLock::new();
static PIPELINES: OnceLock<Mutex<HashMap<PipelineKey, ComputePipeline>>> = OnceLock::new();

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Metal(msg.into())
}

fn library(device: &MetalDevice, family: Family) -> CResult<Library> {
    let id = device.device().registry_id();
    let libs = LIBRARIES.get_or_init(Default::default);
    let mut libs = libs.lock().map_err(|e| err(e.to_string()))?;
    if let Some(l) = libs.get(&(id, family)) {
        return Ok(l.clone());
    }
    let src = match family {
        Family::Qmatmul => abi::QMATMUL_SRC,
        Family::Attn => abi::ATTENTION_SRC,
    };
    let lib = device
        .device()
        .new_library_with_source(&format!("{}\n{}", abi::HEADER_SRC, src), Some(&compile_options()))
        .map_err(|e| err(e.to_string()))?;
    libs.insert((id, family), lib.clone());
    Ok(lib)
}

/// Compile options for our kernels: no fast math, whose default assumes no NaN or ∞ (it may fold
/// the kernels' `isnan` tests away; docs/KERNELS.md, "NaN and Inf"). `Relaxed` still allows
/// reassociation (macOS 15 / iOS 18 and later), with precise `exp`; older systems get IEEE
/// semantics throughout.
fn compile_options() -> Retained<MTLCompileOptions> {
    let options = MTLCompileOptions::new();
    if objc2::available!(macos = 15, ios = 18) {
        options.setMathMode(MTLMathMode::Relaxed);
        options.setMathFloatingPointFunctions(MTLMathFloatingPointFunctions::Precise);
    } else {
        #[allow(deprecated)]
        options.setFastMathEnabled(false);
    }
    options
}

fn pipeline(device: &MetalDevice, launch: &Launch) -> CResult<ComputePipeline> {
    let name = launch.kernel.to_string();
    let key = (
        device.device().registry_id(),
        name.clone(),
        launch.constants.clone(),
    );
    let pipes = PIPELINES.get_or_init(Default::default);
    if let Some(p) = pipes.lock().map_err(|e| err(e.to_string()))?.get(&key) {
        return Ok(p.clone());
    }
    let lib = library(device, launch.kernel.family)?;
    let constants = ConstantValues::new(
        launch
            .constants
            .iter()
            .map(|&(i, b)| (i, Value::Bool(b)))
            .collect(),
    );
    let constants = (!launch.constants.is_empty()).then_some(&constants);
    let function = lib
        .get_function(&name, constants)
        .map_err(|e| err(e.to_string()))?;
    let pipe = device
        .device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(|e| err(e.to_string()))?;
    pipes
        .lock()
        .map_err(|e| err(e.to_string()))?
        .insert(key, pipe.clone());
    Ok(pipe)
}

fn size(v: [usize; 3]) -> MTLSize {
    MTLSize {
        width: v[0],
        height: v[1],
        depth: v[2],
    }
}

/// A buffer binding: (index, buffer, byte offset, written by the kernel).
type Binding<'a> = (usize, &'a Buffer, usize, bool);

fn encode<A>(
    device: &MetalDevice,
    launch: &Launch,
    bufs: &[Binding<'_>],
    args: (usize, &A),
) -> CResult<()> {
    let pipe = pipeline(device, launch)?;
    let guard = device.command_encoder()?;
    let enc: &ComputeCommandEncoder = guard.as_ref();
    enc.set_compute_pipeline_state(&pipe);
    for &(i, b, off, out) in bufs {
        if out {
            enc.set_output_buffer(i, Some(b), off);
        } else {
            enc.set_input_buffer(i, Some(b), off);
        }
    }
    enc.set_bytes(args.0, args.1);
    if let Some(bytes) = launch.tg_mem_bytes {
        enc.set_threadgroup_memory_length(0, bytes);
    }
    enc.dispatch_thread_groups(size(launch.grid), size(launch.threadgroup));
    Ok(())
}

/// A tensor's Metal buffer and byte offset (it must live on `device`).
fn metal_of(t: &Tensor) -> CResult<(candle_core::StorageRef<'_>, usize)> {
    let (s, l) = t.storage_and_layout();
    let off = l.start_offset() * t.dtype().size_in_bytes();
    if !matches!(&*s, Storage::Metal(_)) {
        return Err(err(
            "metal-candle kernels: tensor is not on the Metal device".into(),
        ));
    }
    Ok((s, off))
}

fn buffer_of(s: &Storage) -> CResult<&Buffer> {
    match s {
        Storage::Metal(m) => Ok(m.buffer()),
        _ => Err(err(
            "metal-candle kernels: tensor is not on the Metal device".into(),
        )),
    }
}

fn act_of(dtype: DType) -> CResult<ElemType> {
    ElemType::from_float_dtype(dtype).ok_or_else(|| err(format!("unsupported dtype {dtype:?}")))
}

/// `metal_fwd` of [`QMatMulOp`]: optional LoRA shrink into an f32 scratch, then mat-vec or mat-mat.
pub(crate) fn qmatmul_fwd(
    op: &QMatMulOp,
    s: &MetalStorage,
    l: &Layout,
) -> CResult<(MetalStorage, Shape)> {
    let device = s.device();
    let (m, k) = l.shape().dims2()?;
    let (n, _) = op.weight.dims();
    let act = act_of(s.dtype())?;
    let lora_dims = match &op.lora {
        Some(b) => Some((b.a.dim(1)?, b.a.dim(0)?)),
        None => None,
    };
    let plan = qmatmul_plan(
        (m, n, k),
        op.weight.quant(),
        act,
        lora_dims,
        qmatmul_variant(m),
    )
    .map_err(candle_core::Error::wrap)?;
    let x = (s.buffer(), l.start_offset() * s.dtype().size_in_bytes());
    let y = device
        .new_buffer_builder()
        .with_size_for(m * n, s.dtype())
        .with_label("mc-qmatmul")
        .build()?;
    let (w_store, w_off) = metal_of(op.weight.bytes())?;
    let w = buffer_of(&w_store)?;
    let scratch = device
        .new_buffer_builder()
        .with_size_for((m * lora_dims.map_or(1, |d| d.0)).max(1), DType::F32)
        .build()?;
    match (&op.lora, &plan.shrink) {
        (Some(lb), Some(shrink)) => {
            let (a_s, a_off) = metal_of(&lb.a)?;
            let (b_s, b_off) = metal_of(&lb.b)?;
            let (sc_s, sc_off) = metal_of(&lb.scales)?;
            let (id_s, id_off) = metal_of(&lb.ids)?;
            let (a, b, sc, ids) = (
                buffer_of(&a_s)?,
                buffer_of(&b_s)?,
                buffer_of(&sc_s)?,
                buffer_of(&id_s)?,
            );
            encode(
                device,
                shrink,
                &[
                    (0, x.0, x.1, false),
                    (1, a, a_off, false),
                    (2, ids, id_off, false),
                    (3, &scratch, 0, true),
                ],
                (4, &plan.args),
            )?;
            let bufs = [
                (0, w, w_off, false),
                (1, x.0, x.1, false),
                (2, &*y, 0, true),
                (4, b, b_off, false),
                (5, &*scratch, 0, false),
                (6, sc, sc_off, false),
                (7, ids, id_off, false),
            ];
            encode(device, &plan.main, &bufs, (3, &plan.args))?;
        }
        _ => {
            // Unused LoRA slots are bound to valid buffers; the kernel never reads them.
            let bufs = [
                (0, w, w_off, false),
                (1, x.0, x.1, false),
                (2, &*y, 0, true),
                (4, x.0, x.1, false),
                (5, &*scratch, 0, false),
                (6, &*scratch, 0, false),
                (7, &*scratch, 0, false),
            ];
            encode(device, &plan.main, &bufs, (3, &plan.args))?;
        }
    }
    Ok((
        MetalStorage::new(y, device.clone(), m * n, s.dtype()),
        Shape::from((m, n)),
    ))
}

/// `metal_fwd` of [`FlashAttention`]: prefill, or decode splits + reduce.
pub(crate) fn attention_fwd(
    op: &FlashAttention,
    (qs, ql): (&MetalStorage, &Layout),
    (ks, kl): (&MetalStorage, &Layout),
    (vs, vl): (&MetalStorage, &Layout),
) -> CResult<(MetalStorage, Shape)> {
    let device = qs.device();
    let p = &op.params;
    let (b, h, t, d) = ql.shape().dims4()?;
    let (_, n_kv, kv_len, _) = kl.shape().dims4()?;
    let q_offset = p.q_offset.unwrap_or(kv_len.saturating_sub(t));
    let dims = AttnDims {
        b,
        h,
        n_kv,
        t,
        kv_len,
        d,
        q_offset,
    };
    let (Some(k_strides), Some(v_strides)) = (kv_strides(kl, d), kv_strides(vl, d)) else {
        return Err(err("flash_attention: k/v rows must be contiguous".into()));
    };
    if !ql.is_contiguous() {
        return Err(err("flash_attention: q must be contiguous".into()));
    }
    let plan = attn_plan(&dims, p, act_of(qs.dtype())?, k_strides, v_strides)
        .map_err(candle_core::Error::wrap)?;
    let el = qs.dtype().size_in_bytes();
    let q = (qs.buffer(), ql.start_offset() * el);
    let k = (ks.buffer(), kl.start_offset() * el);
    let v = (vs.buffer(), vl.start_offset() * el);
    let out = device
        .new_buffer_builder()
        .with_size_for(b * h * t * d, qs.dtype())
        .with_label("mc-attn")
        .build()?;
    let mask_guard = match &p.mask {
        Some(m) => Some(metal_of(m)?),
        None => None,
    };
    let mask = match &mask_guard {
        Some((s, off)) => (buffer_of(s)?, *off),
        None => (q.0, q.1),
    };
    let inputs = [
        (0, q.0, q.1, false),
        (1, k.0, k.1, false),
        (2, v.0, v.1, false),
        (3, mask.0, mask.1, false),
    ];
    match &plan.reduce {
        None => {
            let mut bufs = inputs.to_vec();
            bufs.push((4, &*out, 0, true));
            encode(device, &plan.main, &bufs, (5, &plan.args))?;
        }
        Some(reduce) => {
            let splits = plan.args.n_splits as usize;
            let part_o = device
                .new_buffer_builder()
                .with_size_for(splits * b * h * d, DType::F32)
                .build()?;
            let part_ml = device
                .new_buffer_builder()
                .with_size_for(splits * b * h * 2, DType::F32)
                .build()?;
            let mut bufs = inputs.to_vec();
            bufs.push((4, &*part_o, 0, true));
            bufs.push((5, &*part_ml, 0, true));
            encode(device, &plan.main, &bufs, (6, &plan.args))?;
            let rbufs = [
                (0, &*part_o, 0, false),
                (1, &*part_ml, 0, false),
                (2, &*out, 0, true),
            ];
            encode(device, reduce, &rbufs, (3, &plan.args))?;
        }
    }
    Ok((
        MetalStorage::new(out, device.clone(), b * h * t * d, qs.dtype()),
        ql.shape().clone(),
    ))
}
