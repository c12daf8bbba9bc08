//! The `s3grant` command line: one binary, a subcommand per job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::{Backend, Mode, S3Grant, S3GrantClass, S3GrantClassSpec};
use crate::error::{Error, Result};
use crate::guardrails::check_permitted;
use crate::plan::{parse_manifest, plan_grant};
use crate::policy::build_policy;
use crate::request::GrantRequest;
use crate::validate::{parse_prefixes, BucketName};

#[derive(Debug, Parser)]
#[command(
    name = "s3grant",
    version,
    about = "Scoped S3 credentials as Kubernetes Secrets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(RunConfig),
    /// Print the CustomResourceDefinitions (the files in crds/ are generated from this).
    Crd(CrdArgs),
    /// Print the IAM policy for a bucket, like `s3-credentials policy`.
    Policy(PolicyArgs),
    /// Show what the operator would do for a grant, without a cluster or AWS.
    Plan(PlanArgs),
}

/// `s3grant run` flags; each also reads an environment variable.
#[derive(Clone, Debug, Args)]
pub struct RunConfig {
    /// Grants reconciled at once per backend (IAM rate-limits its API per account). The
    /// controller runs up to twice that in all, so a stalled backend cannot take every slot.
    #[arg(long, env = "S3GRANT_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// How long a replaced access key stays valid after a rotation, for pods still using it.
    #[arg(long, env = "S3GRANT_KEY_GRACE_PERIOD", default_value = "24h", value_parser = duration_arg)]
    pub key_grace_period: Duration,
    /// How often an unchanged IAM-user grant is checked for drift in AWS, and how often
    /// IAM users whose grant is gone are swept.
    #[arg(long, env = "S3GRANT_RESYNC_PERIOD", default_value = "1h", value_parser = duration_arg)]
    pub resync_period: Duration,
    /// The fraction of an STS session's lifetime after which it is re-minted (0.05 to 0.9).
    #[arg(long, env = "S3GRANT_STS_REFRESH_FRACTION", default_value_t = crate::sts_session::DEFAULT_REFRESH_FRACTION, value_parser = fraction_arg)]
    pub sts_refresh_fraction: f64,
    /// This cluster's identity, tagged on every IAM user, so that clusters sharing an AWS
    /// account never sweep each other's users. Default: the uid of the kube-system namespace.
    #[arg(long, env = "S3GRANT_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// The age an IAM user must reach before the sweep may delete it for a missing grant
    /// (IAM is eventually consistent: a new user can be invisible to reads for a while).
    #[arg(long, env = "S3GRANT_SWEEP_MIN_AGE", default_value = "10m", value_parser = duration_arg)]
    pub sweep_min_age: Duration,
    /// A reconcile running longer than this makes /livez fail, so that the kubelet
    /// restarts a wedged operator. Keep it above --kube-read-timeout plus a minute: every
    /// call a reconcile makes has a shorter timeout than that, so it is stuck.
    #[arg(long, env = "S3GRANT_WEDGE_TIMEOUT", default_value = "7m", value_parser = duration_arg)]
    pub wedge_timeout: Duration,
    /// How long a connection to the API server may stay silent while a response is
    /// awaited. Longer than a watch's own 290 s, so quiet watches are not cut; a stalled
    /// connection is given up after it.
    #[arg(long, env = "S3GRANT_KUBE_READ_TIMEOUT", default_value = "5m", value_parser = duration_arg)]
    pub kube_read_timeout: Duration,
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "S3GRANT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: std::net::SocketAddr,
    /// Only reconcile grants in this namespace (all namespaces when unset).
    #[arg(long, env = "S3GRANT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "S3GRANT_LOG_JSON")]
    pub log_json: bool,
    /// Take a coordination.k8s.io Lease before acting, for running more than one replica.
    #[arg(long, env = "S3GRANT_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "S3GRANT_LEASE_NAMESPACE",
        default_value = "s3grant-system"
    )]
    pub lease_namespace: String,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, env = "S3GRANT_LEASE_DURATION", default_value = "15s", value_parser = duration_arg)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (the pod name in a Deployment).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

fn fraction_arg(text: &str) -> std::result::Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.05..=0.9).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0.05 and 0.9".into())
    }
}

fn duration_arg(text: &str) -> std::result::Result<Duration, String> {
    crate::validate::parse_duration(text)
}

#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Write one file per CRD (`<plural>.<group>.yaml`) into each of these folders instead of printing.
    #[arg(long, value_name = "DIR")]
    pub split: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The bucket.
    pub bucket: String,
    /// Confine to keys under this prefix (a folder); repeat for several.
    #[arg(long = "prefix", value_name = "PREFIX")]
    pub prefixes: Vec<String>,
    /// Read and list only.
    #[arg(long, conflicts_with = "write_only")]
    pub read_only: bool,
    /// Write only.
    #[arg(long)]
    pub write_only: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The S3Grant manifest (YAML).
    #[arg(short = 'f', long = "filename", value_name = "GRANT.yaml")]
    pub grant: PathBuf,
    /// The S3GrantClass manifest the grant would use; without it, a class that permits
    /// the grant with default backend settings is assumed.
    #[arg(long, value_name = "CLASS.yaml")]
    pub class: Option<PathBuf>,
    /// A label of the grant's namespace, for the class's namespaceSelector; repeat for several.
    #[arg(long = "namespace-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub namespace_labels: Vec<(String, String)>,
}

fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

pub fn crd(args: &CrdArgs) -> Result<String> {
    if args.split.is_empty() {
        return Ok(crate::api::crds_yaml());
    }
    let mut written = String::new();
    for dir in &args.split {
        for crd in crate::api::crds() {
            let path = dir.join(format!(
                "{}.yaml",
                crd.metadata.name.as_deref().unwrap_or("crd")
            ));
            let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes");
            std::fs::write(&path, yaml).map_err(|e| Error::Manifest {
                what: path.display().to_string(),
                reason: e.to_string(),
            })?;
            written.push_str(&format!("wrote {}\n", path.display()));
        }
    }
    Ok(written)
}

pub fn policy(args: &PolicyArgs) -> Result<String> {
    let mode = match (args.read_only, args.write_only) {
        (true, _) => Mode::ReadOnly,
        (_, true) => Mode::WriteOnly,
        _ => Mode::ReadWrite,
    };
    let bucket = BucketName::parse(&args.bucket)?;
    let prefixes = parse_prefixes(&args.prefixes)?;
    Ok(build_policy(&bucket, &prefixes, mode).to_pretty_json())
}

pub fn plan(args: &PlanArgs) -> Result<String> {
    let mut grant: S3Grant = parse_manifest("S3Grant manifest", &read(&args.grant)?)?;
    if grant.metadata.namespace.is_none() {
        grant.metadata.namespace = Some("default".into());
    }
    let mut notes = Vec::new();
    if grant.metadata.uid.is_none() {
        grant.metadata.uid = Some("uid-assigned-at-creation".into());
        notes.push("names end in a hash of the uid the API server assigns; shown here for a placeholder uid");
    }
    let request = GrantRequest::parse(&grant)?;
    let class = match &args.class {
        Some(path) => {
            let class: S3GrantClass = parse_manifest("S3GrantClass manifest", &read(path)?)?;
            let labels: BTreeMap<String, String> = args.namespace_labels.iter().cloned().collect();
            let mut checked = class.clone();
            if class.spec.namespace_selector.is_some() && labels.is_empty() {
                checked.spec.namespace_selector = None;
                notes.push("the class's namespaceSelector was not checked: give the namespace's labels with --namespace-label");
            }
            check_permitted(&checked, &labels, &request)?;
            class
        }
        None => {
            notes.push("no --class: assuming a class that permits this grant, with default backend settings");
            assumed_class()
        }
    };
    let plan = plan_grant(&request, &class, None)?;
    let mut out = plan.describe();
    for note in notes {
        out.push_str(&format!("note: {note}\n"));
    }
    Ok(out)
}

fn assumed_class() -> S3GrantClass {
    S3GrantClass::new(
        "(assumed)",
        S3GrantClassSpec {
            backend: Backend {
                role_arn: Some("arn:aws:iam::ACCOUNT:role/CLASS-ROLE".into()),
                ..Backend::default()
            },
            namespace_selector: None,
            buckets: Vec::new(),
            prefix_template: None,
            allow_whole_bucket: true,
            modes: None,
            max_duration: None,
            allow_iam_users: None,
        },
    )
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Manifest {
        what: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> RunConfig {
        match Cli::try_parse_from(args).unwrap().command {
            Command::Run(config) => config,
            other => panic!("{other:?}"),
        }
    }

    /// The chart sets every flag through its environment variable, booleans as "true"/"false".
    #[test]
    fn run_flags_read_their_environment_variables() {
        std::env::set_var("S3GRANT_LEADER_ELECTION", "false");
        std::env::set_var("S3GRANT_KEY_GRACE_PERIOD", "90m");
        std::env::set_var("S3GRANT_STS_REFRESH_FRACTION", "0.5");
        let config = run_config(&["s3grant", "run"]);
        assert!(!config.leader_election);
        assert_eq!(config.key_grace_period.as_secs(), 5400);
        assert_eq!(config.sts_refresh_fraction, 0.5);
        std::env::set_var("S3GRANT_LEADER_ELECTION", "true");
        assert!(run_config(&["s3grant", "run"]).leader_election);
        std::env::set_var("S3GRANT_STS_REFRESH_FRACTION", "0.99");
        assert!(
            Cli::try_parse_from(["s3grant", "run"]).is_err(),
            "fraction out of range"
        );
        for var in [
            "S3GRANT_LEADER_ELECTION",
            "S3GRANT_KEY_GRACE_PERIOD",
            "S3GRANT_STS_REFRESH_FRACTION",
        ] {
            std::env::remove_var(var);
        }
        let defaults = run_config(&["s3grant", "run"]);
        assert_eq!(defaults.key_grace_period.as_secs(), 24 * 3600);
        assert!(!defaults.leader_election);
    }
}
