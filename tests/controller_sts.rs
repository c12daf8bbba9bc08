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

/// On role credentials (IRSA, Pod Identity) every AssumeRole is role chaining, which AWS
/// caps at one hour. moto does not enforce that cap (nor session policies), but it shows
/// what s3grant asks for: the operator runs on session credentials here, and a 2h grant
/// gets a 1h session with the clamp stated in its status.
#[tokio::test]
async fn on_role_credentials_sessions_are_clamped_to_one_hour_and_the_status_says_so() {
    let Some(bed) = testbed().await else { return };
    let ns = namespace(&bed.kube, "sts-chain", &[]).await;
    let iam = iam_admin(&bed.moto);
    let account = bed.moto.role_arn.split(':').nth(4).unwrap().to_string();
    let admin_arn = std::env::var("S3GRANT_TEST_MOTO_ADMIN_ARN")
        .expect("the testbed exports the moto admin's ARN");
    let (operator_role, session_role) = (unique("operator"), unique("sessions"));
    let trust = |principal: &str| {
        serde_json::json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}]}).to_string()
    };
    let allow = |action: &str| {
        serde_json::json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]}).to_string()
    };
    iam.create_role()
        .role_name(&operator_role)
        .assume_role_policy_document(trust(&admin_arn))
        .send()
        .await
        .unwrap();
    iam.put_role_policy()
        .role_name(&operator_role)
        .policy_name("chain")
        .policy_document(allow("sts:AssumeRole"))
        .send()
        .await
        .unwrap();
    let operator_session =
        format!("arn:aws:sts::{account}:assumed-role/{operator_role}/s3grant-operator");
    let session_role_arn = iam
        .create_role()
        .role_name(&session_role)
        .assume_role_policy_document(trust(&operator_session))
        .max_session_duration(43200)
        .send()
        .await
        .unwrap()
        .role
        .unwrap()
        .arn;
    iam.put_role_policy()
        .role_name(&session_role)
        .policy_name("s3")
        .policy_document(allow("s3:*"))
        .send()
        .await
        .unwrap();

    // The operator's own credentials: a session of the operator role, as IRSA would give.
    let sts_config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(&bed.moto.endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            &bed.moto.access_key_id,
            &bed.moto.secret_access_key,
            None,
            None,
            "test",
        ))
        .build();
    let account_role = format!("arn:aws:iam::{account}:role/{operator_role}");
    let own = aws_sdk_sts::Client::from_conf(sts_config)
        .assume_role()
        .role_arn(&account_role)
        .role_session_name("s3grant-operator")
        .send()
        .await
        .unwrap()
        .credentials
        .unwrap();
    let on_role = AwsTarget {
        access_key_id: own.access_key_id.clone(),
        secret_access_key: own.secret_access_key.clone(),
        role_arn: session_role_arn,
        ..bed.moto.clone()
    };
    let class = class_on(
        &bed.kube,
        &on_role,
        &ns,
        "chain",
        "  allowWholeBucket: true\n",
    )
    .await;
    // class_on stores the key pair; add the session token the operator must present.
    let token = serde_json::json!({"stringData": {"AWS_SESSION_TOKEN": own.session_token}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(bed.kube.clone(), &ns)
        .patch(
            &backend_credentials_secret(&bed.kube, &ns, &on_role).await,
            &PatchParams::default(),
            &Patch::Merge(&token),
        )
        .await
        .unwrap();

    let _operator = Operator::start(&ns, &[]);
    let grant = format!(
        "apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {{name: long}}\nspec: {{bucket: {}, prefix: long/, duration: 2h, className: {class}}}\n",
        bed.moto.bucket
    );
    apply_grant(&bed.kube, &ns, &grant).await;
    let grant = wait_ready(&bed.kube, &ns, "long", "True", READY_TIMEOUT).await;
    let (_, _, message) = ready_condition(&grant).unwrap();
    assert!(
        message.contains("duration clamped from 2h to 1h"),
        "{message}"
    );
    let data = secret_data(&bed.kube, &ns, "long-s3").await.unwrap();
    let expires: Timestamp = data["AWS_CREDENTIAL_EXPIRATION"].parse().unwrap();
    let lifetime = expires.as_second() - Timestamp::now().as_second();
    assert!(
        (3500..=3600).contains(&lifetime),
        "a 1h session, got {lifetime}s"
    );
    delete_class(&bed.kube, &class).await;
}
