//! Helpers for integration tests on the testbed (`tests/testbed.sh up`).
//!
//! A test calls [`testbed()`]: without `S3GRANT_TESTBED` in the environment it gets
//! `None` and returns early with a message saying how to run it; with it, every server
//! must answer, or the test fails. Each test gets its own namespace, its own operator
//! process watching only that namespace, and unique AWS names.

#![allow(dead_code)]

pub mod audit;
pub mod proxy;
pub mod rgw;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials as S3Credentials, Region};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use s3grant::api::{S3Grant, S3GrantClass};
use tokio::sync::OnceCell;

/// Where an AWS-compatible server of the testbed is, with its admin keys.
#[derive(Clone, Debug)]
pub struct AwsTarget {
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub role_arn: String,
    pub bucket: String,
    pub region: String,
}

#[derive(Clone)]
pub struct Testbed {
    pub kube: Client,
    pub moto: AwsTarget,
    /// A second moto: a second AWS account, for grants that move between backends.
    pub moto2: AwsTarget,
    pub rgw: AwsTarget,
    pub ceph_conf: String,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("S3GRANT_TESTBED is set but {name} is not: source the testbed's env file")
    })
}

fn target(server: &str) -> AwsTarget {
    let var = |suffix: &str| required(&format!("S3GRANT_TEST_{server}_{suffix}"));
    AwsTarget {
        endpoint: var("ENDPOINT"),
        access_key_id: var("ACCESS_KEY_ID"),
        secret_access_key: var("SECRET_ACCESS_KEY"),
        role_arn: var("ROLE_ARN"),
        bucket: var("BUCKET"),
        region: std::env::var(format!("S3GRANT_TEST_{server}_REGION"))
            .unwrap_or_else(|_| "us-east-1".into()),
    }
}

static CRDS_INSTALLED: OnceCell<()> = OnceCell::const_new();

/// The testbed, or `None` (with a message) when the environment does not name one.
pub async fn testbed() -> Option<Testbed> {
    if std::env::var("S3GRANT_TESTBED").is_err() {
        eprintln!(
            "skipped: no testbed in the environment; run `tests/testbed.sh test` (README.md)"
        );
        return None;
    }
    let config = Config::infer()
        .await
        .expect("KUBECONFIG from the testbed must load");
    let kube = Client::try_from(config).expect("kube client");
    kube.apiserver_version()
        .await
        .expect("the testbed's Kubernetes API server must answer");
    CRDS_INSTALLED
        .get_or_init(|| install_crds(kube.clone()))
        .await;
    Some(Testbed {
        kube,
        moto: target("MOTO"),
        moto2: target("MOTO2"),
        rgw: target("RGW"),
        ceph_conf: required("S3GRANT_TEST_CEPH_CONF"),
    })
}

/// Applies the CRDs from crds/ (what users install) and waits until they are served.
async fn install_crds(client: Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for file in ["s3grants.s3grant.io.yaml", "s3grantclasses.s3grant.io.yaml"] {
        let text =
            std::fs::read_to_string(format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply("s3grant-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        wait_for(
            Duration::from_secs(30),
            &format!("CRD {name} established"),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    let established = crd
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            },
        )
        .await;
    }
}

