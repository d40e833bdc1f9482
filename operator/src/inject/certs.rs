//! The webhook's serving certificate and the CA the API server trusts it by.
//!
//! Managed mode (the default): the operator keeps a CA and a serving certificate in one
//! Secret of its namespace, shared by every replica, and keeps the `caBundle` of its
//! `MutatingWebhookConfiguration` equal to the Secret's bundle. [`renew`] decides, as a pure
//! function of the Secret and the clock, whether anything must be issued: the serving
//! certificate is reissued when a third of its lifetime is left (or its names changed), the
//! CA likewise; a new CA is put first in the bundle and the old one stays in it until it
//! expires, so certificates of either are trusted during the change. Replicas that race to
//! write the Secret are ordered by its resourceVersion: the loser reads the winner's.
//!
//! File mode (`--webhook-cert-dir`, e.g. a cert-manager Certificate's Secret mounted as a
//! volume): the operator only reads `tls.crt` and `tls.key` and reloads them when they change;
//! cert-manager's CA injector keeps the `caBundle`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Report, Result};

/// Keys of the managed Secret (the first two as in a `kubernetes.io/tls` Secret).
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
/// The CAs the API server must trust: the current one first.
pub const BUNDLE_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub cert: Duration,
}

impl Default for Lifetimes {
    /// Ten years for the CA, 90 days for the serving certificate.
    fn default() -> Self {
        Lifetimes { ca: Duration::from_secs(10 * 365 * 86_400), cert: Duration::from_secs(90 * 86_400) }
    }
}

/// What the managed Secret holds, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Material {
    /// The keys are secrets: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("bundle", &self.bundle)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl Material {
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| data.get(key).and_then(|bytes| String::from_utf8(bytes.0.clone()).ok());
        Some(Material {
            bundle: text(BUNDLE_KEY)?,
            ca_key: text(CA_KEY_KEY)?,
            cert: text(CERT_KEY)?,
            key: text(KEY_KEY)?,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        [(BUNDLE_KEY, &self.bundle), (CA_KEY_KEY, &self.ca_key), (CERT_KEY, &self.cert), (KEY_KEY, &self.key)]
            .into_iter()
            .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
            .collect()
    }
}

/// One certificate's facts, read back from its PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    not_before: i64,
    not_after: i64,
    dns_names: Vec<String>,
}

fn certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(std::result::Result::ok).collect()
}

fn facts(der: &CertificateDer<'_>) -> Option<Facts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = cert.validity();
    let mut dns_names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => ip_text(ip),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    dns_names.sort();
    Some(Facts {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        dns_names,
    })
}

/// An IP address SAN as text (rcgen issues a name that parses as an address as one).
fn ip_text(bytes: &[u8]) -> Option<String> {
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(ip.to_string())
}

/// Issued certificates start a little in the past, for API servers whose clock is behind
/// ours: a tenth of the lifetime, at most a minute.
fn backdate(lifetime: Duration) -> i64 {
    (secs(lifetime) / 10).min(60)
}

/// Whether a certificate valid from `facts.not_before` to `facts.not_after` must be replaced
/// at `now`: when less than a third of its lifetime is left.
fn due(facts: &Facts, now: i64) -> bool {
    let lifetime = facts.not_after - facts.not_before;
    facts.not_after - now < lifetime / 3
}

fn time_at(unix: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|err| Error::Certificate(err.to_string()))
}

fn rcgen_error(err: rcgen::Error) -> Error {
    Error::Certificate(err.to_string())
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 4)
}

