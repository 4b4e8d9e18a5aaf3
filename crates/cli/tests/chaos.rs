//! The fault matrix against real QEMU, through the library: a test-sized slice (an operator's
//! cancel, a server crash, a source agent crash), each in the phase it is meant for. No cell
//! may ever show two running copies, and every cell must be ok (job ended, record true,
//! memory intact).

use ferry_chaos::{CellOptions, CellSpec, ChaosLab, Fault, LabSpec, Phase};
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_of_the_fault_matrix_never_shows_two_copies() {
    remove_orphan_test_labs();
    let spec = LabSpec {
        name: unique_test_lab_name(),
        ferry_binary: env!("CARGO_BIN_EXE_ferry").into(),
        accel: std::env::var("FERRY_ACCEL").unwrap_or_else(|_| "auto".into()),
    };
    let mut lab = ChaosLab::start(&spec).await.expect("chaos lab");
    let cells = [
        CellSpec::at(Fault::Cancel, Phase::FirstRound),
        CellSpec::at(Fault::KillServer, Phase::LaterRounds),
        CellSpec::at(Fault::KillSourceAgent, Phase::FirstRound),
    ];
    let results = ferry_chaos::run_cells(&mut lab, &cells, &CellOptions::default(), |r| {
        eprintln!("{}", ferry_chaos::report::table_row(r))
    })
    .await
    .expect("the runner itself works");
    let bad: Vec<_> = results.iter().filter(|r| r.two_copies || !r.ok).collect();
    if !bad.is_empty() {
        lab.keep_logs();
    }
    assert!(
        results.iter().all(|r| !r.two_copies),
        "two copies: {bad:#?}"
    );
    assert!(bad.is_empty(), "cells not ok: {bad:#?}");
}
