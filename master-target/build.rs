//! Puts the git revision into `--version` (see `build-support/git_rev.rs`).
include!("../build-support/git_rev.rs");

fn main() {
    println!("cargo:rerun-if-changed=../build-support/git_rev.rs");
    git_revision();
}
