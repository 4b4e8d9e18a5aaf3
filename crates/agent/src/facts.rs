//! Host facts: what the server's pre-flight checks and destination ranking are computed from.
//!
//! The parts that never change while the agent runs (CPU, QEMU version and machine types,
//! accelerator) are measured once at start; memory and datastore space on every report.
//! Parsing is kept in pure functions tested on sample text.

use std::path::Path;
use std::process::Command;

use ferry_api::hosts::{DatastoreFacts, HostFacts, NetworkFacts};
use ferry_qemu::{probe_accelerator, Accel, AccelChoice, QemuError};
use tracing::{info, warn};

use crate::config::AgentConfig;

/// CPU identity from `/proc/cpuinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuInfo {
    pub vendor: String,
    pub model: String,
    pub flags: Vec<String>,
    /// Logical processors (`processor` entries).
    pub cores: u32,
}

/// Parses `/proc/cpuinfo` text; the first processor's identity, and the count of processors.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => info.cores += 1,
            "vendor_id" if info.vendor.is_empty() => info.vendor = value.to_string(),
            "model name" if info.model.is_empty() => info.model = value.to_string(),
            "flags" if info.flags.is_empty() => {
                info.flags = value.split_whitespace().map(str::to_string).collect()
            }
            _ => {}
        }
    }
    info
}

/// `(MemTotal, MemAvailable)` in MiB from `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The version number from `qemu-system-x86_64 --version` output ("7.2.22").
pub fn parse_qemu_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let rest = line.split("version").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

