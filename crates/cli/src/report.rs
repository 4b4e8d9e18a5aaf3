//! How errors reach the operator: a stable code, one sentence, and a hint.

use ferry_lab::LabError;

/// Prints an error as `error[code]: message` plus a hint line. Errors from the lab carry
/// their own code and hint; anything else gets a generic code.
pub fn print_error(e: &anyhow::Error) {
    if let Some(lab) = e.downcast_ref::<LabError>() {
        eprintln!("error[{}]: {lab}", lab.code());
        eprintln!("  hint: {}", lab.hint());
    } else {
        eprintln!("error[ferry]: {e:#}");
    }
}
