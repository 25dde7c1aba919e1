//! Reads a manifest directory into a [`Catalog`], or into the full list of what is wrong
//! with it, each as `file:line: reason`.
//!
//! Files ending in `.yaml` or `.yml` directly in the directory are read in name order;
//! each may hold several documents separated by `---`. Documents are parsed one by one so
//! a YAML error is reported at its own line; then references are checked (the space of
//! an address or user, plans, a subscription's topic) and duplicates refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::authz::{AddressPattern, Operation, Rule};
use super::model::{self, AddressType, AuthType, Document, Header, KINDS};
use super::{
    Address, AddressPlan, AddressSpace, AddressSpacePlan, Catalog, ManifestError, Origin, User,
    UserAuth,
};
use crate::amqp::scram::ScramCredential;
use crate::broker::store::MAX_ADDRESS_LEN;

/// Largest manifest file read: manifests are configuration, not data.
pub const MAX_MANIFEST_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads and checks every manifest in `dir`.
pub fn load_dir(dir: &Path) -> Result<Catalog, Vec<ManifestError>> {
    let at = |file: &Path, reason: String| {
        vec![ManifestError {
            origin: Origin {
                file: file.to_path_buf(),
                line: 0,
            },
            reason,
        }]
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| at(dir, format!("cannot read directory: {e}")))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        if len > MAX_MANIFEST_FILE_BYTES {
            return Err(at(
                &p,
                format!("file of {len} bytes exceeds {MAX_MANIFEST_FILE_BYTES}"),
            ));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| at(&p, format!("cannot read: {e}")))?;
        files.push((p, text));
    }
    load_texts(&files)
}

/// Checks manifests given as `(file name, text)`.
pub fn load_texts(files: &[(PathBuf, String)]) -> Result<Catalog, Vec<ManifestError>> {
    let mut b = Builder::default();
    for (file, text) in files {
        for (line, doc) in split_documents(text) {
            b.document(
                Origin {
                    file: file.clone(),
                    line,
                },
                doc,
            );
        }
    }
    b.finish()
}

/// Splits a YAML stream at `---` lines; yields each document's first line (1-based) and
/// text, skipping documents that hold only comments and blank lines.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start_byte, mut start_line) = (0, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// The documents seen so far, by kind, with where each came from.
#[derive(Default)]
struct Builder {
    errors: Vec<ManifestError>,
    spaces: Vec<(Origin, Document<model::AddressSpaceSpec>)>,
    addresses: Vec<(Origin, Document<model::AddressSpec>)>,
    users: Vec<(Origin, Document<model::MessagingUserSpec>)>,
    address_plans: Vec<(Origin, Document<model::AddressPlanSpec>)>,
    space_plans: Vec<(Origin, Document<model::AddressSpacePlanSpec>)>,
}

fn parse<S: serde::de::DeserializeOwned>(
    origin: &Origin,
    text: &str,
) -> Result<Document<S>, ManifestError> {
    serde_yaml::from_str(text).map_err(|e| yaml_error(origin, &e))
}

fn yaml_error(origin: &Origin, e: &serde_yaml::Error) -> ManifestError {
    let line = e
        .location()
        .map_or(origin.line, |l| origin.line + l.line() - 1);
    // serde_yaml appends " at line L column C" relative to the document; we give our own.
    let text = e.to_string();
    let reason = match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    ManifestError {
        origin: Origin {
            file: origin.file.clone(),
            line,
        },
        reason,
    }
}

impl Builder {
    fn error(&mut self, origin: &Origin, reason: impl Into<String>) {
        self.errors.push(ManifestError {
            origin: origin.clone(),
            reason: reason.into(),
        });
    }

