//! `qemu-img`: create, inspect and copy images.
