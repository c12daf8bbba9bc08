//! The API: `S3Grant` (what a tenant asks for) and `S3GrantClass` (what the platform
//! team allows). Doc comments here become `kubectl explain` text; rules the API server
//! can check itself are CEL and OpenAPI validation in the generated CRDs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "s3grant.io";
pub const FINALIZER: &str = "s3grant.io/cleanup";
pub const FIELD_MANAGER: &str = "s3grant";
pub const DEFAULT_CLASS_ANNOTATION: &str = "s3grant.io/is-default-class";
pub const ROTATE_REQUESTED_ANNOTATION: &str = "s3grant.io/rotate-requested-at";
/// Finalizer on classes a grant holds something on: the class stays until its grants let go.
pub const CLASS_FINALIZER: &str = "s3grant.io/grants";
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "s3grant");

/// What the credentials may do inside the bucket and prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// Read, list, write and delete objects.
    #[default]
    ReadWrite,
    /// Read and list objects.
    ReadOnly,
    /// Write objects only: no reads, no listing.
    WriteOnly,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::ReadWrite, Mode::ReadOnly, Mode::WriteOnly];
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A request for S3 credentials confined to one bucket, optionally to key prefixes, and
/// to a mode. Without `duration` s3grant creates an IAM user with an access key; with
/// `duration` it issues STS session credentials and re-mints them before they expire.
/// The credentials are written to a Secret in the grant's namespace.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "s3grant.io",
    version = "v1alpha1",
    kind = "S3Grant",
    namespaced,
    status = "S3GrantStatus",
    shortname = "s3g",
    doc = "S3Grant asks for S3 credentials scoped to a bucket, prefixes and a mode, delivered as a Secret.",
    printcolumn = r#"{"name":"Bucket","type":"string","jsonPath":".spec.bucket"}"#,
    printcolumn = r#"{"name":"Prefix","type":"string","jsonPath":".spec.prefix"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName","priority":1}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.prefix) && has(self.prefixes))").message("set prefix or prefixes, not both"))]
#[x_kube(validation = Rule::new("!(has(self.duration) && has(self.rotateEvery))").message("rotateEvery applies to IAM-user grants only; a grant with duration gets STS credentials that are re-minted before they expire"))]
pub struct S3GrantSpec {
    /// The S3 bucket the credentials may use. Must follow S3's bucket naming rules.
    #[schemars(length(min = 3, max = 63), pattern(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"))]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.contains('.-') && !self.contains('-.')").message("bucket must not contain '..', '.-' or '-.'"))]
    #[x_kube(validation = Rule::new("!self.matches('^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$')").message("bucket must not be formatted as an IP address"))]
    #[x_kube(validation = Rule::new("!self.startsWith('xn--') && !self.startsWith('sthree-') && !self.endsWith('-s3alias') && !self.endsWith('--ol-s3')").message("bucket uses a prefix or suffix that S3 reserves"))]
    pub bucket: String,

