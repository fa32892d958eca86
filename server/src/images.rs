//! Image inputs of the OpenAI API: finding the image parts of a request, getting their bytes
//! (`data:` base64 URLs always; `http://` and `https://` URLs only with `--allow-image-urls`), decoding and
//! preprocessing them off the async runtime, and expanding the prompt's `<|image|>` placeholders.
//!
//! The chat template renders one `<|image|>` per image part; as transformers' `Gemma4Processor`
//! does, the k-th placeholder of the tokenized prompt becomes `<|image>` + n_k × `<|image|>` +
//! `<image|>`, n_k the soft tokens of image k under the request's budget.
//!
//! Fetching: hyper's HTTP/1.1 client (already in the tree through axum) over a TCP connection to an
//! address checked before connecting: hosts that resolve to loopback, private, link-local,
//! unspecified or other non-public addresses are refused; redirects are not followed; the whole
//! fetch has a timeout and the body a size limit. `https://` runs over rustls (ring), verifying
//! the server against Mozilla's roots (webpki-roots, compiled in) plus the operator's
//! `--image-ca-file`; the name checked is the URL's host, SNI included.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Request, StatusCode, Uri};
use base64::Engine as _;
use gemma4_model::vision::preprocess::{
    decode_image, preprocess, DecodeLimits, ImageProcessorConfig,
};
use gemma4_model::vision::PreprocessedImage;
use http_body_util::{BodyExt, Empty};
use tokio_rustls::rustls::{self, pki_types};

use crate::cpu::CpuPool;
use crate::openai::error::ApiError;

/// What the HTTP side knows of the checkpoint's vision side.
#[derive(Debug, Clone)]
pub struct VisionMeta {
    pub image_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    pub processor: ImageProcessorConfig,
    /// Patches per side the vision tower has positions for (`position_embedding_size`).
    pub max_patches_per_side: usize,
}

/// Default of `--limit-images-per-prompt`.
pub const DEFAULT_LIMIT_PER_PROMPT: usize = 8;
/// Default of `--image-fetch-timeout` (seconds).
pub const DEFAULT_FETCH_TIMEOUT_SECS: u64 = 10;

/// How image inputs are handled.
#[derive(Debug)]
pub struct ImageSettings {
    /// None: a text-only checkpoint (image requests are a 400).
    pub vision: Option<VisionMeta>,
    /// The image placeholder id of the config, even for a text-only checkpoint (a prompt that
    /// contains it without an image is refused).
    pub image_token_id: Option<u32>,
    /// Which http(s):// image URLs are fetched.
    pub urls: UrlPolicy,
    /// Let fetched URLs reach loopback and private addresses (tests only; no flag).
    pub allow_private_hosts: bool,
    /// Images per request (`--limit-images-per-prompt`).
    pub limit_per_prompt: usize,
    /// Whole-fetch timeout per image URL.
    pub fetch_timeout: Duration,
    /// Encoded size (bytes) and header dimensions (pixels) accepted, checked before decoding.
    pub decode: DecodeLimits,
    /// TLS client of https:// fetches (roots: webpki-roots, plus `--image-ca-file`).
    pub tls: Arc<rustls::ClientConfig>,
}

impl ImageSettings {
    pub fn new(
        vision: Option<VisionMeta>,
        image_token_id: Option<u32>,
        urls: UrlPolicy,
        limit_per_prompt: usize,
        fetch_timeout: Duration,
    ) -> Self {
        ImageSettings {
            vision,
            image_token_id,
            urls,
            allow_private_hosts: false,
            limit_per_prompt,
            fetch_timeout,
            decode: DecodeLimits::default(),
            tls: tls_config(&[])
                .unwrap_or_else(|e| unreachable!("the default TLS client config: {e}")),
        }
    }

    /// Also trusts the CA certificates of a PEM file (`--image-ca-file`): an internal image
    /// host, or a proxy that re-signs. Refused when the file has no certificate.
    pub fn add_ca_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        use pki_types::pem::PemObject as _;
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs = pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no CERTIFICATE block", path.display()));
        }
        self.tls = tls_config(&certs).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(())
    }
}

