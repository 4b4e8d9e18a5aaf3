//! Instances: define, start, stop, delete; each change goes to the instance's agent first,
//! and is recorded only when the agent did it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ferry_api::agent::{AgentInstance, DefineInstance};
use ferry_api::checks::Candidate;
use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::{
    BootFrom, ConsoleQuery, ConsoleSegment, CreateInstance, Instance, InstanceConsole,
    InstanceSpec, InstanceState, NicSpec, StopOptions, Warning,
};
use ferry_api::migrations::{Event, MigrationKind};
use serde::Deserialize;
use uuid::Uuid;

use super::hosts::{all_hosts, one_host};
use super::{ApiJson, ApiQuery};
use crate::agents::agent_client;
use crate::auth::{Admin, Operator, Reader};
use crate::disks;
use crate::server::AppState;
use crate::store::codes;
use crate::ServerError;

pub(crate) async fn find(state: &AppState, id_or_name: &str) -> Result<Instance, ServerError> {
    let i = state
        .store
        .get_instance(id_or_name)
        .await?
        .ok_or_else(|| ServerError::not_found("instance", id_or_name))?;
    Ok(with_guest(state, i))
}

/// The instance with what its guest agent last reported on its host.
fn with_guest(state: &AppState, mut i: Instance) -> Instance {
    i.guest = state.reports.guest(i.id, &i.host);
    i
}

fn publish(state: &AppState, i: &Instance) {
    state.events.publish(Event::Instance {
        instance: Box::new(i.clone()),
    });
}

fn invalid(message: String) -> ServerError {
    ServerError::bad_request("invalid-instance", message, "fix the named field and retry")
}

/// `s` for an error message: quoted, with control characters escaped so that a NUL or an
/// escape sequence in a request never reaches a terminal or a log raw.
fn shown(s: &str) -> String {
    format!("'{}'", s.escape_debug())
}

/// Refuses control characters (NUL, newline, escape, ...) in a string field: they would end
/// up in QEMU's command line, file names and terminals.
fn no_control_chars(field: &str, value: &str) -> Result<(), ServerError> {
    if ferry_qemu::has_control_chars(value) {
        return Err(ServerError::bad_request(
            "invalid-instance",
            format!("{field} {} contains control characters", shown(value)),
            "use printable characters only",
        ));
    }
    Ok(())
}

/// Checks what can be checked without a host, so that a request QEMU would refuse is a 400
/// here instead of a 502 when the instance starts.
fn validate(req: &CreateInstance) -> Result<(), ServerError> {
    let s: &InstanceSpec = &req.spec;
    let texts = [
        ("name", req.name.as_str()),
        ("host", req.host.as_deref().unwrap_or("")),
        ("cpu_model", s.cpu_model.as_str()),
        ("machine", s.machine.as_str()),
        ("boot.kernel", s.boot.kernel.as_deref().unwrap_or("")),
        ("boot.initrd", s.boot.initrd.as_deref().unwrap_or("")),
        ("boot.cmdline", s.boot.cmdline.as_str()),
    ];
    for (field, value) in texts {
        no_control_chars(field, value)?;
    }
    for (i, nic) in s.nics.iter().enumerate() {
        no_control_chars("nics.network", &nic.network)?;
        no_control_chars("nics.mac", &nic.mac)?;
        validate_nic_address(i, nic)?;
    }
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 40
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !req.name.starts_with('-');
    if !name_ok {
        return Err(invalid(format!(
            "name {} must be 1-40 characters of a-z, 0-9 and '-'",
            shown(&req.name)
        )));
    }
    let (min, max) = (ferry_qemu::MIN_MEMORY_MIB, ferry_qemu::MAX_MEMORY_MIB);
    if !(min..=max).contains(&s.memory_mib) {
        return Err(invalid(format!(
            "memory_mib {} is out of range ({min} to {max})",
            s.memory_mib
        )));
    }
    let max_vcpus = ferry_qemu::MAX_VCPUS;
    if !(1..=max_vcpus).contains(&s.vcpus) {
        return Err(ServerError::bad_request(
            "invalid-instance",
            format!("vcpus {} is out of range (1 to {max_vcpus})", s.vcpus),
            format!("QEMU starts an x86 guest with at most {max_vcpus} vCPUs"),
        ));
    }
    let model_ok = !s.cpu_model.is_empty()
        && s.cpu_model.len() <= 64
        && s.cpu_model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !model_ok || matches!(s.cpu_model.as_str(), "host" | "max") {
        return Err(ServerError::bad_request(
            "invalid-instance",
            format!(
                "cpu_model {} is not a migratable CPU model",
                shown(&s.cpu_model)
            ),
            "name a QEMU CPU model such as qemu64 or Westmere (see GET /v1/cpu-baseline)",
        ));
    }
    if !ferry_qemu::is_known_machine_type(&s.machine) {
        return Err(unknown_machine(&s.machine));
    }
    if !s.disks.is_empty() || s.boot.nvram.is_some() {
        return Err(invalid(
            "spec.disks and spec.boot.nvram are written by Ferry; ask for disks with `disks`"
                .into(),
        ));
    }
    let kernel_files = [
        ("boot.kernel", &s.boot.kernel),
        ("boot.initrd", &s.boot.initrd),
    ];
    if s.boot.from == BootFrom::Disk {
        if let Some((field, _)) = kernel_files.iter().find(|(_, p)| p.is_some()) {
            return Err(invalid(format!(
                "{field} is given but the instance boots from disk; drop it or boot the kernel"
            )));
        }
        if req.disks.is_empty() {
            return Err(invalid(
                "boot.from is disk but no disk is given; add one with `disks`".into(),
            ));
        }
    }
    for (field, path) in kernel_files {
        let Some(path) = path else {
            if s.boot.from == BootFrom::Kernel {
                return Err(invalid(format!("{field} is required to boot a kernel")));
            }
            continue;
        };
        let p = std::path::Path::new(path);
        let plain = p.is_absolute()
            && p.components()
                .all(|c| !matches!(c, std::path::Component::ParentDir));
        if !plain {
            return Err(ServerError::bad_request(
                "invalid-instance",
                format!(
                    "{field} {} must be an absolute path without '..'",
                    shown(path)
                ),
                "give the file's full path inside a datastore",
            ));
        }
    }
    Ok(())
}