    /// A key prefix the credentials are confined to, read as a folder: `tenant-a` and
    /// `tenant-a/` both mean keys under `tenant-a/` (never `tenant-ab/`). Absent (with
    /// `prefixes` absent too) means the whole bucket, if the class allows it. Wildcards,
    /// policy variables, a leading `/`, `.` or `..` segments and `//` are rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 1024),
        pattern(r"^[^/*?${}\x00-\x1f\x7f][^*?${}\x00-\x1f\x7f]*$")
    )]
    #[x_kube(validation = Rule::new("!self.contains('//') && !self.matches('(^|/)[.][.]?(/|$)')").message("prefix must not contain empty, '.' or '..' segments"))]
    pub prefix: Option<String>,

    /// Several key prefixes, each read as a folder like `prefix`. Use either `prefix` or `prefixes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 32),
        inner(
            length(min = 1, max = 1024),
            pattern(r"^[^/*?${}\x00-\x1f\x7f][^*?${}\x00-\x1f\x7f]*$")
        )
    )]
    #[x_kube(validation = Rule::new("self.all(p, !p.contains('//') && !p.matches('(^|/)[.][.]?(/|$)'))").message("prefixes must not contain empty, '.' or '..' segments"))]
    pub prefixes: Option<Vec<String>>,

    /// What the credentials may do: ReadWrite (default), ReadOnly or WriteOnly.
    #[serde(default)]
    pub mode: Mode,

    /// Set for STS session credentials of this lifetime (Go duration syntax, 15m to 12h),
    /// re-minted at about two thirds of it. Unset for an IAM user with a long-lived access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"))]
    #[x_kube(validation = Rule::new("self != '' && duration(self) >= duration('15m') && duration(self) <= duration('12h')").message("duration must be between 15m and 12h"))]
    pub duration: Option<String>,

    /// IAM-user grants only: rotate the access key on this period (Go duration syntax,
    /// 1h to 8760h). The previous key stays valid for the operator's grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"))]
    #[x_kube(validation = Rule::new("self != '' && duration(self) >= duration('1h') && duration(self) <= duration('8760h')").message("rotateEvery must be between 1h and 8760h"))]
    pub rotate_every: Option<String>,

    /// The S3GrantClass that supplies the backend and decides what may be granted.
    /// The cluster's default class (annotation s3grant.io/is-default-class) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,

    /// The Secret to write the credentials into. Defaults to `<grant name>-s3`.
    /// s3grant never overwrites a Secret it does not own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: Option<String>,
}

/// What s3grant observed and did. Never holds a secret value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3GrantStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready tells whether the Secret holds working credentials, with a reason when not.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// IamUser or StsSession.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_kind: Option<String>,
    /// The S3GrantClass that was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// The Secret holding the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The IAM user (IAM-user grants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_user: Option<String>,
    /// The STS role session name (STS grants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_session_name: Option<String>,
    /// The access key id now in the Secret (never the secret key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// When the credentials in the Secret expire (STS grants), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When the credentials were last issued or rotated, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated: Option<String>,
    /// The value of the s3grant.io/rotate-requested-at annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_rotation_request: Option<String>,
    /// Size of the compiled policy as IAM counts it (characters, whitespace excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_size: Option<i64>,
    /// Everything s3grant holds in AWS for this grant, each with the backend it lives on.
    /// An entry is written before its object is created and removed only once the object
    /// is gone, so nothing s3grant creates is ever out of its reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<Held>,
}

/// One object s3grant holds in AWS for a grant (today: an IAM user with its keys and
/// policies; STS sessions cannot be revoked and are not held).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    /// What it is: IamUser.
    pub kind: HeldKind,
    /// Its name (the IAM user name).
    pub name: String,
    /// The class whose backend it lives on.
    pub class_name: String,
    /// Which of that class's backends (an id listed in the class's status.backends).
    pub backend: String,
    /// The id AWS gave it (IAM's UserId), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When it was recorded, RFC 3339: IAM is eventually consistent, so a user recorded
    /// moments ago and not found may simply not be visible yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HeldKind {
    IamUser,
}

/// A condition in the Kubernetes API conventions' shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, e.g. Ready.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// A CamelCase reason, e.g. Issued, NotPermitted, SecretConflict.
    pub reason: String,
    /// A human-readable explanation.
    pub message: String,
    /// When the status last changed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What tenants may ask for and where their credentials come from, like a StorageClass.
