//! The ledger (a grant's `status.held`): what s3grant holds in AWS for a grant, each
//! entry with the class and backend it lives on. A reconcile is a diff of the plan
//! against it: record what is wanted before creating it, remove what is recorded and no
//! longer wanted, on the backend where it was recorded. Kind switches, class moves and
//! backend changes are then ordinary diffs. Pure: the controller writes what this returns.

use std::borrow::Borrow;

use crate::api::{Held, HeldKind, S3GrantClass, S3GrantStatus};
use crate::backend::record_of;
use crate::plan::GrantPlan;

/// The entry for the IAM user the plan wants, if it wants one.
pub fn wanted(plan: &GrantPlan) -> Option<Held> {
    plan.user_name().map(|name| Held {
        kind: HeldKind::IamUser,
        name: name.to_string(),
        class_name: plan.class_name.clone(),
        backend: plan.backend.id.clone(),
        id: None,
        since: None,
    })
}

/// Two entries name the same object when kind, name and backend agree (whichever class
/// they were recorded under: two classes may share a backend).
pub fn same_object(a: &Held, b: &Held) -> bool {
    a.kind == b.kind && a.name == b.name && a.backend == b.backend
}

/// The ledger with `want` recorded under its class, to write before the object is
/// created; `None` when it is recorded already. An id learnt earlier is kept.
pub fn record(held: &[Held], want: &Held) -> Option<Vec<Held>> {
    if held
        .iter()
        .any(|h| same_object(h, want) && h.class_name == want.class_name)
    {
        return None;
    }
    let known = held.iter().find(|h| same_object(h, want));
    let mut next: Vec<Held> = held
        .iter()
        .filter(|h| !same_object(h, want))
        .cloned()
        .collect();
    next.push(Held {
        id: known.and_then(|h| h.id.clone()).or_else(|| want.id.clone()),
        since: known
            .and_then(|h| h.since.clone())
            .or_else(|| want.since.clone()),
        ..want.clone()
    });
    Some(next)
}

/// The entries no longer wanted: to be removed on their own backends.
pub fn stale(held: &[Held], want: Option<&Held>) -> Vec<Held> {
    held.iter()
        .filter(|h| want.is_none_or(|w| !same_object(h, w)))
        .cloned()
        .collect()
}

/// The ledger once the entries in `released` are gone and the wanted object's AWS id
/// is known.
pub fn settle(held: &[Held], want: Option<&Held>, released: &[Held]) -> Vec<Held> {
    held.iter()
        .filter(|h| !released.iter().any(|r| same_object(h, r)))
        .map(|h| match want {
            Some(w) if same_object(h, w) && w.id.is_some() => Held {
                id: w.id.clone(),
                ..h.clone()
            },
            _ => h.clone(),
        })
        .collect()
}

/// The ledger of a status. A status written before the ledger existed names its user in
/// `iamUser` and its class in `className`: that user is held on the class's current backend.
pub fn held_of<C: Borrow<S3GrantClass>>(
    status: Option<&S3GrantStatus>,
    classes: &[C],
) -> Vec<Held> {
    let Some(status) = status else {
        return Vec::new();
    };
    if !status.held.is_empty() {
        return status.held.clone();
    }
    let (Some(user), Some(class_name)) = (&status.iam_user, &status.class_name) else {
        return Vec::new();
    };
    let backend = classes
        .iter()
        .map(Borrow::borrow)
        .find(|c| c.metadata.name.as_deref() == Some(class_name))
        .map(|c| record_of(&c.spec.backend).id)
        .unwrap_or_default();
    vec![Held {
        kind: HeldKind::IamUser,
        name: user.clone(),
        class_name: class_name.clone(),
        backend,
        id: None,
        since: None,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, class: &str, backend: &str) -> Held {
        Held {
            kind: HeldKind::IamUser,
            name: name.into(),
            class_name: class.into(),
            backend: backend.into(),
            id: None,
            since: None,
        }
    }

    #[test]
    fn a_new_user_is_recorded_once_before_it_is_created() {
        let want = user("u", "a", "b1");
        let written = record(&[], &want).unwrap();
        assert_eq!(written, std::slice::from_ref(&want));
        assert_eq!(record(&written, &want), None, "already recorded");
        assert!(stale(&written, Some(&want)).is_empty());
    }

    #[test]
    fn a_move_to_another_backend_keeps_the_old_user_until_it_is_released() {
        let old = Held {
            id: Some("AIDA1".into()),
            ..user("u", "a", "b1")
        };
        let want = user("u", "b", "b2");
        let written = record(std::slice::from_ref(&old), &want).unwrap();
        assert_eq!(written, [old.clone(), want.clone()]);
        assert_eq!(stale(&written, Some(&want)), std::slice::from_ref(&old));
        let learnt = Held {
            id: Some("AIDA2".into()),
            ..want.clone()
        };
        let settled = settle(&written, Some(&learnt), &[old]);
        assert_eq!(settled, [learnt]);
    }

    #[test]
    fn a_class_sharing_the_backend_takes_the_entry_over_with_its_id() {
        let old = Held {
            id: Some("AIDA1".into()),
            ..user("u", "a", "b1")
        };
        let want = user("u", "b", "b1");
        let written = record(std::slice::from_ref(&old), &want).unwrap();
        assert_eq!(
            written,
            [Held {
                id: Some("AIDA1".into()),
                ..want.clone()
            }]
        );
        assert!(stale(&written, Some(&want)).is_empty());
    }

    #[test]
    fn an_sts_grant_holds_nothing_so_every_user_is_stale() {
        let held = [user("u", "a", "b1")];
        assert_eq!(stale(&held, None), held);
        assert!(settle(&held, None, &held).is_empty());
    }

    #[test]
    fn a_status_from_before_the_ledger_names_its_user() {
        let status = S3GrantStatus {
            iam_user: Some("u".into()),
            class_name: Some("gone".into()),
            ..Default::default()
        };
        let held = held_of::<S3GrantClass>(Some(&status), &[]);
        assert_eq!(held, [user("u", "gone", "")]);
        assert!(held_of::<S3GrantClass>(None, &[]).is_empty());
    }
}
