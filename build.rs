//! Compiles the admin API (proto/admin.proto) with protox, a pure-Rust
//! protobuf compiler, so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    let fds = protox::compile(["proto/admin.proto"], ["proto"])?;
    tonic_build::configure()
        // `shardgate admin --json` prints the replies as they are.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