/// Machine type names (and aliases) from `-machine help` output.
pub fn parse_machine_help(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("Supported machines"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses an accelerator setting (`auto`, `kvm`, `tcg`).
pub fn parse_accel_choice(s: &str) -> Result<AccelChoice, QemuError> {
    s.parse()
}

/// The accelerator guests run with on this host.
///
/// `FERRY_ACCEL` overrides the configuration. `auto` trusts KVM only when this host is not
/// itself a VM: on nested hosts `/dev/kvm` exists and runs a few instructions but a Linux guest
/// crawls, and the agent has no guest image of its own to try a real boot with. Operators of
/// nested hosts with good nested KVM force `kvm`.
pub fn choose_accel(config: &AgentConfig, cpu: &CpuInfo) -> Result<Accel, QemuError> {
    let setting = std::env::var("FERRY_ACCEL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| config.accel.clone());
    let choice = parse_accel_choice(&setting)?;
    if choice == AccelChoice::Auto && cpu.flags.iter().any(|f| f == "hypervisor") {
        info!("this host is a VM; using TCG (set accel = \"kvm\" to force KVM)");
        return Ok(Accel::Tcg);
    }
    probe_accelerator(&config.qemu_binary, choice, None)
}

/// Facts that do not change while the agent runs, measured once at start.
#[derive(Debug, Clone)]
pub struct StaticFacts {
    pub cpu: CpuInfo,
    pub accel: Accel,
    pub qemu_version: String,
    pub machine_types: Vec<String>,
}

impl StaticFacts {
    /// Measures CPU, accelerator and QEMU once (blocking: runs QEMU twice).
    pub fn measure(config: &AgentConfig) -> Result<StaticFacts, QemuError> {
        let cpu = parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let accel = choose_accel(config, &cpu)?;
        let run =
            |arg: &str| {
                Command::new(&config.qemu_binary)
                .arg(arg)
                .args(if arg == "-machine" { &["help"][..] } else { &[][..] })
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| {
                    warn!(error = %e, binary = %config.qemu_binary.display(), "cannot run QEMU");
                    String::new()
                })
            };
        let qemu_version = parse_qemu_version(&run("--version")).unwrap_or_default();
        let machine_types = parse_machine_help(&run("-machine"));
        Ok(StaticFacts {
            cpu,
            accel,
            qemu_version,
            machine_types,
        })
    }

    /// Full facts: the static part plus memory and datastores measured now. `guest_ram_mib` is
    /// the RAM of the guests running here (used only with `ram_capacity_mib`).
    pub fn current(&self, config: &AgentConfig, guest_ram_mib: u64) -> HostFacts {
        let real = parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
        let (ram_total_mib, ram_free_mib) =
            apply_capacity(real, config.ram_capacity_mib, guest_ram_mib);
        HostFacts {
            name: config.name.clone(),
            cpu_vendor: self.cpu.vendor.clone(),
            cpu_model: self.cpu.model.clone(),
            cpu_flags: mask_flags(&self.cpu.flags, &config.cpu_flags_mask),
            cores: self.cpu.cores,
            ram_total_mib,
            ram_free_mib,
            ram_reserve_mib: config.reserve_mib,
            accel: self.accel.name().to_string(),
            qemu_version: self.qemu_version.clone(),
            machine_types: self.machine_types.clone(),
            firmware: firmware(config),
            datastores: config
                .datastores
                .iter()
                .map(|d| datastore_facts(&d.name, &d.path, d.identity.as_deref()))
                .collect(),
            networks: config
                .networks
                .iter()
                .map(|n| NetworkFacts {
                    name: n.name.clone(),
                    bridge: n.bridge.clone(),
                    subnet: n.subnet.clone(),
                })
                .collect(),
            migration_addr: config.migration_addr.to_string(),
            migration_ports: config.migration_ports.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The firmware this host can boot: SeaBIOS comes with QEMU; UEFI needs both OVMF files.
fn firmware(config: &AgentConfig) -> Vec<String> {
    let mut out = vec!["bios".to_string()];
    if config.ovmf_code.is_file() && config.ovmf_vars.is_file() {
        out.push("uefi".into());
    }
    out
}

/// `(total, free)` RAM to report: the real figures, or with a configured capacity
/// `(capacity, min(real free, capacity - guest RAM))`.
pub fn apply_capacity(real: (u64, u64), capacity: Option<u64>, guest_ram_mib: u64) -> (u64, u64) {
    match capacity {
        None => real,
        Some(cap) => (cap, real.1.min(cap.saturating_sub(guest_ram_mib))),
    }
}

/// `flags` without those named in `mask`, in their original order.
pub fn mask_flags(flags: &[String], mask: &[String]) -> Vec<String> {
    flags
        .iter()
        .filter(|f| !mask.contains(f))
        .cloned()
        .collect()
}

/// Space and identity of one datastore; zero sizes when the path cannot be measured.
pub(crate) fn datastore_facts(name: &str, path: &Path, configured: Option<&str>) -> DatastoreFacts {
    let (total_bytes, free_bytes) = statvfs(path).unwrap_or((0, 0));
    let identity = std::fs::read_to_string(path.join(".ferry-datastore-id"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| configured.map(str::to_string));
    DatastoreFacts {
        name: name.to_string(),
        path: path.display().to_string(),
        total_bytes,
        free_bytes,
        identity,
    }
}

/// `(total, available)` bytes of the file system holding `path`.
pub(crate) fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a properly sized, zeroed struct
    // that statvfs(3) fills in; neither outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let frag = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frag, st.f_bavail as u64 * frag))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
model name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\nflags\t\t: fpu vme sse2 avx2 hypervisor\n\n\
processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\n\
flags\t\t: fpu vme sse2 avx2 hypervisor\n";

    #[test]
    fn cpuinfo_gives_identity_flags_and_cores() {
        let c = parse_cpuinfo(CPUINFO);
        assert_eq!(c.vendor, "GenuineIntel");
        assert_eq!(c.model, "Intel(R) Xeon(R) Processor @ 2.50GHz");
        assert_eq!(c.flags, ["fpu", "vme", "sse2", "avx2", "hypervisor"]);
        assert_eq!(c.cores, 2);
        assert_eq!(parse_cpuinfo(""), CpuInfo::default());
    }

    #[test]
    fn meminfo_in_mib() {
        let text = "MemTotal:       24684096 kB\nMemFree:        23406048 kB\nMemAvailable:   24260448 kB\n";
        assert_eq!(parse_meminfo(text), (24105, 23691));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn qemu_version_and_machines() {
        let v = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022";
        assert_eq!(parse_qemu_version(v).as_deref(), Some("7.2.22"));
        assert_eq!(parse_qemu_version(""), None);
        let m = "Supported machines are:\nmicrovm              microvm (i386)\n\
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n\
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n\
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\nnone                 empty machine\n";
        assert_eq!(
            parse_machine_help(m),
            ["microvm", "pc", "pc-i440fx-7.2", "q35", "none"]
        );
    }

    #[test]
    fn capacity_caps_total_and_free() {
        assert_eq!(apply_capacity((24000, 20000), None, 4096), (24000, 20000));
        // Capacity minus guests is below the real free RAM.
        assert_eq!(
            apply_capacity((24000, 20000), Some(4096), 1024),
            (4096, 3072)
        );
        // The real free RAM is the smaller one.
        assert_eq!(
            apply_capacity((24000, 1000), Some(4096), 1024),
            (4096, 1000)
        );
        // Guests above the capacity leave nothing, not an underflow.
        assert_eq!(apply_capacity((24000, 20000), Some(1024), 2048), (1024, 0));
    }

    #[test]
    fn mask_removes_flags() {
        let flags: Vec<String> = ["fpu", "sse2", "avx2", "avx512f"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            mask_flags(&flags, &["avx2".into(), "nothere".into()]),
            ["fpu", "sse2", "avx512f"]
        );
        assert_eq!(mask_flags(&flags, &[]), flags);
    }

    #[test]
    fn current_facts_honour_reserve_capacity_and_mask() {
        let mut config = AgentConfig::from_toml_str(
            "name = \"hv1\"\ncredential = \"c\"\nreserve_mib = 300\nram_capacity_mib = 2048\ncpu_flags_mask = [\"sse2\"]\n",
            "agent.toml",
        )
        .unwrap();
        let facts = StaticFacts {
            cpu: parse_cpuinfo(CPUINFO),
            accel: Accel::Tcg,
            qemu_version: "7.2.22".into(),
            machine_types: vec![],
        };
        let f = facts.current(&config, 512);
        assert_eq!(f.ram_reserve_mib, 300);
        assert_eq!(f.ram_total_mib, 2048);
        assert!(f.ram_free_mib <= 1536, "{}", f.ram_free_mib);
        assert_eq!(f.cpu_flags, ["fpu", "vme", "avx2", "hypervisor"]);
        config.ram_capacity_mib = None;
        config.cpu_flags_mask.clear();
        let f = facts.current(&config, 512);
        assert!(f.ram_total_mib > 0);
        assert_eq!(f.cpu_flags.len(), 5);
        assert_eq!(f.ram_reserve_mib, 300);
    }

    #[test]
    fn datastore_identity_and_space() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".ferry-datastore-id"), "nfs-1\n").unwrap();
        let f = datastore_facts("local", dir.path(), None);
        assert_eq!(f.identity.as_deref(), Some("nfs-1"));
        assert!(f.total_bytes > 0 && f.free_bytes <= f.total_bytes);
        let missing = datastore_facts("gone", Path::new("/nonexistent/ds"), Some("lab"));
        assert_eq!(
            (missing.total_bytes, missing.identity.as_deref()),
            (0, Some("lab")),
            "a configured identity stands where no file is"
        );
    }
}
