//! The `none` backend: no domain at all, for tests and for debugging the storage and
//! NBD side on their own. Its state is one marker file in the run dir, so it survives
//! a controller restart the way a real domain would.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::io_err;
use crate::{DomainSpec, DomainState, HvError, Hypervisor};

const MARKER: &str = "none.running";

#[derive(Debug, Default, Clone, Copy)]
pub struct NoneHv;

impl NoneHv {
    pub fn new() -> Self {
        NoneHv
    }
}

impl Hypervisor for NoneHv {
    fn name(&self) -> &'static str {
        "none"
    }

    fn start(&self, spec: &DomainSpec) -> Result<(), HvError> {
        let state = self.state(&spec.name, &spec.run_dir)?;
        if state != DomainState::Halted {
            return Err(HvError::AlreadyRunning {
                name: spec.name.clone(),
                state,
            });
        }
        fs::create_dir_all(&spec.run_dir).map_err(io_err(&spec.name, "creating run dir"))?;
        // An empty console log, so callers can open it as for any other backend.
        fs::write(self.console_log(&spec.run_dir), b"")
            .map_err(io_err(&spec.name, "creating console log"))?;
        let json = serde_json::to_string_pretty(spec).unwrap_or_default();
        fs::write(spec.run_dir.join(MARKER), json)
            .map_err(io_err(&spec.name, "writing state marker"))
    }

    fn shutdown(&self, name: &str, run_dir: &Path, _timeout: Duration) -> Result<(), HvError> {
        self.kill(name, run_dir)
    }

    fn pause(&self, name: &str, _run_dir: &Path) -> Result<(), HvError> {
        Err(HvError::NotRunning {
            name: name.to_string(),
            op: "pause",
            reason: "hypervisor none runs no guest".into(),
        })
    }

    fn unpause(&self, name: &str, _run_dir: &Path) -> Result<(), HvError> {
        Err(HvError::NotRunning {
            name: name.to_string(),
            op: "unpause",
            reason: "hypervisor none runs no guest".into(),
        })
    }

    fn set_memory(&self, name: &str, _run_dir: &Path, mib: u64) -> Result<(), HvError> {
        Err(HvError::Memory {
            name: name.to_string(),
            mib,
            reason: "hypervisor none runs no guest".into(),
        })
    }

    fn kill(&self, name: &str, run_dir: &Path) -> Result<(), HvError> {
        match fs::remove_file(run_dir.join(MARKER)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(name, "removing state marker")(e))
            }
            _ => Ok(()),
        }
    }

    fn state(&self, _name: &str, run_dir: &Path) -> Result<DomainState, HvError> {
        Ok(if run_dir.join(MARKER).exists() {
            DomainState::Running
        } else {
            DomainState::Halted
        })
    }

    fn console_log(&self, run_dir: &Path) -> PathBuf {
        run_dir.join("console.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtMode;

    #[test]
    fn start_then_shutdown_tracks_state_in_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DomainSpec {
            name: "work".into(),
            memory_mib: 400,
            maxmem_mib: 400,
            vcpus: 1,
            virt_mode: VirtMode::Pvh,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            netvm: None,
            net: Default::default(),
            label: "red".into(),
            run_dir: dir.path().join("work"),
            user: None,
        };
        let hv = NoneHv::new();
        assert_eq!(
            hv.state("work", &spec.run_dir).unwrap(),
            DomainState::Halted
        );
        hv.start(&spec).unwrap();
        assert_eq!(
            hv.state("work", &spec.run_dir).unwrap(),
            DomainState::Running
        );
        assert!(matches!(
            hv.start(&spec),
            Err(HvError::AlreadyRunning { .. })
        ));
        // A second backend instance (a restarted controller) sees the same state.
        assert_eq!(
            NoneHv::new().state("work", &spec.run_dir).unwrap(),
            DomainState::Running
        );
        hv.shutdown("work", &spec.run_dir, Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            hv.state("work", &spec.run_dir).unwrap(),
            DomainState::Halted
        );
        hv.shutdown("work", &spec.run_dir, Duration::from_secs(1))
            .unwrap();
        hv.kill("work", &spec.run_dir).unwrap();
        assert!(hv.console_log(&spec.run_dir).exists());
    }
}