/// A NIC's static address and gateway, by the rules every part of Ferry uses
/// ([`ferry_qemu::Ipv4Cidr::check_host`]): refused here, a bad address never reaches a guest.
fn validate_nic_address(i: usize, nic: &NicSpec) -> Result<(), ServerError> {
    let refuse = |message: String| {
        ServerError::bad_request(
            "invalid-nic-address",
            message,
            "give the NIC a host address as ADDR/PREFIX inside its network, e.g. 10.77.0.50/24, \
             and optionally a gateway in the same subnet, e.g. 10.77.0.1",
        )
    };
    let ipv4 = match nic.ipv4.as_deref() {
        Some(text) => Some(
            text.parse::<ferry_qemu::Ipv4Cidr>()
                .map_err(|e| refuse(format!("nics[{i}].ipv4: {e}")))?,
        ),
        None => None,
    };
    let gateway = match nic.gateway.as_deref() {
        Some(text) => Some(
            ferry_qemu::parse_gateway(text)
                .map_err(|e| refuse(format!("nics[{i}].gateway: {e}")))?,
        ),
        None => None,
    };
    match (ipv4, gateway) {
        (None, Some(gw)) => Err(refuse(format!(
            "nics[{i}].gateway {gw} is given without a static address (nics[{i}].ipv4)"
        ))),
        (Some(cidr), gw) => cidr
            .check_host(gw)
            .map_err(|e| refuse(format!("nics[{i}]: {e}"))),
        (None, None) => Ok(()),
    }
}

fn unknown_machine(machine: &str) -> ServerError {
    ServerError::bad_request(
        "unknown-machine-type",
        format!(
            "machine {} is not an x86 machine type QEMU knows",
            shown(machine)
        ),
        "use pc or q35, or a versioned name such as pc-q35-9.2 (see `ferry host show`)",
    )
}

/// Checks the spec against what the chosen host reported (its facts): its RAM, machine types
/// and datastores. A host that reported no facts yet is not second-guessed; its agent checks
/// the spec again when it defines the instance.
fn validate_for_host(spec: &InstanceSpec, host: &Host) -> Result<(), ServerError> {
    let Some(facts) = &host.facts else {
        return Ok(());
    };
    if facts.ram_total_mib > 0 && u64::from(spec.memory_mib) > facts.ram_total_mib {
        return Err(ServerError::bad_request(
            "memory-exceeds-host",
            format!(
                "memory_mib {} is more than host {}'s {} MiB of RAM",
                spec.memory_mib, host.name, facts.ram_total_mib
            ),
            "ask for less memory or pick a bigger host (`ferry host list`)",
        ));
    }
    if !facts.machine_types.is_empty() && !facts.machine_types.contains(&spec.machine) {
        return Err(ServerError::bad_request(
            "unknown-machine-type",
            format!(
                "machine {} is not one host {}'s QEMU offers",
                shown(&spec.machine),
                host.name
            ),
            "use pc or q35, or one of the host's machine_types (`ferry host show`)",
        ));
    }
    if let Some(nic) = spec
        .nics
        .iter()
        .find(|n| !facts.networks.iter().any(|f| f.name == n.network))
    {
        return Err(unknown_network(&nic.network, host));
    }
    // A static address outside the subnet the host says its network has would leave the
    // guest unreachable there.
    for (i, nic) in spec.nics.iter().enumerate() {
        let Some(addr) = nic
            .ipv4
            .as_deref()
            .and_then(|a| a.parse::<ferry_qemu::Ipv4Cidr>().ok())
        else {
            continue;
        };
        let subnet = facts
            .networks
            .iter()
            .find(|f| f.name == nic.network)
            .and_then(|f| f.subnet.as_deref())
            .and_then(|s| s.parse::<ferry_qemu::Ipv4Cidr>().ok());
        if let Some(subnet) = subnet {
            if subnet.prefix != addr.prefix || !subnet.contains(addr.addr) {
                return Err(ServerError::new(
                    422,
                    "address-outside-network",
                    format!(
                        "nics[{i}].ipv4 {addr} is not an address of network {}, whose subnet \
                         on host {} is {subnet}",
                        nic.network, host.name
                    ),
                    format!(
                        "give the NIC an address inside {subnet}, with prefix /{}",
                        subnet.prefix
                    ),
                ));
            }
        }
    }
    for (field, path) in [
        ("boot.kernel", &spec.boot.kernel),
        ("boot.initrd", &spec.boot.initrd),
    ] {
        let Some(path) = path else { continue };
        if crate::checks::covering(&facts.datastores, path).is_none() {
            let stores: Vec<&str> = facts.datastores.iter().map(|d| d.path.as_str()).collect();
            return Err(ServerError::bad_request(
                "path-outside-datastores",
                format!(
                    "{field} {} is not inside a datastore of host {} ({})",
                    shown(path),
                    host.name,
                    if stores.is_empty() {
                        "it has none".to_string()
                    } else {
                        stores.join(", ")
                    }
                ),
                "put the guest's files into a datastore (`datastores` in the agent's config) \
                 and give their paths there",
            ));
        }
    }
    Ok(())
}

