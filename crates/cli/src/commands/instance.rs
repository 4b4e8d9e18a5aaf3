//! `ferry instance`: define, start, stop and remove virtual machines.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use clap::{Args, Subcommand};
use ferry_api::instances::{
    BootFrom, BootSpec, CacheMode, CreateInstance, DiskBus, DiskFormat, DiskRequest, FirmwareKind,
    Instance, InstanceConsole, InstanceSpec, InstanceState, NicSpec,
};
use ferry_lab::guest_config::GuestConfig;
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::LabError;
use ferry_qemu::{parse_gateway, Ipv4Cidr, MacAddr};

use super::{seg, Ctx};
use crate::error::{exit, CliError};
use crate::output::{self, OutputFormat};

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum InstanceCommand {
    /// List instances: host, state, generation, migration in flight.
    List,
    /// Show one instance (name or id).
    Show { instance: String },
    /// Define an instance on a host, with its disks (and start it with --start).
    Create(Box<CreateArgs>),
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
    /// Remove a stopped instance, and the disk images Ferry made for it (images given with
    /// --disk-image stay).
    Delete { instance: String },
    /// Show the guest's serial console output: from every host that ran it, in order, so a
    /// migration does not cut it (each host's part after a `--- HOST ...` line).
    #[command(visible_alias = "log")]
    Console {
        instance: String,
        /// At most this many bytes of output, the newest (default 256 KiB, at most 16 MiB).
        #[arg(long, value_name = "N")]
        bytes: Option<u64>,
    },
}

/// `ferry instance create`: an explicit kernel boot, a boot from disk, or `--lab-guest`,
/// Ferry's test guest, which needs nothing but a name.
///
/// Disks (`--disk-image`, then `--disk-backing`, then `--disk`, each in the order given; with
/// `--boot disk` the first one boots) take options after a comma: `id=NAME`, `bus=virtio-blk|
/// virtio-scsi|ide|sata`, `cache=none|writeback|writethrough|directsync|unsafe`,
/// `serial=TEXT`, `format=qcow2|raw`, `ro`, and for `--disk-image` also `copy`. Sizes are
/// bytes or a whole number with K, M, G or T (powers of 1024): `10G`, `512M`.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
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
    /// Kernel image, a path inside a datastore every host can read (needed to boot a kernel).
    /// A relative path is taken from the current directory, if the file is there.
    #[arg(long, conflicts_with = "lab_guest")]
    pub kernel: Option<String>,
    /// Initramfs, a path inside a datastore every host can read (needed to boot a kernel).
    /// A relative path is taken from the current directory, if the file is there.
    #[arg(long, conflicts_with = "lab_guest")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[arg(long, conflicts_with = "lab_guest")]
    pub cmdline: Option<String>,
    /// A NIC on a network, `NETWORK[,mac=52:54:00:xx:xx:xx][,ip=ADDR/PREFIX][,gw=GW]`; repeat
    /// for more. Without a MAC one is derived from the instance name. `ip=` gives the guest a
    /// static address (through an SMBIOS OEM string its OS reads, as Ferry's Debian image
    /// does); without it the guest uses DHCP.
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
    /// A new empty disk, `SIZE[@DATASTORE][,OPTION...]` (qcow2 unless format=raw); without a
    /// datastore the host's shared datastore with the most room. Repeat for more.
    #[arg(long = "disk", value_name = "SIZE[@DATASTORE]", value_parser = parse_new_disk)]
    pub disks: Vec<DiskRequest>,
    /// An existing image, `PATH[@DATASTORE][,OPTION...]`: the absolute path on the host,
    /// inside a datastore. Used in place (Ferry never deletes it), or copied onto DATASTORE
    /// with --copy (the copy is deleted with the instance). Repeat for more.
    #[arg(long = "disk-image", value_name = "PATH[@DATASTORE]", value_parser = parse_image_disk)]
    pub disk_images: Vec<DiskRequest>,
    /// A new qcow2 overlay on a base image, `BASE[@DATASTORE][:SIZE][,OPTION...]`: BASE is the
    /// absolute path of the base on the host (inside a datastore, ideally a shared one); SIZE
    /// defaults to the base's. Repeat for more.
    #[arg(
        long = "disk-backing",
        value_name = "BASE[@DATASTORE][:SIZE]",
        value_parser = parse_backing_disk
    )]
    pub disk_backings: Vec<DiskRequest>,
    /// Copy every --disk-image onto its datastore instead of using it in place.
    #[arg(long, requires = "disk_images")]
    pub copy: bool,
    /// What boots: `kernel` (--kernel/--initrd) or `disk` (the first disk, through the
    /// firmware). Default: kernel when --kernel or --lab-guest is given, else disk.
    #[arg(long, value_name = "disk|kernel", value_parser = parse_boot)]
    pub boot: Option<BootFrom>,
    /// The firmware: `bios` (SeaBIOS) or `uefi` (OVMF, with a per-instance variable store;
    /// the host needs Debian's ovmf package).
    #[arg(long, value_name = "bios|uefi", value_parser = parse_firmware, default_value = "bios")]
    pub firmware: FirmwareKind,
}

