//! `ferry datastore`: the storage the hosts report, one entry per storage (hosts that mount
//! the same shared storage, by its identity file, share an entry).

use clap::Subcommand;
use ferry_api::hosts::Datastore;

use super::Ctx;
use crate::error::{exit, CliError};
use crate::output;

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum DatastoreCommand {
    /// List datastores: shared or local, free space, and where each host mounts them.
    List,
}

pub async fn run(ctx: &Ctx, cmd: DatastoreCommand) -> Result<u8, CliError> {
    match cmd {
        DatastoreCommand::List => {
            let list: Vec<Datastore> = ctx.get("/v1/datastores").await?;
            ctx.print(&list, |l| output::datastores_table(l));
        }
    }
    Ok(exit::OK)
}
