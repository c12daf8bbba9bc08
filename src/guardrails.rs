//! Which class applies to a grant, and whether that class permits it. Pure: the
//! controller calls this before anything touches AWS, so a refused grant costs no AWS call.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::{Mode, S3GrantClass};
use crate::error::{shown, Error, Result};
use crate::request::{GrantRequest, Wanted};
use crate::validate::{format_duration, parse_duration, Prefix, MAX_SESSION_DURATION};

const NAMESPACE_PLACEHOLDER: &str = "{namespace}";

/// The class a grant uses: the one it names, or the single default class. A class being
/// deleted is not used: its grants are revoked so the class can go.
/// `classes` may hold the classes themselves or `Arc`s of them (the controller's cache).
pub fn select_class<'a, C: Borrow<S3GrantClass>>(
    class_name: Option<&str>,
    classes: &'a [C],
) -> Result<&'a S3GrantClass> {
    let classes = classes.iter().map(Borrow::borrow);
    if let Some(wanted) = class_name {
        let class = classes
            .clone()
            .find(|c| c.metadata.name.as_deref() == Some(wanted))
            .ok_or_else(|| {
                Error::ClassNotFound(format!("S3GrantClass {} does not exist", shown(wanted)))
            })?;
        if class.metadata.deletion_timestamp.is_some() {
            return Err(Error::ClassNotFound(format!(
                "S3GrantClass {} is being deleted",
                shown(wanted)
            )));
        }
        return Ok(class);
    }
    let (deleting, defaults): (Vec<&S3GrantClass>, Vec<&S3GrantClass>) = classes
        .filter(|c| c.is_default())
        .partition(|c| c.metadata.deletion_timestamp.is_some());
    match (defaults.as_slice(), deleting.as_slice()) {
        ([only], _) => Ok(only),
        ([], [being_deleted, ..]) => Err(Error::ClassNotFound(format!(
            "the default S3GrantClass {} is being deleted",
            being_deleted.metadata.name.as_deref().unwrap_or_default()
        ))),
        ([], []) => Err(Error::NoDefaultClass(
            "the grant names no className and no S3GrantClass is marked default".into(),
        )),
        (several, _) => {
            let names: Vec<&str> = several
                .iter()
                .filter_map(|c| c.metadata.name.as_deref())
                .collect();
            Err(Error::AmbiguousDefaultClass(format!(
                "{} S3GrantClasses are marked default ({}); the platform team must mark exactly one",
                names.len(),
                names.join(", ")
            )))
        }
    }
}

/// Checks every rule of the class against the grant. The error says which rule refused it.
pub fn check_permitted(
    class: &S3GrantClass,
    namespace_labels: &BTreeMap<String, String>,
    request: &GrantRequest,
) -> Result<()> {
    let class_name = class.metadata.name.clone().unwrap_or_default();
    let namespace = request.namespace.as_str();
    let refuse = |reason: String| Error::NotPermitted {
        class: class_name.clone(),
        reason,
    };
    let misconfigured = |reason: String| Error::ClassMisconfigured {
        class: class_name.clone(),
        reason,
    };
    let rules = &class.spec;

    if let Some(selector) = &rules.namespace_selector {
        if !selector_matches(selector, namespace_labels).map_err(misconfigured)? {
            return Err(refuse(format!(
                "namespace {namespace} is not selected by the class's namespaceSelector"
            )));
        }
    }

    if !rules.buckets.iter().any(|b| b == request.bucket.as_str()) {
        return Err(refuse(format!(
            "bucket {} is not one of the class's buckets",
            shown(request.bucket.as_str())
        )));
    }

    if request.prefixes.is_empty() && !rules.allow_whole_bucket {
        return Err(refuse(
            "a grant without a prefix (the whole bucket) needs allowWholeBucket".into(),
        ));
    }
    if let Some(template) = &rules.prefix_template {
        let allowed = expand_prefix_template(template, namespace).map_err(misconfigured)?;
        if let Some(outside) = request.prefixes.iter().find(|p| !p.is_within(&allowed)) {
            return Err(refuse(format!(
                "prefix {outside} is not under {allowed} (the class's prefixTemplate for namespace {namespace})"
            )));
        }
    }

    if let Some(modes) = &rules.modes {
        if !modes.contains(&request.mode) {
            let allowed: Vec<String> = modes.iter().map(Mode::to_string).collect();
            return Err(refuse(format!(
                "mode {} is not allowed (allowed: {})",
                request.mode,
                allowed.join(", ")
            )));
        }
    }

    match request.wanted {
        Wanted::StsSession { duration } => {
            let max = match &rules.max_duration {
                Some(text) => parse_duration(text).map_err(|reason| {
                    misconfigured(format!("maxDuration {}: {reason}", shown(text)))
                })?,
                None => MAX_SESSION_DURATION,
            };
            if duration > max {
                return Err(refuse(format!(
                    "duration {} is longer than the class's maxDuration {}",
                    format_duration(duration),
                    format_duration(max)
                )));
            }
        }
        Wanted::IamUser { .. } if rules.allow_iam_users == Some(false) => {
            return Err(refuse(
                "IAM-user grants are not allowed; set a duration for STS credentials".into(),
            ));
        }
        Wanted::IamUser { .. } => {}
    }
    Ok(())
}