/// Parses `--boot`.
pub fn parse_boot(s: &str) -> Result<BootFrom, String> {
    match s {
        "disk" => Ok(BootFrom::Disk),
        "kernel" => Ok(BootFrom::Kernel),
        _ => Err(format!("{s:?} is not disk or kernel")),
    }
}

/// Parses `--firmware`.
pub fn parse_firmware(s: &str) -> Result<FirmwareKind, String> {
    match s {
        "bios" => Ok(FirmwareKind::Bios),
        "uefi" => Ok(FirmwareKind::Uefi),
        _ => Err(format!("{s:?} is not bios or uefi")),
    }
}

/// Parses a size: bytes, or a whole number with `K`, `M`, `G` or `T` (powers of 1024,
/// optionally followed by `iB` or `B`), a multiple of 512 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?} is not a size like 10G, 512M, 1T or a number of bytes"
            ))
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 10G, 512M, 1T or a number of bytes"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 || bytes & 511 != 0 {
        return Err(format!(
            "{s:?} must be more than 0 and a multiple of 512 bytes"
        ));
    }
    Ok(bytes)
}

/// Splits `HEAD[,OPTION...]` and applies the options to `disk`; `copy` is allowed only for
/// images.
fn disk_options<'a>(s: &'a str, disk: &mut DiskRequest, image: bool) -> Result<&'a str, String> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or("").trim();
    if head.is_empty() {
        return Err(format!("{s:?}: the disk is missing before the options"));
    }
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (part.trim(), None),
        };
        match (key, value) {
            ("id", Some(v)) => disk.id = Some(v.to_string()),
            ("bus", Some(v)) => disk.bus = v.parse::<DiskBus>()?,
            ("cache", Some(v)) => disk.cache = v.parse::<CacheMode>()?,
            ("serial", Some(v)) => disk.serial = Some(v.to_string()),
            ("format", Some(v)) => disk.format = Some(v.parse::<DiskFormat>()?),
            ("ro" | "read-only", None) => disk.read_only = true,
            ("copy", None) if image => disk.copy = true,
            _ => {
                return Err(format!(
                    "{part:?} is not a disk option (id=, bus=, cache=, serial=, format=, ro{})",
                    if image { ", copy" } else { "" }
                ))
            }
        }
    }
    Ok(head)
}

/// `X@DATASTORE` -> `(X, Some(DATASTORE))`; an `@` inside a path (followed by a `/`) is
/// part of the path.
fn split_datastore(head: &str) -> Result<(&str, Option<String>), String> {
    match head.rsplit_once('@') {
        Some((_, ds)) if ds.contains('/') => Ok((head, None)),
        Some((x, ds)) if ds.is_empty() || x.is_empty() => {
            Err(format!("{head:?}: expected X@DATASTORE with both parts"))
        }
        Some((x, ds)) => Ok((x, Some(ds.to_string()))),
        None => Ok((head, None)),
    }
}

fn absolute(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} must be the image's absolute path on the instance's host"
        ));
    }
    Ok(path.to_string())
}

/// Parses `--disk SIZE[@DATASTORE][,OPTION...]`.
pub fn parse_new_disk(s: &str) -> Result<DiskRequest, String> {
    let mut disk = DiskRequest::default();
    let head = disk_options(s, &mut disk, false)?;
    let (size, datastore) = split_datastore(head)?;
    disk.size_bytes = Some(parse_size(size)?);
    disk.datastore = datastore;
    Ok(disk)
}

/// Parses `--disk-image PATH[@DATASTORE][,OPTION...]`.
pub fn parse_image_disk(s: &str) -> Result<DiskRequest, String> {
    let mut disk = DiskRequest::default();
    let head = disk_options(s, &mut disk, true)?;
    let (path, datastore) = split_datastore(head)?;
    disk.image = Some(absolute(path)?);
    disk.datastore = datastore;
    Ok(disk)
}

