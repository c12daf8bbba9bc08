//! s3grant: S3Grant custom resources become scoped S3 credentials in Secrets.
//!
//! The pipeline, a module a step: [`api`] (what is asked) → [`guardrails`] (is it
//! permitted) → [`validate`] and [`policy`] (exactly what to grant) → [`plan`] (the
//! desired state) → [`iam_user`] / [`sts_session`] (ensure it in AWS) → [`secret`]
//! (write it) → [`status`]. [`controller`] runs the pipeline; [`operator`] wires it up.

pub mod admin;
pub mod api;
pub mod aws;
pub mod cli;
pub mod controller;
pub mod error;
pub mod guardrails;
pub mod iam_user;
pub mod metrics;
pub mod naming;
pub mod operator;
pub mod plan;
pub mod policy;
pub mod secret;
pub mod status;
pub mod sts_session;
pub mod validate;

pub use error::{Error, Result};
