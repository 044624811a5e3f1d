// Included by the build scripts of the four binaries (`include!`): sets `TERN_GIT_REV`,
// the commit they are built from (`unknown` outside a git checkout), which every
// `--version` shows beside the release.
fn git_revision() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TERN_GIT_REV={rev}");
    // Rebuilt when HEAD moves: HEAD itself (per worktree), and the branch it names, loose
    // or packed (in the common dir). Only files that exist are watched: a missing one would
    // make cargo run this script on every build.
    let dir = git(&["rev-parse", "--absolute-git-dir"]);
    let common = git(&["rev-parse", "--git-common-dir"]).map(std::path::PathBuf::from);
    let mut watch = Vec::new();
    if let Some(dir) = dir {
        let dir = std::path::PathBuf::from(dir);
        watch.push(dir.join("HEAD"));
        let common = common.map(|c| if c.is_absolute() { c } else { std::path::PathBuf::from(".").join(c) }).unwrap_or(dir);
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(head));
        }
        watch.push(common.join("packed-refs"));
    }
    for w in watch.into_iter().filter(|w| w.exists()) {
        println!("cargo:rerun-if-changed={}", w.display());
    }
}