/// Parses `--disk-backing BASE[@DATASTORE][:SIZE][,OPTION...]`.
pub fn parse_backing_disk(s: &str) -> Result<DiskRequest, String> {
    let mut disk = DiskRequest::default();
    let head = disk_options(s, &mut disk, false)?;
    let head = match head.rsplit_once(':') {
        Some((rest, size)) if !size.contains('/') => {
            disk.size_bytes = Some(parse_size(size)?);
            rest
        }
        _ => head,
    };
    let (base, datastore) = split_datastore(head)?;
    disk.backing = Some(absolute(base)?);
    disk.datastore = datastore;
    Ok(disk)
}

/// The lab guest's default RAM: its 64 MiB working set plus the kernel's reserve, with room.
pub const LAB_GUEST_MEMORY_MIB: u32 = 256;
pub use ferry_lab::instance::LAB_NETWORK;

/// One `--nic` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub network: String,
    pub mac: Option<String>,
    /// `ip=ADDR/PREFIX`: a static address the guest gets through its firmware tables.
    pub ip: Option<Ipv4Cidr>,
    /// `gw=GW`: its gateway, with `ip=`.
    pub gw: Option<Ipv4Addr>,
}

/// Parses `NETWORK[,mac=..][,ip=ADDR/PREFIX][,gw=GW]` (`ip` and `gw` as the lab guest's
/// `ferry.ip=`/`ferry.gw=`), checking the address by the server's rules.
pub fn parse_nic(s: &str) -> Result<NicArg, String> {
    let mut parts = s.split(',');
    let network = parts.next().unwrap_or("").trim();
    if network.is_empty() || network.contains('=') {
        return Err(format!(
            "{s:?}: expected NETWORK[,mac=XX:XX:XX:XX:XX:XX][,ip=ADDR/PREFIX][,gw=GW]"
        ));
    }
    let mut nic = NicArg {
        network: network.to_string(),
        mac: None,
        ip: None,
        gw: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("mac", v)) => {
                let v = v.trim().to_ascii_lowercase();
                if !is_mac(&v) {
                    return Err(format!("{v:?} is not a MAC address like 52:54:00:12:34:56"));
                }
                nic.mac = Some(v);
            }
            Some(("ip", v)) => nic.ip = Some(v.parse()?),
            Some(("gw", v)) => nic.gw = Some(parse_gateway(v)?),
            _ => {
                return Err(format!(
                    "{part:?}: the NIC options are mac=, ip=ADDR/PREFIX and gw="
                ))
            }
        }
    }
    match (nic.ip, nic.gw) {
        (None, Some(gw)) => return Err(format!("gw={gw} needs a static address (ip=ADDR/PREFIX)")),
        (Some(ip), gw) => ip.check_host(gw)?,
        (None, None) => {}
    }
    Ok(nic)
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses `A.B.C.D/PREFIX` (prefix 1 to 32), as a NIC's `ip=` does.
pub fn parse_ip_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let c: Ipv4Cidr = s.parse()?;
    Ok((c.addr, c.prefix))
}