/// Replaces `{namespace}` and validates the result as a prefix.
pub fn expand_prefix_template(
    template: &str,
    namespace: &str,
) -> std::result::Result<Prefix, String> {
    let expanded = template.replace(NAMESPACE_PLACEHOLDER, namespace);
    Prefix::parse(&expanded).map_err(|e| {
        format!(
            "prefixTemplate {} does not give a valid prefix (only {NAMESPACE_PLACEHOLDER} may be used): {e}",
            shown(template)
        )
    })
}

/// Label selector semantics of Kubernetes: all matchLabels and all matchExpressions hold.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> std::result::Result<bool, String> {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    if !labels_match {
        return Ok(false);
    }
    for expression in selector.match_expressions.iter().flatten() {
        let value = labels.get(&expression.key);
        let values = expression.values.as_deref().unwrap_or_default();
        let holds = match expression.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => {
                return Err(format!(
                    "namespaceSelector has unknown operator {}",
                    shown(other)
                ))
            }
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Backend, S3GrantClassSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn class(name: &str, default: bool) -> S3GrantClass {
        let mut class = S3GrantClass::new(
            name,
            S3GrantClassSpec {
                backend: Backend::default(),
                namespace_selector: None,
                buckets: vec!["acme-data".into()],
                prefix_template: Some("data/{namespace}/".into()),
                allow_whole_bucket: false,
                modes: None,
                max_duration: Some("2h".into()),
                allow_iam_users: None,
            },
        );
        if default {
            class.metadata.annotations = Some(BTreeMap::from([(
                crate::api::DEFAULT_CLASS_ANNOTATION.into(),
                "true".into(),
            )]));
        }
        class
    }

    /// Parses the grant as the controller does (in namespace tenant-a), then checks it.
    fn check(class: &S3GrantClass, labels: &BTreeMap<String, String>, yaml: &str) -> Result<()> {
        let spec: crate::api::S3GrantSpec = serde_yaml::from_str(yaml).unwrap();
        let mut grant = crate::api::S3Grant::new("g", spec);
        grant.metadata.namespace = Some("tenant-a".into());
        check_permitted(class, labels, &GrantRequest::parse(&grant)?)
    }

    fn refusal(spec: &str) -> String {
        check(&class("team", true), &BTreeMap::new(), spec)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn grant_under_own_namespace_prefix_is_permitted() {
        let spec = "{bucket: acme-data, prefix: data/tenant-a/reports}";
        assert!(check(&class("team", true), &BTreeMap::new(), spec).is_ok());
    }

    #[test]
    fn grant_for_another_tenants_prefix_is_not_permitted() {
        let message = refusal("{bucket: acme-data, prefix: data/tenant-b/}");
        assert!(message.contains("not under data/tenant-a/"), "{message}");
    }

    #[test]
    fn sibling_namespace_prefix_is_not_permitted() {
        let message = refusal("{bucket: acme-data, prefix: data/tenant-ab/}");
        assert!(message.contains("not permitted"), "{message}");
        let own_folder = "{bucket: acme-data, prefix: data/tenant-a}";
        assert!(check(&class("team", true), &BTreeMap::new(), own_folder).is_ok());
    }

    #[test]
    fn dot_dot_escape_is_rejected_outright() {
        let message = refusal("{bucket: acme-data, prefix: data/tenant-a/../tenant-b/}");
        assert!(message.contains("'..' segments"), "{message}");
    }

    #[test]
    fn bucket_mode_duration_and_whole_bucket_rules_refuse() {
        assert!(refusal("{bucket: other-bucket, prefix: data/tenant-a/}")
            .contains("not one of the class's buckets"));
        assert!(refusal("{bucket: acme-data}").contains("allowWholeBucket"));
        assert!(
            refusal("{bucket: acme-data, prefix: data/tenant-a/, duration: 3h}")
                .contains("maxDuration 2h")
        );
        let mut strict = class("team", true);
        strict.spec.modes = Some(vec![Mode::ReadOnly]);
        let err = check(
            &strict,
            &BTreeMap::new(),
            "{bucket: acme-data, prefix: data/tenant-a/}",
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("mode ReadWrite is not allowed"));
    }

    #[test]
    fn namespace_selector_is_enforced() {
        let mut selective = class("team", true);
        selective.spec.namespace_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "s3grant.io/tenant".into(),
                "true".into(),
            )])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["blocked".into()]),
            }]),
        });
        let spec = "{bucket: acme-data, prefix: data/tenant-a/}";
        let tenant = BTreeMap::from([("s3grant.io/tenant".to_string(), "true".to_string())]);
        assert!(check(&selective, &tenant, spec).is_ok());
        let err = check(&selective, &BTreeMap::new(), spec).unwrap_err();
        assert_eq!(err.category(), "NotPermitted");
        let mut blocked = tenant.clone();
        blocked.insert("tier".into(), "blocked".into());
        assert!(check(&selective, &blocked, spec).is_err());
    }

    fn name_of(class: Result<&S3GrantClass>) -> String {
        match class {
            Ok(class) => class.metadata.name.clone().unwrap(),
            Err(err) => format!("{}: {err}", err.category()),
        }
    }

    #[test]
    fn class_selection_prefers_the_named_class_and_refuses_two_defaults() {
        let classes = [class("a", true), class("b", false)];
        assert_eq!(name_of(select_class(None, &classes)), "a");
        assert_eq!(name_of(select_class(Some("b"), &classes)), "b");
        assert!(name_of(select_class(Some("c"), &classes)).starts_with("ClassNotFound"));
        let two = [class("a", true), class("b", true)];
        let message = name_of(select_class(None, &two));
        assert!(
            message.contains("2 S3GrantClasses are marked default (a, b)"),
            "{message}"
        );
        assert!(name_of(select_class(None, &[class("x", false)])).starts_with("NoDefaultClass"));
    }

    #[test]
    fn a_class_being_deleted_is_not_used() {
        let mut deleting = class("a", true);
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let only = [deleting.clone()];
        assert!(name_of(select_class(Some("a"), &only)).contains("being deleted"));
        assert!(name_of(select_class(None, &only)).starts_with("ClassNotFound"));
        let with_another = [deleting, class("b", true)];
        assert_eq!(name_of(select_class(None, &with_another)), "b");
    }

    #[test]
    fn template_with_unknown_placeholder_is_a_class_error() {
        let mut odd = class("team", true);
        odd.spec.prefix_template = Some("data/{tenant}/".into());
        let err = check(
            &odd,
            &BTreeMap::new(),
            "{bucket: acme-data, prefix: data/x/}",
        );
        assert_eq!(err.unwrap_err().category(), "ClassMisconfigured");
    }
}
