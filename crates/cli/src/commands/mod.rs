//! The CLI's command groups, one file each. Each `run` returns the process exit code or a
//! [`CliError`]; main.rs prints and exits.

pub mod chaos;
pub mod daemon;
pub mod datastore;
pub mod host;
pub mod instance;
pub mod lab;
pub mod login;
pub mod migrate;
pub mod token;

use clap::Args;
use ferry_api::{ApiClient, ApiError, ErrorBody};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{self, ClientConfig};
use crate::error::CliError;
use crate::output::{self, OutputFormat};

/// Flags every API command takes (also after the subcommand: `ferry host list -o json`).
#[derive(Args, Clone, Default, PartialEq, Eq)]
pub struct ApiOpts {
    /// Server URL, e.g. http://127.0.0.1:7400 (else `url` in $FERRY_CONFIG or
    /// ~/.config/ferry/cli.toml).
    #[arg(long, env = "FERRY_URL", global = true)]
    pub url: Option<String>,
    /// API token (else `token` in the config file).
    #[arg(long, env = "FERRY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA file to verify the server with (the server's pki/ca.pem); else the
    /// fingerprint `ferry login` stored for this URL.
    #[arg(long, env = "FERRY_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t, global = true)]
    pub output: OutputFormat,
}

/// Leaves the token out: commands are compared and printed in tests and debug output.
impl std::fmt::Debug for ApiOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiOpts")
            .field("url", &self.url)
            .field("token", &ferry_api::redact::secret_field(&self.token))
            .field("output", &self.output)
            .finish()
    }
}

impl ApiOpts {
    pub fn resolve(&self) -> Result<ClientConfig, CliError> {
        let mut cfg = config::resolve(self.url.clone(), self.token.clone(), || {
            config::load_file(config::config_path())
        })?;
        cfg.ca = self.ca.clone().filter(|p| !p.as_os_str().is_empty());
        if cfg.ca.is_none() {
            // The file's trust applies to the server it was stored for only.
            if let Ok(file) = config::load_file(config::config_path()) {
                if file.url.as_deref().map(|u| u.trim_end_matches('/'))
                    == Some(cfg.url.trim_end_matches('/'))
                {
                    cfg.ca = file.ca;
                    cfg.fingerprint = file.fingerprint;
                }
            }
        }
        Ok(cfg)
    }
}

/// A connection to the server plus how to print what it answers.
pub struct Ctx {
    pub client: ApiClient,
    pub output: OutputFormat,
    token_missing: bool,
}

impl Ctx {
    pub fn new(opts: &ApiOpts) -> Result<Ctx, CliError> {
        let cfg = opts.resolve()?;
        Ctx::from_config(&cfg, opts.output)
    }

    /// A context around a client that already carries its token (a local cluster's).
    pub fn with_client(client: ApiClient) -> Ctx {
        Ctx {
            client,
            output: OutputFormat::Table,
            token_missing: false,
        }
    }

