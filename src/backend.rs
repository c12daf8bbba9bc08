//! Which backend a class points at, as a record a grant's ledger can name. A class's
//! backend can change (another endpoint, account or credentials Secret); the class's
//! status keeps the records of the backends its grants still hold something on, so a
//! grant can always be cleaned up where its objects live. Pure.

use std::borrow::Borrow;

use crate::api::{Backend, BackendRecord, S3GrantClass};
use crate::naming::digest;

/// The record of a class's current backend. The id changes whenever anything that says
/// where the backend is or who the operator is there changes.
pub fn record_of(backend: &Backend) -> BackendRecord {
    let reference = backend
        .credentials_secret_ref
        .as_ref()
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .unwrap_or_default();
    let id = digest(&format!(
        "{}\n{}\n{reference}",
        backend.region.as_deref().unwrap_or_default(),
        backend.endpoint.as_deref().unwrap_or_default(),
    ))[..12]
        .to_string();
    BackendRecord {
        id,
        region: backend.region.clone(),
        endpoint: backend.endpoint.clone(),
        credentials_secret_ref: backend.credentials_secret_ref.clone(),
    }
}

/// The backend `id` of the class named `class_name`: its current one or one its status
/// remembers. `None` when the class is gone or never recorded it.
pub fn find<C: Borrow<S3GrantClass>>(
    classes: &[C],
    class_name: &str,
    id: &str,
) -> Option<BackendRecord> {
    let class = classes
        .iter()
        .map(Borrow::borrow)
        .find(|c| c.metadata.name.as_deref() == Some(class_name))?;
    let current = record_of(&class.spec.backend);
    if current.id == id {
        return Some(current);
    }
    class
        .status
        .as_ref()?
        .backends
        .iter()
        .find(|b| b.id == id)
        .cloned()
}

/// Whether the class's status already remembers `record`.
pub fn is_recorded(class: &S3GrantClass, record: &BackendRecord) -> bool {
    class
        .status
        .as_ref()
        .is_some_and(|s| s.backends.iter().any(|b| b == record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{S3GrantClassSpec, S3GrantClassStatus, SecretReference};

    fn class(endpoint: &str) -> S3GrantClass {
        S3GrantClass::new(
            "team",
            S3GrantClassSpec {
                backend: Backend {
                    endpoint: Some(endpoint.into()),
                    credentials_secret_ref: Some(SecretReference {
                        namespace: "s3grant-system".into(),
                        name: "admin".into(),
                    }),
                    ..Backend::default()
                },
                namespace_selector: None,
                buckets: vec!["b".into()],
                prefix_template: None,
                allow_whole_bucket: false,
                modes: None,
                max_duration: None,
                allow_iam_users: None,
            },
        )
    }

    #[test]
    fn a_backend_change_gives_a_new_id_and_the_old_one_stays_findable_once_recorded() {
        let before = class("http://one:1");
        let old = record_of(&before.spec.backend);
        assert_eq!(old, record_of(&before.spec.backend), "deterministic");
        let mut after = class("http://two:2");
        let new = record_of(&after.spec.backend);
        assert_ne!(old.id, new.id);
        assert_eq!(find(&[after.clone()], "team", &new.id), Some(new.clone()));
        assert_eq!(
            find(&[after.clone()], "team", &old.id),
            None,
            "not recorded"
        );
        after.status = Some(S3GrantClassStatus {
            backends: vec![old.clone(), new.clone()],
        });
        assert_eq!(find(&[after.clone()], "team", &old.id), Some(old.clone()));
        assert!(is_recorded(&after, &old));
        assert_eq!(find(&[after], "other", &old.id), None, "another class");
    }

    #[test]
    fn another_credentials_secret_is_another_backend() {
        let mut other = class("http://one:1");
        other
            .spec
            .backend
            .credentials_secret_ref
            .as_mut()
            .unwrap()
            .name = "other".into();
        assert_ne!(
            record_of(&class("http://one:1").spec.backend).id,
            record_of(&other.spec.backend).id
        );
    }
}
