//! Devices the engine can run on. This build trains on CPU; CUDA arrives with the `cuda` feature
//! (issue: CUDA backend) and until then asking for it is a clear error, never a panic.

use gantry_api::Devices;

use crate::{Error, Result};

/// Checks that this build can run on `devices`.
pub fn check_supported(devices: &Devices) -> Result<()> {
    match devices {
        Devices::Cpu(_) => Ok(()),
        Devices::Cuda(_) => {
            Err(Error::Device(format!("resources.devices = \"{devices}\": this gantry was built without CUDA support; use cpu:N")))
        }
    }
}
