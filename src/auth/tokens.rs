//! Bearer tokens of `serviceaccount` MessagingUsers. A [`TokenAuthenticator`] says which
//! user a token belongs to; [`FileTokens`] reads a `token: username` YAML map (tests,
//! laptops). A Kubernetes TokenReview authenticator would be another implementation.

use std::collections::HashMap;
use std::path::Path;

/// Maps a bearer token to the user it authenticates.
pub trait TokenAuthenticator: Send + Sync {
    /// The username `token` proves, if any.
    fn review(&self, token: &str) -> Option<String>;
}

/// Tokens from a YAML file of `token: username` pairs.
pub struct FileTokens(HashMap<String, String>);

impl FileTokens {
    pub fn load(path: &Path) -> Result<FileTokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let map = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(FileTokens(map))
    }
}

impl TokenAuthenticator for FileTokens {
    fn review(&self, token: &str) -> Option<String> {
        self.0.get(token).cloned()
    }
}