/// Cluster-scoped: for the platform team alone.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "s3grant.io",
    version = "v1alpha1",
    kind = "S3GrantClass",
    status = "S3GrantClassStatus",
    shortname = "s3gc",
    doc = "S3GrantClass says where S3Grant credentials come from and what tenants may ask for.",
    printcolumn = r#"{"name":"Buckets","type":"string","jsonPath":".spec.buckets"}"#,
    printcolumn = r#"{"name":"PrefixTemplate","type":"string","jsonPath":".spec.prefixTemplate"}"#,
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".metadata.annotations.s3grant\\.io/is-default-class"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct S3GrantClassSpec {
    /// Where credentials are issued: region, endpoint, STS role, IAM path.
    pub backend: Backend,

    /// Namespaces whose grants may use this class. Absent selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// The buckets grants of this class may name.
    #[schemars(length(min = 1))]
    pub buckets: Vec<String>,

    /// Every granted prefix must sit under this one, after `{namespace}` is replaced by
    /// the grant's namespace, e.g. `data/{namespace}/`. Absent: any prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub prefix_template: Option<String>,

    /// Whether a grant without a prefix (the whole bucket) is allowed.
    #[serde(default)]
    pub allow_whole_bucket: bool,

    /// The modes grants may ask for. Absent: all modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes: Option<Vec<Mode>>,

    /// The longest STS session a grant may ask for (Go duration syntax). Absent: 12h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"))]
    #[x_kube(validation = Rule::new("self != '' && duration(self) >= duration('15m') && duration(self) <= duration('12h')").message("maxDuration must be between 15m and 12h"))]
    pub max_duration: Option<String>,

    /// Whether IAM-user grants (without duration) are allowed. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_iam_users: Option<bool>,
}

/// What s3grant records about a class: every backend it has pointed at while grants
/// held something there, so a grant can still be cleaned up after the class moved on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3GrantClassStatus {
    /// The backends of this class, oldest first; the last one is the current one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendRecord>,
}

/// Where a backend is and how the operator reaches it (never a secret value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRecord {
    /// A digest of the fields below; grants' status.held entries name it.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// The AWS (or S3-compatible) side of a class.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The AWS region. Default us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// One endpoint for IAM, STS and S3 (S3-compatible stores). AWS's endpoints when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://"))]
    pub endpoint: Option<String>,
    /// The role assumed for STS grants; required for grants with a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^arn:[a-z-]+:iam::[0-9]*:role/"))]
    pub role_arn: Option<String>,
    /// IAM users are created under this path. Default /s3grant/.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^/([\x21-\x7e]*/)?$"))]
    pub iam_path: Option<String>,
    /// A managed policy ARN set as every created user's permissions boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions_boundary: Option<String>,
    /// A Secret holding the keys the operator itself uses for this backend
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN).
    /// Absent: the operator's default AWS credential chain (IRSA, Pod Identity, env).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// Names a Secret in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

pub const DEFAULT_REGION: &str = "us-east-1";
pub const DEFAULT_IAM_PATH: &str = "/s3grant/";

impl S3GrantSpec {
    /// The prefixes asked for, whether given as `prefix` or `prefixes`.
    pub fn requested_prefixes(&self) -> Vec<String> {
        match (&self.prefix, &self.prefixes) {
            (Some(p), _) => vec![p.clone()],
            (None, Some(ps)) => ps.clone(),
            (None, None) => Vec::new(),
        }
    }
}

impl S3Grant {
    pub fn secret_name(&self) -> String {
        self.spec
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-s3", self.metadata.name.as_deref().unwrap_or_default()))
    }
}

impl S3GrantClass {
    pub fn is_default(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true")
    }
}

/// The CRDs, in the order `s3grant crd` prints them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        unwrap_descriptions(S3Grant::crd()),
        unwrap_descriptions(S3GrantClass::crd()),
    ]
}

/// Doc comments are wrapped at 90 columns in the source; `kubectl explain` wraps text
/// itself, so single line breaks become spaces (blank lines still separate paragraphs).
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|paragraph| {
                                    paragraph
                                        .split('\n')
                                        .map(str::trim)
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD always serializes");
    walk(&mut value);
    serde_json::from_value(value).expect("only descriptions changed")
}

/// The CRDs as one multi-document YAML file, as kept in `crds/`.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}
