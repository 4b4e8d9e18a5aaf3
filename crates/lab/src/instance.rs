//! The lab guest as an instance of the API: what the demo, the lab CLI and the tests ask the
//! server (or an agent) to run.

use ferry_api::instances::{
    BootFrom, BootSpec, CreateInstance, DiskRequest, InstanceSpec, NicSpec,
};

use ferry_qemu::Ipv4Cidr;

use crate::debian_image::DebianImage;
use crate::guest_config::GuestConfig;
use crate::image::GuestImage;

/// The network every lab host attaches guests to (its `br0`).
pub const LAB_NETWORK: &str = "lab";

/// A lab guest booting `image` with `config`, `memory_mib` of RAM, and one NIC on the lab
/// network with `mac`.
pub fn guest_instance_spec(
    image: &GuestImage,
    config: &GuestConfig,
    memory_mib: u32,
    mac: &str,
) -> InstanceSpec {
    InstanceSpec {
        memory_mib,
        vcpus: 1,
        cpu_model: "qemu64".into(),
        machine: "pc".into(),
        boot: BootSpec {
            kernel: Some(image.kernel.display().to_string()),
            initrd: Some(image.initrd.display().to_string()),
            cmdline: config.kernel_cmdline(),
            ..BootSpec::default()
        },
        disks: vec![],
        nics: vec![NicSpec {
            network: LAB_NETWORK.into(),
            mac: mac.into(),
            // The lab guest takes its address from the kernel command line (`ferry.ip=`).
            ipv4: None,
            gateway: None,
        }],
    }
}

/// The Debian guest as an instance on `host`: its disk a copy of `image` on `datastore`
/// (Ferry's, deleted with the instance), booted through SeaBIOS, one NIC on the lab network
/// with the static address `ipv4` (the lab has no DHCP server: without one the guest has no
/// address there).
#[allow(clippy::too_many_arguments)]
pub fn debian_instance(
    name: &str,
    host: &str,
    image: &DebianImage,
    datastore: &str,
    memory_mib: u32,
    mac: &str,
    ipv4: Option<Ipv4Cidr>,
    start: bool,
) -> CreateInstance {
    CreateInstance {
        name: name.into(),
        host: Some(host.into()),
        spec: InstanceSpec {
            memory_mib,
            vcpus: 1,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSpec {
                from: BootFrom::Disk,
                ..BootSpec::default()
            },
            disks: vec![],
            nics: vec![NicSpec {
                network: LAB_NETWORK.into(),
                mac: mac.into(),
                ipv4: ipv4.map(|c| c.to_string()),
                gateway: None,
            }],
        },
        disks: vec![DiskRequest {
            image: Some(image.path.display().to_string()),
            copy: true,
            datastore: Some(datastore.into()),
            ..DiskRequest::default()
        }],
        start,
    }
}
