//! Devices the engine can run on. The trainer runs on CPU. Built with the `cuda` feature, the
//! binary carries the CUDA kernels (`gantry_kernels::cuda`: NVRTC-compiled sources, cuBLASLt),
//! but the trainer does not drive them yet, so a CUDA job is refused up front with an error that
//! says so, never accepted and then failed halfway.

use gantry_api::Devices;

use crate::{Error, Result};

/// Checks that this build can run on `devices`.
pub fn check_supported(devices: &Devices) -> Result<()> {
    match devices {
        Devices::Cpu(_) => Ok(()),
        Devices::Cuda(_) if cfg!(feature = "cuda") => Err(Error::Device(format!(
            "resources.devices = \"{devices}\": this gantry has the CUDA kernels but its trainer does not run on GPUs yet; use cpu:N"
        ))),
        Devices::Cuda(_) => Err(Error::Device(format!(
            "resources.devices = \"{devices}\": this gantry was built without CUDA support (rebuild with `--features cuda`); use cpu:N"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_supported_and_cuda_is_refused_with_a_reason() {
        assert!(check_supported(&Devices::Cpu(2)).is_ok());
        let err = check_supported(&Devices::Cuda(vec![0, 1])).unwrap_err().to_string();
        assert!(err.contains("cuda:0,1") && err.contains("use cpu:N"), "{err}");
    }
}
