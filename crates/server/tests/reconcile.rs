//! The record follows the truth: the server compares every agent's report with the store,
//! moves a wrong record to the host that runs the guest, and pauses a second running copy.
//! Real agents, real QEMU guests in lab hosts.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use ferry_api::agent::{AgentInstance, DefineInstance};
use ferry_api::instances::{Instance, InstanceState};
use ferry_server::agents::agent_client;
use ferry_server::config::Limits;

async fn wait_for<F, Fut>(what: &str, patience: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {patience:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn alarms(c: &Cluster, code: &str) -> usize {
    let audit: Vec<serde_json::Value> = c.admin.get("/v1/audit").await.unwrap();
    audit
        .iter()
        .filter(|e| e["action"] == "instance.reconcile" && e["detail"]["code"] == code)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_follows_the_agents_and_a_second_copy_is_paused() {
    let c = Cluster::start(2, Limits::default()).await;
    let vm = c.running_vm("truth", "hv1", 0).await;

    // A record that says hv2 while hv1 runs the guest (what a lost commit would leave).
    c.server
        .state
        .store
        .move_instance_to(vm.id, "hv2")
        .await
        .unwrap();
    wait_for(
        "the record back on hv1",
        Duration::from_secs(20),
        || async { c.instance("truth").await.host == "hv1" },
    )
    .await;
    let fixed: Instance = c.instance("truth").await;
    assert_eq!(fixed.state, InstanceState::Running);
    assert_eq!(fixed.generation, 2, "each move counts");
    assert_eq!(alarms(&c, "record-corrected").await, 1);

    // A second copy of the same guest on hv2, started behind the server's back (without a
    // NIC, so that it cannot take the owner's address on the guest network).
    let hv2 = agent_client(&c.server.state, "hv2").await.unwrap();
    let path = format!("/v1/instances/{}", vm.id);
    let mut spec = vm.spec.clone();
    spec.nics.clear();
    let _: AgentInstance = hv2
        .put(
            &path,
            &DefineInstance {
                name: vm.name.clone(),
                spec,
            },
        )
        .await
        .unwrap();
    let _: AgentInstance = hv2.post(&format!("{path}/start"), &()).await.unwrap();
    wait_for(
        "the copy on hv2 paused",
        Duration::from_secs(30),
        || async {
            let copy: AgentInstance = hv2.get(&path).await.unwrap();
            copy.qemu_state.as_deref() == Some("paused")
        },
    )
    .await;
    assert!(alarms(&c, "two-copies").await >= 1);
    let owner = c.instance("truth").await;
    assert_eq!(
        (owner.host.as_str(), owner.state),
        ("hv1", InstanceState::Running),
        "the owner's copy keeps running"
    );
    // While the copy exists, starting the instance would make two: refused.
    let err = c
        .admin
        .post::<_, Instance>("/v1/instances/truth/start", &())
        .await
        .unwrap_err();
    common::assert_refused(&err, 409, "copy-elsewhere");

    // Without the copy the refusal goes (the guest runs, so its own host now answers that).
    let _: AgentInstance = hv2.post(&format!("{path}/stop"), &()).await.unwrap();
    wait_for(
        "hv2's report without the copy",
        Duration::from_secs(20),
        || async {
            let err = c
                .admin
                .post::<_, Instance>("/v1/instances/truth/start", &())
                .await
                .unwrap_err();
            err.code() != "copy-elsewhere"
        },
    )
    .await;
    let report = c.verify(0).await;
    assert!(report.checked > 0 && report.errors == 0, "{report:?}");
    c.shutdown().await;
}
