//! STS grants end to end against Ceph RGW, which really enforces session policies,
//! `s3:prefix` conditions and DurationSeconds bounds (moto enforces none of these).

mod common;

use std::time::Duration;

use common::*;
use jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use s3grant::api::S3Grant;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Setup {
    bed: Testbed,
    namespace: String,
    class: String,
}

async fn setup(prefix: &str) -> Option<Setup> {
    let bed = testbed().await?;
    let namespace = namespace(&bed.kube, prefix, &[]).await;
    let rules = "  prefixTemplate: \"{namespace}/\"\n  maxDuration: 1h\n";
    let class = class_on(&bed.kube, &bed.rgw, &namespace, "rgw", rules).await;
    Some(Setup {
        bed,
        namespace,
        class,
    })
}

impl Setup {
    fn grant_yaml(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: {name}}}\nspec:\n  bucket: {}\n  className: {}\n{extra}",
            self.bed.rgw.bucket, self.class
        )
    }

    async fn finish(self) {
        delete_class(&self.bed.kube, &self.class).await;
    }
}

#[tokio::test]
async fn sts_grant_is_confined_to_its_prefix_and_mode_by_rgw() {
    let Some(s) = setup("sts-basic").await else {
        return;
    };
    let operator = Operator::start(&s.namespace, &[]);
    let ns = s.namespace.clone();
    let started = std::time::Instant::now();
    apply_grant(
        &s.bed.kube,
        &ns,
        &s.grant_yaml("rw", &format!("  prefix: {ns}/rw\n  duration: 15m\n")),
    )
    .await;
    apply_grant(
        &s.bed.kube,
        &ns,
        &s.grant_yaml(
            "ro",
            &format!("  prefix: {ns}/ro/\n  mode: ReadOnly\n  duration: 20m\n"),
        ),
    )
    .await;
    apply_grant(
        &s.bed.kube,
        &ns,
        &s.grant_yaml(
            "wo",
            &format!("  prefix: {ns}/wo/\n  mode: WriteOnly\n  duration: 15m\n"),
        ),
    )
    .await;
    let rw = wait_ready(&s.bed.kube, &ns, "rw", "True", READY_TIMEOUT).await;
    eprintln!("apply to Ready (STS on RGW): {:?}", started.elapsed());
    let status = rw.status.unwrap();
    assert_eq!(status.credential_kind.as_deref(), Some("StsSession"));
    assert!(status
        .role_session_name
        .as_deref()
        .unwrap()
        .starts_with("s3g-"));

    let data = secret_data(&s.bed.kube, &ns, "rw-s3").await.unwrap();
    assert!(!data["AWS_SESSION_TOKEN"].is_empty());
    assert_eq!(
        status.expires_at.as_deref(),
        Some(data["AWS_CREDENTIAL_EXPIRATION"].as_str())
    );
    let expires: Timestamp = data["AWS_CREDENTIAL_EXPIRATION"].parse().unwrap();
    let lifetime = expires.as_second() - Timestamp::now().as_second();
    assert!(
        (840..=900).contains(&lifetime),
        "a 15m session, got {lifetime}s"
    );
    let process: serde_json::Value =
        serde_json::from_str(&data["credential_process.json"]).unwrap();
    assert_eq!(process["Expiration"], data["AWS_CREDENTIAL_EXPIRATION"]);

    // A reconcile of a grant whose session is fresh costs no AWS call.
    operator.wait_ready().await; // its startup probe of the backends is done
    let calls_before = operator.aws_calls().await;
    operator
        .reconcile_after(touch_grant(&s.bed.kube, &ns, "rw"))
        .await;
    assert_eq!(
        operator.aws_calls().await - calls_before,
        0,
        "no AWS call while the session is fresh"
    );
    assert_eq!(
        secret_data(&s.bed.kube, &ns, "rw-s3").await.unwrap(),
        data,
        "Secret unchanged"
    );

    let bucket = s.bed.rgw.bucket.clone();
    let tenant = s3_from_secret(&s.bed.rgw, &data);
    assert!(
        can_put(&tenant, &bucket, &format!("{ns}/rw/a.txt")).await,
        "put inside"
    );
    assert!(
        can_get(&tenant, &bucket, &format!("{ns}/rw/a.txt")).await,
        "get inside"
    );
    assert!(
        can_list(&tenant, &bucket, Some(&format!("{ns}/rw/"))).await,
        "list inside"
    );
    assert!(
        !can_put(&tenant, &bucket, &format!("{ns}/rwx/a.txt")).await,
        "sibling prefix denied"
    );
    assert!(
        !can_put(&tenant, &bucket, &format!("{ns}/ro/a.txt")).await,
        "other grant's prefix denied"
    );
    assert!(
        !can_list(&tenant, &bucket, None).await,
        "listing the whole bucket denied"
    );
    assert!(
        !can_list(&tenant, &bucket, Some(&format!("{ns}/rwx"))).await,
        "listing a sibling denied"
    );

    let ro = s3_from_secret(&s.bed.rgw, &wait_secret(&s, "ro-s3").await);
    assert!(
        can_list(&ro, &bucket, Some(&format!("{ns}/ro/"))).await,
        "read-only lists inside"
    );
    assert!(
        !can_put(&ro, &bucket, &format!("{ns}/ro/a.txt")).await,
        "read-only cannot put"
    );
    let wo = s3_from_secret(&s.bed.rgw, &wait_secret(&s, "wo-s3").await);
    assert!(
        can_put(&wo, &bucket, &format!("{ns}/wo/a.txt")).await,
        "write-only puts inside"
    );
    assert!(
        !can_get(&wo, &bucket, &format!("{ns}/wo/a.txt")).await,
        "write-only cannot get"
    );
    assert!(
        !can_list(&wo, &bucket, Some(&format!("{ns}/wo/"))).await,
        "write-only cannot list"
    );

    for name in ["rw", "ro", "wo"] {
        Api::<S3Grant>::namespaced(s.bed.kube.clone(), &ns)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(READY_TIMEOUT, "the Secrets to go with their grants", || {
        let client = s.bed.kube.clone();
        let ns = ns.clone();
        async move {
            secret_data(&client, &ns, "rw-s3")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await;
    s.finish().await;
}

async fn wait_secret(s: &Setup, name: &str) -> std::collections::BTreeMap<String, String> {
    wait_for(READY_TIMEOUT, &format!("Secret {name}"), || {
        let client = s.bed.kube.clone();
        let ns = s.namespace.clone();
        let name = name.to_string();
        async move { secret_data(&client, &ns, &name).await }
    })
    .await
}

#[tokio::test]
async fn sts_credentials_are_reminted_before_they_expire() {
    let Some(s) = setup("sts-remint").await else {
        return;
    };
    // Re-mint after 5% of the 15-minute lifetime (about 40 s) instead of two thirds.
    let _operator = Operator::start(&s.namespace, &["--sts-refresh-fraction", "0.05"]);
    let ns = s.namespace.clone();
    apply_grant(
        &s.bed.kube,
        &ns,
        &s.grant_yaml("app", &format!("  prefix: {ns}/app/\n  duration: 15m\n")),
    )
    .await;
    wait_ready(&s.bed.kube, &ns, "app", "True", READY_TIMEOUT).await;
    let first = wait_secret(&s, "app-s3").await;
    let first_expiry: Timestamp = first["AWS_CREDENTIAL_EXPIRATION"].parse().unwrap();

    let second = wait_for(Duration::from_secs(90), "re-minted credentials", || {
        let client = s.bed.kube.clone();
        let ns = ns.clone();
        let first_key = first["AWS_ACCESS_KEY_ID"].clone();
        async move {
            let data = secret_data(&client, &ns, "app-s3").await?;
            (data["AWS_ACCESS_KEY_ID"] != first_key).then_some(data)
        }
    })
    .await;
    let second_expiry: Timestamp = second["AWS_CREDENTIAL_EXPIRATION"].parse().unwrap();
    assert!(
        Timestamp::now() < first_expiry,
        "re-minted while the first session was still valid"
    );
    assert!(second_expiry > first_expiry, "the new session lasts longer");
    let bucket = s.bed.rgw.bucket.clone();
    assert!(
        can_put(
            &s3_from_secret(&s.bed.rgw, &second),
            &bucket,
            &format!("{ns}/app/new")
        )
        .await
    );
    assert!(
        can_put(
            &s3_from_secret(&s.bed.rgw, &first),
            &bucket,
            &format!("{ns}/app/old")
        )
        .await,
        "old session still valid until it expires"
    );
    s.finish().await;
}

#[tokio::test]
async fn narrowing_a_grant_remints_credentials_with_the_narrower_policy() {
    let Some(s) = setup("sts-narrow").await else {
        return;
    };
    let _operator = Operator::start(&s.namespace, &[]);
    let ns = s.namespace.clone();
    apply_grant(
        &s.bed.kube,
        &ns,
        &s.grant_yaml("app", &format!("  prefix: {ns}/\n  duration: 15m\n")),
    )
    .await;
    wait_ready(&s.bed.kube, &ns, "app", "True", READY_TIMEOUT).await;
    let wide = wait_secret(&s, "app-s3").await;
    let bucket = s.bed.rgw.bucket.clone();
    assert!(
        can_put(
            &s3_from_secret(&s.bed.rgw, &wide),
            &bucket,
            &format!("{ns}/b/x")
        )
        .await
    );

    let narrow = serde_json::json!({"spec": {"prefix": format!("{ns}/a/")}});
    Api::<S3Grant>::namespaced(s.bed.kube.clone(), &ns)
        .patch("app", &PatchParams::default(), &Patch::Merge(&narrow))
        .await
        .unwrap();
    let narrowed = wait_for(READY_TIMEOUT, "credentials for the narrower grant", || {
        let client = s.bed.kube.clone();
        let ns = ns.clone();
        let wide_key = wide["AWS_ACCESS_KEY_ID"].clone();
        async move {
            let data = secret_data(&client, &ns, "app-s3").await?;
            (data["AWS_ACCESS_KEY_ID"] != wide_key).then_some(data)
        }
    })
    .await;
    let client = s3_from_secret(&s.bed.rgw, &narrowed);
    assert!(can_put(&client, &bucket, &format!("{ns}/a/x")).await);
    assert!(
        !can_put(&client, &bucket, &format!("{ns}/b/x")).await,
        "the new session has the narrower policy"
    );
    s.finish().await;
}
