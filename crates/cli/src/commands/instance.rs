//! `ferry instance`: define, start, stop and remove virtual machines.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use clap::{Args, Subcommand};
use ferry_api::instances::{
    BootSpec, CreateInstance, Instance, InstanceSpec, InstanceState, NicSpec,
};
use ferry_lab::guest_config::GuestConfig;
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::LabError;
use ferry_qemu::MacAddr;

use super::{seg, Ctx};
use crate::error::{exit, CliError};
use crate::output::{self, OutputFormat};

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum InstanceCommand {
    /// List instances: host, state, generation, migration in flight.
    List,
    /// Show one instance (name or id).
    Show { instance: String },
    /// Define an instance on a host (and start it with --start).
    Create(CreateArgs),
    /// Start a stopped instance.
    Start { instance: String },
    /// Stop a running instance: the guest is asked to shut down (guest agent, else ACPI) and
    /// powered off if it has not after the timeout.
    Stop {
        instance: String,
        /// Power off at once instead of asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to shut down (default 30, at most 45).
        #[arg(long, value_name = "S", conflicts_with = "force")]
        timeout: Option<u32>,
    },
    /// Remove a stopped instance's definition.
    Delete { instance: String },
}

/// `ferry instance create`: either an explicit kernel boot, or `--lab-guest`, Ferry's test
/// guest, which needs nothing but a name.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct CreateArgs {
    pub name: String,
    /// Guest RAM in MiB (default with --lab-guest: 256).
    #[arg(long, required_unless_present = "lab_guest")]
    pub memory_mib: Option<u32>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Host to define it on (default: the server picks the enabled online host with the most
    /// free RAM).
    #[arg(long)]
    pub host: Option<String>,
    /// Kernel image, a path every host can read.
    #[arg(
        long,
        required_unless_present = "lab_guest",
        conflicts_with = "lab_guest"
    )]
    pub kernel: Option<String>,
    /// Initramfs, a path every host can read.
    #[arg(
        long,
        required_unless_present = "lab_guest",
        conflicts_with = "lab_guest"
    )]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[arg(long, conflicts_with = "lab_guest")]
    pub cmdline: Option<String>,
    /// A NIC on a network, `NETWORK[,mac=52:54:00:xx:xx:xx]`; repeat for more. Without a MAC
    /// one is derived from the instance name.
    #[arg(long = "nic", value_parser = parse_nic)]
    pub nics: Vec<NicArg>,
    /// Start it right away.
    #[arg(long)]
    pub start: bool,
    /// Ferry's test guest: kernel and initramfs from the lab image (built if needed), its
    /// command line, and one NIC on network `lab`.
    #[arg(long)]
    pub lab_guest: bool,
    /// The lab guest's eth0 address, `A.B.C.D/PREFIX` (only with --lab-guest).
    #[arg(long, value_parser = parse_ip_prefix)]
    pub ip: Option<(Ipv4Addr, u8)>,
}

/// The lab guest's default RAM: its 64 MiB working set plus the kernel's reserve, with room.
pub const LAB_GUEST_MEMORY_MIB: u32 = 256;
pub use ferry_lab::instance::LAB_NETWORK;

/// One `--nic` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub network: String,
    pub mac: Option<String>,
}

/// Parses `NETWORK[,mac=..]`.
pub fn parse_nic(s: &str) -> Result<NicArg, String> {
    let mut parts = s.split(',');
    let network = parts.next().unwrap_or("").trim();
    if network.is_empty() || network.contains('=') {
        return Err(format!("{s:?}: expected NETWORK[,mac=XX:XX:XX:XX:XX:XX]"));
    }
    let mut mac = None;
    for part in parts {
        match part.split_once('=') {
            Some(("mac", v)) => {
                let v = v.trim().to_ascii_lowercase();
                if !is_mac(&v) {
                    return Err(format!("{v:?} is not a MAC address like 52:54:00:12:34:56"));
                }
                mac = Some(v);
            }
            _ => return Err(format!("{part:?}: the only NIC option is mac=")),
        }
    }
    Ok(NicArg {
        network: network.to_string(),
        mac,
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses `A.B.C.D/PREFIX`.
pub fn parse_ip_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected A.B.C.D/PREFIX, e.g. 10.77.0.100/24"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length 0..=32"))?;
    Ok((ip, prefix))
}

/// A stable MAC for NIC `index` of instance `name`: the same name gets the same address on
/// every run, so ARP caches and DHCP leases in a lab stay valid across re-creation.
pub fn mac_for(name: &str, index: usize) -> String {
    // FNV-1a: tiny, stable across Rust versions (unlike std's hasher).
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes().chain((index as u32).to_be_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    MacAddr::local(h & 0x00ff_ffff).to_string()
}

/// The kernel and initramfs of a lab guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabImage {
    pub kernel: String,
    pub initrd: String,
}

