//! Devices the engine can run on: CPU ranks, and, in builds with the `cuda` feature, one GPU per
//! job (`cuda:N`; the NCCL communicator exists, but the trainer does not use it yet). Whatever cannot run is
//! refused up front with an error that says why, never accepted and then failed halfway. Whether
//! the GPU exists is checked when the trainer opens it (the error names the missing driver or
//! device).

use gantry_api::Devices;

use crate::{Error, Result};

/// Checks that this build can run on `devices`.
pub fn check_supported(devices: &Devices) -> Result<()> {
    match devices {
        Devices::Cpu(_) => Ok(()),
        Devices::Cuda(ids) if cfg!(feature = "cuda") && ids.len() == 1 => Ok(()),
        Devices::Cuda(_) if cfg!(feature = "cuda") => Err(Error::Device(format!(
            "resources.devices = \"{devices}\": the trainer runs one GPU per job for now (data parallelism over NCCL is not wired into it yet); use one GPU (cuda:N) or cpu:N"
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
    fn cpu_is_supported_and_what_cannot_run_is_refused_with_a_reason() {
        assert!(check_supported(&Devices::Cpu(2)).is_ok());
        let err = check_supported(&Devices::Cuda(vec![0, 1])).unwrap_err().to_string();
        assert!(err.contains("cuda:0,1") && err.contains("cpu:N"), "{err}");
        assert_eq!(check_supported(&Devices::Cuda(vec![3])).is_ok(), cfg!(feature = "cuda"));
    }
}
