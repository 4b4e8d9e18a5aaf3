use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::LabError;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse) the guest image: Debian's cloud kernel, busybox and Ferry's guest
    /// program. Skipped when nothing changed.
    Build(ImageArgs),
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

pub async fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let ImageCommand::Build(args) = cmd;
    let opts = args.options();
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
