//! The one place that turns a hub address into a tonic endpoint, so that the
//! subscriber, the publisher and `freshctl` connect the same way.

use std::time::Duration;

use tonic::transport::Endpoint;

/// A hub address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hub address {url:?}: {reason}")]
pub struct InvalidAddress {
    /// The address as given.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Builds the endpoint of a hub at `url` (`http://host:port`; a bare
/// `host:port` gets `http://`).
///
/// HTTP/2 keepalive pings detect a connection that died without a FIN (a
/// crashed machine, a dropped route) within seconds instead of the kernel's
/// minutes.
pub(crate) fn endpoint(url: &str, connect_timeout: Duration) -> Result<Endpoint, InvalidAddress> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let invalid = |reason: String| InvalidAddress {
        url: url.to_owned(),
        reason,
    };
    if !full.starts_with("http://") && !full.starts_with("https://") {
        return Err(invalid("the scheme must be http or https".into()));
    }
    let endpoint = Endpoint::from_shared(full).map_err(|e| invalid(e.to_string()))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// The endpoints of a list of hubs (the replicas of one region) given as
/// one comma-separated string, `http://a:50051,http://b:50051`, in order,
/// each with its address as given.
pub(crate) fn endpoints(
    urls: &str,
    connect_timeout: Duration,
) -> Result<Vec<(String, Endpoint)>, InvalidAddress> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(InvalidAddress {
            url: urls.to_owned(),
            reason: "no hub address".into(),
        });
    }
    list.into_iter()
        .map(|u| Ok((u.to_owned(), endpoint(u, connect_timeout)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_urls_and_bare_addresses() {
        let t = Duration::from_secs(1);
        assert_eq!(
            endpoint("http://127.0.0.1:50051", t)
                .unwrap()
                .uri()
                .port_u16(),
            Some(50051)
        );
        assert_eq!(
            endpoint("localhost:7", t).unwrap().uri().to_string(),
            "http://localhost:7/"
        );
        assert!(endpoint("ftp://x:1", t).is_err());
        assert!(endpoint("http://", t).is_err());
        assert!(endpoint("http://exa mple:1", t).is_err());
    }

    #[test]
    fn a_list_of_hubs_is_comma_separated() {
        let t = Duration::from_secs(1);
        let list = endpoints("http://a:1, b:2,", t).unwrap();
        let urls: Vec<&str> = list.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(urls, ["http://a:1", "b:2"]);
        assert!(endpoints(" , ", t).is_err());
        let bad = endpoints("http://a:1,ftp://b:2", t).unwrap_err();
        assert_eq!(bad.url, "ftp://b:2");
    }
}
