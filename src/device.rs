//! Device and dtype selection, in one place.
//!
//! [`DeviceChoice::Auto`] picks Metal when the `metal` feature is compiled in (macOS), else CUDA when
//! the `cuda` feature is, else the CPU. Every other module receives a ready `candle_core::Device`.

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// Metal if compiled in, else CUDA if compiled in, else CPU.
    #[default]
    Auto,
    /// The CPU (candle's backend with the crate's x86 kernels).
    Cpu,
    /// The first Metal GPU (feature `metal`).
    Metal,
    /// The first CUDA GPU (feature `cuda`).
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda),
            other => Err(Error::InvalidParameter {
                name: "device",
                reason: format!("`{other}` is not one of auto, cpu, metal, cuda"),
            }),
        }
    }
}

/// Opens the chosen device. A device whose feature is not compiled in is an error, not a silent
/// fallback; `Auto` never fails on a machine with a CPU.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Metal => open_metal(),
        DeviceChoice::Cuda => open_cuda(),
        DeviceChoice::Auto => {
            if cfg!(feature = "metal") {
                if let Ok(device) = open_metal() {
                    return Ok(device);
                }
            }
            if cfg!(feature = "cuda") {
                if let Ok(device) = open_cuda() {
                    return Ok(device);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

fn open_metal() -> Result<Device> {
    #[cfg(feature = "metal")]
    {
        Device::new_metal(0).map_err(|e| Error::DeviceUnavailable {
            device: "metal".into(),
            reason: e.to_string(),
        })
    }
    #[cfg(not(feature = "metal"))]
    {
        Err(Error::DeviceUnavailable {
            device: "metal".into(),
            reason: "metal-candle was built without the `metal` feature".into(),
        })
    }
}

fn open_cuda() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        Device::new_cuda(0).map_err(|e| Error::DeviceUnavailable {
            device: "cuda".into(),
            reason: e.to_string(),
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::DeviceUnavailable {
            device: "cuda".into(),
            reason: "metal-candle was built without the `cuda` feature".into(),
        })
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::InvalidParameter {
            name: "dtype",
            reason: format!("`{other}` is not one of f32, f16, bf16"),
        }),
    }
}

/// The default activation dtype for a device: F32 on the CPU (candle's CPU kernels are fastest and
/// exact there), F16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices_and_rejects_unknown() {
        assert_eq!("CPU".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cpu));
        assert!(matches!(
            "tpu".parse::<DeviceChoice>(),
            Err(Error::InvalidParameter { name: "device", .. })
        ));
        assert_eq!(parse_dtype("bf16").ok(), Some(DType::BF16));
        assert!(parse_dtype("f64").is_err());
    }

    #[test]
    fn auto_gives_a_device_and_missing_backends_are_errors() {
        assert!(select_device(DeviceChoice::Auto).is_ok());
        if !cfg!(feature = "metal") {
            assert!(matches!(
                select_device(DeviceChoice::Metal),
                Err(Error::DeviceUnavailable { .. })
            ));
        }
    }
}
