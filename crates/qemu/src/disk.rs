//! Disks as QEMU sees them: a `-blockdev` node graph per disk and the device that attaches it.
//!
//! Each disk is a `file` node under a format node (`qcow2` or `raw`), optionally over a
//! read-only base image, with node names derived from the disk's id so they are the same on
//! both sides of a migration and across restarts: block jobs (the mirror of a block
//! migration), `query-block` and QEMU's block-node inactivation at switchover all name them.
//! The graph is written in QEMU's JSON syntax, which needs no escaping of file names.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::spec::{has_control_chars, is_simple_name};
use crate::QemuError;

/// Longest disk id: node names (`ferry-ID-base-file`) must stay within QEMU's 31 characters.
pub const MAX_DISK_ID: usize = 16;
/// Longest serial QEMU's virtio-blk and SCSI disks report (virtio-blk's limit is 20 bytes).
pub const MAX_SERIAL: usize = 20;
/// IDE disks per machine: two channels of two units on the pc machine's PIIX controller.
const IDE_SLOTS: usize = 4;
/// SATA ports of the AHCI controller Ferry adds.
const SATA_SLOTS: usize = 6;

/// On-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// Sparse, snapshots and backing files; the default for new disks.
    #[default]
    Qcow2,
    /// A plain byte-for-byte image: fastest, no backing files.
    Raw,
}

/// How the guest sees the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// Paravirtual, fastest; every modern OS has the driver.
    #[default]
    VirtioBlk,
    /// Many disks on one controller, with SCSI commands (discard, serials, hot plug).
    VirtioScsi,
    /// Emulated IDE: for old OSes without virtio drivers (pc machines only).
    Ide,
    /// Emulated AHCI: for OSes without virtio drivers on any machine type.
    Sata,
}

/// The host page cache policy of a disk; `none` is the only mode safe for shared storage
/// across hosts, since the destination reads the image the source wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// O_DIRECT, guest flushes honoured.
    #[default]
    None,
    /// Host page cache, guest flushes honoured.
    Writeback,
    /// Host page cache, every write synchronous.
    Writethrough,
    /// O_DIRECT and every write synchronous.
    Directsync,
    /// Host page cache, flushes ignored: a host crash loses data. For scratch disks only.
    Unsafe,
}

macro_rules! names {
    ($ty:ty { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, for help texts and errors.
            pub const ALL: &'static [$ty] = &[$(<$ty>::$variant),+];
            /// The name in JSON, on the command line and in tables.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    format!("'{s}' is not one of {}", names.join(", "))
                })
            }
        }
    };
}
names!(DiskFormat { Qcow2 = "qcow2", Raw = "raw" });
names!(DiskBus { VirtioBlk = "virtio-blk", VirtioScsi = "virtio-scsi", Ide = "ide", Sata = "sata" });
names!(CacheMode {
    None = "none",
    Writeback = "writeback",
    Writethrough = "writethrough",
    Directsync = "directsync",
    Unsafe = "unsafe",
});

impl CacheMode {
    /// `cache.direct`, `cache.no-flush` of the nodes and `write-cache` of the device.
    fn settings(self) -> (bool, bool, bool) {
        match self {
            CacheMode::None => (true, false, true),
            CacheMode::Writeback => (false, false, true),
            CacheMode::Writethrough => (false, false, false),
            CacheMode::Directsync => (true, false, false),
            CacheMode::Unsafe => (false, true, true),
        }
    }
}

/// A read-only base image under a qcow2 overlay (a golden image on shared storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingImage {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// One disk of an instance, with its image resolved to a path on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Stable id: the device id and the stem of every node name (`ferry-ID`).
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub bus: DiskBus,
    pub cache: CacheMode,
    pub read_only: bool,
    pub serial: Option<String>,
    pub backing: Option<BackingImage>,
}

impl DiskSpec {
    /// The format node: what devices, block jobs and NBD exports name.
    pub fn node_name(&self) -> String {
        node_name(&self.id)
    }

