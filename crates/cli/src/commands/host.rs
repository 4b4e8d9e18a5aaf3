//! `ferry host`: the hypervisor hosts the server knows, and taking one out of placement.

use clap::Subcommand;
use ferry_api::hosts::Host;

use super::{seg, Ctx};
use crate::error::{exit, CliError};
use crate::output;

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum HostCommand {
    /// List hosts: state, capacity, accelerator, last heartbeat.
    List,
    /// Show one host with its facts (CPU, RAM, QEMU, datastores, networks).
    Show { name: String },
    /// Let the host receive new instances and migrations again.
    Enable { name: String },
    /// Stop placing new instances and migrations on the host (running guests stay).
    Disable { name: String },
    /// Give the host's agent a new key and certificate (the old one is revoked).
    RotateCert { name: String },
}

pub async fn run(ctx: &Ctx, cmd: HostCommand) -> Result<u8, CliError> {
    let now = chrono::Utc::now();
    let host: Host = match cmd {
        HostCommand::List => {
            let hosts: Vec<Host> = ctx.get("/v1/hosts").await?;
            ctx.print(&hosts, |h| output::hosts_table(h, now));
            return Ok(exit::OK);
        }
        HostCommand::Show { name } => ctx.get(&format!("/v1/hosts/{}", seg(&name))).await?,
        HostCommand::Enable { name } => {
            ctx.post(&format!("/v1/hosts/{}/enable", seg(&name)), &())
                .await?
        }
        HostCommand::Disable { name } => {
            ctx.post(&format!("/v1/hosts/{}/disable", seg(&name)), &())
                .await?
        }
        HostCommand::RotateCert { name } => {
            ctx.post(&format!("/v1/hosts/{}/rotate-cert", seg(&name)), &())
                .await?
        }
    };
    ctx.print(&host, |h| output::host_detail(h, now));
    Ok(exit::OK)
}