/// A NIC on a network the host does not carry, refused before any disk is made; the message
/// lists the networks the host has (the agent words its own refusal the same way).
fn unknown_network(network: &str, host: &Host) -> ServerError {
    let networks = host
        .facts
        .as_ref()
        .map(|f| {
            ferry_api::hosts::networks_list(
                f.networks
                    .iter()
                    .map(|n| (n.name.as_str(), n.bridge.as_str())),
            )
        })
        .unwrap_or_else(|| "none".into());
    ServerError::new(
        422,
        "unknown-network",
        format!(
            "network {} is not configured on host {}; its networks: {networks}",
            shown(network),
            host.name
        ),
        "use one of the host's networks, or add the network (its name and bridge) to \
         `networks` in the host's agent configuration",
    )
}

/// The default placement: the enabled, online host with the most free memory.
fn pick_host(hosts: &[Host]) -> Option<&Host> {
    hosts
        .iter()
        .filter(|h| h.enabled && h.state == HostState::Online)
        .max_by_key(|h| h.facts.as_ref().map(|f| f.ram_free_mib).unwrap_or(0))
}

#[utoipa::path(get, path = "/v1/instances", responses((status = 200, body = Vec<Instance>)))]
pub async fn list(
    State(state): State<AppState>,
    _r: Reader,
) -> Result<Json<Vec<Instance>>, ServerError> {
    let all = state.store.list_instances(None).await?;
    Ok(Json(
        all.into_iter().map(|i| with_guest(&state, i)).collect(),
    ))
}

#[utoipa::path(get, path = "/v1/instances/{id}", params(("id" = String, Path, description = "instance name or id")), responses((status = 200, body = Instance), (status = 404, description = "no such instance", body = ferry_api::ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
) -> Result<Json<Instance>, ServerError> {
    Ok(Json(find(&state, &id).await?))
}

/// Defines an instance on a host (and starts it if asked), with its disks: each requested
/// disk is created, copied or attached by the host's agent first and becomes `spec.disks`
/// (and the NVRAM of a UEFI guest `spec.boot.nvram`). Nothing is recorded unless the agent
/// accepted the instance, and a refused create leaves no image it made behind.
#[utoipa::path(post, path = "/v1/instances", request_body = CreateInstance, responses((status = 201, body = Instance), (status = 400, description = "invalid request (invalid-instance, invalid-disk, invalid-disk-size, ...)", body = ferry_api::ErrorBody), (status = 404, description = "no such host", body = ferry_api::ErrorBody), (status = 409, description = "the host cannot take it, the name is taken, a disk's file exists (disk-exists) or another instance uses the image (disk-in-use)", body = ferry_api::ErrorBody), (status = 413, description = "request body too large", body = ferry_api::ErrorBody), (status = 422, description = "the host cannot provide a disk or a network: unknown-network, unknown-datastore, no-room, path-outside-datastores, image-not-found, image-unreadable, format-mismatch, unsupported-format, wrong-datastore, uefi-unavailable", body = ferry_api::ErrorBody), (status = 503, description = "the host's agent did not answer", body = ferry_api::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    who: Admin,
    ApiJson(req): ApiJson<CreateInstance>,
) -> Result<(StatusCode, Json<Instance>), ServerError> {
    validate(&req)?;
    disks::validate_requests(&req)?;
    let host = match &req.host {
        Some(name) => one_host(&state, name).await?,
        None => {
            let hosts = all_hosts(&state).await?;
            pick_host(&hosts).cloned().ok_or_else(|| {
                ServerError::conflict(
                    "no-host-available",
                    "no enabled host is online",
                    "enable a host or start its agent",
                )
            })?
        }
    };
    if !host.enabled {
        return Err(ServerError::conflict(
            "host-disabled",
            format!("host {} is disabled", host.name),
            "enable it or pick another host",
        ));
    }
    if host.state != HostState::Online {
        return Err(ServerError::conflict(
            "host-offline",
            format!("host {} is offline", host.name),
            "start its agent or pick another host",
        ));
    }
    validate_for_host(&req.spec, &host)?;
    disks::validate_for_host(&req, &host)?;
    if state.store.get_instance(&req.name).await?.is_some() {
        return Err(ServerError::conflict(
            codes::INSTANCE_EXISTS,
            format!("an instance named {} exists", req.name),
            "pick another name",
        ));
    }
    // In a task of its own: a caller that disconnects during a long copy must not cut the
    // create short between making an image and recording (or undoing) it.
    let task = {
        let (state, who, req) = (state.clone(), who.clone(), req.clone());
        tokio::spawn(async move {
            let mut created = disks::Created::new(&host.name);
            let instance = match define(&state, &req, &host, &mut created).await {
                Ok(i) => i,
                Err(e) => {
                    created.undo(&state, &who.name, &req.name).await;
                    return Err(e);
                }
            };
            state
                .store
                .audit(
                    &who.name,
                    "instance.create",
                    &req.name,
                    &serde_json::json!({
                        "host": host.name,
                        "spec": instance.spec,
                        "images_created": created.images(),
                    }),
                )
                .await?;
            Ok(instance)
        })
    };
    let instance = task
        .await
        .map_err(|e| ServerError::internal(format!("instance create task failed: {e}")))??;
    let instance = if req.start {
        power(
            &state,
            &Operator {
                name: who.name.clone(),
            },
            instance,
            InstanceState::Running,
            StopOptions::default(),
        )
        .await?
    } else {
        publish(&state, &instance);
        instance
    };
    let instance = Instance {
        warnings: create_warnings(&req),
        ..instance
    };
    Ok((StatusCode::CREATED, Json(instance)))
}

