use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::disk::{validate_disks, DiskSpec};
use crate::net::Ipv4Cidr;
use crate::QemuError;

/// Smallest guest Ferry will start: below this Debian's kernel does not reach init.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest Ferry will start (1 TiB): anything above is almost surely a unit mistake.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Upper bound on vCPUs: QEMU's x86 machines refuse more than 255 without an IOMMU with
/// interrupt remapping (x2APIC), which Ferry does not configure; a bigger number would only
/// fail when QEMU starts.
pub const MAX_VCPUS: u32 = 255;

/// Whether `name` is an x86 machine type QEMU knows: the aliases `pc` and `q35`, their
/// versioned names (`pc-i440fx-9.2`, `pc-q35-7.2`, and distribution suffixes such as
/// `pc-q35-noble`), `isapc` and `microvm`. `none` and `x-remote` run no guest and are refused.
/// Checked without a host, so a typo is refused when the instance is defined rather than when
/// QEMU starts; the hosts' own lists (their facts) are checked where they are known.
pub fn is_known_machine_type(name: &str) -> bool {
    if matches!(name, "pc" | "q35" | "isapc" | "microvm") {
        return true;
    }
    let Some(version) = name
        .strip_prefix("pc-i440fx-")
        .or_else(|| name.strip_prefix("pc-q35-"))
    else {
        return false;
    };
    !version.is_empty()
        && version.len() <= 24
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// Whether `s` holds a control character (NUL, newline, escape, DEL, ...): such bytes in a
/// name or path end up in command lines, file names and terminals, and are refused everywhere.
pub fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// What a virtual machine is, independent of the host it runs on.
///
/// Both sides of a live migration start QEMU from the same spec, because QEMU only accepts an
/// incoming migration into a machine with the same devices, memory and CPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instance name; also names files and the QEMU process (`-name`).
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// A named QEMU CPU model (`qemu64`, `Westmere`, ...). `host` and `max` are refused: they
    /// make the guest depend on the exact host, which defeats migration.
    pub cpu_model: String,
    /// QEMU machine type (`pc`, `q35`, or a versioned one like `pc-i440fx-7.2`).
    pub machine: String,
    pub boot: BootSource,
    pub firmware: Firmware,
    /// In order; with [`BootSource::Disk`] the first one is the boot disk.
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootSource {
    /// QEMU loads a kernel and initrd from host files (fast; the lab guest, or a root disk
    /// without a bootloader).
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// The firmware boots the first disk, as on real hardware: any OS with a bootloader.
    Disk,
}

/// The machine's firmware.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Firmware {
    /// SeaBIOS, which QEMU loads by itself.
    #[default]
    Bios,
    /// OVMF: its code (read-only, shared by every guest) and this instance's own variable
    /// store, which is the guest's NVRAM and so belongs with its disks.
    Uefi { code: PathBuf, vars: PathBuf },
}

/// A virtio NIC attached to a host tap device.
///
/// The MAC is fixed in the spec so that the guest keeps its identity on the network across a
/// migration; the tap is host-local and re-created with the same name on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub tap: String,
    pub mac: MacAddr,
    /// A static address the guest should use on this NIC, handed to it as an SMBIOS OEM
    /// string (a disk-booted guest has no command line Ferry controls); `None`: the guest
    /// configures the NIC itself (DHCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Cidr>,
    /// The router the guest should use, inside `ipv4`'s subnet; only with `ipv4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

