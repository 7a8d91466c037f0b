pub mod domain;

pub mod proto {
    tonic::include_proto!("backstop.v1");
}
pub mod config;
pub mod engine;
