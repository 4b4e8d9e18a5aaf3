use crate::process::{RunPaths, StartMode};
use crate::spec::{BootSource, InstanceSpec};
use crate::Accel;

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
    push(&["-machine", &spec.machine]);
    push(&["-accel", accel.qemu_option()]);
    push(&["-cpu", &spec.cpu_model]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    let BootSource::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot;
    push(&["-kernel", &kernel.display().to_string()]);
    push(&["-initrd", &initrd.display().to_string()]);
    push(&["-append", cmdline]);
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
    for (i, nic) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap),
        ]);
        // romfile= keeps the PXE ROM out: it is useless with direct kernel boot, and would be
        // migrated with every guest.
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={},romfile=", nic.mac),
        ]);
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
            nics: vec![NicSpec {
                tap: "tap-web1".into(),
                mac: MacAddr::local(7),
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
             -netdev tap,id=net0,ifname=tap-web1,script=no,downscript=no \
             -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:07,romfile="
        );
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
