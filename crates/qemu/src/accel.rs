use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::QemuError;

/// The accelerator a QEMU process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The `-accel` option value. TCG gets a 64 MiB translation cache instead of QEMU's 1 GiB
    /// default, so a host can run many small guests.
    pub fn qemu_option(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,tb-size=64",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the operator asked for: `auto` probes, the others force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, QemuError> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(QemuError::UnknownAccel(other.to_string())),
        }
    }
}

/// A real boot used to judge KVM: a kernel and initrd that print `ready_marker` on the serial
/// port once they reach user space.
///
/// `/dev/kvm` existing proves little: on nested hosts KVM creates VMs that then crawl (a Linux
/// guest can spin in its decompressor for minutes). Only a guest that gets to user space within
/// `timeout` shows that KVM is worth using.
#[derive(Debug, Clone)]
pub struct BootProbe {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub ready_marker: String,
    pub timeout: Duration,
}

/// Chooses the accelerator for this host.
///
/// `Auto` picks KVM only when `/dev/kvm` exists, a few instructions run under it, and (when
/// given) the boot probe reaches user space in time; otherwise TCG. A forced choice is
/// honoured, except that forcing KVM on a host without a working `/dev/kvm` is an error rather
/// than a guest that never boots.
pub fn probe_accelerator(
    qemu: &Path,
    choice: AccelChoice,
    boot: Option<&BootProbe>,
) -> Result<Accel, QemuError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            kvm_runs_instructions(qemu).map_err(|reason| QemuError::AccelUnusable {
                accel: "kvm".into(),
                reason,
            })?;
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            if let Err(reason) = kvm_runs_instructions(qemu) {
                info!(%reason, "KVM unusable; using TCG");
                return Ok(Accel::Tcg);
            }
            if let Some(boot) = boot {
                if let Err(reason) = kvm_boots(qemu, boot) {
                    info!(%reason, "KVM too slow to boot a guest; using TCG");
                    return Ok(Accel::Tcg);
                }
            }
            Ok(Accel::Kvm)
        }
    }
}

/// Runs three real-mode instructions at the reset vector under KVM: they write to the
/// isa-debug-exit port, which makes QEMU exit with status 33.
fn kvm_runs_instructions(qemu: &Path) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let dir = tempdir()?;
    let bios = dir.0.join("probe.bin");
    let mut rom = vec![0xF4u8; 65536]; // hlt everywhere
    rom[0xFFF0..0xFFF5].copy_from_slice(&[0xB0, 0x10, 0xE6, 0xF4, 0xF4]); // mov al,16; out 0xf4,al; hlt
    std::fs::write(&bios, &rom).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel", "kvm", "-machine", "pc", "-cpu", "qemu64", "-m", "16",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .arg("-bios")
    .arg(&bios)
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    match run_with_timeout(cmd, Duration::from_secs(10), None)? {
        (Some(33), _) => Ok(()),
        (code, out) => Err(format!(
            "the KVM instruction probe ended with {code:?}: {}",
            out.trim()
        )),
    }
}

fn kvm_boots(qemu: &Path, boot: &BootProbe) -> Result<(), String> {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel", "kvm", "-machine", "pc", "-cpu", "qemu64", "-m", "256",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .arg("-kernel")
    .arg(&boot.kernel)
    .arg("-initrd")
    .arg(&boot.initrd)
    .args(["-append", &boot.cmdline])
    .args(["-serial", "stdio"]);
    let start = Instant::now();
    let (_, out) = run_with_timeout(cmd, boot.timeout, Some(&boot.ready_marker))?;
    if out.contains(&boot.ready_marker) {
        debug!(
            elapsed_ms = start.elapsed().as_millis() as u64,
            "KVM boot probe reached user space"
        );
        Ok(())
    } else {
        Err(format!(
            "a guest did not reach user space within {:?} under KVM",
            boot.timeout
        ))
    }
}

/// Runs `cmd`, collecting stdout+stderr, until it exits, `marker` appears in its output, or
/// `timeout` passes; the process is always killed and reaped before returning.
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    marker: Option<&str>,
) -> Result<(Option<i32>, String), String> {
    use std::io::Read;
    let dir = tempdir()?;
    let out_path = dir.0.join("out");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cmd.get_program().to_string_lossy()))?;
    let deadline = Instant::now() + timeout;
    let read_out = || {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&out_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    };
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if marker.is_some_and(|m| read_out().contains(m)) || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((code, read_out()))
}

/// A scratch directory removed when dropped, so no return path leaks it.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<ScratchDir, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferry-accel-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(ScratchDir(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses_and_rejects_unknown() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        let err = "hvf".parse::<AccelChoice>().unwrap_err();
        assert_eq!(err.code(), "unknown-accelerator");
    }

    #[test]
    fn forced_tcg_needs_no_probe() {
        let acc =
            probe_accelerator(Path::new("/nonexistent/qemu"), AccelChoice::Tcg, None).unwrap();
        assert_eq!(acc, Accel::Tcg);
    }

    #[test]
    fn forced_kvm_with_a_broken_binary_is_an_error_not_a_hang() {
        let err =
            probe_accelerator(Path::new("/nonexistent/qemu"), AccelChoice::Kvm, None).unwrap_err();
        assert_eq!(err.code(), "accelerator-unusable");
    }
}
