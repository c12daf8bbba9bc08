//! `s3grant run`: logging, the Kubernetes client, the admin server, leader election, then
//! the controller.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, Readiness};
use crate::cli::RunConfig as Config;
use crate::controller;
use crate::leader::{Elector, Fence};
use crate::metrics::Metrics;

pub const LEASE_NAME: &str = "s3grant-leader";

/// How long the Kubernetes client waits for a connection.
const KUBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the Kubernetes client may take to send a request.
const KUBE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// The Kubernetes client (in-cluster or KUBECONFIG), with timeouts. The read timeout
/// (`--kube-read-timeout`, 5 min) is an idle timeout on the socket, and the same client
/// carries the watches, which are silent while nothing changes: kube's watcher asks the
/// API server to end each watch after 290 s (`timeoutSeconds`) and reconnects itself when
/// a watch has been silent for 295 s. The default is longer than both, so a quiet watch is
/// never cut, and a stalled connection is still given up after 5 minutes instead of
/// never. Leader election bounds each of its own requests by the time its lease has left.
async fn kube_client(read_timeout: Duration) -> anyhow::Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    config.connect_timeout = Some(KUBE_CONNECT_TIMEOUT);
    config.write_timeout = Some(KUBE_WRITE_TIMEOUT);
    config.read_timeout = Some(read_timeout);
    // Count the read timeout from when a request is sent, not from when its pooled
    // connection went idle.
    config.reset_reader_on_write = true;
    Client::try_from(config).context("build the Kubernetes client")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_json);
    let client = kube_client(config.kube_read_timeout).await?;
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
        return controller::run(client, config, metrics, readiness, Fence::unfenced()).await;
    }

    // Only the holder of the Lease acts, and only while its own clock says the Lease is
    // valid (the fence, checked before every AWS call). Losing it ends the process, so a
    // replica that was cut off (network partition, long pause) never keeps acting beside
    // a new leader, and competes again after its restart.
    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("s3grant-{:08x}", rand::random::<u32>()));
    let elector = Elector::new(
        client.clone(),
        &config.lease_namespace,
        LEASE_NAME,
        &identity,
        config.lease_duration,
    );
    let fence = elector.fence();
    let timing = elector.timing();
    tracing::info!(identity, lease = LEASE_NAME, namespace = %config.lease_namespace, lease_seconds = timing.lease.as_secs(), "waiting to become leader");
    readiness.set_standby(true);
    let leadership = tokio::select! {
        leadership = elector.acquire() => leadership,
        () = shutdown_signal() => {
            tracing::info!("stopped while standing by");
            return Ok(());
        }
    };
    tracing::info!(identity, valid_for = ?timing.lease - timing.margin, "became leader");
    readiness.set_standby(false);
    readiness.set_leading(true);
    let keeper = elector.keep(leadership);
    let result = tokio::select! {
        // First, so that a replica resuming after a pause sees its lapsed fence before
        // anything else this task drives.
        biased;
        () = fence.closed() => {
            readiness.set_leading(false);
            let reason = fence.why_closed();
            anyhow::bail!("lost the leader-election Lease ({reason}); exiting so a fresh start can compete again")
        }
        result = controller::run(client, config, metrics, readiness.clone(), fence.clone()) => result,
    };
    // The controller stopped (SIGTERM, or an error): no AWS call from here on, then the
    // Lease is freed so that a standby takes over at once.
    fence.close_because("the controller stopped");
    readiness.set_leading(false);
    keeper.release().await;
    result
}
