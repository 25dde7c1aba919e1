//! Authorization rules of a MessagingUser: which operations on which addresses.
//!
//! A rule grants a set of [`Operation`]s on a list of [`AddressPattern`]s; a user may do
//! what any of its rules grants. Patterns are an exact address, a prefix ending in `*`
//! (`orders.*` matches `orders.eu` and `orders.eu.paris`), or `*` for every address of the
//! user's address space. Nothing else is a pattern: `*` in the middle, empty patterns and
//! whitespace are refused when the manifest is loaded, never at attach time.
//!
//! The rules live here, with the manifests that declare them, so that `manifest` names
//! nothing of `auth`; `auth::authz` re-exports this module for the checks at attach time.

use std::fmt;

/// Something a user may do to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Attach a link that sends to the address.
    Send,
    /// Attach a link that receives from the address.
    Recv,
    /// Read the address's state (management).
    View,
    /// Change the address (management).
    Manage,
}

impl Operation {
    pub fn parse(s: &str) -> Option<Operation> {
        match s {
            "send" => Some(Operation::Send),
            "recv" => Some(Operation::Recv),
            "view" => Some(Operation::View),
            "manage" => Some(Operation::Manage),
            _ => None,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Send => "send",
            Operation::Recv => "recv",
            Operation::View => "view",
            Operation::Manage => "manage",
        })
    }
}

/// An address or address prefix a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    Exact(String),
    /// Matches every address starting with the prefix (empty: every address).
    Prefix(String),
}

impl AddressPattern {
    /// Parses a pattern, saying what is wrong with a bad one.
    pub fn parse(s: &str) -> Result<AddressPattern, String> {
        if s.is_empty() {
            return Err("address pattern must not be empty".into());
        }
        if s.chars().any(char::is_whitespace) {
            return Err(format!("address pattern {s:?} contains whitespace"));
        }
        match s.find('*') {
            None => Ok(AddressPattern::Exact(s.to_owned())),
            Some(i) if i == s.len() - 1 => Ok(AddressPattern::Prefix(s[..i].to_owned())),
            Some(_) => Err(format!(
                "address pattern {s:?}: `*` may only end a pattern (as in `orders.*` or `*`)"
            )),
        }
    }

    pub fn matches(&self, address: &str) -> bool {
        match self {
            AddressPattern::Exact(a) => a == address,
            AddressPattern::Prefix(p) => address.starts_with(p.as_str()),
        }
    }
}

/// One grant: these operations on these addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub operations: Vec<Operation>,
    pub addresses: Vec<AddressPattern>,
}

/// Whether any rule allows `op` on `address`.
pub fn allows(rules: &[Rule], op: Operation, address: &str) -> bool {
    rules
        .iter()
        .any(|r| r.operations.contains(&op) && r.addresses.iter().any(|p| p.matches(address)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ops: &[Operation], patterns: &[&str]) -> Rule {
        Rule {
            operations: ops.to_vec(),
            addresses: patterns
                .iter()
                .map(|p| AddressPattern::parse(p).unwrap())
                .collect(),
        }
    }

    #[test]
    fn exact_prefix_and_wildcard_patterns_match() {
        let rules = [
            rule(&[Operation::Send], &["orders"]),
            rule(&[Operation::Recv], &["orders.*"]),
            rule(&[Operation::View], &["*"]),
        ];
        assert!(allows(&rules, Operation::Send, "orders"));
        assert!(!allows(&rules, Operation::Send, "orders.eu"));
        assert!(allows(&rules, Operation::Recv, "orders.eu.paris"));
        assert!(!allows(&rules, Operation::Recv, "orders"));
        assert!(allows(&rules, Operation::View, "anything"));
        assert!(!allows(&rules, Operation::Manage, "orders"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(AddressPattern::parse("").is_err());
        assert!(AddressPattern::parse("or*ders")
            .unwrap_err()
            .contains("may only end"));
        assert!(AddressPattern::parse("a b").is_err());
        assert_eq!(
            AddressPattern::parse("*").unwrap(),
            AddressPattern::Prefix(String::new())
        );
    }
}
