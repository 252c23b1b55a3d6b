//! What a reconcile can fail with (it is retried).

/// Errors of one reconciliation; they are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing the gateway's xDS certificate: {0}")]
    Certificate(String),
}

impl Error {
    /// A short label for metrics: the API status reason (`Conflict`, `Forbidden`...) or the kind of
    /// failure.
    pub fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) if !s.reason.is_empty() => s.reason.clone(),
            Error::Kube(kube::Error::Api(s)) => format!("HTTP{}", s.code),
            Error::Kube(_) => "Transport".into(),
            Error::Certificate(_) => "Certificate".into(),
        }
    }
}
