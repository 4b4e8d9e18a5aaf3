//! One QEMU process, as Ferry runs it.
//!
//! Every host-side decision about a QEMU process lives here: the command line an
//! [`InstanceSpec`] turns into (identical on both sides of a migration, which QEMU requires),
//! which accelerator really works on this host, starting normally or in incoming mode, and
//! stopping without leaving a process, a socket or a file behind. Migration policy does not:
//! that is `ferry-migrate`'s.

mod accel;
mod cmdline;
mod disk;
mod error;
mod net;
mod process;
mod spec;

pub use accel::{probe_accelerator, Accel, AccelChoice, BootProbe};
pub use cmdline::{qemu_args, GUEST_AGENT_PORT};
pub use disk::{
    node_name, validate_disks, BackingImage, CacheMode, DiskBus, DiskFormat, DiskSpec, MAX_DISK_ID,
    MAX_SERIAL,
};
pub use error::QemuError;
pub use net::{parse_gateway, smbios_arg, smbios_net_string, Ipv4Cidr, SMBIOS_NET_PREFIX};
pub use process::{Exit, LaunchOptions, QemuProcess, RunPaths, Shutdown, StartMode};
pub use spec::{
    has_control_chars, is_known_machine_type, BootSource, Firmware, InstanceSpec, MacAddr, NicSpec,
    MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
};
