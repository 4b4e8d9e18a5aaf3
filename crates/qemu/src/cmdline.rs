use serde_json::json;

use crate::disk::disk_args;
use crate::net::{smbios_arg, smbios_net_string};
use crate::process::{RunPaths, StartMode};
use crate::spec::{BootSource, Firmware, InstanceSpec};
use crate::Accel;

/// The virtio-serial port name qemu-guest-agent opens inside the guest.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The QEMU arguments for `spec` (without the binary).
///
/// Kept a pure function so that the exact command line is unit-tested, and so that source and
/// destination provably get the same machine: only the run paths and the incoming flag differ.
pub fn qemu_args(
    spec: &InstanceSpec,
    accel: Accel,
    paths: &RunPaths,
    mode: StartMode,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-no-user-config", "-nodefaults", "-display", "none"]);
    match &spec.firmware {
        Firmware::Bios => push(&["-machine", &spec.machine]),
        Firmware::Uefi { code, vars } => {
            for (node, path, read_only) in [
                ("ferry-fw-code", code, true),
                ("ferry-fw-vars", vars, false),
            ] {
                push(&["-blockdev", &json!({"driver": "file", "node-name": format!("{node}-file"), "filename": path, "read-only": read_only}).to_string()]);
                push(&["-blockdev", &json!({"driver": "raw", "node-name": node, "file": format!("{node}-file"), "read-only": read_only}).to_string()]);
            }
            push(&[
                "-machine",
                &format!(
                    "{},pflash0=ferry-fw-code,pflash1=ferry-fw-vars",
                    spec.machine
                ),
            ]);
        }
    }
    push(&["-accel", accel.qemu_option()]);
    push(&["-cpu", &spec.cpu_model]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    let boot_disk = match &spec.boot {
        BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", &kernel.display().to_string()]);
            push(&["-initrd", &initrd.display().to_string()]);
            push(&["-append", cmdline]);
            None
        }
        BootSource::Disk => Some(0),
    };
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            paths.serial_socket.display(),
            paths.serial_log.display()
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp_socket.display()),
    ]);
    push(&["-pidfile", &paths.pidfile.display().to_string()]);
    a.extend(disk_args(&spec.disks, boot_disk));
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    // Every instance gets the guest agent's channel, so an OS that runs qemu-guest-agent is
    // seen (OS, addresses) and shut down cleanly without Ferry knowing it in advance.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qga0,path={},server=on,wait=off",
            paths.qga_socket.display()
        ),
    ]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}"),
    ]);
    for (i, nic) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap),
        ]);
        // romfile= keeps the PXE ROM out: Ferry's guests boot a kernel or a disk, never the
        // network, and the ROM would be migrated with every guest.
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={},romfile=", nic.mac),
        ]);
    }
    // Static addresses reach a disk-booted guest through its firmware tables (a kernel-booted
    // one may read them too); the same on both sides of a migration, like every option.
    let oem: Vec<String> = spec
        .nics
        .iter()
        .enumerate()
        .filter_map(|(i, nic)| smbios_net_string(i, nic))
        .collect();
    if let Some(arg) = smbios_arg(&oem) {
        push(&["-smbios", &arg]);
    }
    if mode == StartMode::Incoming {
        // -S: the destination never starts the guest by itself when the stream completes;
        // Ferry starts it only after recording that the guest belongs here (the commit point).
        push(&["-S", "-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{MacAddr, NicSpec};

    fn spec() -> InstanceSpec {
        InstanceSpec {
            name: "web-1".into(),
            memory_mib: 512,
            vcpus: 2,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSource::Kernel {
                kernel: "/img/vmlinuz".into(),
                initrd: "/img/initrd".into(),
                cmdline: "console=ttyS0 ferry.wss=64".into(),
            },
            firmware: Firmware::Bios,
            disks: vec![],
            nics: vec![NicSpec {
                tap: "tap-web1".into(),
                mac: MacAddr::local(7),
                ipv4: None,
                gateway: None,
            }],
        }
    }

    #[test]
    fn command_line_names_every_part_of_the_machine() {
        let paths = RunPaths::in_dir("/run/ferry/web-1".as_ref());
        let args = qemu_args(&spec(), Accel::Tcg, &paths, StartMode::Normal).join(" ");
        assert_eq!(
            args,
            "-name guest=web-1,debug-threads=on -no-user-config -nodefaults -display none \
             -machine pc -accel tcg,tb-size=64 -cpu qemu64 -m 512M -smp 2 \
             -kernel /img/vmlinuz -initrd /img/initrd -append console=ttyS0 ferry.wss=64 \
             -chardev socket,id=serial0,path=/run/ferry/web-1/serial.sock,server=on,wait=off,logfile=/run/ferry/web-1/serial.log,logappend=on \
             -serial chardev:serial0 -qmp unix:/run/ferry/web-1/qmp.sock,server=on,wait=off \
             -pidfile /run/ferry/web-1/qemu.pid \
             -chardev socket,id=qga0,path=/run/ferry/web-1/qga.sock,server=on,wait=off \
             -device virtio-serial-pci,id=vser0 \
             -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
             -netdev tap,id=net0,ifname=tap-web1,script=no,downscript=no \
             -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:07,romfile="
        );
    }

    #[test]
    fn a_static_address_is_one_smbios_oem_string_per_nic() {
        let mut s = spec();
        assert!(!qemu_args(
            &s,
            Accel::Tcg,
            &RunPaths::in_dir("/r".as_ref()),
            StartMode::Normal
        )
        .contains(&"-smbios".to_string()));
        s.nics[0].ipv4 = Some("10.77.0.50/24".parse().unwrap());
        s.nics[0].gateway = Some("10.77.0.1".parse().unwrap());
        let args = qemu_args(
            &s,
            Accel::Tcg,
            &RunPaths::in_dir("/r".as_ref()),
            StartMode::Incoming,
        );
        let i = args.iter().position(|a| a == "-smbios").expect("-smbios");
        assert_eq!(
            args[i + 1],
            "type=11,value=ferry.net0=10.77.0.50/24,,gw=10.77.0.1,,mac=52:54:00:00:00:07"
        );
    }

    #[test]
    fn a_uefi_disk_boot_has_flash_nodes_and_a_boot_disk() {
        let mut s = spec();
        s.boot = BootSource::Disk;
        s.firmware = Firmware::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/ds/web-1-VARS.fd".into(),
        };
        s.disks = vec![crate::disk::DiskSpec {
            id: "root".into(),
            path: "/ds/web-1.qcow2".into(),
            format: crate::DiskFormat::Qcow2,
            bus: crate::DiskBus::VirtioBlk,
            cache: crate::CacheMode::None,
            read_only: false,
            serial: None,
            backing: None,
        }];
        let paths = RunPaths::in_dir("/r".as_ref());
        let args = qemu_args(&s, Accel::Tcg, &paths, StartMode::Normal);
        let joined = args.join(" ");
        assert!(joined.contains("-machine pc,pflash0=ferry-fw-code,pflash1=ferry-fw-vars"));
        assert!(joined.contains(r#""filename":"/ds/web-1-VARS.fd""#));
        assert!(!joined.contains("-kernel"));
        assert!(joined.contains(r#""bootindex":0"#));
    }

    #[test]
    fn incoming_differs_only_by_the_incoming_flag() {
        let paths = RunPaths::in_dir("/r".as_ref());
        let normal = qemu_args(&spec(), Accel::Kvm, &paths, StartMode::Normal);
        let incoming = qemu_args(&spec(), Accel::Kvm, &paths, StartMode::Incoming);
        assert_eq!(&incoming[..normal.len()], &normal[..]);
        assert_eq!(&incoming[normal.len()..], &["-S", "-incoming", "defer"]);
    }
}
