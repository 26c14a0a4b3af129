//! The control API of `skiff serve` (and `skiff up`): the server over a
//! running platform, the client the CLI uses, the JSON both speak, the
//! source archive a deploy uploads (`skiff-archive`), and the web console
//! the same address serves under `/console`.

#![forbid(unsafe_code)]

pub use skiff_archive as archive;
pub mod client;
mod console;
mod failure;
pub mod server;
pub mod types;

#[cfg(test)]
mod openapi_tests;

pub use client::{Client, ClientError};
pub use server::{ApiConfig, OPENAPI, ROUTES};