/// A stable MAC for NIC `index` of instance `name` ([`MacAddr::for_nic`]).
pub fn mac_for(name: &str, index: usize) -> String {
    MacAddr::for_nic(name, index).to_string()
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

/// `--kernel`/`--initrd` as the absolute path the server needs: an absolute path as given; a
/// relative one from `cwd`, resolved (symlinks, `..`) when the file is there, because the
/// agent reads the path on the instance's host and has no idea of this shell's directory. A
/// relative path to nothing here is refused rather than guessed: it is probably a path on
/// another machine.
pub fn absolute_boot_file(flag: &str, path: &str, cwd: &Path) -> Result<String, CliError> {
    if path.starts_with('/') {
        return Ok(path.to_string());
    }
    let joined = cwd.join(path);
    match joined.canonicalize() {
        Ok(p) if p.is_file() => Ok(path_str(&p)),
        _ => Err(CliError::new(
            "invalid-arguments",
            format!(
                "{flag} {path:?} is a relative path and {} is no file",
                joined.display()
            ),
            format!(
                "give {flag} the file's absolute path on the instance's host; a relative \
                 path is taken from the current directory"
            ),
        )),
    }
}

/// The request `create` sends. `lab` must be given when `args.lab_guest` is set. A relative
/// `--kernel`/`--initrd` is made absolute from the current directory ([`absolute_boot_file`]).
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
    let mut disks: Vec<DiskRequest> = args.disk_images.clone();
    if args.copy {
        for d in &mut disks {
            d.copy = true;
        }
    }
    disks.extend(args.disk_backings.iter().cloned());
    disks.extend(args.disks.iter().cloned());
    let from = args
        .boot
        .unwrap_or(if args.lab_guest || args.kernel.is_some() {
            BootFrom::Kernel
        } else {
            BootFrom::Disk
        });
    match from {
        BootFrom::Disk if args.lab_guest => {
            return Err(CliError::new(
                "invalid-arguments",
                "the lab guest boots its kernel; --boot disk cannot be used with --lab-guest",
                "give the lab guest data disks with --disk, or leave out --lab-guest",
            ))
        }
        BootFrom::Disk
            if args.kernel.is_some() || args.initrd.is_some() || args.cmdline.is_some() =>
        {
            return Err(CliError::new(
                "invalid-arguments",
                "--kernel, --initrd and --cmdline boot a kernel, but --boot is disk",
                "leave them out, or use --boot kernel",
            ))
        }
        BootFrom::Disk if disks.is_empty() => {
            return Err(CliError::new(
                "invalid-arguments",
                "nothing to boot: give --kernel and --initrd, or a disk to boot from \
                 (--disk-image, --disk-backing) with --boot disk",
                "see `ferry instance create --help`",
            ))
        }
        BootFrom::Kernel if !args.lab_guest && (args.kernel.is_none() || args.initrd.is_none()) => {
            return Err(CliError::new(
                "invalid-arguments",
                "booting a kernel needs --kernel and --initrd",
                "give both, or boot a disk with --boot disk",
            ))
        }
        _ => {}
    }
    let mut nics: Vec<NicArg> = args.nics.clone();
    let boot = if args.lab_guest {
        let lab = lab.ok_or_else(|| CliError::new("internal", "lab image missing", ""))?;
        if nics.is_empty() {
            nics.push(NicArg {
                network: LAB_NETWORK.into(),
                mac: None,
                ip: None,
                gw: None,
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
            firmware: args.firmware,
            ..BootSpec::default()
        }
    } else {
        let absolute = |flag: &str, path: &Option<String>| -> Result<Option<String>, CliError> {
            let Some(path) = path else { return Ok(None) };
            if path.starts_with('/') {
                return Ok(Some(path.clone()));
            }
            let cwd = std::env::current_dir().map_err(|e| {
                CliError::new(
                    "invalid-arguments",
                    format!(
                        "{flag} {path:?} is relative and the current directory is unknown: {e}"
                    ),
                    format!("give {flag} the file's absolute path on the instance's host"),
                )
            })?;
            absolute_boot_file(flag, path, &cwd).map(Some)
        };
        BootSpec {
            from,
            firmware: args.firmware,
            kernel: absolute("--kernel", &args.kernel)?,
            initrd: absolute("--initrd", &args.initrd)?,
            cmdline: args.cmdline.clone().unwrap_or_default(),
            nvram: None,
        }
    };
    let memory_mib = args
        .memory_mib
        .or(args.lab_guest.then_some(LAB_GUEST_MEMORY_MIB))
        .unwrap_or_default();
    Ok(CreateInstance {
        name: args.name.clone(),
        host: args.host.clone(),
        disks,
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
                    ipv4: n.ip.map(|c| c.to_string()),
                    gateway: n.gw.map(|g| g.to_string()),
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
            let made: Instance = if req.disks.is_empty() {
                ctx.post("/v1/instances", &req).await?
            } else {
                // Copying an image takes as long as its data takes to move.
                ctx.client
                    .clone()
                    .with_timeout(Duration::from_secs(3600))
                    .post("/v1/instances", &req)
                    .await
                    .map_err(|e| ctx.api_err(e))?
            };
            // On stderr, so that `-o json` stays one document (which has them too).
            for w in &made.warnings {
                eprintln!("{}", crate::error::render_warning(w));
            }
            made
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
        InstanceCommand::Console { instance, bytes } => {
            let query = bytes.map(|b| format!("?bytes={b}")).unwrap_or_default();
            let console: InstanceConsole = ctx
                .get(&format!("/v1/instances/{}/console{query}", seg(&instance)))
                .await?;
            ctx.print(&console, output::console);
            return Ok(exit::OK);
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
