use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferry_lab::debian_image::{
    ensure_debian_image_with_progress, DebianImage, DebianImageOptions, DEFAULT_SIZE_GIB,
    MAX_SIZE_GIB,
};
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::LabError;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse) the guest image: Debian's cloud kernel, busybox and Ferry's guest
    /// program. Skipped when nothing changed. With --debian: a bootable qcow2 disk of a minimal
    /// Debian bookworm running qemu-guest-agent, built from Debian packages (needs root).
    Build(BuildArgs),
}

/// `ferry image build`: the lab image, or with `--debian` the Debian disk image.
#[derive(Args, Clone, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Build the Debian bookworm disk image (qcow2, boots from its own disk through SeaBIOS,
    /// runs qemu-guest-agent) instead of the lab's kernel + initramfs.
    #[arg(long, conflicts_with = "offline")]
    pub debian: bool,
    /// Virtual size of the Debian disk in GiB (1 to 2047; the file holds only what is used).
    #[arg(long, value_name = "GIB", default_value_t = DEFAULT_SIZE_GIB, requires = "debian",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SIZE_GIB)))]
    pub size: u32,
    /// Build the Debian image again even if the cache has one (to pick up package updates).
    #[arg(long, requires = "debian")]
    pub force: bool,
}

/// Where the image comes from and goes to.
#[derive(Args, Clone, Debug)]
pub struct ImageArgs {
    /// Cache directory (default: $FERRY_CACHE_DIR, else ~/.cache/ferry).
    #[arg(long, env = "FERRY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Debian kernel package (default: what linux-image-cloud-amd64 depends on).
    #[arg(long)]
    pub kernel_package: Option<String>,
    /// Use only the kernel package already in the cache; never call apt.
    #[arg(long)]
    pub offline: bool,
}

impl ImageArgs {
    pub fn options(&self) -> ImageOptions {
        let mut o = ImageOptions::default();
        if let Some(dir) = &self.cache_dir {
            o.cache_dir = dir.clone();
        }
        if self.kernel_package.is_some() {
            o.kernel_package = self.kernel_package.clone();
        }
        o.offline = self.offline;
        o
    }
}

impl BuildArgs {
    pub fn debian_options(&self) -> DebianImageOptions {
        let mut o = DebianImageOptions::default();
        if let Some(dir) = &self.image.cache_dir {
            o.cache_dir = dir.clone();
        }
        o.kernel_package = self.image.kernel_package.clone();
        o.size_gib = self.size;
        o.force = self.force;
        o
    }
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let ImageCommand::Build(args) = cmd;
    if args.debian {
        return run_debian(&args).await;
    }
    let opts = args.image.options();
    let (image, rebuilt) = tokio::task::spawn_blocking(move || ensure_image(&opts))
        .await?
        .map_err(LabError::from)?;
    ferry_cli::outln!(
        "{} image {}\n  kernel {} ({})\n  initrd {}",
        if rebuilt { "built" } else { "reused" },
        image.id,
        image.kernel.display(),
        image.kernel_version,
        image.initrd.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_debian(args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let opts = args.debian_options();
    let (image, built) = tokio::task::spawn_blocking(move || {
        // Progress goes to stderr, so stdout stays the result a script can read.
        ensure_debian_image_with_progress(&opts, &|step| eprintln!("  {step}"))
    })
    .await?
    .map_err(LabError::from)?;
    ferry_cli::outln!("{}", render_debian(&image, built));
    Ok(ExitCode::SUCCESS)
}

/// What `ferry image build --debian` prints: the path first, then what was done.
fn render_debian(image: &DebianImage, built: bool) -> String {
    let what = if built {
        format!("built in {:.0} s", image.build_seconds)
    } else {
        format!(
            "reused (built at {} in {:.0} s; --force builds it again)",
            chrono::DateTime::from_timestamp(image.built_unix as i64, 0)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|| "?".into()),
            image.build_seconds
        )
    };
    format!(
        "{}\n  Debian {} image {}: {what}\n  disk    qcow2, {} GiB virtual, {:.0} MiB file\n  \
         kernel  {} ({})\n  root    UUID={}\n  use     qemu-img create -f qcow2 -b {} -F qcow2 \
         overlay.qcow2",
        image.path.display(),
        image.suite,
        image.id,
        image.size_gib,
        image.file_bytes as f64 / (1 << 20) as f64,
        image.kernel_version,
        image.kernel_package,
        image.root_uuid,
        image.path.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ImageCommand,
    }

    fn parse(args: &[&str]) -> Result<BuildArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("ferry-image").chain(args.iter().copied()))?;
        let ImageCommand::Build(b) = cli.cmd;
        Ok(b)
    }

    #[test]
    fn debian_flags_parse_and_need_debian() {
        let b = parse(&["build", "--debian", "--size", "8", "--force"]).unwrap();
        assert!(b.debian && b.force);
        let o = b.debian_options();
        assert_eq!((o.size_gib, o.force), (8, true));
        let b = parse(&["build", "--debian"]).unwrap();
        assert_eq!(b.size, DEFAULT_SIZE_GIB);
        assert!(
            parse(&["build", "--size", "8"]).is_err(),
            "--size needs --debian"
        );
        assert!(
            parse(&["build", "--force"]).is_err(),
            "--force needs --debian"
        );
        assert!(parse(&["build", "--debian", "--size", "0"]).is_err());
        assert!(parse(&["build", "--debian", "--size", "4096"]).is_err());
        assert!(parse(&["build", "--debian", "--offline"]).is_err());
        assert!(!parse(&["build"]).unwrap().debian);
    }

    #[test]
    fn debian_output_names_the_path_first() {
        let image = DebianImage {
            path: "/c/debian-images/abc/debian-bookworm-1.qcow2".into(),
            id: "abc".into(),
            suite: "bookworm".into(),
            kernel_package: "linux-image-6.1.0-57-cloud-amd64".into(),
            kernel_version: "6.1.0-57-cloud-amd64".into(),
            root_uuid: "1234".into(),
            size_gib: 4,
            packages: vec![],
            file_bytes: 140 << 20,
            build_seconds: 83.4,
            built_unix: 0,
        };
        let text = render_debian(&image, true);
        let first = text.lines().next().unwrap();
        assert_eq!(first, "/c/debian-images/abc/debian-bookworm-1.qcow2");
        assert!(text.contains("built in 83 s"), "{text}");
        assert!(text.contains("140 MiB file"), "{text}");
        let text = render_debian(&image, false);
        assert!(
            text.contains("reused (built at 1970-01-01 00:00 UTC"),
            "{text}"
        );
    }
}