/// A name nobody else uses: `prefix-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Polls `check` until it gives a value, failing the test with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace of the test's own.
pub async fn namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = unique(prefix);
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// A Secret holding the admin keys of a testbed server, for a class's credentialsSecretRef.
pub async fn backend_credentials_secret(
    client: &Client,
    namespace: &str,
    target: &AwsTarget,
) -> String {
    // One Secret per server and key pair: classes of one test on one server share it.
    let port = target.endpoint.rsplit(':').next().unwrap_or_default();
    let key = &s3grant::naming::digest(&target.access_key_id)[..8];
    let name = format!("backend-admin-{port}-{key}");
    let existing = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await
        .expect("read backend credentials secret");
    if existing.is_some() {
        return name;
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (
                "AWS_ACCESS_KEY_ID".to_string(),
                ByteString(target.access_key_id.clone().into_bytes()),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                ByteString(target.secret_access_key.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create backend credentials secret");
    name
}

/// A class of the test's own (named `<prefix>-<random>`) on a testbed server: its
/// endpoint, role and admin keys (from a Secret created in `secret_namespace`), its IAM
/// path `/s3grant/<class>/`, the server's bucket, and the class rules in `rules`
/// (YAML lines under `spec:`, indented two spaces). Returns the class name.
pub async fn class_on(
    client: &Client,
    target: &AwsTarget,
    secret_namespace: &str,
    prefix: &str,
    rules: &str,
) -> String {
    let credentials = backend_credentials_secret(client, secret_namespace, target).await;
    let class = unique(prefix);
    apply_class(
        client,
        &format!(
            "apiVersion: s3grant.io/v1alpha1\nkind: S3GrantClass\nmetadata: {{name: {class}}}\nspec:\n  backend:\n    endpoint: {}\n    region: us-east-1\n    roleArn: {}\n    iamPath: /s3grant/{class}/\n    credentialsSecretRef: {{namespace: {secret_namespace}, name: {credentials}}}\n  buckets: [{}]\n{rules}",
            target.endpoint, target.role_arn, target.bucket
        ),
    )
    .await;
    class
}

/// Creates a cluster-scoped class from YAML (its name must be unique to the test).
pub async fn apply_class(client: &Client, yaml: &str) -> S3GrantClass {
    let class: S3GrantClass = serde_yaml::from_str(yaml).expect("class YAML");
    let api: Api<S3GrantClass> = Api::all(client.clone());
    api.patch(
        &class.metadata.name.clone().unwrap(),
        &PatchParams::apply("s3grant-tests").force(),
        &Patch::Apply(&class),
    )
    .await
    .expect("apply class")
}

/// Deletes a class and waits until it is gone: a class s3grant's grants hold something on
/// goes once an operator has revoked them. A class still there after 20 s (its operator
/// was stopped first) has its finalizers removed, so it does not linger in the testbed.
pub async fn delete_class(client: &Client, name: &str) {
    let api: Api<S3GrantClass> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if api.get_opt(name).await.ok().flatten().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("class {name} still there 20 s after its deletion: removing its finalizers");
    let strip = serde_json::json!({"metadata": {"finalizers": null}});
    let _ = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&strip))
        .await;
}

/// Creates a grant from YAML in `namespace`.
pub async fn apply_grant(client: &Client, namespace: &str, yaml: &str) -> S3Grant {
    let mut grant: S3Grant = serde_yaml::from_str(yaml).expect("grant YAML");
    grant.metadata.namespace = Some(namespace.into());
    let api: Api<S3Grant> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &grant.metadata.name.clone().unwrap(),
        &PatchParams::apply("s3grant-tests").force(),
        &Patch::Apply(&grant),
    )
    .await
    .expect("apply grant")
}

pub fn ready_condition(grant: &S3Grant) -> Option<(String, String, String)> {
    let status = grant.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        ready.status.clone(),
        ready.reason.clone(),
        ready.message.clone(),
    ))
}

/// Waits until the grant's Ready condition has `status` (and is for its current generation).
pub async fn wait_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &str,
    timeout: Duration,
) -> S3Grant {
    let api: Api<S3Grant> = Api::namespaced(client.clone(), namespace);
    wait_for(
        timeout,
        &format!("grant {namespace}/{name} Ready={status}"),
        || {
            let api = api.clone();
            async move {
                let grant = api.get(name).await.ok()?;
                let (s, _, _) = ready_condition(&grant)?;
                let current =
                    grant.status.as_ref()?.observed_generation == grant.metadata.generation;
                (s == status && current).then_some(grant)
            }
        },
    )
    .await
}

pub async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Option<BTreeMap<String, String>> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()??;
    Some(
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
            .collect(),
    )
}

/// An S3 client for a testbed server with the given keys.
pub fn s3(
    target: &AwsTarget,
    access_key_id: &str,
    secret_access_key: &str,
    session_token: Option<&str>,
) -> aws_sdk_s3::Client {
    let credentials = S3Credentials::new(
        access_key_id,
        secret_access_key,
        session_token.map(str::to_string),
        None,
        "test",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(target.region.clone()))
        .endpoint_url(&target.endpoint)
        .force_path_style(true)
        .credentials_provider(credentials)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// An S3 client from the keys a grant's Secret holds.
pub fn s3_from_secret(target: &AwsTarget, data: &BTreeMap<String, String>) -> aws_sdk_s3::Client {
    s3(
        target,
        &data["AWS_ACCESS_KEY_ID"],
        &data["AWS_SECRET_ACCESS_KEY"],
        data.get("AWS_SESSION_TOKEN").map(String::as_str),
    )
}

/// The admin's IAM client for a testbed server.
pub fn iam_admin(target: &AwsTarget) -> aws_sdk_iam::Client {
    let credentials = aws_credential_types::Credentials::new(
        &target.access_key_id,
        &target.secret_access_key,
        None,
        None,
        "test",
    );
    let config = aws_sdk_iam::Config::builder()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new(target.region.clone()))
        .endpoint_url(&target.endpoint)
        .credentials_provider(credentials)
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

/// Whether a put of `key` succeeds; an AccessDenied (or other 403) is `false`, anything
/// else unexpected fails the test.
pub async fn can_put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    match s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(b"s3grant".to_vec().into())
        .send()
        .await
    {
        Ok(_) => true,
        Err(err) => denied(err, "PutObject", key),
    }
}

