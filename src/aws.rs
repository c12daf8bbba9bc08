//! AWS clients for a class's backend, and how AWS errors become ours. Credentials for
//! the operator come from the default chain (IRSA, Pod Identity, environment) unless the
//! class names a Secret with keys for an S3-compatible store.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::{BackendRecord, DEFAULT_REGION};
use crate::error::{Error, Result};
use crate::leader::{Fence, NotLeader};
use crate::metrics::{AwsCallCounter, Metrics};

/// Credentials handed to a tenant. Their `Debug` never shows the secret parts.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub expiration: Option<Timestamp>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// IAM and STS clients for one class's backend.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub iam: aws_sdk_iam::Client,
    pub sts: aws_sdk_sts::Client,
    /// True when the operator's own credentials are role credentials (a session token),
    /// so AssumeRole is role chaining and capped at one hour.
    pub role_chaining: bool,
}

/// The operator's base AWS configuration from the default chain, loaded once.
/// Region is fixed here so loading never probes instance metadata for it; each class sets its own.
pub async fn load_base_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(DEFAULT_REGION))
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .load()
        .await
}

/// Clients for a backend (of the class `class_name`, for messages): its region and
/// endpoint, and the keys in its credentials Secret when it names one. Whether the
/// default chain gives role credentials is resolved once (`default_chain_is_role`):
/// calling the provider directly bypasses the SDK's identity cache, so it must not
/// happen on every reconcile. Every call through these clients is refused while `fence`
/// is closed ([`FenceGuard`]).
pub async fn clients_for(
    base: &SdkConfig,
    backend: &BackendRecord,
    class_name: &str,
    secrets: impl Fn(&str) -> Api<Secret>,
    metrics: Arc<Metrics>,
    default_chain_is_role: &tokio::sync::OnceCell<bool>,
    fence: &Fence,
) -> Result<AwsClients> {
    let class_name = class_name.to_string();
    let mut config = base.to_builder();
    config.set_region(Some(Region::new(
        backend
            .region
            .clone()
            .unwrap_or_else(|| DEFAULT_REGION.into()),
    )));
    if let Some(endpoint) = &backend.endpoint {
        config.set_endpoint_url(Some(endpoint.clone()));
    }
    let role_chaining = match &backend.credentials_secret_ref {
        Some(reference) => {
            let credentials = read_backend_credentials(
                &secrets(&reference.namespace),
                &class_name,
                &reference.name,
            )
            .await?;
            let has_token = credentials.session_token().is_some();
            config.set_credentials_provider(Some(SharedCredentialsProvider::new(credentials)));
            has_token
        }
        None => {
            let provider = base.credentials_provider();
            *default_chain_is_role
                .get_or_try_init(|| async move {
                    match provider {
                        Some(provider) => provider
                            .provide_credentials()
                            .await
                            .map(|c| c.session_token().is_some())
                            .map_err(|e| Error::ClassMisconfigured {
                                class: class_name.clone(),
                                reason: format!(
                                    "the operator has no AWS credentials for this backend: {e}"
                                ),
                            }),
                        None => Ok(false),
                    }
                })
                .await?
        }
    };
    let config = config.build();
    let iam = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::config::Builder::from(&config)
            .interceptor(FenceGuard(fence.clone()))
            .interceptor(AwsCallCounter(metrics.clone()))
            .build(),
    );
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config)
            .interceptor(FenceGuard(fence.clone()))
            .interceptor(AwsCallCounter(metrics))
            .build(),
    );
    Ok(AwsClients {
        iam,
        sts,
        role_chaining,
    })
}

/// Refuses every AWS call (reads too) while the leader-election fence is closed. It runs
/// on each attempt after signing, the last step before the request is sent, so a replica
/// that was paused past its lease and resumes cannot send one before it notices.
#[derive(Debug)]
pub struct FenceGuard(pub Fence);

impl Intercept for FenceGuard {
    fn name(&self) -> &'static str {
        "s3grant-leader-fence"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        if self.0.is_open() {
            Ok(())
        } else {
            Err(Box::new(NotLeader))
        }
    }
}

