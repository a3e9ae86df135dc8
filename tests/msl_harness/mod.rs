//! MSL host-emulation harness (test support, not library API).
//!
//! Builds the project's `.metal` sources as C++ with the system compiler (`$CXX`, else `c++`, else
//! `g++`) through the shim in `include/metal_stdlib`, links them with the fiber scheduler into a
//! shared library under `CARGO_TARGET_TMPDIR`, and runs kernels by name. The only source rewrite is
//! `[[threadgroup(` → `[[msl_tg_buffer(` (the `threadgroup` address-space macro would eat it).
//! Builds are cached by a hash of every input, so each test binary compiles at most once.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Kernel families, one exported `msl_emu_run_<family>` each.
#[derive(Debug, Clone, Copy)]
pub enum Family {
    Qmatmul,
    Attention,
    Selftest,
}

impl Family {
    fn symbol(self) -> &'static [u8] {
        match self {
            Family::Qmatmul => b"msl_emu_run_qmatmul\0",
            Family::Attention => b"msl_emu_run_attention\0",
            Family::Selftest => b"msl_emu_run_selftest\0",
        }
    }
}

/// A device buffer: 16-byte aligned host memory.
#[derive(Clone)]
pub struct Buf {
    words: Vec<u128>,
    len: usize,
}

impl Buf {
    pub fn zeros(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(16).max(1)],
            len,
        }
    }
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = Self::zeros(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
    }
    pub fn from_pod<T: Copy>(v: &[T]) -> Self {
        let n = std::mem::size_of_val(v);
        // SAFETY: T is plain data (f32, u16, u32 and #[repr(C)] structs of them); we read n bytes.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) };
        Self::from_bytes(bytes)
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: words holds at least len bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: words holds at least len bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        self.bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    pub fn to_u16(&self) -> Vec<u16> {
        self.bytes()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
    fn ptr(&mut self) -> *mut std::ffi::c_void {
        self.words.as_mut_ptr() as *mut std::ffi::c_void
    }
}

/// One dispatch: grid and threadgroup sizes, threadgroup memory sizes, function constants.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub grid: [u32; 3],
    pub threadgroup: [u32; 3],
    pub tg_mem_bytes: Vec<usize>,
    /// Function-constant values by index (`MC_FC_*`).
    pub constants: Vec<bool>,
}

type RunFn = unsafe extern "C" fn(
    *const std::ffi::c_char,
    *const u8,
    usize,
    *const *mut std::ffi::c_void,
    *const u32,
    *const u32,
    *const usize,
    usize,
    *mut std::ffi::c_char,
    usize,
) -> i32;

/// The built and loaded emulation library.
pub struct Harness {
    lib: libloading::Library,
}

static HARNESS: OnceLock<Result<Harness, String>> = OnceLock::new();

/// The harness, built on first use (panics with the compiler's output if the build fails).
pub fn harness() -> &'static Harness {
    match HARNESS.get_or_init(build) {
        Ok(h) => h,
        Err(e) => panic!("MSL emulation harness build failed:\n{e}"),
    }
}

impl Harness {
    /// Runs kernel `name` of `family` over `bufs` (bound at indices 0..). Err: the emulator's
    /// report (unknown kernel, barrier deadlock, bad geometry).
    pub fn run(
        &self,
        family: Family,
        name: &str,
        bufs: &mut [&mut Buf],
        launch: &Launch,
    ) -> Result<(), String> {
        // SAFETY: the symbol has the RunFn signature (include/msl_entry.h).
        let run: libloading::Symbol<RunFn> =
            unsafe { self.lib.get(family.symbol()) }.map_err(|e| format!("symbol: {e}"))?;
        let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        let ptrs: Vec<*mut std::ffi::c_void> = bufs.iter_mut().map(|b| b.ptr()).collect();
        let consts: Vec<u8> = launch.constants.iter().map(|&c| c as u8).collect();
        let mut err = vec![0 as std::ffi::c_char; 1024];
        // SAFETY: buffers outlive the call; the kernel's bounds are the test's responsibility.
        let rc = unsafe {
            run(
                cname.as_ptr(),
                consts.as_ptr(),
                consts.len(),
                ptrs.as_ptr(),
                launch.grid.as_ptr(),
                launch.threadgroup.as_ptr(),
                launch.tg_mem_bytes.as_ptr(),
                launch.tg_mem_bytes.len(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the callee NUL-terminates err.
        Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    pub fn f32_to_f16(&self, x: f32) -> u16 {
        // SAFETY: symbol signature from entry_selftest.cpp.
        unsafe {
            self.lib
                .get::<unsafe extern "C" fn(f32) -> u16>(b"msl_emu_f32_to_f16\0")
                .map(|f| f(x))
        }
        .unwrap_or(0xFFFF)
    }
    pub fn f16_to_f32(&self, x: u16) -> f32 {
        // SAFETY: symbol signature from entry_selftest.cpp.
        unsafe {
            self.lib
                .get::<unsafe extern "C" fn(u16) -> f32>(b"msl_emu_f16_to_f32\0")
                .map(|f| f(x))
        }
        .unwrap_or(f32::NAN)
    }
    pub fn f32_to_bf16(&self, x: f32) -> u16 {
        // SAFETY: symbol signature from entry_selftest.cpp.
        unsafe {
            self.lib
                .get::<unsafe extern "C" fn(f32) -> u16>(b"msl_emu_f32_to_bf16\0")
                .map(|f| f(x))
        }
        .unwrap_or(0xFFFF)
    }
}

const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-Wall",
    "-Wno-attributes",
    "-Wno-unknown-pragmas",
];

fn sources() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    (root.join("metal"), root.join("tests/msl_harness"))
}

fn compiler() -> String {
    if let Ok(c) = std::env::var("CXX") {
        return c;
    }
    for c in ["c++", "g++"] {
        if Command::new(c).arg("--version").output().is_ok() {
            return c.to_string();
        }
    }
    "g++".to_string()
}

fn list(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
    });
    v.sort();
    v
}

