//! The testbed's servers are real and wired: each test here checks one server for the
//! behaviour other tests rely on, with a control that would fail on a fake.
//!
//! - Kubernetes API server: our generated CRDs are applied (by `common::testbed()`) and
//!   served; namespaces and Secrets work; a kube-rs watcher sees a new S3Grant; the
//!   status subresource is separate from the main resource; the CRDs' OpenAPI and CEL
//!   rules refuse hostile grants.
//! - moto: an IAM user with a prefix policy is allowed inside and denied outside
//!   (actions and resources are enforced; Conditions are not, so no listing check here).
//! - Ceph RGW: an `s3:prefix`-conditioned ListBucket is enforced, and an STS session
//!   policy confines an AssumeRole session.
//!
//! The policies here are written by hand, not compiled by s3grant: these tests are about
//! the servers. tests/policy_enforcement.rs judges the compiler's policies on RGW.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::rgw::{self, RgwBucket, RgwUser};
use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use s3grant::api::S3Grant;
use serde_json::json;

const WATCH_TIMEOUT: Duration = Duration::from_secs(30);

fn grant(name: &str, spec: serde_json::Value) -> S3Grant {
    serde_json::from_value(json!({
        "apiVersion": "s3grant.io/v1alpha1",
        "kind": "S3Grant",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("grant {name}: {e}"))
}

#[tokio::test]
async fn kube_serves_our_crds_secrets_watches_and_the_status_subresource() {
    let Some(bed) = testbed().await else {
        return;
    };
    let started = std::time::Instant::now();

    // The CRDs applied from crds/ are the ones s3grant generates, established and served.
    let crds: Api<CustomResourceDefinition> = Api::all(bed.kube.clone());
    for generated in s3grant::api::crds() {
        let name = generated.metadata.name.clone().unwrap();
        let served = crds.get(&name).await.expect("CRD is stored");
        assert_eq!(served.spec.group, generated.spec.group, "{name}");
        assert_eq!(served.spec.names.kind, generated.spec.names.kind, "{name}");
        assert_eq!(served.spec.scope, generated.spec.scope, "{name}");
        let version = &served.spec.versions[0];
        assert_eq!(version.name, generated.spec.versions[0].name, "{name}");
        assert_eq!(
            version.subresources, generated.spec.versions[0].subresources,
            "{name}: subresources"
        );
        let established = served
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is established");
    }

    // A namespace and a Secret, read back.
    let grant_crd = crds.get("s3grants.s3grant.io").await.unwrap();
    assert!(
        grant_crd.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "S3Grant has a status subresource"
    );

    let ns = namespace(&bed.kube, "smoke", &[("s3grant.io/smoke", "true")]).await;
    let stored_ns = Api::<Namespace>::all(bed.kube.clone())
        .get(&ns)
        .await
        .expect("namespace is stored");
    assert_eq!(
        stored_ns.metadata.labels.unwrap_or_default()["s3grant.io/smoke"],
        "true"
    );
    let secrets: Api<Secret> = Api::namespaced(bed.kube.clone(), &ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("smoke".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "key".to_string(),
            ByteString(b"value\x00\xffbinary".to_vec()),
        )])),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
    let read = secrets.get("smoke").await.expect("get Secret");
    assert_eq!(
        read.data, secret.data,
        "Secret data round-trips byte for byte"
    );
    assert!(
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .is_err(),
        "a second create of the same name conflicts"
    );

    // A watcher sees a grant created after its initial list.
    let grants: Api<S3Grant> = Api::namespaced(bed.kube.clone(), &ns);
    let mut events = watcher(grants.clone(), watcher::Config::default()).boxed();
    tokio::time::timeout(WATCH_TIMEOUT, async {
        while let Some(event) = events.try_next().await.expect("watch stream") {
            if matches!(event, Event::InitDone) {
                return;
            }
        }
        panic!("watch stream ended before its initial list was done");
    })
    .await
    .expect("watcher's initial list within the timeout");
    let created = grants
        .create(
            &PostParams::default(),
            &grant(
                "watched",
                json!({"bucket": "acme-data", "prefix": "tenant-a/"}),
            ),
        )
        .await
        .expect("a valid grant is accepted");
    assert_eq!(
        created.spec.mode,
        s3grant::api::Mode::ReadWrite,
        "defaulted"
    );
    let seen = next_apply(&mut events, "watched", |_| true).await;
    assert_eq!(seen.metadata.uid, created.metadata.uid);
    let generation = created.metadata.generation;

    // Status goes through the status subresource, and only there.
    let status = json!({
        "observedGeneration": generation,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "SmokeTest",
            "message": "patched through the status subresource",
        }],
        "secretName": "watched-s3",
    });
    grants
        .patch_status(
            "watched",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status, "spec": {"bucket": "changed-by-status"}})),
        )
        .await
        .expect("patch status");
    let read = grants.get("watched").await.unwrap();
    let (ready, reason, message) = ready_condition(&read).expect("Ready condition stored");
    assert_eq!(
        (ready.as_str(), reason.as_str(), message.as_str()),
        (
            "False",
            "SmokeTest",
            "patched through the status subresource"
        )
    );
    let read_status = read.status.clone().unwrap();
    assert_eq!(read_status.secret_name.as_deref(), Some("watched-s3"));
    assert_eq!(read_status.observed_generation, generation);
    assert_eq!(
        read.spec.bucket, "acme-data",
        "the status subresource ignores spec changes"
    );
    assert_eq!(
        read.metadata.generation, generation,
        "a status change does not bump the generation"
    );
    next_apply(&mut events, "watched", |g| {
        g.status.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("watched-s3")
    })
    .await;

    grants
        .patch(
            "watched",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"secretName": "changed-by-main"}})),
        )
        .await
        .expect("patch main resource");
    let read = grants.get("watched").await.unwrap();
    assert_eq!(
        read.status.unwrap().secret_name.as_deref(),
        Some("watched-s3"),
        "the main resource ignores status changes"
    );
    eprintln!("kube smoke: {:?}", started.elapsed());
}