/// Which http(s):// image URLs are fetched: none (`--no-image-urls`), or those of public hosts,
/// restricted to some domains and their subdomains (`--allowed-media-domains`) when given.
#[derive(Debug, Clone)]
pub enum UrlPolicy {
    Refuse,
    Fetch { domains: Vec<String> },
}

impl UrlPolicy {
    pub fn new(fetch: bool, domains: &[String]) -> Result<Self, String> {
        let domains: Vec<String> = domains
            .iter()
            .map(|d| d.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        match (fetch, domains.is_empty()) {
            (false, false) => Err("cannot be combined with --no-image-urls".into()),
            (false, true) => Ok(UrlPolicy::Refuse),
            (true, _) => Ok(UrlPolicy::Fetch { domains }),
        }
    }

    /// Why `url` (http or https) is not fetched, if it is not.
    fn refuses(&self, url: &str) -> Option<String> {
        let domains = match self {
            UrlPolicy::Refuse => {
                return Some(
                    "image URLs are not fetched by this server (--no-image-urls): send the image inline as a data: URL (data:image/png;base64,...)".into(),
                )
            }
            UrlPolicy::Fetch { domains } if domains.is_empty() => return None,
            UrlPolicy::Fetch { domains } => domains,
        };
        let host = url.parse::<Uri>().ok().and_then(|u| {
            u.host()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        });
        match host {
            Some(h) if domains.iter().any(|d| h == *d || h.ends_with(&format!(".{d}"))) => None,
            Some(h) => Some(format!(
                "{h} is not among this server's allowed media domains ({}; --allowed-media-domains)",
                domains.join(", ")
            )),
            None => Some("invalid image URL: no host".into()),
        }
    }
}

/// rustls over ring, TLS 1.2 and 1.3, HTTP/1.1 by ALPN; Mozilla's roots plus `extra`.
fn tls_config(
    extra: &[pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for c in extra {
        roots
            .add(c.clone())
            .map_err(|e| format!("certificate refused as a root: {e}"))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// One image part of a request.
#[derive(Debug, Clone)]
pub struct ImageRef {
    /// Where it is in the request, for error messages: `messages[1].content[0]`.
    pub location: String,
    pub url: String,
}

/// Checks the request-level rules before any work: a vision tower, the per-prompt limit, and
/// the URL schemes the server takes.
pub fn check_refs(settings: &ImageSettings, refs: &[ImageRef]) -> Result<(), ApiError> {
    if refs.is_empty() {
        return Ok(());
    }
    if settings.vision.is_none() {
        return Err(ApiError::bad_request(format!(
            "{}: this model has no vision tower (a text-only checkpoint): image inputs are not supported",
            refs[0].location
        )));
    }
    if refs.len() > settings.limit_per_prompt {
        return Err(ApiError::bad_request(format!(
            "the request has {} images, more than this server's limit of {} per prompt (--limit-images-per-prompt)",
            refs.len(),
            settings.limit_per_prompt
        )));
    }
    for r in refs {
        let scheme = r
            .url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "data" => {}
            "http" | "https" => {
                if let Some(why) = settings.urls.refuses(&r.url) {
                    return Err(ApiError::bad_request(format!("{}: {why}", r.location)));
                }
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{}: unsupported image URL (expected data:image/...;base64,..., http://... or https://...)",
                    r.location
                )))
            }
        }
    }
    Ok(())
}

/// Fetches (http), decodes and preprocesses every image, in order; the decoding runs on the
/// request CPU pool (which also bounds the memory of decodes at once: width × height × 3 each).
pub async fn load(
    settings: &ImageSettings,
    cpu: &CpuPool,
    refs: Vec<ImageRef>,
    budget: usize,
) -> Result<Vec<Arc<PreprocessedImage>>, ApiError> {
    let Some(vision) = settings.vision.clone() else {
        return Err(ApiError::bad_request(
            "this model has no vision tower: image inputs are not supported",
        ));
    };
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let fetched = if r.url.len() >= 5 && r.url[..5].eq_ignore_ascii_case("data:") {
            None
        } else {
            let bytes = fetch(&r.url, settings).await.map_err(|e| {
                ApiError::bad_request(format!("{}: fetching {}: {e}", r.location, short(&r.url)))
            })?;
            Some(bytes)
        };
        let limits = settings.decode;
        let processor = vision.processor;
        let max_side = vision.max_patches_per_side;
        let location = r.location.clone();
        let decoded = cpu
            .run(move || {
            let bytes = match fetched {
                Some(b) => b,
                None => decode_data_url(&r.url)?,
            };
            let img = decode_image(&bytes, &limits).map_err(|e| e.to_string())?;
            drop(bytes);
            let p = preprocess(&img, &processor, budget).map_err(|e| e.to_string())?;
            if p.patches_w.max(p.patches_h) > max_side {
                return Err(format!(
                    "the image is {}x{} patches at this soft-token budget ({budget}), more than the vision tower's {max_side} per side: send a less elongated image or a smaller mm_processor_kwargs.max_soft_tokens",
                    p.patches_h, p.patches_w
                ));
            }
            Ok(p)
        })
            .await
            .map_err(|e| ApiError::internal(format!("{location}: {}", e.message)))?;
        match decoded {
            Ok(p) => out.push(Arc::new(p)),
            Err(e) => return Err(ApiError::bad_request(format!("{location}: {e}"))),
        }
    }
    Ok(out)
}