/// Whether an SDK error is the fence's refusal (somewhere in its chain of sources).
fn refused_by_fence(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<NotLeader>() {
            return true;
        }
        cause = err.source();
    }
    false
}

async fn read_backend_credentials(
    api: &Api<Secret>,
    class: &str,
    name: &str,
) -> Result<aws_credential_types::Credentials> {
    let misconfigured = |reason: String| Error::ClassMisconfigured {
        class: class.to_string(),
        reason,
    };
    let secret = api
        .get_opt(name)
        .await
        .map_err(Error::kube("read the class's credentials Secret"))?
        .ok_or_else(|| misconfigured(format!("credentials Secret {name} does not exist")))?;
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.is_empty())
    };
    let (Some(id), Some(key)) = (field("AWS_ACCESS_KEY_ID"), field("AWS_SECRET_ACCESS_KEY")) else {
        return Err(misconfigured(format!(
            "credentials Secret {name} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )));
    };
    Ok(aws_credential_types::Credentials::new(
        id,
        key,
        field("AWS_SESSION_TOKEN"),
        None,
        "s3grant-class-secret",
    ))
}

/// The code of an AWS call the fence refused (it was never sent).
pub const NOT_LEADER_CODE: &str = "NotLeader";

/// The code of a call that got no answer at all (a timeout, a connection that failed):
/// not AWS's, ours, so the backend's circuit breaker can tell silence from refusal.
pub const NO_ANSWER: &str = "NoAnswer";

/// What went wrong in one AWS call, with the error code when the service sent one.
#[derive(Debug)]
pub struct AwsFailure {
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
    pub transient: bool,
}

impl AwsFailure {
    pub fn from_sdk<E>(
        err: aws_smithy_runtime_api::client::result::SdkError<
            E,
            aws_smithy_runtime_api::http::Response,
        >,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        use aws_smithy_runtime_api::client::result::SdkError;
        if refused_by_fence(&err) {
            // Not sent: another replica may be acting. Transient, so no grant is told to fix
            // anything; this replica exits as soon as it notices.
            return AwsFailure {
                code: Some(NOT_LEADER_CODE.into()),
                status: None,
                message: NotLeader.to_string(),
                transient: true,
            };
        }
        match &err {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().map(str::to_string);
                let message = service
                    .err()
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}"));
                let transient = status >= 500
                    || status == 429
                    || code.as_deref().is_some_and(is_throttling_code);
                AwsFailure {
                    code,
                    status: Some(status),
                    message,
                    transient,
                }
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => AwsFailure {
                code: Some(NO_ANSWER.into()),
                status: None,
                message: aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
                transient: true,
            },
            SdkError::ResponseError(_) => AwsFailure {
                code: None,
                status: None,
                message: aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
                transient: true,
            },
            _ => AwsFailure {
                code: None,
                status: None,
                message: aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
                transient: false,
            },
        }
    }

    pub fn is_code(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    pub fn into_error(self, operation: &'static str) -> Error {
        Error::Aws {
            operation,
            code: self.code,
            message: self.message,
            transient: self.transient,
        }
    }
}

fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "ServiceUnavailable"
            | "RequestTimeout"
    )
}

/// Converts an SDK error into ours, naming the operation.
pub fn aws_error<E>(
    operation: &'static str,
) -> impl FnOnce(
    aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    move |err| AwsFailure::from_sdk(err).into_error(operation)
}

/// Converts an SDK timestamp.
pub fn timestamp(time: &aws_smithy_types::DateTime) -> Timestamp {
    Timestamp::from_second(time.secs()).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_never_shows_secrets() {
        let credentials = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG".into(),
            session_token: Some("FQoGZXIvYXdzEPT".into()),
            expiration: None,
        };
        let shown = format!("{credentials:?}");
        assert!(shown.contains("AKIDEXAMPLE"));
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("FQoGZXIvYXdzEPT"),
            "{shown}"
        );
    }
}

#[cfg(test)]
mod classification_tests {
    use super::*;
    use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
    use aws_smithy_types::body::SdkBody;

