//! Modules pinned by URL: downloads them, verifies their digest before
//! anything uses them, and keeps them in the download cache (one file per
//! digest, written to a temporary file, fsynced and renamed into place), so
//! later starts need no network. `engine` asks for bytes only when it has no
//! compiled module for the digest (memory → compiled cache → here).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{Digest, EngineSettings};

/// How many redirects a download may follow (each one checked like the URL).
const MAX_REDIRECTS: usize = 5;

/// Where the bytes of a module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Read from the module file of the config.
    File,
    /// A verified copy kept by an earlier download.
    DownloadCache,
    /// Downloaded now.
    Network,
}

impl std::fmt::Display for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fetched::File => "file",
            Fetched::DownloadCache => "download cache",
            Fetched::Network => "network",
        })
    }
}

/// Why a module could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot download {url}: {message}")]
    Download { url: String, message: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} is larger than engine.max_module_mb allows ({limit} bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error(
        "{url} has digest {actual}, but the config pins {expected}; the download was refused and nothing was kept"
    )]
    DigestMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
}

/// Downloads pinned modules through the download cache. Cheap to share.
pub struct Fetcher {
    download_dir: Option<PathBuf>,
    allow_insecure_http: bool,
    timeout: Duration,
    max_bytes: u64,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl Fetcher {
    pub fn new(settings: &EngineSettings) -> Fetcher {
        Fetcher {
            download_dir: settings.download_dir.clone(),
            allow_insecure_http: settings.allow_insecure_http,
            timeout: settings.fetch_timeout,
            max_bytes: settings.max_module_bytes,
            client: OnceLock::new(),
        }
    }

    pub fn download_dir(&self) -> Option<&Path> {
        self.download_dir.as_deref()
    }

    /// The module at `url` whose digest is `expected`: from the download cache
    /// when an intact copy is there, else from the network (kept for next time).
    /// Bytes that do not match `expected` are never returned nor kept.
    pub async fn fetch(
        &self,
        url: &str,
        expected: Digest,
    ) -> Result<(Vec<u8>, Fetched), FetchError> {
        if let Some(bytes) = self.cached(expected).await {
            return Ok((bytes, Fetched::DownloadCache));
        }
        let bytes = self.download(url).await?;
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(FetchError::DigestMismatch {
                url: url.to_owned(),
                expected,
                actual,
            });
        }
        if let Some(dir) = self.download_dir.clone() {
            let kept = bytes.clone();
            let stored = tokio::task::spawn_blocking(move || store(&dir, &expected, &kept)).await;
            match stored {
                Ok(Ok(path)) => {
                    tracing::info!(url, digest = %expected, path = %path.display(), "module downloaded and kept")
                }
                Ok(Err(e)) => {
                    tracing::warn!(url, digest = %expected, error = %e, "module downloaded but cannot be kept in the download cache; the next start downloads it again")
                }
                Err(e) => tracing::warn!(url, error = %e, "download cache task failed"),
            }
        }
        Ok((bytes, Fetched::Network))
    }

    /// An intact cached copy of `digest`; a copy that fails its digest is removed.
    async fn cached(&self, digest: Digest) -> Option<Vec<u8>> {
        let path = entry_path(self.download_dir.as_deref()?, &digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "download cache entry unreadable; downloading again");
                return None;
            }
        };
        if Digest::of(&bytes) == digest {
            return Some(bytes);
        }
        tracing::warn!(path = %path.display(), "download cache entry does not match its digest; removing it and downloading again");
        let _ = tokio::fs::remove_file(&path).await;
        None
    }

    fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_init(|| {
                crate::install_tls_provider();
                let allow_insecure = self.allow_insecure_http;
                let redirects = reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() > MAX_REDIRECTS {
                        attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
                    } else if permitted(attempt.url(), allow_insecure) {
                        attempt.follow()
                    } else {
                        let refused = format!(
                            "redirect to {} refused: modules are fetched over https:// (or http:// to loopback with engine.allow_insecure_http)",
                            attempt.url()
                        );
                        attempt.error(refused)
                    }
                });
                reqwest::Client::builder()
                    .timeout(self.timeout)
                    .redirect(redirects)
                    .no_proxy()
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    async fn download(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let failed = |message: String| FetchError::Download {
            url: url.to_owned(),
            message,
        };
        let client = self.client().map_err(failed)?;
        let mut response = client
            .get(url)
            .send()
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.to_owned(),
            limit: self.max_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| failed(error_chain(&e)))?
        {
            if (bytes.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// Whether a module may be fetched from `url` (also checked for each redirect).
fn permitted(url: &reqwest::Url, allow_insecure_http: bool) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => {
            allow_insecure_http
                && match url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    None => false,
                }
        }
        _ => false,
    }
}

fn entry_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(format!("{}.wasm", digest.hex()))
}

/// Writes verified bytes as the cache entry of `digest`: a temporary file in
/// the same directory, fsynced, then renamed, so a reader sees the whole
/// entry or none.
fn store(dir: &Path, digest: &Digest, bytes: &[u8]) -> std::io::Result<PathBuf> {
    // Private like the compiled cache, though every read is re-verified
    // against the pinned digest, so a planted file is never used.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)?;
    let path = entry_path(dir, digest);
    let mut tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    // The rename itself is durable once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// The error and its causes on one line (reqwest and aya hide the cause
/// otherwise).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_allowed_loopback_http_is_permitted() {
        let url = |u: &str| reqwest::Url::parse(u).expect("url");
        assert!(permitted(&url("https://example.com/m.wasm"), false));
        assert!(!permitted(&url("http://127.0.0.1:8080/m.wasm"), false));
        assert!(permitted(&url("http://127.0.0.1:8080/m.wasm"), true));
        assert!(permitted(&url("http://[::1]:8080/m.wasm"), true));
        assert!(permitted(&url("http://localhost/m.wasm"), true));
        assert!(!permitted(&url("http://example.com/m.wasm"), true));
        assert!(!permitted(&url("ftp://127.0.0.1/m.wasm"), true));
    }

    #[test]
    fn stored_entries_are_whole_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = b"\0asm module bytes";
        let digest = Digest::of(bytes);
        let path = store(dir.path(), &digest, bytes).expect("store");
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(format!("{}.wasm", digest.hex()))]
        );
    }
}