impl LabImage {
    /// Builds or reuses the guest image in the default cache (as `ferry image build` does).
    pub async fn ensure() -> Result<LabImage, CliError> {
        let opts = ImageOptions::default();
        let (image, _) = tokio::task::spawn_blocking(move || ensure_image(&opts))
            .await
            .map_err(|e| CliError::new("internal", format!("image builder panicked: {e}"), ""))?
            .map_err(LabError::from)?;
        Ok(LabImage {
            kernel: path_str(&image.kernel),
            initrd: path_str(&image.initrd),
        })
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The request `create` sends. `lab` must be given when `args.lab_guest` is set.
pub fn create_request(
    args: &CreateArgs,
    lab: Option<&LabImage>,
) -> Result<CreateInstance, CliError> {
    if args.ip.is_some() && !args.lab_guest {
        return Err(CliError::new(
            "invalid-arguments",
            "--ip sets the lab guest's address and needs --lab-guest",
            "put the address in --cmdline for your own kernel",
        ));
    }
    let mut nics: Vec<NicArg> = args.nics.clone();
    let boot = if args.lab_guest {
        let lab = lab.ok_or_else(|| CliError::new("internal", "lab image missing", ""))?;
        if nics.is_empty() {
            nics.push(NicArg {
                network: LAB_NETWORK.into(),
                mac: None,
            });
        }
        let config = GuestConfig {
            ip: args.ip,
            ..GuestConfig::default()
        };
        let memory = args.memory_mib.unwrap_or(LAB_GUEST_MEMORY_MIB);
        config.validate(memory).map_err(|e| {
            CliError::new(
                "invalid-instance",
                format!("lab guest {}: {e}", args.name),
                "raise --memory-mib",
            )
        })?;
        BootSpec {
            kernel: Some(lab.kernel.clone()),
            initrd: Some(lab.initrd.clone()),
            cmdline: config.kernel_cmdline(),
            ..BootSpec::default()
        }
    } else {
        BootSpec {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone().unwrap_or_default(),
            ..BootSpec::default()
        }
    };
    let memory_mib = args
        .memory_mib
        .or(args.lab_guest.then_some(LAB_GUEST_MEMORY_MIB))
        .unwrap_or_default();
    Ok(CreateInstance {
        name: args.name.clone(),
        host: args.host.clone(),
        disks: vec![],
        spec: InstanceSpec {
            memory_mib,
            vcpus: args.vcpus,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot,
            disks: vec![],
            nics: nics
                .iter()
                .enumerate()
                .map(|(i, n)| NicSpec {
                    network: n.network.clone(),
                    mac: n.mac.clone().unwrap_or_else(|| mac_for(&args.name, i)),
                })
                .collect(),
        },
        start: args.start,
    })
}

pub async fn run(ctx: &Ctx, cmd: InstanceCommand) -> Result<u8, CliError> {
    let instance: Instance = match cmd {
        InstanceCommand::List => {
            let list: Vec<Instance> = ctx.get("/v1/instances").await?;
            ctx.print(&list, |l| output::instances_table(l));
            return Ok(exit::OK);
        }
        InstanceCommand::Show { instance } => {
            ctx.get(&format!("/v1/instances/{}", seg(&instance)))
                .await?
        }
        InstanceCommand::Create(args) => {
            let lab = if args.lab_guest {
                Some(LabImage::ensure().await?)
            } else {
                None
            };
            let req = create_request(&args, lab.as_ref())?;
            ctx.post("/v1/instances", &req).await?
        }
        InstanceCommand::Start { instance } => {
            ctx.post(&format!("/v1/instances/{}/start", seg(&instance)), &())
                .await?
        }
        InstanceCommand::Stop {
            instance,
            force,
            timeout,
        } => {
            let opts = ferry_api::instances::StopOptions {
                force,
                timeout_s: timeout,
            };
            ctx.post(
                &format!("/v1/instances/{}/stop{}", seg(&instance), opts.query()),
                &(),
            )
            .await?
        }
        InstanceCommand::Delete { instance } => {
            let answer: serde_json::Value = ctx
                .delete(&format!("/v1/instances/{}", seg(&instance)))
                .await?;
            match ctx.output {
                OutputFormat::Json if !answer.is_null() => {
                    crate::outln!("{}", output::json(&answer))
                }
                OutputFormat::Json => {
                    crate::outln!(
                        "{}",
                        output::json(&serde_json::json!({"deleted": instance}))
                    )
                }
                OutputFormat::Table => crate::outln!("deleted instance {instance}"),
            }
            return Ok(exit::OK);
        }
    };
    ctx.print(&instance, output::instance_detail);
    Ok(exit::OK)
}

/// Polls until `instance` is in `state`, for commands that promise a running guest.
pub async fn wait_for_state(
    ctx: &Ctx,
    instance: &str,
    state: InstanceState,
    timeout: Duration,
) -> Result<Instance, CliError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let i: Instance = ctx.get(&format!("/v1/instances/{}", seg(instance))).await?;
        if i.state == state {
            return Ok(i);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::new(
                "instance-timeout",
                format!(
                    "instance {instance} is {} after {} s, expected {}",
                    output::instance_state(i.state),
                    timeout.as_secs(),
                    output::instance_state(state)
                ),
                "check the agent's log on its host",
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
