//! The manifest documents as written in YAML, in EnMasse's shape: `apiVersion`, `kind`,
//! `metadata.name`, optional `metadata.namespace`, and a `spec` per kind.
//!
//! These types only describe the text; [`super::load`] checks references between
//! documents and turns them into a [`super::Catalog`]. Unknown fields are errors, so a
//! typo never silently means "use the default".

use serde::Deserialize;

/// The kinds of document a manifest directory may hold.
pub const KINDS: [&str; 5] = [
    "AddressSpace",
    "Address",
    "MessagingUser",
    "AddressPlan",
    "AddressSpacePlan",
];

/// Just enough of any document to tell its kind.
#[derive(Debug, Deserialize)]
pub struct Header {
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<serde_yaml::Mapping>,
    #[serde(default)]
    pub annotations: Option<serde_yaml::Mapping>,
}

/// One document with its kind's spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// A tenant: its plan, how clients reach it and whether they must log in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddressSpaceSpec {
    /// `standard` or `brokered` in EnMasse; recorded, not interpreted.
    #[serde(default, rename = "type")]
    pub space_type: Option<String>,
    pub plan: String,
    /// Accept SASL ANONYMOUS (and plain AMQP without SASL) for this space. Default false.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Extra host names (AMQP open hostname, TLS SNI) that select this space; its
    /// `metadata.name` always does.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Accepted for compatibility with EnMasse manifests; Entrepot authenticates itself.
    #[serde(default)]
    pub authentication_service: Option<serde_yaml::Value>,
    #[serde(default)]
    pub endpoints: Option<serde_yaml::Value>,
}

/// The kinds of address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressType {
    Queue,
    Topic,
    Subscription,
    Anycast,
    Multicast,
}

/// An address of a space; `metadata.name` is `<space>.<name>` as in EnMasse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddressSpec {
    pub address: String,
    #[serde(rename = "type")]
    pub address_type: AddressType,
    pub plan: String,
    /// For `subscription`: the topic address it subscribes to.
    #[serde(default)]
    pub topic: Option<String>,
    /// Allow removing this address while it still holds messages (they are then
    /// unreachable and reclaimed by retention). Default false: removal is refused.
    #[serde(default)]
    pub delete_with_messages: bool,
}

/// How a user proves who it is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticationSpec {
    #[serde(rename = "type")]
    pub auth_type: AuthType,
    /// For `password`: the output of `entrepot hash-password`
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
    #[serde(default)]
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthType {
    Password,
    Serviceaccount,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSpec {
    pub addresses: Vec<String>,
    pub operations: Vec<String>,
}

/// A user of a space; `metadata.name` is `<space>.<name>` as in EnMasse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MessagingUserSpec {
    pub username: String,
    pub authentication: AuthenticationSpec,
    #[serde(default)]
    pub authorization: Vec<AuthorizationSpec>,
}

/// Limits of one address. Absent means "the broker's own limit".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddressPlanSpec {
    #[serde(default)]
    pub address_type: Option<AddressType>,
    #[serde(default)]
    pub max_depth: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub max_message_bytes: Option<u64>,
    #[serde(default)]
    pub retention_secs: Option<u64>,
    #[serde(default)]
    pub display_name: Option<String>,
}

/// Limits of one address space. Absent means unlimited (up to the broker's limits).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddressSpacePlanSpec {
    #[serde(default)]
    pub max_addresses: Option<u64>,
    #[serde(default)]
    pub max_connections: Option<u64>,
    #[serde(default)]
    pub max_stored_bytes: Option<u64>,
    #[serde(default)]
    pub display_name: Option<String>,
}