/// Waits for an Apply event of `name` that satisfies `check`.
async fn next_apply(
    events: &mut (impl futures::Stream<Item = Result<Event<S3Grant>, watcher::Error>> + Unpin),
    name: &str,
    check: impl Fn(&S3Grant) -> bool,
) -> S3Grant {
    tokio::time::timeout(WATCH_TIMEOUT, async {
        while let Some(event) = events.try_next().await.expect("watch stream") {
            if let Event::Apply(g) | Event::InitApply(g) = event {
                if g.metadata.name.as_deref() == Some(name) && check(&g) {
                    return g;
                }
            }
        }
        panic!("watch stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no watch event for {name} within {WATCH_TIMEOUT:?}"))
}

/// Every hostile grant is refused by the API server itself (OpenAPI patterns and CEL
/// rules in the CRD), with a message that names the rule; the same grant made valid is
/// accepted, so the refusals are not the server refusing everything.
#[tokio::test]
async fn kube_refuses_hostile_grants_with_the_rule_that_caught_them() {
    let Some(bed) = testbed().await else {
        return;
    };
    let ns = namespace(&bed.kube, "smoke-hostile", &[]).await;
    let grants: Api<S3Grant> = Api::namespaced(bed.kube.clone(), &ns);
    const PATTERN: &str = "should match";
    const SEGMENTS: &str = "prefix must not contain empty, '.' or '..' segments";
    const DURATION: &str = "duration must be between 15m and 12h";
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "dotdot",
            json!({"bucket": "acme-data", "prefix": "tenant-a/../tenant-b/"}),
            vec!["spec.prefix", SEGMENTS],
        ),
        (
            "dotdot-alone",
            json!({"bucket": "acme-data", "prefix": ".."}),
            vec!["spec.prefix", SEGMENTS],
        ),
        (
            "star",
            json!({"bucket": "acme-data", "prefix": "tenant-*"}),
            vec!["spec.prefix", PATTERN],
        ),
        (
            "policy-variable",
            json!({"bucket": "acme-data", "prefix": "home/${aws:username}/"}),
            vec!["spec.prefix", PATTERN],
        ),
        (
            "leading-slash",
            json!({"bucket": "acme-data", "prefix": "/tenant-a/"}),
            vec!["spec.prefix", PATTERN],
        ),
        (
            "empty-segment",
            json!({"bucket": "acme-data", "prefix": "a//b"}),
            vec!["spec.prefix", SEGMENTS],
        ),
        (
            "prefixes-dotdot",
            json!({"bucket": "acme-data", "prefixes": ["ok/", "a/../b/"]}),
            vec![
                "spec.prefixes",
                "prefixes must not contain empty, '.' or '..' segments",
            ],
        ),
        (
            "duration-13h",
            json!({"bucket": "acme-data", "prefix": "tenant-a/", "duration": "13h"}),
            vec!["spec.duration", DURATION],
        ),
        (
            "duration-10m",
            json!({"bucket": "acme-data", "prefix": "tenant-a/", "duration": "10m"}),
            vec!["spec.duration", DURATION],
        ),
        (
            "rotate-with-duration",
            json!({"bucket": "acme-data", "prefix": "tenant-a/", "duration": "1h", "rotateEvery": "24h"}),
            vec!["rotateEvery applies to IAM-user grants only"],
        ),
        (
            "prefix-and-prefixes",
            json!({"bucket": "acme-data", "prefix": "tenant-a/", "prefixes": ["tenant-b/"]}),
            vec!["set prefix or prefixes, not both"],
        ),
        (
            "bad-bucket",
            json!({"bucket": "Not_A_Bucket", "prefix": "tenant-a/"}),
            vec!["spec.bucket", PATTERN],
        ),
    ];
    for (name, spec, fragments) in &cases {
        match grants
            .create(&PostParams::default(), &grant(name, spec.clone()))
            .await
        {
            Err(kube::Error::Api(status)) => {
                eprintln!("{name}: {}", status.message);
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert_eq!(status.reason, "Invalid", "{name}: {status:?}");
                for fragment in fragments {
                    assert!(
                        status.message.contains(fragment),
                        "{name}: refusal should mention {fragment:?}: {}",
                        status.message
                    );
                }
            }
            Ok(_) => panic!("{name}: hostile grant {spec} was accepted"),
            Err(e) => panic!("{name}: expected a 422 from the API server, got {e:?}"),
        }
    }
    // The control: well-formed neighbours of the hostile ones are accepted.
    for (name, spec) in [
        (
            "ok-prefix",
            json!({"bucket": "acme-data", "prefix": "tenant-a/reports..2024/", "duration": "12h"}),
        ),
        (
            "ok-prefixes",
            json!({"bucket": "acme.data-2", "prefixes": ["a/", "b/c"], "rotateEvery": "24h"}),
        ),
        (
            "ok-short",
            json!({"bucket": "acme-data", "prefix": "x", "duration": "15m"}),
        ),
    ] {
        grants
            .create(&PostParams::default(), &grant(name, spec.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name}: valid grant {spec} refused: {e}"));
    }
    let mut stored: Vec<String> = grants
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|g| g.metadata.name)
        .collect();
    stored.sort();
    assert_eq!(stored, ["ok-prefix", "ok-prefixes", "ok-short"]);
}

