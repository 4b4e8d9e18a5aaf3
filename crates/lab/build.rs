//! Compiles the test guest (`crates/guest`) into a fully static binary and leaves it in
//! `$OUT_DIR/ferry-guest`, where `src/image.rs` embeds it with `include_bytes!`.
//!
//! Why not a Cargo dependency: a binary crate cannot be depended on, and the guest must be
//! linked with `+crt-static` while the rest of the workspace is not. Calling rustc directly on
//! the guest's `main.rs` works because the guest uses std only. The result: the single `ferry`
//! binary can build the guest image on any machine, without a Rust toolchain there.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_src = manifest_dir.join("../guest/src");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let output = out_dir.join("ferry-guest");

    println!("cargo:rerun-if-changed={}", guest_src.display());
    println!("cargo:rerun-if-changed=build.rs");

    let result = Command::new(&rustc)
        .args(["--edition", "2021", "-C", "opt-level=2"])
        .args(["-C", "target-feature=+crt-static", "-C", "strip=debuginfo"])
        .args(["--crate-type", "bin", "--crate-name", "ferry_guest"])
        .arg("-o")
        .arg(&output)
        .arg(guest_src.join("main.rs"))
        .output();
    match result {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "compiling the guest program with `{rustc}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run `{rustc}` to compile the guest program: {e}"),
    }
}
