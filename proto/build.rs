fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // protoc comes from the crates registry (protoc-bin-vendored): nothing to install.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/placement.proto",
            "proto/internal.proto",
            "proto/scheduler.proto",
            "proto/dapr_runtime.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
