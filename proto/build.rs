//! Compiles the `.proto` files with protox (pure Rust: no `protoc` needed
//! anywhere) and generates the tonic clients and servers, plus the encoded
//! file descriptor set that server reflection serves.

use prost::Message;

const PROTOS: &[&str] = &[
    "cowsnap/worker/v1/worker.proto",
    "cowsnap/v1/resources.proto",
    "cowsnap/v1/operation.proto",
    "cowsnap/v1/volume.proto",
    "cowsnap/v1/snapshot.proto",
    "cowsnap/v1/worker_admin.proto",
    "csi/v1/csi.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