    pub fn from_config(cfg: &ClientConfig, output: OutputFormat) -> Result<Ctx, CliError> {
        Ok(Ctx {
            client: cfg.client()?,
            output,
            token_missing: cfg.token.is_none(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.client.get(path).await.map_err(|e| self.api_err(e))
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.client
            .post(path, body)
            .await
            .map_err(|e| self.api_err(e))
    }

    pub async fn patch<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.client
            .patch(path, body)
            .await
            .map_err(|e| self.api_err(e))
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.client.delete(path).await.map_err(|e| self.api_err(e))
    }

    /// A 401 without any token configured is the user's setup, not a wrong token: say how to
    /// configure one.
    pub fn api_err(&self, e: ApiError) -> CliError {
        match e {
            ApiError::Status { status: 401, body } if self.token_missing => {
                CliError::Api(ApiError::Status {
                    status: 401,
                    body: ErrorBody::new(
                        &body.code,
                        format!("{} (no token was sent)", body.message),
                        "pass --token, set FERRY_TOKEN, or put `token = \"...\"` in \
                         ~/.config/ferry/cli.toml (or $FERRY_CONFIG)",
                    ),
                })
            }
            e => CliError::Api(e),
        }
    }

    /// Prints one API object (or a list): JSON as is, else the given table rendering.
    pub fn print<T: Serialize + ?Sized>(&self, value: &T, table: impl FnOnce(&T) -> String) {
        match self.output {
            OutputFormat::Json => crate::outln!("{}", output::json(value)),
            OutputFormat::Table => {
                let text = table(value);
                if !text.is_empty() {
                    crate::outln!("{text}");
                }
            }
        }
    }
}

/// Percent-encodes one path segment (see [`ferry_api::encode_segment`]).
pub fn seg(s: &str) -> String {
    ferry_api::encode_segment(s)
}

/// Every command the library implements (all but `demo` and `image`, which live in the
/// binary); main.rs flattens this into the top-level command list.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ClusterCommand {
    /// Hypervisor hosts: list, show, enable, disable.
    Host {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: host::HostCommand,
    },
    /// Datastores: the storage hosts report, shared ones once with every mount.
    Datastore {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: datastore::DatastoreCommand,
    },
    /// Instances (virtual machines): list, show, create, start, stop, delete, console.
    Instance {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: instance::InstanceCommand,
    },
    /// Move an instance to another host (live unless --cold).
    Migrate {
        #[command(flatten)]
        api: ApiOpts,
        #[command(flatten)]
        args: migrate::MigrateArgs,
    },
    /// Migration jobs: list, show, logs, cancel, watch.
    Migration {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: migrate::MigrationCommand,
    },
    /// API tokens: create (with a role and a lifetime), list, revoke. Admin tokens only.
    Token {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: token::TokenCommand,
    },
    /// Remember a server: its URL, token and how to trust its certificate (FERRY_CA, or the
    /// fingerprint it shows, accepted with --accept-fingerprint or interactively).
    Login {
        #[command(flatten)]
        api: ApiOpts,
        /// The CA fingerprint (sha256:AB:CD:...) the server printed at its first start.
        #[arg(long, value_name = "FINGERPRINT")]
        accept_fingerprint: Option<String>,
    },
    /// Run the control plane (REST API, migration queue, database).
    Server(daemon::DaemonArgs),
    /// Run a host agent (this host's QEMU processes and migration halves).
    Agent(daemon::DaemonArgs),
    /// A whole cluster on this machine: lab hosts as namespaces, server and agents as daemons.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The fault matrix: lab migrations with a fault each (cancel, kill -9 of a QEMU, agent
    /// or server, migration link down) in each phase, checked for never two copies, an ended
    /// job, a true record and intact memory. Exits 1 if any cell is not ok.
    Chaos(chaos::ChaosArgs),
}

impl ClusterCommand {
    pub async fn run(self) -> Result<u8, CliError> {
        match self {
            ClusterCommand::Host { api, cmd } => host::run(&Ctx::new(&api)?, cmd).await,
            ClusterCommand::Datastore { api, cmd } => datastore::run(&Ctx::new(&api)?, cmd).await,
            ClusterCommand::Instance { api, cmd } => instance::run(&Ctx::new(&api)?, cmd).await,
            ClusterCommand::Migrate { api, args } => {
                migrate::run_migrate(&Ctx::new(&api)?, args).await
            }
            ClusterCommand::Migration { api, cmd } => migrate::run(&Ctx::new(&api)?, cmd).await,
            ClusterCommand::Token { api, cmd } => token::run(&Ctx::new(&api)?, cmd).await,
            ClusterCommand::Login {
                api,
                accept_fingerprint,
            } => login::run(&api, accept_fingerprint).await,
            ClusterCommand::Server(args) => daemon::run_server(args).await,
            ClusterCommand::Agent(args) => daemon::run_agent(args).await,
            ClusterCommand::Lab(cmd) => lab::run(cmd).await,
            ClusterCommand::Chaos(args) => chaos::run(args).await,
        }
    }
}

/// This `ferry` binary's path, to start daemons (`ferry server`, `ferry agent`) from it.
pub(crate) fn this_program() -> Result<std::path::PathBuf, crate::error::CliError> {
    std::env::current_exe().map_err(|e| {
        crate::error::CliError::new(
            "no-executable",
            format!("cannot find this program: {e}"),
            "",
        )
    })
}

/// Resolves on Ctrl-C or SIGTERM: what the demo, the bench and the fault matrix stop on, so
/// that they clean up their labs.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
