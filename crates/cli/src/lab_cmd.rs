use std::process::ExitCode;

use clap::Subcommand;
use ferry_lab::net::{destroy_lab, list_labs, LabNet};
use ferry_lab::LabError;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create lab hosts (namespaces `ferry-NAME-hv1..N`, a switch and a client); a stale lab
    /// of the same name is removed first. They stay until `ferry lab down`.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
    },
    /// Remove a lab: every process in its namespaces, then the namespaces.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// List the labs present on this machine.
    List,
}

pub async fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up { name, hosts } => {
            let net = tokio::task::spawn_blocking(move || LabNet::create(&name, hosts))
                .await?
                .map_err(LabError::from)?;
            for h in &net.hosts {
                println!(
                    "{}\tnetns {}\tmigration {}",
                    h.name, h.netns, h.migration_addr
                );
            }
            println!(
                "client\tnetns {}\taddress {}",
                net.client_netns, net.client_addr
            );
            net.leak();
        }
        LabCommand::Down { name } => {
            tokio::task::spawn_blocking(move || destroy_lab(&name)).await?;
        }
        LabCommand::List => {
            for lab in list_labs() {
                println!("{lab}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
