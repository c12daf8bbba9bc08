//! `s3grant run`: logging, the admin server, leader election, then the controller.

use std::sync::Arc;

use kube::Client;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, Readiness};
use crate::controller::{self, Config};
use crate::metrics::Metrics;

pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,aws=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_json);
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let admin_server = admin::serve(config.admin_addr, metrics.clone(), readiness.clone());
    tokio::spawn(async move {
        if let Err(err) = admin_server.await {
            tracing::error!(error = %err, "admin server failed");
        }
    });
    controller::run(client, config, metrics, readiness).await
}