/// What a create did that works but is probably a mistake, for the answer: an instance
/// without a NIC boots fine and then cannot be reached but through its serial console, which
/// is easy to miss until it is needed.
fn create_warnings(req: &CreateInstance) -> Vec<Warning> {
    let mut out = Vec::new();
    if req.spec.nics.is_empty() {
        out.push(Warning {
            code: "no-network".into(),
            message: format!(
                "{} has no NIC: its guest has no network and is reachable only through its \
                 serial console (`ferry instance console {}`)",
                req.name, req.name
            ),
            hint: "if it needs a network, delete it and create it again with --nic NETWORK \
                   (`ferry host show HOST` lists a host's networks)"
                .into(),
        });
    }
    out
}

/// The part of a create that makes things: disks, the record, the agent's definition. On an
/// error the record is gone again and `created` lists the images for the caller to undo.
async fn define(
    state: &AppState,
    req: &CreateInstance,
    host: &Host,
    created: &mut disks::Created,
) -> Result<Instance, ServerError> {
    let agent = agent_client(state, &host.name).await?;
    let prepared = disks::prepare(state, host, req, created).await?;
    let mut spec = req.spec.clone();
    spec.disks = prepared.disks.clone();
    spec.boot.nvram = prepared.nvram.clone();
    // Held until the instance is recorded, so that a concurrent create sees its images.
    let _claims = disks::claim(state, host, &req.name, &prepared).await?;
    let id = Uuid::new_v4();
    let instance = state
        .store
        .insert_instance(id, &req.name, &host.name, &spec, InstanceState::Stopped)
        .await?;
    let defined: Result<AgentInstance, _> = agent
        .put(
            &format!("/v1/instances/{id}"),
            &DefineInstance {
                name: req.name.clone(),
                spec: spec.clone(),
            },
        )
        .await;
    if let Err(e) = defined {
        state.store.delete_instance(id).await?;
        return Err(ServerError::from_agent(&host.name, e));
    }
    Ok(instance)
}

fn refuse_if_migrating(i: &Instance) -> Result<(), ServerError> {
    match i.migration {
        Some(m) => Err(ServerError::conflict(
            codes::MIGRATION_IN_PROGRESS,
            format!("{} is being migrated ({m})", i.name),
            "wait for the migration to end or cancel it",
        )),
        None => Ok(()),
    }
}

/// Starts or stops an instance on its agent, then records and audits it.
async fn power(
    state: &AppState,
    who: &Operator,
    i: Instance,
    to: InstanceState,
    stop: StopOptions,
) -> Result<Instance, ServerError> {
    let (verb, query) = if to == InstanceState::Running {
        ("start", String::new())
    } else {
        ("stop", stop.query())
    };
    let agent = agent_client(state, &i.host).await?;
    let done: AgentInstance = agent
        .post(&format!("/v1/instances/{}/{verb}{query}", i.id), &())
        .await
        .map_err(|e| ServerError::from_agent(&i.host, e))?;
    state.store.set_instance_state(i.id, to).await?;
    state
        .store
        .audit(
            &who.name,
            &format!("instance.{verb}"),
            &i.name,
            &serde_json::json!({"host": i.host, "stopped_by": done.stopped_by}),
        )
        .await?;
    let i = find(state, &i.id.to_string()).await?;
    publish(state, &i);
    Ok(i)
}

