//! Compiles the .proto files with the pure-Rust `protox`, so a fresh machine needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tern.proto");
    let fds = protox::compile(["proto/tern.proto"], ["proto"])?;
    // A record's payload is shared, not copied, when the agent keeps a sent batch until
    // its ack (a dropped link then loses none of the change log).
    tonic_prost_build::configure().bytes(".tern.v1.Record.payload").compile_fds(fds)?;
    Ok(())
}
