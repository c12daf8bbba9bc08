//! A grant's spec, parsed once into validated values. The guardrails, the plan and the
//! writes all take a [`GrantRequest`]; nothing downstream reads the raw spec again.

use std::time::Duration;

use crate::api::{Mode, S3Grant, ROTATE_REQUESTED_ANNOTATION};
use crate::error::{shown, Error, Result};
use crate::validate::{
    parse_bounded_duration, parse_prefixes, BucketName, Prefix, MAX_ROTATE_EVERY,
    MAX_SESSION_DURATION, MIN_ROTATE_EVERY, MIN_SESSION_DURATION,
};

/// Kubernetes object names (a Secret's among them) are at most this long.
pub const MAX_OBJECT_NAME: usize = 253;

/// What kind of credential the grant asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// STS session credentials of this lifetime.
    StsSession { duration: Duration },
    /// An IAM user with an access key, rotated on this period (or only on request).
    IamUser { rotate_every: Option<Duration> },
}

/// A grant, validated: who it is, what it asks for, where the credentials go.
#[derive(Clone, Debug, PartialEq)]
pub struct GrantRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub bucket: BucketName,
    /// Folder prefixes, sorted, without overlaps; empty means the whole bucket.
    pub prefixes: Vec<Prefix>,
    pub mode: Mode,
    pub wanted: Wanted,
    /// The class the grant names; the default class when `None`.
    pub class_name: Option<String>,
    pub secret_name: String,
    /// The value of the rotation annotation, when set.
    pub rotation_request: Option<String>,
}

impl GrantRequest {
    /// Validates everything the grant's author controls. The API server checks most of
    /// this too; the operator never relies on the CRD having been installed unmodified.
    pub fn parse(grant: &S3Grant) -> Result<Self> {
        let spec = &grant.spec;
        let name = grant.metadata.name.clone().unwrap_or_default();
        if spec.prefix.is_some() && spec.prefixes.is_some() {
            return Err(Error::InvalidSpec(
                "set prefix or prefixes, not both".into(),
            ));
        }
        if spec.prefixes.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::InvalidSpec(
                "prefixes must not be empty; leave it out to ask for the whole bucket".into(),
            ));
        }
        let bucket = BucketName::parse(&spec.bucket)?;
        let prefixes = parse_prefixes(&spec.requested_prefixes())?;
        let wanted = match (&spec.duration, &spec.rotate_every) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidSpec(
                    "rotateEvery applies to IAM-user grants only; remove it or remove duration"
                        .into(),
                ))
            }
            (Some(text), None) => Wanted::StsSession {
                duration: parse_bounded_duration(
                    "duration",
                    text,
                    MIN_SESSION_DURATION,
                    MAX_SESSION_DURATION,
                )?,
            },
            (None, rotate_every) => Wanted::IamUser {
                rotate_every: rotate_every
                    .as_deref()
                    .map(|text| {
                        parse_bounded_duration(
                            "rotateEvery",
                            text,
                            MIN_ROTATE_EVERY,
                            MAX_ROTATE_EVERY,
                        )
                    })
                    .transpose()?,
            },
        };
        let secret_name = spec
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{name}-s3"));
        check_secret_name(&secret_name, spec.secret_name.is_none())?;
        Ok(GrantRequest {
            namespace: grant.metadata.namespace.clone().unwrap_or_default(),
            uid: grant.metadata.uid.clone().unwrap_or_default(),
            generation: grant.metadata.generation,
            name,
            bucket,
            prefixes,
            mode: spec.mode,
            wanted,
            class_name: spec.class_name.clone(),
            secret_name,
            rotation_request: grant
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ROTATE_REQUESTED_ANNOTATION))
                .cloned(),
        })
    }

    pub fn is_sts(&self) -> bool {
        matches!(self.wanted, Wanted::StsSession { .. })
    }
}

/// A Secret name must be a DNS subdomain of at most 253 characters. A name derived from
/// a long grant name can overflow it: say so before anything is created in AWS.
fn check_secret_name(name: &str, derived: bool) -> Result<()> {
    let problem = if name.len() > MAX_OBJECT_NAME {
        Some(format!(
            "is {} characters, over Kubernetes' limit of {MAX_OBJECT_NAME}",
            name.len()
        ))
    } else if !is_dns_subdomain(name) {
        Some(
            "is not a valid Kubernetes object name (lowercase letters, digits, '-' and '.')".into(),
        )
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::InvalidSpec(format!(
            "the Secret name {} {problem}{}",
            shown(name),
            if derived {
                "; set spec.secretName to a shorter name"
            } else {
                ""
            }
        ))),
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::S3GrantSpec;

    fn grant(name: &str, spec: &str) -> S3Grant {
        let spec: S3GrantSpec = serde_yaml::from_str(spec).unwrap();
        let mut grant = S3Grant::new(name, spec);
        grant.metadata.namespace = Some("tenant-a".into());
        grant.metadata.uid = Some("uid-1".into());
        grant
    }

    #[test]
    fn a_grant_is_parsed_once_into_validated_values() {
        let request = GrantRequest::parse(&grant(
            "reports",
            "{bucket: acme-data, prefixes: [b, a/], mode: ReadOnly, duration: 1h}",
        ))
        .unwrap();
        assert_eq!(request.bucket.as_str(), "acme-data");
        let prefixes: Vec<&str> = request.prefixes.iter().map(Prefix::as_str).collect();
        assert_eq!(prefixes, ["a/", "b/"]);
        assert_eq!(
            request.wanted,
            Wanted::StsSession {
                duration: Duration::from_secs(3600)
            }
        );
        assert_eq!(request.secret_name, "reports-s3");
    }

    #[test]
    fn a_derived_secret_name_over_253_characters_is_refused_up_front() {
        let long = "g".repeat(251);
        let err = GrantRequest::parse(&grant(&long, "{bucket: acme-data, prefix: a/}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("254 characters"), "{err}");
        assert!(err.contains("set spec.secretName"), "{err}");
        let named = grant(&long, "{bucket: acme-data, prefix: a/, secretName: short}");
        assert_eq!(GrantRequest::parse(&named).unwrap().secret_name, "short");
        let fits = "g".repeat(250);
        assert!(GrantRequest::parse(&grant(&fits, "{bucket: acme-data, prefix: a/}")).is_ok());
    }

    #[test]
    fn contradictory_or_empty_fields_are_refused() {
        for spec in [
            "{bucket: acme-data, prefix: a/, prefixes: [b/]}",
            "{bucket: acme-data, prefixes: []}",
            "{bucket: acme-data, duration: 1h, rotateEvery: 2h}",
            "{bucket: acme-data, duration: 10m}",
            "{bucket: acme-data, secretName: Bad_Name}",
        ] {
            let err = GrantRequest::parse(&grant("g", spec)).unwrap_err();
            assert_eq!(err.category(), "InvalidSpec", "{spec}: {err}");
        }
    }
}
