//! `ferry bench`: the arguments and the edge of [`ferry_bench`] (the bench is its own crate;
//! this file parses, handles Ctrl-C, prints `--json` on stdout and maps the exit code).

use std::process::ExitCode;

use clap::Args;
use ferry_bench::BenchError;

use crate::image_cmd::ImageArgs;

/// `ferry bench`'s arguments: the bench's own and where the lab image comes from.
#[derive(Args, Debug)]
pub struct BenchCommand {
    #[command(flatten)]
    bench: ferry_bench::BenchArgs,
    #[command(flatten)]
    image: ImageArgs,
}

pub async fn run(args: BenchCommand) -> anyhow::Result<ExitCode> {
    // Ctrl-C drops the bench future and with it the lab (or, with --debian or --disks, the
    // local cluster), which removes every namespace, QEMU process and tap on drop.
    let image = args.image.options();
    let outcome = tokio::select! {
        r = ferry_bench::run(&args.bench, &image) => r.map_err(edge)?,
        _ = ferry_cli::commands::shutdown_signal() => {
            eprintln!("interrupted: cleaning up the lab");
            return Ok(ExitCode::from(130));
        }
    };
    if let Some(json) = &outcome.stdout {
        ferry_cli::outln!("{json}");
    }
    Ok(ExitCode::from(outcome.exit_code))
}

/// A lab error keeps its code and hint (see `report::print_error`); the rest is its story.
fn edge(e: BenchError) -> anyhow::Error {
    match e {
        BenchError::Lab(e) => e.into(),
        e => anyhow::anyhow!(e.chain()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchCommand,
    }

    #[test]
    fn the_bench_and_image_arguments_parse_together() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["bench", "--quick", "--cache-dir", "/c", "--offline"]).unwrap();
        assert_eq!(
            cli.bench.image.options().cache_dir,
            std::path::Path::new("/c")
        );
        assert!(cli.bench.image.offline);
        assert!(format!("{:?}", cli.bench.bench).contains("quick: true"));
        assert!(Cli::try_parse_from(["bench", "--debian", "--quick"]).is_err());
    }
}