fn build() -> Result<Harness, String> {
    let (metal_dir, harness_dir) = sources();
    let include = harness_dir.join("include");
    let mut inputs = list(&metal_dir, &["metal", "h"]);
    inputs.extend(list(&harness_dir, &["metal", "cpp"]));
    inputs.extend(list(&include, &["h"]));
    inputs.push(include.join("metal_stdlib"));
    let cxx = compiler();
    let mut hasher = DefaultHasher::new();
    (CXX_FLAGS, &cxx).hash(&mut hasher);
    for p in &inputs {
        p.file_name().hash(&mut hasher);
        std::fs::read(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .hash(&mut hasher);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("msl_harness-{:016x}", hasher.finish()));
    let lib_path = dir.join("libmsl_emu.so");
    if !lib_path.exists() {
        compile(&cxx, &inputs, &include, &dir, &lib_path)?;
    }
    // SAFETY: our own library; its initialisers only build static tables.
    let lib = unsafe { libloading::Library::new(&lib_path) }.map_err(|e| format!("load: {e}"))?;
    Ok(Harness { lib })
}

fn compile(
    cxx: &str,
    inputs: &[PathBuf],
    include: &Path,
    dir: &Path,
    lib_path: &Path,
) -> Result<(), String> {
    // A private work dir, renamed into place at the end, so concurrent test binaries never see a
    // half-written library.
    let work = dir.with_extension(format!("tmp{}", std::process::id()));
    let gen = work.join("gen");
    std::fs::create_dir_all(&gen).map_err(|e| e.to_string())?;
    let mut units = Vec::new();
    for p in inputs.iter().filter(|p| !p.starts_with(include)) {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let name = p.file_name().ok_or("bad input path")?;
        std::fs::write(
            gen.join(name),
            text.replace("[[threadgroup(", "[[msl_tg_buffer("),
        )
        .map_err(|e| e.to_string())?;
        if p.extension().is_some_and(|e| e == "cpp") {
            units.push(gen.join(name));
        }
    }
    let mut jobs = Vec::new();
    for u in &units {
        let obj = u.with_extension("o");
        let child = Command::new(cxx)
            .args(CXX_FLAGS)
            .arg("-I")
            .arg(&gen)
            .arg("-I")
            .arg(include)
            .arg("-c")
            .arg(u)
            .arg("-o")
            .arg(&obj)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `{cxx}`: {e} (set CXX to a C++17 compiler)"))?;
        jobs.push((child, obj));
    }
    let mut objs = Vec::new();
    let mut errors = String::new();
    for (child, obj) in jobs {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            errors.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        objs.push(obj);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let tmp_lib = work.join("libmsl_emu.so");
    let out = Command::new(cxx)
        .arg("-shared")
        .arg("-o")
        .arg(&tmp_lib)
        .args(&objs)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp_lib, lib_path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Normalised error ‖a − b‖₂ / max(‖b‖₂, ε).
pub fn normalized_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num.sqrt() / den.sqrt().max(1e-12)) as f32
}

/// Candle-tensor glue shared by the kernel tests.
/// A tensor's elements as a harness buffer (flattened).
pub fn buf_of(t: &candle_core::Tensor) -> Buf {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        candle_core::DType::F32 => Buf::from_pod(&t.to_vec1::<f32>().unwrap()),
        candle_core::DType::F16 => Buf::from_pod(&t.to_vec1::<half::f16>().unwrap()),
        candle_core::DType::BF16 => Buf::from_pod(&t.to_vec1::<half::bf16>().unwrap()),
        candle_core::DType::U8 => Buf::from_pod(&t.to_vec1::<u8>().unwrap()),
        candle_core::DType::U32 => Buf::from_pod(&t.to_vec1::<u32>().unwrap()),
        d => panic!("dtype {d:?}"),
    }
}

pub fn f32_of(b: &Buf, dtype: candle_core::DType) -> Vec<f32> {
    match dtype {
        candle_core::DType::F32 => b.to_f32(),
        candle_core::DType::F16 => b
            .to_u16()
            .into_iter()
            .map(|x| half::f16::from_bits(x).to_f32())
            .collect(),
        _ => b
            .to_u16()
            .into_iter()
            .map(|x| half::bf16::from_bits(x).to_f32())
            .collect(),
    }
}

pub fn launch(l: &metal_candle::kernels::abi::Launch) -> Launch {
    Launch {
        grid: l.grid.map(|v| v as u32),
        threadgroup: l.threadgroup.map(|v| v as u32),
        tg_mem_bytes: l.tg_mem_bytes.into_iter().collect(),
        constants: l.constant_values(),
    }
}
