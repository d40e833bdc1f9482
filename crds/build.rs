//! Compiles the agent configuration's protobuf (`proto/breakwater/agent/v1alpha1/agent.proto`)
//! into Rust with prost-build, parsing it with protox (pure Rust: no `protoc` to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "breakwater/agent/v1alpha1/agent.proto";
    println!("cargo:rerun-if-changed=proto/{proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
