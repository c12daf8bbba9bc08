//! `s3grant run`: logging, the admin server, leader election, then the controller.

use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, Readiness};
use crate::cli::RunConfig as Config;
use crate::controller;
use crate::metrics::Metrics;

pub const LEASE_NAME: &str = "s3grant-leader";

pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,kube=warn,aws_config=warn,aws_smithy_runtime=warn,hyper=warn")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_json);
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let admin_server = admin::serve(config.admin_addr, metrics.clone(), readiness.clone());
    tokio::spawn(async move {
        if let Err(err) = admin_server.await {
            tracing::error!(error = %err, "admin server failed");
        }
    });

    if !config.leader_election {
        readiness.set_leading(true);
        return controller::run(client, config, metrics, readiness).await;
    }

    // Only the holder of the Lease acts. Losing it ends the process, so a replica that
    // was cut off (network partition, long pause) never keeps acting beside a new leader.
    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("s3grant-{:08x}", rand::random::<u32>()));
    let lease_seconds = config.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&config.lease_namespace)
        .with_identity(&identity)
        .with_duration(lease_seconds)
        .with_grace((lease_seconds / 3).max(1))
        .build()
        .await
        .context("create the leader-election Lease manager")?;
    let (mut leading, _lease_task) = manager.watch().await;
    tracing::info!(identity, lease = LEASE_NAME, namespace = %config.lease_namespace, "waiting to become leader");
    readiness.set_standby(true);
    while !*leading.borrow_and_update() {
        leading.changed().await.context("leader election stopped")?;
    }
    tracing::info!(identity, "became leader");
    readiness.set_standby(false);
    readiness.set_leading(true);
    tokio::select! {
        result = controller::run(client, config, metrics, readiness.clone()) => result,
        () = lost(&mut leading) => {
            readiness.set_leading(false);
            anyhow::bail!("lost the leader-election Lease; exiting so a fresh start can compete again")
        }
    }
}

async fn lost(leading: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}