/// moto's admin target, without needing the Kubernetes part of the testbed.
fn moto() -> Option<AwsTarget> {
    if std::env::var("S3GRANT_TESTBED").is_err() {
        eprintln!(
            "skipped: no testbed in the environment; run `tests/testbed.sh test` (README.md)"
        );
        return None;
    }
    let var = |suffix: &str| {
        std::env::var(format!("S3GRANT_TEST_MOTO_{suffix}")).unwrap_or_else(|_| {
            panic!("S3GRANT_TESTBED is set but S3GRANT_TEST_MOTO_{suffix} is not")
        })
    };
    Some(AwsTarget {
        endpoint: var("ENDPOINT"),
        access_key_id: var("ACCESS_KEY_ID"),
        secret_access_key: var("SECRET_ACCESS_KEY"),
        role_arn: var("ROLE_ARN"),
        bucket: var("BUCKET"),
        region: var("REGION"),
    })
}

#[tokio::test]
async fn moto_iam_user_with_a_prefix_policy_is_confined_to_it() {
    let Some(moto) = moto() else {
        return;
    };
    let iam = iam_admin(&moto);
    let admin = s3(&moto, &moto.access_key_id, &moto.secret_access_key, None);
    let bucket = &moto.bucket;
    let user = unique("smoke-user");
    let folder = unique("smoke");
    let (inside, sibling, other) = (
        format!("{folder}/seed.txt"),
        format!("{folder}b/seed.txt"),
        format!("other-{folder}/seed.txt"),
    );
    for key in [&inside, &sibling, &other] {
        admin
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(b"seed".to_vec().into())
            .send()
            .await
            .expect("admin seeds");
    }

    iam.create_user().user_name(&user).send().await.unwrap();
    let key = iam
        .create_access_key()
        .user_name(&user)
        .send()
        .await
        .unwrap();
    let key = key.access_key().unwrap();
    let tenant = s3(&moto, key.access_key_id(), key.secret_access_key(), None);

    // Control: the user's own key, no policy: nothing, not even inside.
    assert!(!can_put(&tenant, bucket, &format!("{folder}/x")).await);
    assert!(!can_get(&tenant, bucket, &inside).await);

    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": [format!("arn:aws:s3:::{bucket}/{folder}/*")],
        }],
    });
    iam.put_user_policy()
        .user_name(&user)
        .policy_name("prefix")
        .policy_document(policy.to_string())
        .send()
        .await
        .unwrap();
    let put_inside = format!("{folder}/new.txt");
    rgw::wait_until("moto applies the user policy", true, || {
        can_put(&tenant, bucket, &put_inside)
    })
    .await;
    assert!(can_get(&tenant, bucket, &inside).await, "get inside");
    assert!(
        !can_put(&tenant, bucket, &format!("{folder}b/new.txt")).await,
        "put in the sibling prefix is denied"
    );
    assert!(!can_get(&tenant, bucket, &sibling).await, "get sibling");
    assert!(
        !can_put(&tenant, bucket, &format!("other-{folder}/new.txt")).await,
        "put elsewhere is denied"
    );
    assert!(!can_get(&tenant, bucket, &other).await, "get elsewhere");

    iam.delete_access_key()
        .user_name(&user)
        .access_key_id(key.access_key_id())
        .send()
        .await
        .unwrap();
    iam.delete_user_policy()
        .user_name(&user)
        .policy_name("prefix")
        .send()
        .await
        .unwrap();
    iam.delete_user().user_name(&user).send().await.unwrap();
    for key in [&inside, &sibling, &other, &put_inside] {
        let _ = admin.delete_object().bucket(bucket).key(key).send().await;
    }
}

fn list_policy(bucket: &str, condition: bool) -> String {
    let mut statement = json!({
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": [format!("arn:aws:s3:::{bucket}")],
    });
    if condition {
        statement["Condition"] = json!({"StringLike": {"s3:prefix": ["inside/*"]}});
    }
    json!({"Version": "2012-10-17", "Statement": [statement]}).to_string()
}

/// RGW evaluates Conditions: an `s3:prefix`-conditioned ListBucket lists inside the
/// prefix only; the same statement without the Condition lists everything.
#[tokio::test]
async fn rgw_enforces_the_s3_prefix_condition_on_listings() {
    let Some(rgw) = rgw::rgw() else {
        return;
    };
    let user = RgwUser::create(&rgw, "smoke-list");
    let bucket = RgwBucket::create(&rgw, "smoke-list").await;
    let b = bucket.name.as_str();
    rgw::seed(&rgw, b, "inside/seed.txt").await;
    rgw::seed(&rgw, b, "outside/seed.txt").await;
    let tenant = user.s3(&rgw);

    assert!(
        !can_list(&tenant, b, Some("inside/")).await,
        "no policy: no listing"
    );

    rgw::put_user_policy(&rgw, &user.uid, "list", &list_policy(b, true)).await;
    rgw::wait_until("conditioned ListBucket in force", true, || {
        can_list(&tenant, b, Some("inside/"))
    })
    .await;
    assert!(can_list(&tenant, b, Some("inside/deeper/")).await);
    assert!(!can_list(&tenant, b, Some("outside/")).await, "outside");
    assert!(!can_list(&tenant, b, Some("inside")).await, "no slash");
    assert!(!can_list(&tenant, b, None).await, "no prefix");

    rgw::put_user_policy(&rgw, &user.uid, "list", &list_policy(b, false)).await;
    rgw::wait_until("unconditioned ListBucket in force", true, || {
        can_list(&tenant, b, Some("outside/"))
    })
    .await;
    assert!(
        can_list(&tenant, b, None).await,
        "without the Condition everything lists: the denials were the Condition's"
    );
}

/// An RGW STS session is confined by its session policy; without one it has the role's
/// full rights (`s3:*` on `*`).
#[tokio::test]
async fn rgw_sts_session_policy_confines_the_session() {
    let Some(rgw) = rgw::rgw() else {
        return;
    };
    let bucket = RgwBucket::create(&rgw, "smoke-sts").await;
    let b = bucket.name.as_str();
    rgw::seed(&rgw, b, "outside/seed.txt").await;

    let unconfined = rgw::assume_role(&rgw, None).await;
    assert!(
        can_put(&unconfined, b, "outside/role.txt").await,
        "the role alone reaches outside"
    );
    assert!(can_list(&unconfined, b, None).await);

    let session_policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": [format!("arn:aws:s3:::{b}/inside/*")],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [format!("arn:aws:s3:::{b}")],
                "Condition": {"StringLike": {"s3:prefix": ["inside/*"]}},
            },
        ],
    })
    .to_string();
    let confined = rgw::assume_role(&rgw, Some(&session_policy)).await;
    assert!(can_put(&confined, b, "inside/session.txt").await, "put in");
    assert!(can_get(&confined, b, "inside/session.txt").await, "get in");
    assert!(can_list(&confined, b, Some("inside/")).await, "list in");
    assert!(
        !can_put(&confined, b, "outside/session.txt").await,
        "put out"
    );
    assert!(!can_get(&confined, b, "outside/seed.txt").await, "get out");
    assert!(!can_list(&confined, b, None).await, "list all");
    assert!(!can_list(&confined, b, Some("outside/")).await, "list out");
}
