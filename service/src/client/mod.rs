//! The HTTPS client behind `cella scan`, `cella session …`, `cella pack …`, `cella tenant …`, `cella key …` and `cella admin …`:
//! where the server is, which CA to trust and which credential to send, and problem documents
//! turned back into readable errors.

pub mod admin;
pub mod baseline;
pub mod history;
pub mod ignore;
pub mod pack;
pub mod report;
pub mod scan;
pub mod session;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::data_dir::DataDir;
use crate::tls;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no server given: pass --server URL or set CELLA_URL (none is running with data folder {0})")]
    NoServer(PathBuf),
    #[error("no API key: set CELLA_API_KEY to the key `cella tenant create` printed")]
    NoApiKey,
    #[error("no admin credential: set CELLA_ADMIN_KEY, or pass --data-dir of the server ({0} is missing)")]
    NoAdminKey(PathBuf),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the CA file {0} holds no usable PEM certificate")]
    BadCa(PathBuf, #[source] reqwest::Error),
    #[error("cannot reach {0}")]
    Http(String, #[source] reqwest::Error),
    #[error("{status}: {detail}")]
    Api { status: StatusCode, detail: String },
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("the download broke off after {0} bytes (the server may have failed mid-export); nothing was kept: try again")]
    Interrupted(u64, #[source] reqwest::Error),
    #[error("{0}")]
    BadCredential(String),
    /// A bad command-line value the client found before sending anything.
    #[error("{0}")]
    Usage(String),
    /// `--wait-secs` ran out while the job was still queued or running (it goes on).
    #[error("{0}")]
    StillRunning(String),
    /// The server's certificate is not one this client trusts.
    #[error(
        "cannot reach {0}: its certificate is not signed by a CA this client trusts; pass --ca FILE \
             (or set CELLA_CA) with the server's CA, e.g. the server's <data dir>/tls/ca.pem"
    )]
    UntrustedServer(String, #[source] reqwest::Error),
    /// A pack file that does not pass validation (`cella pack test`): where and what.
    #[error("{}: the pack is refused: {problem}", path.display())]
    Pack { path: PathBuf, problem: cella_policies::rules::tenant::PackError },
    /// A local scan (`cella pack test`) did not run to its end.
    #[error("{0}")]
    ScanFailed(String),
    #[error("{0}")]
    Other(String),
}

/// Server, CA and data folder options shared by the client commands.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server's URL [env: CELLA_URL] [default: the one `cella serve` with --data-dir runs]
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// An extra CA certificate (PEM) to trust [env: CELLA_CA] [default: the data folder's CA]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The server's data folder, on the server's host: finds its URL, CA and admin credential
    /// [env: CELLA_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// An API client with one credential.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Connection {
    fn data_dir(&self) -> DataDir {
        DataDir::resolve(self.data_dir.clone())
    }

    fn base_url(&self) -> Result<String, ClientError> {
        if let Some(url) =
            self.server.clone().or_else(|| std::env::var("CELLA_URL").ok()).filter(|u| !u.is_empty())
        {
            return checked_url(&url);
        }
        let dir = self.data_dir();
        std::fs::read_to_string(dir.url_file())
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .map_err(|_| ClientError::NoServer(dir.root().to_owned()))
    }

    fn http(&self) -> Result<reqwest::Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cella/", env!("CARGO_PKG_VERSION")));
        let ca = self.ca.clone().or_else(|| std::env::var_os("CELLA_CA").map(PathBuf::from)).or_else(|| {
            let local = tls::local_ca_path(self.data_dir().root());
            local.exists().then_some(local)
        });
        if let Some(ca) = ca {
            let pem = std::fs::read(&ca).map_err(|e| ClientError::Read(ca.clone(), e))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ClientError::BadCa(ca.clone(), e))?;
            builder = builder.add_root_certificate(cert);
        }
        builder.build().map_err(|e| ClientError::Http("the TLS client".into(), e))
    }

    /// A client with the tenant's API key (`CELLA_API_KEY`).
    pub fn tenant(&self) -> Result<ApiClient, ClientError> {
        let token = std::env::var("CELLA_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
            .ok_or(ClientError::NoApiKey)?;
        Ok(ApiClient {
            http: self.http()?,
            base: self.base_url()?,
            token: checked_token("CELLA_API_KEY", &token)?,
        })
    }

    /// A client with the operator credential (`CELLA_ADMIN_KEY`, or the data folder's).
    pub fn admin(&self) -> Result<ApiClient, ClientError> {
        let token = match std::env::var("CELLA_ADMIN_KEY").ok().filter(|k| !k.is_empty()) {
            Some(t) => t,
            None => {
                let path = self.data_dir().admin_key_file();
                std::fs::read_to_string(&path).map_err(|_| ClientError::NoAdminKey(path))?.trim().to_owned()
            }
        };
        Ok(ApiClient {
            http: self.http()?,
            base: self.base_url()?,
            token: checked_token("the admin credential", &token)?,
        })
    }
}

