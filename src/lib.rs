//! s3grant: S3Grant custom resources become scoped S3 credentials in Secrets.
//!
//! The pipeline, a module a step: [`api`] (what is asked) → [`request`] (the spec,
//! validated once, with [`validate`]) → [`guardrails`] (is it permitted) → [`policy`]
//! and [`plan`] (the desired state, on a [`backend`]) → [`ledger`] (what is held, what
//! to create and what to release) → [`iam_user`] / [`sts_session`] (ensure it in AWS)
//! → [`secret`] (write it) → [`status`]. [`controller`] runs the pipeline; [`operator`]
//! wires it up, with [`leader`] election when more than one replica runs.

pub mod admin;
pub mod api;
pub mod aws;
pub mod backend;
pub mod cli;
pub mod controller;
pub mod error;
pub mod failpoint;
pub mod guardrails;
pub mod iam_user;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod naming;
pub mod operator;
pub mod plan;
pub mod policy;
pub mod request;
pub mod secret;
pub mod status;
pub mod sts_session;
pub mod validate;

pub use error::{Error, Result};
