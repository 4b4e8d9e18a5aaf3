//! `ferry`: one binary for every role: the demo, the lab, the guest image, the server, the
//! agent, and the REST client commands.

mod bench;
mod demo;
mod image_cmd;
mod report;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_cli::commands::ClusterCommand;
use ferry_cli::error::{exit, EXIT_CODES_HELP};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of KVM/QEMU virtual machines",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `ferry_migrate=debug`.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "warn")]
    log: String,
    /// Append log lines to this file instead of stderr (never with colour codes), e.g. for
    /// `ferry agent` outside systemd.
    #[arg(long, global = true, value_name = "FILE", env = "FERRY_LOG_FILE")]
    log_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest on lab host A and live-migrate it to lab host B, with a live progress
    /// display and a report.
    Demo(demo::DemoArgs),
    /// Compare migration policies (QEMU defaults, virsh, Nova, KubeVirt, Proxmox, Ferry auto)
    /// side by side on lab guests; prints a table, writes JSON, markdown and a plot.
    Bench(bench::BenchCommand),
    /// Build guest images: the lab guest's kernel and initramfs, or (--debian) a bootable
    /// Debian disk running qemu-guest-agent.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    #[command(flatten)]
    Cluster(ClusterCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; usage errors exit 1 like every other
            // error (clap's default 2 means "migration failed" here).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::ERROR
            } else {
                exit::OK
            });
        }
    };
    if let Err(e) = ferry_cli::logging::init(&cli.log, cli.log_file.as_deref()) {
        eprintln!("{}", e.render());
        return ExitCode::from(e.exit_code());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error[runtime]: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => edge(demo::run(args).await),
            Command::Bench(args) => edge(bench::run(args).await),
            Command::Image(cmd) => edge(image_cmd::run(cmd).await),
            Command::Cluster(cmd) => match cmd.run().await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("{}", e.render());
                    ExitCode::from(e.exit_code())
                }
            },
        }
    })
}

/// The anyhow edge of the older commands.
fn edge(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            report::print_error(&e);
            ExitCode::from(exit::ERROR)
        }
    }
}
