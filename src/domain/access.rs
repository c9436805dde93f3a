//! Who may do what: roles, building scopes and the identity of a caller. Pure rules; how an
//! identity is established (tokens, certificates) lives in `auth`.

use std::collections::BTreeSet;
use std::fmt;

use super::{BuildingId, SensorId, ValidationError};

/// What a caller may do, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read setpoints, history and sensor state; subscribe to commands.
    Viewer,
    /// Also create, change and delete setpoints.
    Operator,
    /// Everything, including what only administrators may do.
    Admin,
}

impl Role {
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        match value {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(ValidationError::new(
                "role",
                format!("{other:?} is not one of viewer, operator, admin"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The least role that may perform `action`.
    fn required_for(action: Action) -> Role {
        match action {
            Action::Read => Role::Viewer,
            Action::Write => Role::Operator,
            Action::WriteSafety => Role::Admin,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of RPC, as far as permissions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Get, List, history, sensor state, subscribe.
    Read,
    /// Put and Delete, and writing the OVERRIDE level.
    Write,
    /// Writing the SAFETY level (freeze or overheat protection).
    WriteSafety,
}

/// The buildings a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `*`: every building, including ones created later.
    All,
    /// Exactly these (possibly none).
    Buildings(BTreeSet<BuildingId>),
}

impl Scope {
    /// From the `buildings` claim: building ids, or `*` alone for all.
    pub fn parse<S: AsRef<str>>(buildings: &[S]) -> Result<Self, ValidationError> {
        if buildings.iter().any(|b| b.as_ref() == "*") {
            return if buildings.len() == 1 {
                Ok(Scope::All)
            } else {
                Err(ValidationError::new(
                    "buildings",
                    "\"*\" must be the only entry",
                ))
            };
        }
        buildings
            .iter()
            .map(|b| BuildingId::parse(b.as_ref()).map_err(|e| e.within("buildings")))
            .collect::<Result<_, _>>()
            .map(Scope::Buildings)
    }

    pub fn contains(&self, building: &BuildingId) -> bool {
        self.contains_str(building.as_str())
    }

    /// As [`Scope::contains`], for a building id read from an event or a row.
    pub fn contains_str(&self, building: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Buildings(set) => set.contains(building),
        }
    }

    /// Whether a caller of this scope may bind `sensor` to `building`, creating it there or
    /// moving it there. Callers of every building bind any id; others only ids named under the
    /// building (`{building}/…`), so that no building can take or block another's sensor.
    pub fn may_bind(&self, sensor: &SensorId, building: &BuildingId) -> bool {
        match self {
            Scope::All => true,
            Scope::Buildings(set) => {
                set.contains(building) && sensor.named_under() == Some(building.as_str())
            }
        }
    }

    /// The buildings as a list for a SQL `= ANY($n)` filter; `None` means no filter.
    pub fn as_sql(&self) -> Option<Vec<&str>> {
        match self {
            Scope::All => None,
            Scope::Buildings(set) => Some(set.iter().map(BuildingId::as_str).collect()),
        }
    }
}

/// The kind of credential an identity was established with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    Jwt,
    StaticToken,
    Certificate,
    /// Everyone, when authentication is off.
    Anonymous,
}

/// Who a caller is: a name, within the kind of credential that vouches for it. The same name
/// from two kinds is two callers (an identity provider's `sub` and a static token's subject
/// are chosen by different people), though both are recorded as that name in the history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    pub kind: CredentialKind,
    /// As recorded in `updated_by`.
    pub name: String,
}

impl Subject {
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// An authenticated caller: the subject recorded as `updated_by`, and what it may do where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: Subject,
    pub role: Role,
    pub scope: Scope,
}

/// Why an authenticated caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not {action}; {required} or higher is required")]
pub struct Denied {
    role: Role,
    required: Role,
    action: &'static str,
}

impl Identity {
    /// Longest subject kept; longer ones are refused rather than truncated, so two callers never
    /// share a name in the history.
    pub const MAX_SUBJECT_LEN: usize = 256;

    pub fn new(
        kind: CredentialKind,
        subject: impl Into<String>,
        role: Role,
        scope: Scope,
    ) -> Result<Self, ValidationError> {
        let subject = subject.into();
        if subject.is_empty() || subject.len() > Self::MAX_SUBJECT_LEN {
            return Err(ValidationError::new(
                "sub",
                format!("must be 1 to {} bytes", Self::MAX_SUBJECT_LEN),
            ));
        }
        if subject.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "sub",
                "must not contain control characters",
            ));
        }
        Ok(Self {
            subject: Subject {
                kind,
                name: subject,
            },
            role,
            scope,
        })
    }

    /// Whether the role allows `action` at all (buildings are checked per resource).
    pub fn check(&self, action: Action) -> Result<(), Denied> {
        let required = Role::required_for(action);
        if self.role >= required {
            Ok(())
        } else {
            Err(Denied {
                role: self.role,
                required,
                action: match action {
                    Action::Read => "read",
                    Action::Write => "change setpoints",
                    Action::WriteSafety => "write the SAFETY level",
                },
            })
        }
    }

    /// Whether this caller may see anything of `building`.
    pub fn sees(&self, building: &BuildingId) -> bool {
        self.scope.contains(building)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn building(id: &str) -> BuildingId {
        BuildingId::parse(id).expect("valid")
    }

    #[test]
    fn roles_parse_and_order() {
        assert_eq!(Role::parse("viewer"), Ok(Role::Viewer));
        assert_eq!(Role::parse("operator"), Ok(Role::Operator));
        assert_eq!(Role::parse("admin"), Ok(Role::Admin));
        assert!(Role::parse("Admin").is_err());
        assert!(Role::parse("").is_err());
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn every_role_against_every_action() {
        let cases = [
            (Role::Viewer, Action::Read, true),
            (Role::Viewer, Action::Write, false),
            (Role::Operator, Action::Read, true),
            (Role::Operator, Action::Write, true),
            (Role::Admin, Action::Read, true),
            (Role::Admin, Action::Write, true),
        ];
        for (role, action, allowed) in cases {
            let who = Identity::new(CredentialKind::Jwt, "x", role, Scope::All).expect("valid");
            assert_eq!(who.check(action).is_ok(), allowed, "{role} {action:?}");
        }
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(Scope::parse(&["*"]), Ok(Scope::All));
        assert!(Scope::parse(&["*", "b1"]).is_err());
        assert!(Scope::parse(&["b 1"]).is_err());
        let scope = Scope::parse(&["b1", "b2"]).expect("valid");
        assert!(scope.contains(&building("b1")));
        assert!(!scope.contains(&building("b3")));
        assert_eq!(scope.as_sql(), Some(vec!["b1", "b2"]));
        let none = Scope::parse::<&str>(&[]).expect("valid");
        assert!(!none.contains(&building("b1")));
        assert_eq!(none.as_sql(), Some(vec![]));
        assert!(Scope::All.contains(&building("anything")));
        assert_eq!(Scope::All.as_sql(), None);
    }

    #[test]
    fn subjects_are_bounded_and_printable() {
        assert!(Identity::new(CredentialKind::Certificate, "", Role::Viewer, Scope::All).is_err());
        assert!(Identity::new(
            CredentialKind::Certificate,
            "a\nb",
            Role::Viewer,
            Scope::All
        )
        .is_err());
        assert!(Identity::new(
            CredentialKind::Certificate,
            "x".repeat(257),
            Role::Viewer,
            Scope::All
        )
        .is_err());
        assert!(Identity::new(
            CredentialKind::Certificate,
            "CN=gateway-1",
            Role::Viewer,
            Scope::All
        )
        .is_ok());
    }
}