pub async fn can_get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    match s3.get_object().bucket(bucket).key(key).send().await {
        Ok(_) => true,
        Err(err) => denied(err, "GetObject", key),
    }
}

pub async fn can_list(s3: &aws_sdk_s3::Client, bucket: &str, prefix: Option<&str>) -> bool {
    let mut request = s3.list_objects_v2().bucket(bucket);
    if let Some(prefix) = prefix {
        request = request.prefix(prefix);
    }
    match request.send().await {
        Ok(_) => true,
        Err(err) => denied(err, "ListObjectsV2", prefix.unwrap_or("")),
    }
}

fn denied<E: std::fmt::Debug>(
    err: aws_sdk_s3::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
    op: &str,
    key: &str,
) -> bool {
    let status = err.raw_response().map(|r| r.status().as_u16());
    match status {
        Some(403) => false,
        _ => panic!("{op} {key}: expected success or 403, got {err:?}"),
    }
}

/// The operator as a separate process, watching one namespace; killed when dropped.
pub struct Operator {
    child: Option<Child>,
    pub admin: String,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(namespace: &str, extra_args: &[&str]) -> Operator {
        Operator::start_with_env(namespace, extra_args, &[])
    }

    /// Starts the operator with extra environment variables (e.g. `S3GRANT_CRASH_AT`).
    pub fn start_with_env(namespace: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Operator {
        let port = free_port();
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = log_dir.join(format!("{namespace}-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_s3grant"))
            .arg("run")
            .args(["--watch-namespace", namespace])
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(extra_args)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info,s3grant=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start the operator");
        Operator {
            child: Some(child),
            admin: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// Whether the process is still running (a crash point ends it).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The operator's process id while it has not been killed (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no cleanup, no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("operator running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("{}/metrics", self.admin))
            .await
            .unwrap_or_default()
    }

    /// Waits until /readyz answers 200 (first sync done, backends probed) and the sweep
    /// at start is done: from then on, only grants make the operator call AWS.
    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.admin);
        wait_for(Duration::from_secs(60), "the operator to be ready", || {
            http_get(&url)
        })
        .await;
        self.wait_swept().await;
    }

    /// Waits until the sweep at start is done.
    pub async fn wait_swept(&self) {
        wait_for(Duration::from_secs(60), "the first sweep", || async move {
            (self.counter("s3grant_sweeps_total").await >= 1).then_some(())
        })
        .await;
    }

    /// The value of an unlabelled counter on this operator's /metrics (0 when absent).
    pub async fn counter(&self, name: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits for the operator to reconcile once more after `touch` runs.
    pub async fn reconcile_after<F: std::future::Future<Output = ()>>(&self, touch: F) {
        let before = self.counter("s3grant_reconciles_total").await;
        touch.await;
        wait_for(Duration::from_secs(30), "one more reconcile", || async move {
            (self.counter("s3grant_reconciles_total").await > before).then_some(())
        })
        .await;
    }

    /// AWS calls this operator made to one service ("IAM", "STS"), from its /metrics.
    pub async fn aws_calls_to(&self, service: &str) -> u64 {
        let label = format!("service=\"{service}\"");
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("s3grant_aws_calls_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Total AWS calls this operator made, from its /metrics.
    pub async fn aws_calls(&self) -> u64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("s3grant_aws_calls_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP GET on loopback (the admin server), without another HTTP client crate.
pub async fn http_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Adds a harmless annotation to a grant, which makes the operator reconcile it.
pub async fn touch_grant(client: &Client, namespace: &str, name: &str) {
    let touch =
        serde_json::json!({"metadata": {"annotations": {"example.com/touched": unique("t")}}});
    Api::<S3Grant>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &Patch::Merge(&touch),
        )
        .await
        .expect("touch grant");
}

/// Waits until a grant is gone (its finalizer has run).
pub async fn wait_gone(client: &Client, namespace: &str, name: &str) {
    let api: Api<S3Grant> = Api::namespaced(client.clone(), namespace);
    wait_for(
        Duration::from_secs(60),
        &format!("grant {namespace}/{name} to be gone"),
        || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
}

/// The access key ids of an IAM user on a testbed server (none when it does not exist).
pub async fn access_keys(target: &AwsTarget, user: &str) -> Vec<String> {
    iam_admin(target)
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .map(|o| {
            o.access_key_metadata()
                .iter()
                .filter_map(|k| k.access_key_id().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The IAM users under `path` on a testbed server, by name.
pub async fn iam_users_under(target: &AwsTarget, path: &str) -> Vec<String> {
    let out = iam_admin(target)
        .list_users()
        .path_prefix(path)
        .send()
        .await
        .expect("ListUsers");
    out.users()
        .iter()
        .map(|u| u.user_name().to_string())
        .collect()
}