    fn document(&mut self, origin: Origin, text: &str) {
        let header: Header = match serde_yaml::from_str(text) {
            Ok(h) => h,
            Err(e) => return self.errors.push(yaml_error(&origin, &e)),
        };
        let result = match header.kind.as_deref() {
            Some("AddressSpace") => {
                parse(&origin, text).map(|d| self.spaces.push((origin.clone(), d)))
            }
            Some("Address") => {
                parse(&origin, text).map(|d| self.addresses.push((origin.clone(), d)))
            }
            Some("MessagingUser") => {
                parse(&origin, text).map(|d| self.users.push((origin.clone(), d)))
            }
            Some("AddressPlan") => {
                parse(&origin, text).map(|d| self.address_plans.push((origin.clone(), d)))
            }
            Some("AddressSpacePlan") => {
                parse(&origin, text).map(|d| self.space_plans.push((origin.clone(), d)))
            }
            Some(other) => Err(ManifestError {
                origin: origin.clone(),
                reason: format!(
                    "unknown kind {other:?} (expected one of {})",
                    KINDS.join(", ")
                ),
            }),
            None => Err(ManifestError {
                origin: origin.clone(),
                reason: "missing field `kind`".into(),
            }),
        };
        if let Err(e) = result {
            self.errors.push(e);
        }
    }

    fn finish(mut self) -> Result<Catalog, Vec<ManifestError>> {
        let mut catalog = Catalog::default();
        self.plans(&mut catalog);
        self.spaces(&mut catalog);
        self.addresses(&mut catalog);
        self.check_address_counts(&catalog);
        self.users(&mut catalog);
        if self.errors.is_empty() {
            Ok(catalog)
        } else {
            self.errors.sort_by(|a, b| {
                (&a.origin.file, a.origin.line).cmp(&(&b.origin.file, b.origin.line))
            });
            Err(self.errors)
        }
    }

    fn plans(&mut self, catalog: &mut Catalog) {
        let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
        for (origin, d) in std::mem::take(&mut self.address_plans) {
            if self.duplicate(&mut seen, &origin, "address plan", &d.metadata.name) {
                continue;
            }
            let s = d.spec;
            catalog.address_plans.insert(
                d.metadata.name.clone(),
                AddressPlan {
                    name: d.metadata.name,
                    max_depth: s.max_depth,
                    max_bytes: s.max_bytes,
                    max_message_bytes: s.max_message_bytes,
                    retention_secs: s.retention_secs,
                },
            );
        }
        let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
        for (origin, d) in std::mem::take(&mut self.space_plans) {
            if self.duplicate(&mut seen, &origin, "address space plan", &d.metadata.name) {
                continue;
            }
            let s = d.spec;
            catalog.space_plans.insert(
                d.metadata.name.clone(),
                AddressSpacePlan {
                    name: d.metadata.name,
                    max_addresses: s.max_addresses,
                    max_connections: s.max_connections,
                    max_stored_bytes: s.max_stored_bytes,
                },
            );
        }
    }

    /// Records `name`; reports and returns true if it was already there.
    fn duplicate(
        &mut self,
        seen: &mut BTreeMap<String, Origin>,
        origin: &Origin,
        what: &str,
        name: &str,
    ) -> bool {
        if let Some(first) = seen.get(name) {
            let reason = format!("duplicate {what} {name:?} (first defined at {first})");
            self.error(origin, reason);
            return true;
        }
        seen.insert(name.to_owned(), origin.clone());
        false
    }

    fn spaces(&mut self, catalog: &mut Catalog) {
        let mut seen = BTreeMap::new();
        for (origin, d) in std::mem::take(&mut self.spaces) {
            let name = d.metadata.name;
            if !is_dns_label(&name) {
                self.error(
                    &origin,
                    format!("address space name {name:?} must be a DNS label (a-z, 0-9, -)"),
                );
                continue;
            }
            if self.duplicate(&mut seen, &origin, "address space", &name) {
                continue;
            }
            if !catalog.space_plans.contains_key(&d.spec.plan) {
                self.error(
                    &origin,
                    format!("unknown address space plan {:?}", d.spec.plan),
                );
                continue;
            }
            catalog.spaces.insert(
                name.clone(),
                AddressSpace {
                    name,
                    plan: d.spec.plan,
                    allow_anonymous: d.spec.allow_anonymous,
                    hostnames: d.spec.hostnames,
                    addresses: BTreeMap::new(),
                    users: BTreeMap::new(),
                },
            );
        }
    }