/// A server URL as the client can use it: `https://` (or `http://`, which `cella serve` never
/// speaks: see [`request_error`]), no trailing slash.
fn checked_url(url: &str) -> Result<String, ClientError> {
    let url = url.trim().trim_end_matches('/');
    if !url.starts_with("https://") && !url.starts_with("http://") {
        return Err(ClientError::Usage(format!(
            "{url} is not a server URL: give one like https://host:8443"
        )));
    }
    Ok(url.to_owned())
}

/// The error for a request to `base` that failed before any answer: an untrusted certificate
/// says what to do about it.
fn request_error(base: &str, e: reqwest::Error) -> ClientError {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    let (mut untrusted, mut not_http) = (false, false);
    while let Some(err) = source {
        let text = err.to_string();
        untrusted |= text.contains("UnknownIssuer") || text.contains("invalid peer certificate");
        not_http |= text.contains("invalid HTTP version") || text.contains("HTTP/0.9");
        source = err.source();
    }
    if untrusted {
        return ClientError::UntrustedServer(base.to_owned(), e);
    }
    // Plain HTTP sent to a TLS server: its answer is a TLS alert, not an HTTP response.
    if let Some(rest) = base.strip_prefix("http://").filter(|_| not_http) {
        return ClientError::Usage(format!(
            "{base} did not answer in HTTP: Cella serves HTTPS only; use https://{rest} (with --ca or CELLA_CA for its CA)"
        ));
    }
    ClientError::Http(base.to_owned(), e)
}

/// A credential as it can go into a header: trimmed, visible ASCII only.
fn checked_token(what: &str, token: &str) -> Result<String, ClientError> {
    let token = token.trim();
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_owned())
    } else {
        Err(ClientError::BadCredential(format!(
            "{what} contains spaces, line breaks or other characters no key has: set it to the key alone"
        )))
    }
}

impl ApiClient {
    /// A client for `base` with `token`, trusting `ca` (PEM) in addition to the system's roots.
    pub fn new(base: &str, token: &str, ca: Option<&[u8]>) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        if let Some(pem) = ca {
            let cert =
                reqwest::Certificate::from_pem(pem).map_err(|e| ClientError::BadCa("(given)".into(), e))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| ClientError::Http("the TLS client".into(), e))?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token: token.to_owned() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    /// Sends, and turns a non-2xx answer into [`ClientError::Api`] with the problem's detail.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|e| request_error(&self.base, e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or(body);
        Err(ClientError::Api { status, detail })
    }

    /// GET/POST returning JSON.
    pub async fn json(&self, method: Method, path: &str) -> Result<Value, ClientError> {
        let response = self.send(self.request(method, path)).await?;
        response.json().await.map_err(|e| ClientError::Http(self.base.clone(), e))
    }

    /// POST a JSON body, returning JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send_json(Method::POST, path, body).await
    }

    /// Send a JSON body with `method`, returning JSON.
    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> Result<Value, ClientError> {
        let response = self.send(self.request(method, path).json(body)).await?;
        response.json().await.map_err(|e| ClientError::Http(self.base.clone(), e))
    }

    /// GET raw bytes.
    pub async fn bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let response = self.send(self.request(Method::GET, path)).await?;
        Ok(response.bytes().await.map_err(|e| ClientError::Http(self.base.clone(), e))?.to_vec())
    }
}