    /// Checks that need no host, so QEMU never sees a disk it would refuse.
    pub(crate) fn validate(&self, machine: &str) -> Result<(), QemuError> {
        let bad = |field, reason: String| Err(QemuError::InvalidSpec { field, reason });
        if !is_simple_name(&self.id, MAX_DISK_ID) {
            return bad(
                "disks.id",
                format!(
                    "'{}' must be 1-{MAX_DISK_ID} characters of a-z, 0-9, '-' or '_'",
                    self.id.escape_debug()
                ),
            );
        }
        for (field, path) in std::iter::once(("disks.path", &self.path))
            .chain(self.backing.as_ref().map(|b| ("disks.backing", &b.path)))
        {
            let text = path.to_string_lossy();
            if !path.is_absolute() || has_control_chars(&text) {
                return bad(
                    field,
                    format!("'{}' must be an absolute path", text.escape_debug()),
                );
            }
        }
        if let Some(serial) = &self.serial {
            if serial.is_empty()
                || serial.len() > MAX_SERIAL
                || !serial
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return bad(
                    "disks.serial",
                    format!(
                        "'{}' must be 1-{MAX_SERIAL} characters of A-Z, a-z, 0-9, '-', '_' or '.'",
                        serial.escape_debug()
                    ),
                );
            }
        }
        if self.backing.is_some() && self.format != DiskFormat::Qcow2 {
            return bad(
                "disks.backing",
                "only a qcow2 disk can have a backing image".into(),
            );
        }
        if matches!(self.bus, DiskBus::Ide | DiskBus::Sata) && self.read_only {
            return bad(
                "disks.read_only",
                format!(
                    "an {} disk cannot be read-only; use virtio-blk or virtio-scsi",
                    self.bus
                ),
            );
        }
        if self.bus == DiskBus::Ide && !is_pc_machine(machine) {
            return bad(
                "disks.bus",
                format!("machine {machine} has no IDE controller; use sata"),
            );
        }
        Ok(())
    }
}

/// The format node name of disk `id`.
pub fn node_name(id: &str) -> String {
    format!("ferry-{id}")
}

fn is_pc_machine(machine: &str) -> bool {
    machine == "pc" || machine.starts_with("pc-i440fx-")
}

/// Checks the disks together: unique ids and serials, and room on the emulated buses. Public
/// so that the server can refuse a disk request before any image exists for it.
pub fn validate_disks(disks: &[DiskSpec], machine: &str) -> Result<(), QemuError> {
    let bad = |field, reason: String| Err(QemuError::InvalidSpec { field, reason });
    for (i, d) in disks.iter().enumerate() {
        d.validate(machine)?;
        if disks[..i].iter().any(|o| o.id == d.id) {
            return bad("disks.id", format!("'{}' names two disks", d.id));
        }
        if d.serial.is_some() && disks[..i].iter().any(|o| o.serial == d.serial) {
            return bad(
                "disks.serial",
                format!(
                    "'{}' is the serial of two disks",
                    d.serial.as_deref().unwrap_or("")
                ),
            );
        }
        if disks[..i].iter().any(|o| o.path == d.path) {
            return bad(
                "disks.path",
                format!("{} is attached twice", d.path.display()),
            );
        }
    }
    for (bus, slots) in [(DiskBus::Ide, IDE_SLOTS), (DiskBus::Sata, SATA_SLOTS)] {
        let n = disks.iter().filter(|d| d.bus == bus).count();
        if n > slots {
            return bad(
                "disks.bus",
                format!("{n} {bus} disks do not fit the {slots} slots of the controller"),
            );
        }
    }
    Ok(())
}