fn short(url: &str) -> String {
    if url.len() > 80 {
        let mut end = 80;
        while !url.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &url[..end])
    } else {
        url.to_string()
    }
}

/// The bytes of a `data:[<mediatype>][;params];base64,<data>` URL (whitespace in the data is
/// ignored, padding optional).
pub fn decode_data_url(url: &str) -> Result<Vec<u8>, String> {
    let rest = url.get(5..).ok_or("not a data: URL")?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or("malformed data: URL (no comma before the data)")?;
    if !meta
        .split(';')
        .any(|p| p.trim().eq_ignore_ascii_case("base64"))
    {
        return Err("data: URLs must be base64-encoded (data:image/png;base64,...)".into());
    }
    let media = meta.split(';').next().unwrap_or("").trim();
    if !media.is_empty()
        && !media.to_ascii_lowercase().starts_with("image/")
        && media != "application/octet-stream"
    {
        return Err(format!(
            "the data: URL has media type `{media}`, not an image"
        ));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        engine.decode(compact)
    } else {
        engine.decode(data)
    };
    decoded.map_err(|e| format!("invalid base64 in the data: URL: {e}"))
}

/// Replaces the k-th `image_token_id` of `ids` by `boi + counts[k] × image + eoi`.
pub fn expand_placeholders(ids: &[u32], vision: &VisionMeta, counts: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() + counts.iter().map(|n| n + 1).sum::<usize>());
    let mut k = 0;
    for &id in ids {
        if id == vision.image_token_id && k < counts.len() {
            out.push(vision.boi_token_id);
            out.extend(std::iter::repeat_n(vision.image_token_id, counts[k]));
            out.push(vision.eoi_token_id);
            k += 1;
        } else {
            out.push(id);
        }
    }
    out
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, unspecified,
/// shared, documentation, benchmarking, reserved, broadcast or multicast, nor one of those behind
/// an IPv4-mapped / NAT64 IPv6 address).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                // NAT64 well-known prefix 64:ff9b::/96
                return is_public_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from(0u128))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// GET of an http(s):// URL: address policy, no redirects, timeout, size limit.
async fn fetch(url: &str, settings: &ImageSettings) -> Result<Vec<u8>, String> {
    let timeout = settings.fetch_timeout;
    match tokio::time::timeout(timeout, fetch_inner(url, settings)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no complete answer within {} s",
            timeout.as_secs_f64()
        )),
    }
}