#[utoipa::path(post, path = "/v1/instances/{id}/start", params(("id" = String, Path, description = "instance name or id")), responses((status = 200, body = Instance), (status = 404, description = "no such instance", body = ferry_api::ErrorBody), (status = 409, description = "the instance is being migrated, or another host holds a copy", body = ferry_api::ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
) -> Result<Json<Instance>, ServerError> {
    let i = find(&state, &id).await?;
    refuse_if_migrating(&i)?;
    // A copy of the guest on another host (a migration's leftover, a fenced copy) would make
    // this start a second running guest.
    let fresh = std::time::Duration::from_secs(state.config.heartbeat_timeout_s);
    let elsewhere = state.reports.copies(i.id, fresh);
    if let Some((host, copy)) = elsewhere
        .iter()
        .find(|(h, c)| *h != i.host && c.pid.is_some())
    {
        return Err(ServerError::conflict(
            "copy-elsewhere",
            format!(
                "{} has a copy on {host} ({}); starting it on {} would make two",
                i.name,
                copy.state.as_str(),
                i.host
            ),
            "stop the copy on that host first, or wait for the server to move the record to where the guest runs",
        ));
    }
    Ok(Json(
        power(
            &state,
            &who,
            i,
            InstanceState::Running,
            StopOptions::default(),
        )
        .await?,
    ))
}

/// Asks the guest to shut down (guest agent, else ACPI) and powers it off after the timeout;
/// `force` powers it off at once. The audit log says which happened.
#[utoipa::path(post, path = "/v1/instances/{id}/stop", params(("id" = String, Path, description = "instance name or id"), StopOptions), responses((status = 200, body = Instance), (status = 404, description = "no such instance", body = ferry_api::ErrorBody), (status = 409, description = "the instance is being migrated", body = ferry_api::ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
    ApiQuery(opts): ApiQuery<StopOptions>,
) -> Result<Json<Instance>, ServerError> {
    if opts
        .timeout_s
        .is_some_and(|t| t > StopOptions::MAX_TIMEOUT_S)
    {
        return Err(ServerError::bad_request(
            "invalid-timeout",
            format!(
                "timeout_s {} is more than {} s",
                opts.timeout_s.unwrap_or(0),
                StopOptions::MAX_TIMEOUT_S
            ),
            "give a shorter timeout, or force the stop",
        ));
    }
    let i = find(&state, &id).await?;
    refuse_if_migrating(&i)?;
    Ok(Json(
        power(&state, &who, i, InstanceState::Stopped, opts).await?,
    ))
}

/// Deletes a stopped instance: its definition on its host, then the images Ferry made for it
/// (disks created or copied, the NVRAM); images it was given stay. With such images on a host
/// that is offline the delete is refused rather than leaving them behind unnoticed. If an
/// image cannot be deleted the record stays, and deleting again finishes the job.
#[utoipa::path(delete, path = "/v1/instances/{id}", params(("id" = String, Path, description = "instance name or id")), responses((status = 200, body = Instance), (status = 404, description = "no such instance", body = ferry_api::ErrorBody), (status = 409, description = "the instance runs or is being migrated, its host is offline (host-offline), or an image is still in use (disk-in-use)", body = ferry_api::ErrorBody), (status = 503, description = "the host's agent did not answer", body = ferry_api::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    who: Admin,
    Path(id): Path<String>,
) -> Result<Json<Instance>, ServerError> {
    let i = find(&state, &id).await?;
    refuse_if_migrating(&i)?;
    if i.state == InstanceState::Running {
        return Err(ServerError::conflict(
            "instance-running",
            format!("{} is running", i.name),
            "stop it first",
        ));
    }
    let owned = disks::owned_images(&i.spec);
    if !owned.is_empty() && one_host(&state, &i.host).await?.state != HostState::Online {
        return Err(ServerError::conflict(
            "host-offline",
            format!(
                "{} has {} image(s) Ferry made on host {}, which is offline; deleting it now \
                 would leave them behind",
                i.name,
                owned.len(),
                i.host
            ),
            "start the agent on that host and delete the instance again",
        ));
    }
    let agent = agent_client(&state, &i.host).await?;
    if let Err(e) = agent
        .delete::<serde_json::Value>(&format!("/v1/instances/{}", i.id))
        .await
    {
        if e.status() != Some(404) {
            return Err(ServerError::from_agent(&i.host, e));
        }
    }
    for image in &owned {
        let deleted: Result<serde_json::Value, _> = agent.post("/v1/disks/delete", image).await;
        if let Err(e) = deleted {
            let mut err = ServerError::from_agent(&i.host, e);
            err.body.message = format!(
                "{} is removed from host {}, but its image {image} is not ({}); the record \
                 stays so that deleting it again finishes the job",
                i.name, i.host, err.body.message
            );
            return Err(err);
        }
    }
    let console_hosts = console_hosts(&state, &i).await?;
    crate::kept_copies::remove_all_of(&state, i.id, &format!("{} (instance deleted)", who.name))
        .await;
    state.store.delete_instance(i.id).await?;
    forget_console(&state, i.id, &console_hosts).await;
    state
        .store
        .audit(
            &who.name,
            "instance.delete",
            &i.name,
            &serde_json::json!({"host": i.host, "images_deleted": owned}),
        )
        .await?;
    Ok(Json(i))
}

