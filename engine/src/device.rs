//! Devices the engine can run on: CPU ranks, and, in builds with the `cuda` feature, one GPU per
//! rank (`cuda:N`, or `cuda:0,1,...` for a data-parallel job across GPUs). Whatever cannot run is
//! refused up front with an error that says why, never accepted and then failed halfway. Whether
//! the GPU exists is checked when the trainer opens it (the error names the missing driver or
//! device).

use std::fmt;

use crate::{Error, Result};

/// The devices a run's ranks use: `Cpu(n)` (n CPU ranks) or `Cuda(ordinals)` (one GPU per rank;
/// a daemon worker is handed only its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    Cpu(usize),
    Cuda(Vec<u32>),
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Cpu(1)
    }
}

/// As users write them (`cpu:4`, `cuda:0,1`), for messages that name `resources.devices`.
impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::Cpu(n) => write!(f, "cpu:{n}"),
            Devices::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

/// Checks that this build can run on `devices`.
pub fn check_supported(devices: &Devices) -> Result<()> {
    match devices {
        Devices::Cpu(_) => Ok(()),
        Devices::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
        Devices::Cuda(_) => Err(Error::Device(format!(
            "resources.devices = \"{devices}\": this gantry was built without CUDA support (rebuild with `--features cuda`); use cpu:N"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_print_as_users_write_them() {
        assert_eq!(Devices::Cuda(vec![0, 3]).to_string(), "cuda:0,3");
        assert_eq!(Devices::default().to_string(), "cpu:1");
    }

    #[test]
    fn cpu_is_supported_and_what_cannot_run_is_refused_with_a_reason() {
        assert!(check_supported(&Devices::Cpu(2)).is_ok());
        for ids in [vec![3], vec![0, 1]] {
            let r = check_supported(&Devices::Cuda(ids)).map_err(|e| e.to_string());
            assert_eq!(r.is_ok(), cfg!(feature = "cuda"), "{r:?}");
            if let Err(e) = r {
                assert!(e.contains("without CUDA") && e.contains("cpu:N"), "{e}");
            }
        }
    }
}
