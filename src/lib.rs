//! s3grant: S3Grant custom resources become scoped S3 credentials in Secrets.
//!
//! The pipeline, one module a step: [`api`] (what is asked) → [`guardrails`] (is it
//! permitted) → [`validate`] and [`policy`] (what exactly to grant) → [`plan`] (the
//! desired state) → [`aws`] (ensure it in IAM/STS) → [`secret`] (write it) → [`status`].

pub mod api;
pub mod cli;
pub mod error;
pub mod guardrails;
pub mod naming;
pub mod plan;
pub mod policy;
pub mod validate;

pub use error::{Error, Result};