/// How long the console waits for each host: a host that is down must not hold up the
/// output of the others.
const CONSOLE_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The hosts that may hold output of instance `i`: the one it is on and every host one of its
/// migrations came from or went to (a failed migration's destination may have run it, in
/// post-copy).
async fn console_hosts(state: &AppState, i: &Instance) -> Result<Vec<String>, ServerError> {
    let jobs = state
        .store
        .list_migrations(&crate::store::MigrationFilter {
            instance: Some(i.id),
            ..Default::default()
        })
        .await?;
    let mut hosts = vec![i.host.clone()];
    for m in jobs {
        for h in [m.source, m.destination] {
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
    }
    Ok(hosts)
}

/// Every host's segments as one console: oldest first (by each QEMU's start; segments that
/// started in the same millisecond by host name), and no more than `budget` bytes of text in
/// all, the newest kept. A segment cut short keeps its end from the start of a line, so the
/// first line shown is never a fragment.
pub fn join_console(mut segments: Vec<ConsoleSegment>, budget: u64) -> Vec<ConsoleSegment> {
    segments.sort_by(|a, b| (a.started_at, &a.host).cmp(&(b.started_at, &b.host)));
    let mut left = usize::try_from(budget).unwrap_or(usize::MAX);
    let mut kept = Vec::new();
    for mut seg in segments.into_iter().rev() {
        if left == 0 {
            break;
        }
        let cut_here = seg.text.len() > left;
        if cut_here {
            let mut cut = seg.text.len() - left;
            while !seg.text.is_char_boundary(cut) {
                cut += 1;
            }
            seg.text = seg.text.split_off(cut);
        }
        if seg.omitted_bytes() > 0 {
            // The agent's tail, or the cut above, may begin inside a line: drop that part.
            seg.text = match seg.text.find('\n') {
                Some(nl) => seg.text.split_off(nl + 1),
                None => String::new(),
            };
        }
        left = if cut_here { 0 } else { left - seg.text.len() };
        if !seg.text.is_empty() {
            kept.push(seg);
        }
    }
    kept.reverse();
    kept
}

/// The guest's serial output, from every host that ran it, in order: each host's agent keeps
/// what the guest printed while its QEMU ran there, also after the instance moved on.
#[utoipa::path(get, path = "/v1/instances/{id}/console", params(("id" = String, Path, description = "instance name or id"), ConsoleQuery), responses((status = 200, body = InstanceConsole), (status = 400, description = "bad query (bytes out of range)", body = ferry_api::ErrorBody), (status = 404, description = "no such instance", body = ferry_api::ErrorBody)))]
pub async fn console(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> Result<Json<InstanceConsole>, ServerError> {
    let budget = q.budget();
    if budget == 0 || budget > ConsoleQuery::MAX_BYTES {
        return Err(ServerError::bad_request(
            "bad-query",
            format!(
                "bytes {budget} is out of range (1 to {})",
                ConsoleQuery::MAX_BYTES
            ),
            "ask for fewer bytes; the newest output is returned",
        ));
    }
    let i = find(&state, &id).await?;
    let online: Vec<String> = all_hosts(&state)
        .await?
        .into_iter()
        .filter(|h| h.state == HostState::Online)
        .map(|h| h.name)
        .collect();
    let mut segments = Vec::new();
    let mut unreachable = Vec::new();
    for host in console_hosts(&state, &i).await? {
        if !online.contains(&host) {
            unreachable.push(host);
            continue;
        }
        let answer = match agent_client(&state, &host).await {
            Ok(agent) => agent
                .with_timeout(CONSOLE_AGENT_TIMEOUT)
                .get::<Vec<ConsoleSegment>>(&format!(
                    "/v1/instances/{}/console?bytes={budget}",
                    i.id
                ))
                .await
                .or_else(|e| match e {
                    // An agent refuses the console of an instance that neither runs there nor
                    // left output there: no output from that host, not a failure.
                    ferry_api::ApiError::Status {
                        status: 404,
                        ref body,
                    } if body.code == "instance-not-found" => Ok(Vec::new()),
                    e => Err(e),
                })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(s) => segments.extend(s),
            Err(e) => {
                tracing::warn!(host, error = %e, "console output not available");
                unreachable.push(host);
            }
        }
    }
    Ok(Json(InstanceConsole {
        instance: i.id,
        segments: join_console(segments, budget),
        unreachable,
    }))
}

/// After a delete: every host that ran the instance forgets its console output. Best effort:
/// the instance is gone either way, and a host that is down keeps a few files.
async fn forget_console(state: &AppState, id: Uuid, hosts: &[String]) {
    for host in hosts {
        let deleted = match agent_client(state, host).await {
            Ok(agent) => agent
                .with_timeout(CONSOLE_AGENT_TIMEOUT)
                .delete::<serde_json::Value>(&format!("/v1/instances/{id}/console"))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = deleted {
            tracing::warn!(host, instance = %id, error = %e, "console output not removed");
        }
    }
}

/// Query of `GET /v1/instances/{id}/migration-candidates`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CandidatesQuery {
    /// Evaluate only this host.
    pub destination: Option<String>,
    /// Probe the migration port from the source to each host that passes the other checks
    /// (default true).
    pub probe: Option<bool>,
    /// Block migration: `DISK=DATASTORE[,DISK=DATASTORE...]`, the destination datastore of
    /// local disks (others get the one with the most free room).
    pub map_disk: Option<String>,
}

/// Where the instance can go: every other host (or the one asked for) with the pre-flight
/// checks' verdicts, best first. Changes nothing.
#[utoipa::path(get, path = "/v1/instances/{id}/migration-candidates", params(("id" = String, Path, description = "instance name or id"), CandidatesQuery), responses((status = 200, body = Vec<Candidate>), (status = 400, description = "bad query parameters", body = ferry_api::ErrorBody), (status = 404, description = "no such instance or destination host", body = ferry_api::ErrorBody)))]
pub async fn migration_candidates(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<CandidatesQuery>,
) -> Result<Json<Vec<Candidate>>, ServerError> {
    let i = find(&state, &id).await?;
    let disk_map = parse_disk_map(q.map_disk.as_deref().unwrap_or(""))?;
    let kind = if i.state == InstanceState::Stopped {
        MigrationKind::Cold
    } else {
        MigrationKind::Live
    };
    let candidates = crate::preflight::evaluate(
        &state,
        &crate::preflight::Request {
            instance: &i,
            kind,
            destination: q.destination.as_deref(),
            probe: q.probe.unwrap_or(true),
            migration: None,
            disk_map: Some(&disk_map),
        },
    )
    .await?;
    Ok(Json(candidates))
}

/// `DISK=DATASTORE[,DISK=DATASTORE...]` of the candidates query.
fn parse_disk_map(text: &str) -> Result<std::collections::BTreeMap<String, String>, ServerError> {
    let bad = |why: String| {
        ServerError::bad_request(
            "bad-query",
            format!("map_disk {why}"),
            "write map_disk=disk0=local,disk1=fast",
        )
    };
    let pairs = text
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| ferry_api::migrations::parse_disk_mapping(p.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|why| bad(format!("entry {why}")))?;
    ferry_api::migrations::disk_map(pairs).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::hosts::{HostFacts, NetworkFacts};

    fn host_with_networks(networks: &[(&str, &str)]) -> Host {
        let facts = HostFacts {
            name: "hv1".into(),
            cpu_vendor: "GenuineIntel".into(),
            cpu_model: "Xeon".into(),
            cpu_flags: vec![],
            cores: 2,
            ram_total_mib: 4096,
            ram_free_mib: 4096,
            ram_reserve_mib: 0,
            accel: "tcg".into(),
            qemu_version: "10.0.0".into(),
            machine_types: vec!["pc".into()],
            firmware: vec!["bios".into()],
            datastores: vec![],
            networks: networks
                .iter()
                .map(|(name, bridge)| NetworkFacts {
                    name: name.to_string(),
                    bridge: bridge.to_string(),
                    subnet: None,
                })
                .collect(),
            migration_addr: "10.0.0.1".into(),
            migration_ports: "49152-49215".into(),
            agent_version: "0".into(),
        };
        Host {
            name: "hv1".into(),
            agent_url: "http://127.0.0.1:1".into(),
            enabled: true,
            state: HostState::Online,
            last_heartbeat: None,
            facts: Some(facts),
            instances: 0,
        }
    }

    fn spec_on(network: &str) -> InstanceSpec {
        InstanceSpec {
            memory_mib: 256,
            vcpus: 1,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: Default::default(),
            disks: vec![],
            nics: vec![NicSpec {
                network: network.into(),
                mac: "52:54:00:00:00:01".into(),
                ipv4: None,
                gateway: None,
            }],
        }
    }

    fn seg(host: &str, ms: i64, text: &str) -> ConsoleSegment {
        ConsoleSegment {
            host: host.into(),
            started_at: chrono::DateTime::from_timestamp_millis(ms).unwrap(),
            size_bytes: text.len() as u64,
            text: text.into(),
        }
    }

    #[test]
    fn the_console_is_every_hosts_output_in_time_order_newest_kept() {
        // As the agents answer: host by host.
        let joined = join_console(
            vec![
                seg("hv1", 1_000, "boot\n"),
                seg("hv1", 9_000, "back on hv1\n"),
                seg("hv2", 5_000, "on hv2\n"),
            ],
            1 << 20,
        );
        let order: Vec<(&str, &str)> = joined
            .iter()
            .map(|s| (s.host.as_str(), s.text.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("hv1", "boot\n"),
                ("hv2", "on hv2\n"),
                ("hv1", "back on hv1\n")
            ]
        );
        // A budget keeps the newest bytes: the oldest segment goes, one is cut at its start.
        let three = vec![
            seg("hv1", 1_000, "boot\n"),
            seg("hv2", 5_000, "on hv2\n"),
            seg("hv1", 9_000, "back\n"),
        ];
        let texts = |budget| {
            join_console(three.clone(), budget)
                .into_iter()
                .map(|s| s.text)
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(12), ["on hv2\n", "back\n"]);
        assert_eq!(texts(9), ["back\n"], "no line without its start");
        // Never inside a line when a line starts in what is kept, nor inside a character.
        let lines = join_console(vec![seg("hv1", 0, "first\nsecond\nthird\n")], 10);
        assert_eq!(lines[0].text, "third\n");
        assert_eq!(lines[0].omitted_bytes(), 13);
        let utf8 = join_console(vec![seg("hv1", 0, "aé\nb\n")], 4);
        assert_eq!(utf8[0].text, "b\n", "a cut inside 'é' does not split it");
    }

    #[test]
    fn a_bad_static_address_is_refused_with_its_nic_named() {
        let req = |ipv4: Option<&str>, gw: Option<&str>| {
            let mut spec = spec_on("lab");
            spec.boot.kernel = Some("/images/vmlinuz".into());
            spec.boot.initrd = Some("/images/initrd".into());
            spec.nics[0].ipv4 = ipv4.map(String::from);
            spec.nics[0].gateway = gw.map(String::from);
            CreateInstance {
                name: "net".into(),
                host: None,
                spec,
                disks: vec![],
                start: false,
            }
        };
        validate(&req(Some("10.77.0.50/24"), Some("10.77.0.1"))).unwrap();
        validate(&req(Some("10.77.0.50/24"), None)).unwrap();
        validate(&req(None, None)).unwrap();
        for (ipv4, gw, needle) in [
            (Some("10.77.0.50"), None, "not ADDR/PREFIX"),
            (Some("10.77.0.50/33"), None, "1 to 32"),
            (Some("10.77.0.0/24"), None, "network address"),
            (Some("10.77.0.50/24"), Some("10.77.1.1"), "outside"),
            (Some("10.77.0.50/24"), Some("gw"), "not an IPv4 address"),
            (None, Some("10.77.0.1"), "without a static address"),
        ] {
            let e = validate(&req(ipv4, gw)).unwrap_err();
            assert_eq!(
                (e.status, e.body.code.as_str()),
                (400, "invalid-nic-address"),
                "{ipv4:?} {gw:?}"
            );
            assert!(e.body.message.starts_with("nics[0]"), "{}", e.body.message);
            assert!(e.body.message.contains(needle), "{}", e.body.message);
            assert!(e.body.hint.contains("ADDR/PREFIX"), "{}", e.body.hint);
        }
    }

    #[test]
    fn a_static_address_outside_the_hosts_subnet_is_refused() {
        let mut host = host_with_networks(&[("lab", "br0")]);
        host.facts.as_mut().unwrap().networks[0].subnet = Some("10.77.0.0/24".into());
        let with = |ipv4: &str| {
            let mut spec = spec_on("lab");
            spec.nics[0].ipv4 = Some(ipv4.into());
            spec
        };
        assert!(validate_for_host(&with("10.77.0.50/24"), &host).is_ok());
        for bad in ["10.78.0.50/24", "10.77.0.50/16"] {
            let e = validate_for_host(&with(bad), &host).unwrap_err();
            assert_eq!(
                (e.status, e.body.code.as_str()),
                (422, "address-outside-network"),
                "{bad}"
            );
            assert!(
                e.body.message.contains("10.77.0.0/24"),
                "{}",
                e.body.message
            );
        }
        // A network without a known subnet is not second-guessed.
        host.facts.as_mut().unwrap().networks[0].subnet = None;
        assert!(validate_for_host(&with("10.78.0.50/24"), &host).is_ok());
    }

    #[test]
    fn an_instance_without_a_nic_gets_a_warning() {
        let mut req = CreateInstance {
            name: "quiet".into(),
            host: None,
            spec: spec_on("lab"),
            disks: vec![],
            start: false,
        };
        assert!(create_warnings(&req).is_empty());
        req.spec.nics.clear();
        let w = create_warnings(&req);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].code, "no-network");
        assert!(
            w[0].message.starts_with("quiet has no NIC"),
            "{}",
            w[0].message
        );
        assert!(w[0].hint.contains("--nic"), "{}", w[0].hint);
    }

    #[test]
    fn an_unknown_network_is_refused_with_the_hosts_networks() {
        let host = host_with_networks(&[("lab", "br0"), ("prod", "br1")]);
        assert!(validate_for_host(&spec_on("lab"), &host).is_ok());
        let e = validate_for_host(&spec_on("lab0"), &host).unwrap_err();
        assert_eq!((e.status, e.body.code.as_str()), (422, "unknown-network"));
        assert_eq!(
            e.body.message,
            "network 'lab0' is not configured on host hv1; its networks: lab (bridge br0), \
             prod (bridge br1)"
        );
        assert!(
            e.body.hint.contains("agent configuration"),
            "{}",
            e.body.hint
        );
        let bare = host_with_networks(&[]);
        let e = validate_for_host(&spec_on("lab"), &bare).unwrap_err();
        assert!(e.body.message.ends_with("its networks: none"), "{}", e.body);
    }
}