/// A new CA: its certificate and key, as PEM.
fn new_ca(now: i64, lifetime: Duration) -> Result<(String, KeyPair)> {
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, format!("breakwater-webhook-ca-{now}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = time_at(now - backdate(lifetime))?;
    params.not_after = time_at(now + secs(lifetime))?;
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    Ok((cert.pem(), key))
}

/// A serving certificate for `dns_names`, signed by the CA whose PEM and key are given.
fn new_cert(
    now: i64,
    lifetime: Duration,
    dns_names: &[String],
    ca_pem: &str,
    ca_key: &KeyPair,
) -> Result<(String, String)> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(rcgen_error)?;
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(rcgen_error)?;
    params.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    params.not_before = time_at(now - backdate(lifetime))?;
    params.not_after = time_at(now + secs(lifetime))?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What must be in the Secret at `now` (unix seconds), or None when what is there serves:
/// the CA and the serving certificate each renewed with a third of their lifetime left,
/// the serving certificate also when its names differ from `dns_names` or it is unreadable.
pub fn renew(
    current: Option<&Material>,
    now: i64,
    lifetimes: Lifetimes,
    dns_names: &[String],
) -> Result<Option<Material>> {
    let mut wanted: Vec<String> = dns_names.to_vec();
    wanted.sort();
    let readable = current.and_then(|material| {
        let cas = certificates(&material.bundle);
        let ca = facts(cas.first()?)?;
        let key = KeyPair::from_pem(&material.ca_key).ok()?;
        Some((material, cas, ca, key))
    });
    let Some((material, cas, ca, ca_key)) = readable else {
        let (ca_pem, ca_key) = new_ca(now, lifetimes.ca)?;
        let (cert, key) = new_cert(now, lifetimes.cert, dns_names, &ca_pem, &ca_key)?;
        return Ok(Some(Material { bundle: ca_pem, ca_key: ca_key.serialize_pem(), cert, key }));
    };
    if due(&ca, now) {
        let (ca_pem, new_key) = new_ca(now, lifetimes.ca)?;
        let (cert, key) = new_cert(now, lifetimes.cert, dns_names, &ca_pem, &new_key)?;
        // The old CAs stay trusted until they expire: certificates they signed are still
        // being served by replicas that have not reloaded yet.
        let mut bundle = ca_pem;
        for old in &cas {
            if facts(old).is_some_and(|old| old.not_after > now) {
                bundle.push_str(&pem_of(old));
            }
        }
        return Ok(Some(Material { bundle, ca_key: new_key.serialize_pem(), cert, key }));
    }
    let serving = certificates(&material.cert).first().and_then(facts);
    let fresh = serving.is_some_and(|serving| !due(&serving, now) && serving.dns_names == wanted)
        && certified_key(&material.cert, &material.key).is_ok();
    if fresh {
        return Ok(None);
    }
    let ca_pem = pem_of(&cas[0]);
    let (cert, key) = new_cert(now, lifetimes.cert, dns_names, &ca_pem, &ca_key)?;
    Ok(Some(Material { cert, key, ..material.clone() }))
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

/// The certificate chain and key as rustls serves them.
pub fn certified_key(cert: &str, key: &str) -> Result<CertifiedKey> {
    let chain = certificates(cert);
    if chain.is_empty() {
        return Err(Error::Certificate("no certificate in the PEM".to_string()));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|err| Error::Certificate(format!("private key: {err}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| Error::Certificate(err.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|err| Error::Certificate(format!("the key does not match the certificate: {err}")))?;
    Ok(certified)
}

/// The certificate the TLS listener presents, swapped in place when it is renewed.
#[derive(Debug, Default)]
pub struct Resolver {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl Resolver {
    /// Serves `cert`/`key` from now on; a no-op when they are what is served already.
    pub fn set(&self, cert: &str, key: &str) -> Result<bool> {
        if self.current.read().map(|c| c.as_ref().is_some_and(|(pem, _)| pem == cert)).unwrap_or(false) {
            return Ok(false);
        }
        let certified = Arc::new(certified_key(cert, key)?);
        if let Ok(mut current) = self.current.write() {
            *current = Some((cert.to_string(), certified));
        }
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok()?.as_ref().map(|(_, key)| key.clone())
    }
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The operator issues it into `secret` (in `namespace`) and keeps the `caBundle` of
    /// the MutatingWebhookConfiguration `configuration` current.
    Managed {
        namespace: String,
        secret: String,
        configuration: String,
        dns_names: Vec<String>,
        lifetimes: Lifetimes,
    },
    /// `tls.crt` and `tls.key` in this directory, kept by someone else (cert-manager).
    Files(PathBuf),
}

/// Keeps `resolver` serving a valid certificate from `source`, checking every `every`,
/// until `stop`. Failures are logged and retried at the next check; the listener keeps the
/// certificate it has.
pub async fn keep(
    client: kube::Client,
    source: Source,
    resolver: Arc<Resolver>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        let outcome = match &source {
            Source::Managed { namespace, secret, configuration, dns_names, lifetimes } => {
                let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
                let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
                manage(&secrets, secret, &webhooks, configuration, dns_names, *lifetimes, &resolver).await
            }
            Source::Files(dir) => load_files(dir, &resolver),
        };
        if let Err(err) = outcome {
            tracing::warn!(error = %Report(&err), "webhook certificate not refreshed; retrying");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

fn load_files(dir: &Path, resolver: &Resolver) -> Result<()> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
    };
    if resolver.set(&read(CERT_KEY)?, &read(KEY_KEY)?)? {
        tracing::info!(dir = %dir.display(), "webhook certificate loaded");
    }
    Ok(())
}

async fn manage(
    secrets: &Api<Secret>,
    name: &str,
    webhooks: &Api<MutatingWebhookConfiguration>,
    configuration: &str,
    dns_names: &[String],
    lifetimes: Lifetimes,
    resolver: &Resolver,
) -> Result<()> {
    let stored = secrets.get_opt(name).await?;
    let current = stored.as_ref().and_then(Material::from_secret);
    let now = jiff::Timestamp::now().as_second();
    let material = match (renew(current.as_ref(), now, lifetimes, dns_names)?, current) {
        (None, Some(current)) => current,
        // `renew` issues whenever nothing usable is stored.
        (None, None) => return Err(Error::Certificate("nothing stored and nothing issued".to_string())),
        (Some(fresh), _) => {
            let mut secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_string()),
                    resource_version: stored.as_ref().and_then(|s| s.metadata.resource_version.clone()),
                    labels: Some(
                        [("app.kubernetes.io/managed-by".to_string(), "breakwater-operator".to_string())]
                            .into(),
                    ),
                    ..Default::default()
                },
                type_: Some("Opaque".to_string()),
                data: Some(fresh.to_data()),
                ..Default::default()
            };
            // A write that lost a race (409) is retried from the winner's Secret.
            let written = match &stored {
                None => secrets.create(&PostParams::default(), &secret).await,
                Some(_) => secrets.replace(name, &PostParams::default(), &secret).await,
            };
            match written {
                Ok(saved) => secret = saved,
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(secret = name, "another replica renewed the webhook certificate first");
                    return Box::pin(manage(
                        secrets,
                        name,
                        webhooks,
                        configuration,
                        dns_names,
                        lifetimes,
                        resolver,
                    ))
                    .await;
                }
                Err(err) => return Err(err.into()),
            }
            tracing::info!(secret = name, "webhook certificate issued");
            Material::from_secret(&secret).unwrap_or(fresh)
        }
    };
    ensure_bundle(webhooks, configuration, &material.bundle).await?;
    if resolver.set(&material.cert, &material.key)? {
        tracing::info!(secret = name, "webhook certificate loaded");
    }
    Ok(())
}

/// Sets the `caBundle` of every webhook of `configuration` to `bundle`, when it differs.
async fn ensure_bundle(
    webhooks: &Api<MutatingWebhookConfiguration>,
    configuration: &str,
    bundle: &str,
) -> Result<()> {
    let Some(current) = webhooks.get_opt(configuration).await? else {
        return Err(Error::Certificate(format!(
            "no MutatingWebhookConfiguration {configuration:?} to give the CA to"
        )));
    };
    let stale: Vec<&str> = current
        .webhooks
        .iter()
        .flatten()
        .filter(|hook| {
            hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes())
        })
        .map(|hook| hook.name.as_str())
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    // Strategic merge: `webhooks` merges by name, so only caBundle changes.
    let encoded = ByteString(bundle.as_bytes().to_vec());
    let patch = serde_json::json!({
        "webhooks": stale.iter().map(|name| serde_json::json!({"name": name, "clientConfig": {"caBundle": encoded}})).collect::<Vec<_>>(),
    });
    webhooks.patch(configuration, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    tracing::info!(configuration, webhooks = stale.len(), "webhook caBundle updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn names() -> Vec<String> {
        vec!["breakwater.breakwater-system.svc".to_string()]
    }

    fn issued(now: i64) -> Material {
        renew(None, now, Lifetimes::default(), &names()).expect("issues").expect("something to issue")
    }

    #[test]
    fn nothing_stored_issues_a_ca_and_a_certificate_that_load() {
        let material = issued(1_800_000_000);
        assert_eq!(certificates(&material.bundle).len(), 1);
        certified_key(&material.cert, &material.key).expect("key matches certificate");
        let serving = facts(&certificates(&material.cert)[0]).expect("readable");
        assert_eq!(serving.dns_names, names());
        assert_eq!(serving.not_after - 1_800_000_000, 90 * DAY);
    }

    #[test]
    fn a_fresh_certificate_is_kept() {
        let now = 1_800_000_000;
        let material = issued(now);
        assert_eq!(renew(Some(&material), now + 30 * DAY, Lifetimes::default(), &names()).expect("ok"), None);
    }

    #[test]
    fn the_certificate_is_reissued_with_a_third_left_by_the_same_ca() {
        let now = 1_800_000_000;
        let material = issued(now);
        let later = now + 61 * DAY;
        let renewed =
            renew(Some(&material), later, Lifetimes::default(), &names()).expect("ok").expect("due");
        assert_eq!(renewed.bundle, material.bundle);
        assert_ne!(renewed.cert, material.cert);
        let serving = facts(&certificates(&renewed.cert)[0]).expect("readable");
        assert_eq!(serving.not_after, later + 90 * DAY);
    }

    #[test]
    fn ip_addresses_are_names_too() {
        let names = vec!["127.0.0.1".to_string(), "breakwater.breakwater-system.svc".to_string()];
        let material = renew(None, 1_800_000_000, Lifetimes::default(), &names).expect("ok").expect("issued");
        assert_eq!(facts(&certificates(&material.cert)[0]).expect("readable").dns_names, names);
        assert_eq!(renew(Some(&material), 1_800_000_000, Lifetimes::default(), &names).expect("ok"), None);
    }

    #[test]
    fn changed_names_reissue_the_certificate() {
        let material = issued(1_800_000_000);
        let other = vec!["breakwater.other.svc".to_string()];
        let renewed =
            renew(Some(&material), 1_800_000_000, Lifetimes::default(), &other).expect("ok").expect("due");
        assert_eq!(facts(&certificates(&renewed.cert)[0]).expect("readable").dns_names, other);
    }

    #[test]
    fn a_new_ca_keeps_the_old_one_in_the_bundle_until_it_expires() {
        let short = Lifetimes {
            ca: Duration::from_secs(300 * DAY as u64),
            cert: Duration::from_secs(30 * DAY as u64),
        };
        let now = 1_800_000_000;
        let material = renew(None, now, short, &names()).expect("ok").expect("issued");
        let later = now + 201 * DAY;
        let renewed = renew(Some(&material), later, short, &names()).expect("ok").expect("CA due");
        let bundle = certificates(&renewed.bundle);
        assert_eq!(bundle.len(), 2, "new CA first, old CA kept");
        assert_eq!(pem_of(&bundle[1]), material.bundle);
        // Once the old CA has expired, the next renewal drops it.
        let much_later = now + 301 * DAY;
        let again = renew(Some(&renewed), much_later + 200 * DAY, short, &names()).expect("ok").expect("due");
        assert!(
            certificates(&again.bundle).iter().all(|ca| facts(ca).expect("readable").not_after > much_later)
        );
    }

    #[test]
    fn garbage_is_replaced() {
        let garbage = Material { bundle: "x".into(), ca_key: "y".into(), cert: "z".into(), key: "w".into() };
        let renewed = renew(Some(&garbage), 1_800_000_000, Lifetimes::default(), &names())
            .expect("ok")
            .expect("issued");
        certified_key(&renewed.cert, &renewed.key).expect("usable");
    }

    #[test]
    fn debug_never_prints_a_key() {
        let material = issued(1_800_000_000);
        let printed = format!("{material:?}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    }
}
