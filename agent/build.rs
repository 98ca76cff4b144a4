//! Compiles the kubelet pod-resources proto (`proto/podresources/v1`) into
//! Rust (prost messages + a tonic client). `protox` parses the proto in pure
//! Rust, so building the agent needs no `protoc`.

use std::path::Path;

fn main() {
    let proto = "proto/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            // A clear line instead of a panic backtrace.
            eprintln!("error: cannot parse {proto}: {e}");
            std::process::exit(1);
        }
    };
    let out = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    if let Err(e) = tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .out_dir(Path::new(&out))
        .compile_fds(fds)
    {
        eprintln!("error: cannot generate Rust from {proto}: {e}");
        std::process::exit(1);
    }
}