/// A unicast Ethernet address, validated on parse so QEMU never sees a bad one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered address in QEMU's usual 52:54:00 range, derived from a number,
    /// so that lab guests get stable, distinct MACs.
    pub fn local(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[1], b[2], b[3]])
    }

    /// A stable MAC for NIC `index` of instance `name`: the same name gets the same address
    /// on every run, so ARP caches and DHCP leases in a lab stay valid across re-creation.
    pub fn for_nic(name: &str, index: usize) -> MacAddr {
        // FNV-1a: tiny, stable across Rust versions (unlike std's hasher).
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes().chain((index as u32).to_be_bytes()) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        MacAddr::local(h & 0x00ff_ffff)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "'{s}' is not a MAC address (six hex bytes separated by ':')"
            ));
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(&parts) {
            *slot = u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
                .ok_or_else(|| {
                    format!("'{s}' is not a MAC address ('{part}' is not a hex byte)")
                })?;
        }
        if out[0] & 1 == 1 {
            return Err(format!(
                "'{s}' is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Names that end up in file names, QEMU options and tap names: keep them boring.
pub(crate) fn is_simple_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !s.starts_with('-')
}

impl InstanceSpec {
    /// The memory bounds alone, for callers that want to refuse a size before building a
    /// whole spec.
    pub fn check_memory(memory_mib: u32) -> Result<(), QemuError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(QemuError::InvalidSpec {
                field: "memory_mib",
                reason: format!(
                    "{memory_mib} MiB is out of range ({MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB)"
                ),
            });
        }
        Ok(())
    }

    /// Checks everything that can be checked without a host, so that a bad request fails before
    /// any process, tap or port exists.
    pub fn validate(&self) -> Result<(), QemuError> {
        let bad = |field, reason: String| Err(QemuError::InvalidSpec { field, reason });
        if !is_simple_name(&self.name, 40) {
            return bad(
                "name",
                format!(
                    "'{}' must be 1-40 characters of a-z, 0-9, '-' or '_'",
                    self.name
                ),
            );
        }
        Self::check_memory(self.memory_mib)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(
                "vcpus",
                format!("{} is out of range (1 to {MAX_VCPUS})", self.vcpus),
            );
        }
        if matches!(self.cpu_model.as_str(), "host" | "max") {
            return bad(
                "cpu_model",
                format!(
                    "'{}' ties the guest to this exact host and cannot migrate safely; name a model such as qemu64 or Westmere",
                    self.cpu_model
                ),
            );
        }
        if !is_simple_name(&self.cpu_model.to_ascii_lowercase().replace('.', "-"), 64) {
            return bad(
                "cpu_model",
                format!("'{}' is not a CPU model name", self.cpu_model),
            );
        }
        if !is_known_machine_type(&self.machine) {
            return bad(
                "machine",
                format!(
                    "'{}' is not an x86 machine type QEMU knows (pc, q35, pc-i440fx-X.Y, pc-q35-X.Y)",
                    self.machine.escape_debug()
                ),
            );
        }
        let mut files: Vec<(&'static str, &PathBuf)> = Vec::new();
        match &self.boot {
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                files.extend([("boot.kernel", kernel), ("boot.initrd", initrd)]);
                if has_control_chars(cmdline) {
                    return bad(
                        "boot.cmdline",
                        "must be one line without control characters".into(),
                    );
                }
            }
            BootSource::Disk if self.disks.is_empty() => {
                return bad(
                    "boot",
                    "boots from disk but has no disk; add one or boot a kernel".into(),
                );
            }
            BootSource::Disk => {}
        }
        if let Firmware::Uefi { code, vars } = &self.firmware {
            files.extend([("firmware.code", code), ("firmware.vars", vars)]);
        }
        validate_disks(&self.disks, &self.machine)?;
        for d in &self.disks {
            files.push(("disks.path", &d.path));
            if let Some(b) = &d.backing {
                files.push(("disks.backing", &b.path));
            }
        }
        for (field, path) in files {
            if has_control_chars(&path.to_string_lossy()) {
                return bad(field, "must not contain control characters".into());
            }
            if !path.is_file() {
                return bad(field, format!("{} does not exist", path.display()));
            }
        }
        for nic in &self.nics {
            if !is_simple_name(&nic.tap, 15) {
                return bad(
                    "nics.tap",
                    format!(
                        "'{}' must be 1-15 characters of a-z, 0-9, '-' or '_'",
                        nic.tap
                    ),
                );
            }
            match (nic.ipv4, nic.gateway) {
                (None, Some(gw)) => {
                    return bad(
                        "nics.gateway",
                        format!("{gw} is given without a static address (nics.ipv4)"),
                    )
                }
                (Some(cidr), gw) => {
                    if let Err(e) = cidr.check_host(gw) {
                        return bad("nics.ipv4", e);
                    }
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(dir: &std::path::Path) -> InstanceSpec {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        InstanceSpec {
            name: "web-1".into(),
            memory_mib: 512,
            vcpus: 1,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSource::Kernel {
                kernel,
                initrd,
                cmdline: "console=ttyS0".into(),
            },
            firmware: Firmware::Bios,
            disks: vec![],
            nics: vec![NicSpec {
                tap: "tap-web1".into(),
                mac: MacAddr::local(1),
                ipv4: None,
                gateway: None,
            }],
        }
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert!("52:54:00:12:34".parse::<MacAddr>().is_err());
        assert!("52:54:00:12:34:zz".parse::<MacAddr>().is_err());
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
        assert!("5:54:00:12:34:56".parse::<MacAddr>().is_err());
        assert_eq!(MacAddr::local(258).to_string(), "52:54:00:00:01:02");
    }

    #[test]
    fn machine_types_are_those_qemu_knows_for_x86() {
        for ok in [
            "pc",
            "q35",
            "pc-i440fx-9.2",
            "pc-q35-7.2",
            "pc-q35-noble",
            "microvm",
        ] {
            assert!(is_known_machine_type(ok), "{ok}");
        }
        for bad in [
            "",
            "bogus",
            "none",
            "x-remote",
            "pc-i440fx-",
            "pc,accel=kvm",
            "pc-q35-9.2,x=y",
            "virt",
            "pc\0",
        ] {
            assert!(!is_known_machine_type(bad), "{bad:?}");
        }
        assert!(has_control_chars("a\0b") && has_control_chars("a\x1bb"));
        assert!(!has_control_chars("vmlinuz-6.1 console=ttyS0"));
    }

    #[test]
    fn validate_accepts_a_sane_spec() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path()).validate().unwrap();
    }

    fn s_kernel(s: &InstanceSpec) -> PathBuf {
        match &s.boot {
            BootSource::Kernel { kernel, .. } => kernel.clone(),
            BootSource::Disk => unreachable!(),
        }
    }

    #[test]
    fn validate_rejects_bad_fields_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        type Mutation = Box<dyn Fn(&mut InstanceSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("memory_mib", Box::new(|s| s.memory_mib = 0)),
            ("memory_mib", Box::new(|s| s.memory_mib = u32::MAX)),
            ("vcpus", Box::new(|s| s.vcpus = 0)),
            ("vcpus", Box::new(|s| s.vcpus = 256)),
            ("machine", Box::new(|s| s.machine = "bogus".into())),
            ("machine", Box::new(|s| s.machine = "none".into())),
            ("name", Box::new(|s| s.name = "a\0b".into())),
            (
                "boot.cmdline",
                Box::new(|s| {
                    if let BootSource::Kernel { cmdline, .. } = &mut s.boot {
                        *cmdline = "console=ttyS0\0x".into();
                    }
                }),
            ),
            ("name", Box::new(|s| s.name = "Bad Name".into())),
            ("name", Box::new(|s| s.name = "-x".into())),
            ("cpu_model", Box::new(|s| s.cpu_model = "host".into())),
            ("cpu_model", Box::new(|s| s.cpu_model = "a,b=c".into())),
            ("machine", Box::new(|s| s.machine = "pc,accel=kvm".into())),
            (
                "nics.tap",
                Box::new(|s| s.nics[0].tap = "a-very-long-tap-name".into()),
            ),
            (
                "nics.gateway",
                Box::new(|s| s.nics[0].gateway = Some(Ipv4Addr::new(10, 0, 0, 1))),
            ),
            (
                "nics.ipv4",
                Box::new(|s| s.nics[0].ipv4 = Some("10.0.0.0/24".parse().unwrap())),
            ),
            (
                "nics.ipv4",
                Box::new(|s| {
                    s.nics[0].ipv4 = Some("10.0.0.5/24".parse().unwrap());
                    s.nics[0].gateway = Some(Ipv4Addr::new(10, 0, 1, 1));
                }),
            ),
            (
                "boot.kernel",
                Box::new(|s| {
                    if let BootSource::Kernel { kernel, .. } = &mut s.boot {
                        *kernel = "/nonexistent/vmlinuz".into();
                    }
                }),
            ),
            ("boot", Box::new(|s| s.boot = BootSource::Disk)),
            (
                "firmware.vars",
                Box::new(|s| {
                    s.firmware = Firmware::Uefi {
                        code: s_kernel(s),
                        vars: "/nonexistent/VARS.fd".into(),
                    }
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = sample(dir.path());
            mutate(&mut s);
            match s.validate() {
                Err(QemuError::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidSpec on {field}, got {other:?}"),
            }
        }
    }
}