    /// The space named by `<space>.<name>`, reporting a missing one.
    fn space_of<'c>(
        &mut self,
        catalog: &'c mut Catalog,
        origin: &Origin,
        kind: &str,
        name: &str,
    ) -> Option<&'c mut AddressSpace> {
        let Some((space, rest)) = name.split_once('.').filter(|(_, r)| !r.is_empty()) else {
            self.error(
                origin,
                format!("{kind} metadata.name {name:?} must be <address space>.<name>"),
            );
            return None;
        };
        if !catalog.spaces.contains_key(space) {
            self.error(
                origin,
                format!("{kind} {rest:?} names address space {space:?}, which is not defined"),
            );
        }
        catalog.spaces.get_mut(space)
    }

    fn addresses(&mut self, catalog: &mut Catalog) {
        let docs = std::mem::take(&mut self.addresses);
        for (origin, d) in &docs {
            let s = &d.spec;
            if s.address.is_empty() || s.address.chars().any(char::is_whitespace) {
                self.error(
                    origin,
                    format!(
                        "address {:?} must be non-empty without whitespace",
                        s.address
                    ),
                );
                continue;
            }
            let plan_ok = catalog.address_plans.contains_key(&s.plan);
            let Some(space) = self.space_of(catalog, origin, "address", &d.metadata.name) else {
                continue;
            };
            if space.internal_name(&s.address).len() > MAX_ADDRESS_LEN {
                let reason = format!(
                    "address {:?} is too long (at most {MAX_ADDRESS_LEN} bytes with its space)",
                    s.address
                );
                self.error(origin, reason);
                continue;
            }
            if let Some(first) = space.addresses.get(&s.address) {
                let reason = format!(
                    "duplicate address {:?} in address space {:?} (first defined at {})",
                    s.address, space.name, first.origin
                );
                self.error(origin, reason);
                continue;
            }
            if !plan_ok {
                self.error(origin, format!("unknown address plan {:?}", s.plan));
                continue;
            }
            let address = Address {
                address: s.address.clone(),
                address_type: s.address_type,
                plan: s.plan.clone(),
                topic: s.topic.clone(),
                delete_with_messages: s.delete_with_messages,
                origin: origin.clone(),
            };
            space.addresses.insert(s.address.clone(), address);
        }
        self.check_subscriptions(catalog);
    }

    /// The space plan's `maxAddresses`: the addresses past it, in file order, are errors.
    fn check_address_counts(&mut self, catalog: &Catalog) {
        for space in catalog.spaces.values() {
            let plan = catalog.space_plans.get(&space.plan);
            let Some(max) = plan.and_then(|p| p.max_addresses) else {
                continue;
            };
            let mut in_order: Vec<&Address> = space.addresses.values().collect();
            in_order.sort_by(|a, b| {
                (&a.origin.file, a.origin.line).cmp(&(&b.origin.file, b.origin.line))
            });
            for a in in_order.iter().skip(max as usize) {
                let reason = format!(
                    "address {:?} is over the limit of address space {:?}: its plan {:?} has maxAddresses {max}, {} are declared",
                    a.address,
                    space.name,
                    space.plan,
                    space.addresses.len()
                );
                self.error(&a.origin, reason);
            }
        }
    }

    fn check_subscriptions(&mut self, catalog: &Catalog) {
        for space in catalog.spaces.values() {
            for a in space
                .addresses
                .values()
                .filter(|a| a.address_type == AddressType::Subscription)
            {
                let topic = a.topic.as_deref().and_then(|t| space.addresses.get(t));
                if !topic.is_some_and(|t| t.address_type == AddressType::Topic) {
                    let reason = format!(
                        "subscription {:?} needs spec.topic naming a topic address of space {:?}",
                        a.address, space.name
                    );
                    self.error(&a.origin, reason);
                }
            }
        }
    }

    fn users(&mut self, catalog: &mut Catalog) {
        for (origin, d) in std::mem::take(&mut self.users) {
            let user = match user(&d.spec) {
                Ok(u) => u,
                Err(reason) => {
                    self.error(&origin, reason);
                    continue;
                }
            };
            let Some(space) = self.space_of(catalog, &origin, "messaging user", &d.metadata.name)
            else {
                continue;
            };
            if space.users.contains_key(&user.username) {
                let reason = format!(
                    "duplicate messaging user {:?} in address space {:?}",
                    user.username, space.name
                );
                self.error(&origin, reason);
                continue;
            }
            space.users.insert(user.username.clone(), user);
        }
    }
}