/// `-blockdev` and `-device` arguments for `disks`; the disk at `boot` (an index) gets
/// `bootindex=0`, so firmware boots from it.
pub(crate) fn disk_args(disks: &[DiskSpec], boot: Option<usize>) -> Vec<String> {
    let mut args = Vec::new();
    let mut push = |flag: &str, v: Value| {
        args.push(flag.to_string());
        args.push(v.to_string());
    };
    if disks.iter().any(|d| d.bus == DiskBus::VirtioScsi) {
        push(
            "-device",
            json!({"driver": "virtio-scsi-pci", "id": "scsi0"}),
        );
    }
    if disks.iter().any(|d| d.bus == DiskBus::Sata) {
        push("-device", json!({"driver": "ich9-ahci", "id": "sata0"}));
    }
    let (mut scsi, mut ide, mut sata) = (0usize, 0usize, 0usize);
    for (i, d) in disks.iter().enumerate() {
        let (direct, no_flush, write_cache) = d.cache.settings();
        let cache = json!({"direct": direct, "no-flush": no_flush});
        let node = d.node_name();
        let mut format = json!({
            "driver": d.format.as_str(),
            "node-name": node,
            "file": format!("{node}-file"),
            "read-only": d.read_only,
            "discard": "unmap",
            "cache": cache,
        });
        if let Some(base) = &d.backing {
            let base_node = format!("{node}-base");
            push(
                "-blockdev",
                json!({
                    "driver": "file",
                    "node-name": format!("{base_node}-file"),
                    "filename": base.path,
                    "read-only": true,
                    "cache": cache,
                }),
            );
            push(
                "-blockdev",
                json!({
                    "driver": base.format.as_str(),
                    "node-name": base_node,
                    "file": format!("{base_node}-file"),
                    "read-only": true,
                    "cache": cache,
                }),
            );
            format["backing"] = json!(base_node);
        } else if d.format == DiskFormat::Qcow2 {
            // An image whose header names a backing file it should not have is not opened
            // behind Ferry's back: the graph is exactly what the spec says.
            format["backing"] = Value::Null;
        }
        push(
            "-blockdev",
            json!({
                "driver": "file",
                "node-name": format!("{node}-file"),
                "filename": d.path,
                "read-only": d.read_only,
                "discard": "unmap",
                "cache": cache,
            }),
        );
        push("-blockdev", format);
        let mut dev = match d.bus {
            DiskBus::VirtioBlk => json!({"driver": "virtio-blk-pci"}),
            DiskBus::VirtioScsi => {
                scsi += 1;
                json!({"driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": scsi - 1})
            }
            DiskBus::Ide => {
                ide += 1;
                json!({"driver": "ide-hd", "bus": format!("ide.{}", (ide - 1) / 2), "unit": (ide - 1) % 2})
            }
            DiskBus::Sata => {
                sata += 1;
                json!({"driver": "ide-hd", "bus": format!("sata0.{}", sata - 1)})
            }
        };
        dev["id"] = json!(d.id);
        dev["drive"] = json!(node);
        dev["write-cache"] = json!(if write_cache { "on" } else { "off" });
        if let Some(serial) = &d.serial {
            dev["serial"] = json!(serial);
        }
        if boot == Some(i) {
            dev["bootindex"] = json!(0);
        }
        push("-device", dev);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn disk(id: &str, bus: DiskBus) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            path: format!("/ds/{id}.qcow2").into(),
            format: DiskFormat::Qcow2,
            bus,
            cache: CacheMode::None,
            read_only: false,
            serial: None,
            backing: None,
        }
    }

    #[test]
    fn a_virtio_disk_is_a_file_node_under_a_format_node_with_stable_names() {
        let mut d = disk("disk0", DiskBus::VirtioBlk);
        d.serial = Some("ferry-data".into());
        let args = disk_args(&[d], Some(0));
        assert_eq!(args.len(), 6);
        let file: Value = serde_json::from_str(&args[1]).unwrap();
        let fmt: Value = serde_json::from_str(&args[3]).unwrap();
        let dev: Value = serde_json::from_str(&args[5]).unwrap();
        assert_eq!(file["node-name"], "ferry-disk0-file");
        assert_eq!(file["filename"], "/ds/disk0.qcow2");
        assert_eq!(file["cache"]["direct"], true);
        assert_eq!(fmt["driver"], "qcow2");
        assert_eq!(fmt["node-name"], "ferry-disk0");
        assert_eq!(fmt["file"], "ferry-disk0-file");
        assert_eq!(fmt["backing"], Value::Null);
        assert_eq!(dev["driver"], "virtio-blk-pci");
        assert_eq!(dev["drive"], "ferry-disk0");
        assert_eq!(dev["serial"], "ferry-data");
        assert_eq!(dev["bootindex"], 0);
    }

    #[test]
    fn a_backing_image_is_its_own_read_only_node_pair() {
        let mut d = disk("root", DiskBus::VirtioBlk);
        d.backing = Some(BackingImage {
            path: "/shared/base.qcow2".into(),
            format: DiskFormat::Qcow2,
        });
        let args = disk_args(&[d], None);
        let nodes: Vec<Value> = args
            .chunks(2)
            .filter(|c| c[0] == "-blockdev")
            .map(|c| serde_json::from_str(&c[1]).unwrap())
            .collect();
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0]["node-name"], "ferry-root-base-file");
        assert_eq!(nodes[0]["read-only"], true);
        assert_eq!(nodes[1]["node-name"], "ferry-root-base");
        assert_eq!(nodes[3]["backing"], "ferry-root-base");
        let dev: Value = serde_json::from_str(args.last().unwrap()).unwrap();
        assert!(dev.get("bootindex").is_none());
    }

    #[test]
    fn controllers_and_slots_follow_the_bus() {
        let disks = [
            disk("a", DiskBus::VirtioScsi),
            disk("b", DiskBus::VirtioScsi),
            disk("c", DiskBus::Ide),
            disk("d", DiskBus::Ide),
            disk("e", DiskBus::Ide),
            disk("f", DiskBus::Sata),
        ];
        let args = disk_args(&disks, None);
        let devices: Vec<Value> = args
            .chunks(2)
            .filter(|c| c[0] == "-device")
            .map(|c| serde_json::from_str(&c[1]).unwrap())
            .collect();
        assert_eq!(devices[0]["driver"], "virtio-scsi-pci");
        assert_eq!(devices[1]["driver"], "ich9-ahci");
        assert_eq!(devices[3]["lun"], 1);
        assert_eq!(
            (devices[6]["bus"].as_str(), devices[6]["unit"].as_u64()),
            (Some("ide.1"), Some(0))
        );
        assert_eq!(devices[7]["bus"], "sata0.0");
    }

    #[test]
    fn cache_modes_map_to_node_and_device_settings() {
        for (mode, direct, no_flush, wc) in [
            (CacheMode::None, true, false, "on"),
            (CacheMode::Writeback, false, false, "on"),
            (CacheMode::Writethrough, false, false, "off"),
            (CacheMode::Directsync, true, false, "off"),
            (CacheMode::Unsafe, false, true, "on"),
        ] {
            let mut d = disk("x", DiskBus::VirtioBlk);
            d.cache = mode;
            let args = disk_args(&[d], None);
            let file: Value = serde_json::from_str(&args[1]).unwrap();
            let dev: Value = serde_json::from_str(&args[5]).unwrap();
            assert_eq!(file["cache"]["direct"], direct, "{mode}");
            assert_eq!(file["cache"]["no-flush"], no_flush, "{mode}");
            assert_eq!(dev["write-cache"], wc, "{mode}");
        }
    }

    #[test]
    fn bad_disks_are_refused_with_the_field_named() {
        let field = |disks: &[DiskSpec], machine: &str| match validate_disks(disks, machine) {
            Err(QemuError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        };
        let mut d = disk("x", DiskBus::VirtioBlk);
        d.path = "relative.qcow2".into();
        assert_eq!(field(&[d], "pc"), "disks.path");
        assert_eq!(
            field(&[disk("Bad Id", DiskBus::VirtioBlk)], "pc"),
            "disks.id"
        );
        assert_eq!(
            field(
                &[disk("x", DiskBus::VirtioBlk), disk("x", DiskBus::Sata)],
                "pc"
            ),
            "disks.id"
        );
        assert_eq!(field(&[disk("x", DiskBus::Ide)], "q35"), "disks.bus");
        let five: Vec<DiskSpec> = (0..5)
            .map(|i| disk(&format!("i{i}"), DiskBus::Ide))
            .collect();
        assert_eq!(field(&five, "pc"), "disks.bus");
        let mut ro = disk("x", DiskBus::Sata);
        ro.read_only = true;
        assert_eq!(field(&[ro], "pc"), "disks.read_only");
        let mut s = disk("x", DiskBus::VirtioBlk);
        s.serial = Some("a b".into());
        assert_eq!(field(&[s], "pc"), "disks.serial");
        let mut raw = disk("x", DiskBus::VirtioBlk);
        raw.format = DiskFormat::Raw;
        raw.backing = Some(BackingImage {
            path: "/b".into(),
            format: DiskFormat::Raw,
        });
        assert_eq!(field(&[raw], "pc"), "disks.backing");
        validate_disks(
            &[disk("x", DiskBus::Ide), disk("y", DiskBus::Sata)],
            "pc-i440fx-9.2",
        )
        .unwrap();
    }

    #[test]
    fn names_round_trip() {
        for b in DiskBus::ALL {
            assert_eq!(b.as_str().parse::<DiskBus>().unwrap(), *b);
        }
        assert_eq!(
            serde_json::to_string(&DiskBus::VirtioScsi).unwrap(),
            "\"virtio-scsi\""
        );
        assert!("floppy"
            .parse::<DiskBus>()
            .unwrap_err()
            .contains("virtio-blk"));
    }
}
