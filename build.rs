//! Generates the QuotaService's protobuf and tonic code from `proto/` with protox, a protobuf
//! compiler written in Rust: building tokenbudget needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tokenbudget/v1/quota.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
