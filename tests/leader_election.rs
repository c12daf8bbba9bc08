//! Two replicas with leader election on the testbed's real Lease API: only the leader
//! acts, and when it dies the other takes over within the lease time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

const LEASE_SECONDS: u64 = 4;

fn replica(namespace: &str, identity: &str) -> Operator {
    let lease = format!("{LEASE_SECONDS}s");
    Operator::start(
        namespace,
        &[
            "--leader-election",
            "--lease-namespace",
            namespace,
            "--lease-duration",
            &lease,
            "--identity",
            identity,
        ],
    )
}

async fn holder(client: &kube::Client, namespace: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt("s3grant-leader")
        .await
        .ok()??;
    lease.spec?.holder_identity
}

#[tokio::test]
async fn only_the_leader_acts_and_the_other_takes_over_when_it_dies() {
    let Some(bed) = testbed().await else { return };
    let ns = namespace(&bed.kube, "leader", &[]).await;
    let class = class_on(&bed.kube, &bed.moto, &ns, "leader", "").await;
    let grant = |name: &str| {
        format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec: {{bucket: {}, prefix: {name}/, className: {class}}}\n",
            bed.moto.bucket
        )
    };

    let mut replicas = [replica(&ns, "replica-a"), replica(&ns, "replica-b")];
    let leader = wait_for(Duration::from_secs(30), "a leader", || {
        holder(&bed.kube, &ns)
    })
    .await;
    apply_grant(&bed.kube, &ns, &grant("first")).await;
    wait_ready(&bed.kube, &ns, "first", "True", Duration::from_secs(30)).await;

    let (leader_index, standby_index) = if leader == "replica-a" {
        (0, 1)
    } else {
        (1, 0)
    };
    assert!(replicas[leader_index].log_text().contains("became leader"));
    let standby_log = replicas[standby_index].log_text();
    assert!(
        standby_log.contains("waiting to become leader"),
        "{standby_log}"
    );
    assert!(
        !standby_log.contains("credentials written"),
        "the standby acted:\n{standby_log}"
    );
    let standby_ready = http_get(&format!("{}/readyz", replicas[standby_index].admin)).await;
    assert!(standby_ready.is_some(), "a standby replica reports ready");

    replicas[leader_index].kill();
    let killed_at = Instant::now();
    apply_grant(&bed.kube, &ns, &grant("second")).await;
    let new_leader = wait_for(
        Duration::from_secs(LEASE_SECONDS * 4),
        "the standby to take the Lease",
        || {
            let client = bed.kube.clone();
            let ns = ns.clone();
            let leader = leader.clone();
            async move { holder(&client, &ns).await.filter(|h| *h != leader) }
        },
    )
    .await;
    wait_ready(&bed.kube, &ns, "second", "True", Duration::from_secs(30)).await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after the leader's SIGKILL: {takeover:?} (lease {LEASE_SECONDS}s)");
    assert_ne!(new_leader, leader);
    assert!(
        takeover < Duration::from_secs(LEASE_SECONDS * 3),
        "took {takeover:?}"
    );
    assert!(
        replicas[standby_index]
            .log_text()
            .contains("credentials written"),
        "the new leader acts"
    );
    delete_class(&bed.kube, &class).await;
}