    /// One IAM GetUser answered with `status` and `body`, without retries.
    async fn get_user_failure(status: u16, body: &str) -> Error {
        let replay = StaticReplayClient::new(vec![ReplayEvent::new(
            http::Request::builder()
                .uri("https://iam.amazonaws.com/")
                .body(SdkBody::empty())
                .unwrap(),
            http::Response::builder()
                .status(status)
                .body(SdkBody::from(body.to_string()))
                .unwrap(),
        )]);
        let config = aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::for_tests())
            .retry_config(RetryConfig::disabled())
            .http_client(replay)
            .build();
        aws_sdk_iam::Client::from_conf(config)
            .get_user()
            .user_name("u")
            .send()
            .await
            .map_err(aws_error("iam:GetUser"))
            .unwrap_err()
    }

    fn iam_error(code: &str) -> String {
        format!("<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{code} happened</Message></Error></ErrorResponse>")
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_transient() {
        for (status, body) in [
            (400, iam_error("Throttling")),
            (500, iam_error("ServiceFailure")),
            (503, String::new()),
        ] {
            let error = get_user_failure(status, &body).await;
            assert_eq!(error.category(), "AwsTransient", "{status}: {error}");
            assert!(!error.is_user_error());
        }
    }

    #[tokio::test]
    async fn refusals_are_reported_not_retried_soon() {
        let error = get_user_failure(403, &iam_error("AccessDenied")).await;
        assert_eq!(error.category(), "AwsError");
        assert!(
            error
                .to_string()
                .contains("iam:GetUser failed: AccessDenied happened"),
            "{error}"
        );
        // Ceph RGW answers unsupported IAM calls with a body the SDK cannot parse.
        let rgw = get_user_failure(405, "<Error><Code>MethodNotAllowed</Code></Error>").await;
        assert_eq!(rgw.category(), "AwsError", "{rgw}");
    }

    /// IAM and STS clients as `clients_for` builds them, answering from `replay`.
    async fn fenced_clients(fence: &Fence, replay: StaticReplayClient) -> AwsClients {
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::for_tests())
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .http_client(replay)
            .load()
            .await;
        let backend = BackendRecord {
            id: "b".into(),
            region: None,
            endpoint: Some("http://127.0.0.1:1".into()),
            credentials_secret_ref: None,
        };
        let chain_is_role = tokio::sync::OnceCell::new_with(Some(false));
        clients_for(
            &base,
            &backend,
            "c",
            |_| unreachable!("no credentials Secret"),
            Arc::new(Metrics::default()),
            &chain_is_role,
            fence,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_closed_fence_refuses_every_call_before_it_is_sent() {
        let replay = StaticReplayClient::new(vec![]);
        let fence = Fence::standby();
        let aws = fenced_clients(&fence, replay.clone()).await;
        let refused = aws
            .iam
            .create_user()
            .user_name("u")
            .send()
            .await
            .map_err(aws_error("iam:CreateUser"))
            .unwrap_err();
        assert_eq!(refused.category(), "AwsTransient", "{refused}");
        assert!(!refused.is_user_error());
        assert!(refused.to_string().contains("not the leader"), "{refused}");
        let read = aws
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(aws_error("sts:GetCallerIdentity"))
            .unwrap_err();
        assert!(
            matches!(&read, Error::Aws { code: Some(code), .. } if code == NOT_LEADER_CODE),
            "{read}"
        );
        assert!(
            replay.actual_requests().next().is_none(),
            "nothing was sent"
        );
    }

    #[tokio::test]
    async fn an_open_fence_lets_calls_through() {
        let replay = StaticReplayClient::new(vec![ReplayEvent::new(
            http::Request::builder()
                .uri("http://127.0.0.1:1/")
                .body(SdkBody::empty())
                .unwrap(),
            http::Response::builder()
                .status(200)
                .body(SdkBody::from(
                    "<GetUserResponse><GetUserResult><User><UserName>u</UserName><UserId>AID</UserId><Arn>arn:aws:iam::1:user/u</Arn><Path>/</Path><CreateDate>2026-01-01T00:00:00Z</CreateDate></User></GetUserResult></GetUserResponse>",
                ))
                .unwrap(),
        )]);
        let aws = fenced_clients(&Fence::unfenced(), replay.clone()).await;
        aws.iam.get_user().user_name("u").send().await.unwrap();
        assert_eq!(replay.actual_requests().count(), 1);
    }
}