fn user(spec: &model::MessagingUserSpec) -> Result<User, String> {
    if spec.username.is_empty() {
        return Err("username must not be empty".into());
    }
    let auth = match (spec.authentication.auth_type, &spec.authentication.password_hash) {
        (AuthType::Password, Some(h)) => UserAuth::Password(ScramCredential::parse(h).map_err(|e| e.to_string())?),
        (AuthType::Password, None) => {
            return Err("password authentication needs spec.authentication.passwordHash (see `entrepot hash-password`)".into())
        }
        (AuthType::Serviceaccount, _) => UserAuth::ServiceAccount,
    };
    let mut rules = Vec::with_capacity(spec.authorization.len());
    for a in &spec.authorization {
        let operations = a
            .operations
            .iter()
            .map(|o| {
                Operation::parse(o).ok_or_else(|| {
                    format!("unknown operation {o:?} (expected send, recv, view or manage)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addresses = a
            .addresses
            .iter()
            .map(|p| AddressPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        rules.push(Rule {
            operations,
            addresses,
        });
    }
    Ok(User {
        username: spec.username.clone(),
        auth,
        rules,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLANS: &str = "\
kind: AddressSpacePlan
apiVersion: admin.enmasse.io/v1beta2
metadata: {name: small}
spec: {maxConnections: 10}
---
kind: AddressPlan
apiVersion: admin.enmasse.io/v1beta2
metadata: {name: queue-small}
spec: {maxDepth: 100}
";

    fn load(text: &str) -> Result<Catalog, Vec<ManifestError>> {
        load_texts(&[
            (PathBuf::from("plans.yaml"), PLANS.to_owned()),
            (PathBuf::from("m.yaml"), text.to_owned()),
        ])
    }

    fn errors(text: &str) -> Vec<String> {
        load(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SPACE: &str = "\
apiVersion: enmasse.io/v1beta1
kind: AddressSpace
metadata: {name: app}
spec: {type: standard, plan: small}
";

    #[test]
    fn a_valid_set_loads() {
        let text = format!("{SPACE}---\napiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {{name: app.orders}}\nspec: {{address: orders, type: queue, plan: queue-small}}\n");
        let c = load(&text).unwrap();
        assert_eq!(c.spaces["app"].addresses["orders"].origin.line, 6);
        assert_eq!(
            c.space_for_host(Some("app.example.com"), None)
                .unwrap()
                .name,
            "app"
        );
    }

    #[test]
    fn documents_are_split_with_their_line_numbers() {
        let docs = split_documents("# c\n---\na: 1\n---\n\n---\nb: 2\n");
        assert_eq!(docs, vec![(3, "a: 1\n"), (7, "b: 2\n")]);
    }

    #[test]
    fn yaml_errors_point_at_their_line() {
        let e = errors(&format!("{SPACE}---\nkind: Address\nmetadata: [unclosed\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        // The parser notices the unclosed sequence at the end of the document (line 8).
        assert!(e[0].starts_with("m.yaml:8: did not find expected"), "{e:?}");
    }
}