async fn fetch_inner(url: &str, settings: &ImageSettings) -> Result<Vec<u8>, String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("only http:// and https:// URLs are fetched".into()),
    };
    let authority = uri.authority().ok_or("the URL has no host")?.clone();
    if authority.as_str().contains('@') {
        return Err("URLs with credentials are not fetched".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} does not resolve"));
    }
    if !settings.allow_private_hosts {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(format!(
                "{host} resolves to {}, a loopback, private, link-local or otherwise non-public address: not fetched",
                bad.ip()
            ));
        }
    }
    // Connect to an address checked above (no second resolution).
    let mut last_err = String::new();
    let mut stream = None;
    for a in &addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = format!("connecting to {a}: {e}"),
        }
    }
    let stream = stream.ok_or(last_err)?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("gemma4/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::ACCEPT, "image/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = if https {
        let name = pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
        send(tls, req, settings).await?
    } else {
        send(stream, req, settings).await?
    };
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        return Err(format!("the server answered {status} (a redirect to {}); redirects are not followed: give the final URL", short(to)));
    }
    if status != StatusCode::OK {
        return Err(format!("the server answered {status}"));
    }
    let max = settings.decode.max_bytes;
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > max as u64) {
        return Err(format!(
            "the image is {n} bytes, more than the limit of {max} bytes"
        ));
    }
    let mut body = resp.into_body();
    let mut out = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > max {
                return Err(format!("the image is more than the limit of {max} bytes"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

/// One HTTP/1.1 request over an open connection (plain TCP or TLS).
async fn send<S>(
    stream: S,
    req: Request<Empty<Bytes>>,
    settings: &ImageSettings,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection task outlives the fetch's own timeout a little, so that a slow server is
    // reported as a timeout rather than as a dropped connection; then it is dropped too.
    let linger = settings.fetch_timeout + Duration::from_secs(5);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(linger, conn).await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_policy() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad}");
        }
        for good in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn data_urls() {
        assert_eq!(
            decode_data_url("data:image/png;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert_eq!(
            decode_data_url("data:image/png;base64,aGVsbG8").unwrap(),
            b"hello"
        );
        assert_eq!(
            decode_data_url("data:;base64,aGVs\nbG8=").unwrap(),
            b"hello"
        );
        assert!(decode_data_url("data:image/png;base64,***")
            .unwrap_err()
            .contains("base64"));
        assert!(decode_data_url("data:image/png,hello")
            .unwrap_err()
            .contains("base64"));
        assert!(decode_data_url("data:text/plain;base64,aGVsbG8=")
            .unwrap_err()
            .contains("not an image"));
    }

    #[test]
    fn url_policy() {
        let domains = |d: &[&str]| {
            UrlPolicy::new(true, &d.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let any = domains(&[]);
        assert_eq!(any.refuses("https://example.com/a.png"), None);
        let some = domains(&["Example.com", ".cdn.org"]);
        for ok in [
            "https://example.com/a.png",
            "http://img.example.com:8080/a.png",
            "https://EXAMPLE.COM./a",
            "https://x.cdn.org/a",
        ] {
            assert_eq!(some.refuses(ok), None, "{ok}");
        }
        for no in [
            "https://badexample.com/a.png",
            "https://example.com.evil.net/a",
            "https://cdn.org.evil/a",
            "http://1.2.3.4/a",
        ] {
            let why = some.refuses(no).unwrap();
            assert!(why.contains("allowed media domains"), "{no}: {why}");
        }
        let off = UrlPolicy::new(false, &[]).unwrap();
        assert!(off
            .refuses("https://example.com/a")
            .unwrap()
            .contains("--no-image-urls"));
        assert!(UrlPolicy::new(false, &["example.com".into()]).is_err());
    }

    #[test]
    fn expansion() {
        let v = VisionMeta {
            image_token_id: 7,
            boi_token_id: 8,
            eoi_token_id: 9,
            processor: ImageProcessorConfig::default(),
            max_patches_per_side: 64,
        };
        assert_eq!(
            expand_placeholders(&[1, 7, 2, 7], &v, &[2, 1]),
            vec![1, 8, 7, 7, 9, 2, 8, 7, 9]
        );
    }

    #[tokio::test]
    async fn loopback_urls_are_refused() {
        let s = ImageSettings::new(
            None,
            None,
            UrlPolicy::Fetch { domains: vec![] },
            8,
            Duration::from_secs(2),
        );
        let e = fetch("http://127.0.0.1:9/x.png", &s).await.unwrap_err();
        assert!(e.contains("non-public"), "{e}");
        let e = fetch("http://localhost:9/x.png", &s).await.unwrap_err();
        assert!(e.contains("non-public"), "{e}");
        let e = fetch("http://[::1]:9/x.png", &s).await.unwrap_err();
        assert!(e.contains("non-public"), "{e}");
        let e = fetch("https://127.0.0.1:9/x.png", &s).await.unwrap_err();
        assert!(e.contains("non-public"), "{e}");
    }
}
