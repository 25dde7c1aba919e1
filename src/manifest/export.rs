//! `entrepot export`: what a client of one address space needs to connect, as a
//! Kubernetes ConfigMap — the shape EnMasse's address-space exports have (`service.host`,
//! `service.port.amqp`, `service.port.amqps`, `ca.crt`).

use std::fmt::Write as _;
use std::path::Path;

use super::load::load_dir;

/// What the exported ConfigMap says beyond the space itself.
pub struct ExportOptions<'a> {
    pub host: Option<&'a str>,
    pub amqp_port: u16,
    pub amqps_port: Option<u16>,
    /// PEM of the CA (or self-signed) certificate clients should trust.
    pub ca_pem: Option<String>,
}

/// Renders the ConfigMap for `space` of the manifests in `dir`.
pub fn export(dir: &Path, space: &str, opts: &ExportOptions<'_>) -> Result<String, String> {
    let catalog = load_dir(dir).map_err(|errors| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let s = catalog
        .spaces
        .get(space)
        .ok_or_else(|| format!("no address space {space:?} in {}", dir.display()))?;
    let host = opts
        .host
        .map(str::to_owned)
        .or_else(|| s.hostnames.first().cloned())
        .unwrap_or_else(|| s.name.clone());
    let mut out = String::new();
    let _ = writeln!(out, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}-messaging\n  labels:\n    app: entrepot\n    addressSpace: {}\ndata:", s.name, s.name);
    let _ = writeln!(out, "  service.host: {}", yaml_string(&host));
    let _ = writeln!(out, "  service.port.amqp: \"{}\"", opts.amqp_port);
    if let Some(p) = opts.amqps_port {
        let _ = writeln!(out, "  service.port.amqps: \"{p}\"");
    }
    let addresses: Vec<&str> = s.addresses.keys().map(String::as_str).collect();
    let _ = writeln!(out, "  addresses: {}", yaml_string(&addresses.join(",")));
    if let Some(ca) = &opts.ca_pem {
        let _ = writeln!(out, "  ca.crt: |");
        for line in ca.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    Ok(out)
}

/// A YAML double-quoted scalar.
fn yaml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_example_space_with_its_certificate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let opts = ExportOptions {
            host: Some("messaging.example.com"),
            amqp_port: 5672,
            amqps_port: Some(5671),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
        };
        let text = export(&dir, "app", &opts).unwrap();
        assert!(text.contains("kind: ConfigMap"), "{text}");
        assert!(text.contains("name: app-messaging"), "{text}");
        assert!(
            text.contains("service.host: \"messaging.example.com\""),
            "{text}"
        );
        assert!(text.contains("service.port.amqps: \"5671\""), "{text}");
        assert!(text.contains("orders"), "{text}");
        assert!(text.contains("    -----BEGIN CERTIFICATE-----"), "{text}");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            parsed["data"]["service.port.amqp"],
            serde_yaml::Value::String("5672".into())
        );
        assert!(export(&dir, "nope", &opts)
            .unwrap_err()
            .contains("no address space"));
    }
}
