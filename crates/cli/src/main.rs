//! `ferry`: one binary for every role. Today: the demo, the lab and the guest image.

mod demo;
mod image_cmd;
mod lab_cmd;
mod report;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of KVM/QEMU virtual machines"
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `ferry_migrate=debug`.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest on lab host A and live-migrate it to lab host B, with a live progress
    /// display and a report.
    Demo(demo::DemoArgs),
    /// Create or remove lab hosts (network namespaces) on this machine.
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
    /// Build the test guest's kernel and initramfs.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error[runtime]: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Lab(cmd) => lab_cmd::run(cmd).await,
            Command::Image(cmd) => image_cmd::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            report::print_error(&e);
            ExitCode::from(1)
        }
    }
}
