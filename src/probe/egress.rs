//! Where the prober never connects: link-local addresses (169.254.0.0/16, where AWS, GCP, Azure and
//! others serve instance metadata and credentials at 169.254.169.254; fe80::/10) and the metadata
//! addresses outside them (Alibaba Cloud's 100.100.100.200, AWS's IPv6 fd00:ec2::254). A route's
//! `endpoint` is written by a namespace's users, and a probe sends the backend's key there and
//! reports the answer in status: it must not make the operator, which runs with the cluster's
//! credentials at hand, a reader of its node's metadata service. Checked for IP literals in the URL
//! ([`check_url`]) and for every address a host name resolves to ([`GuardedResolver`]), so that a
//! name pointing there is refused as well. (The gateway's own egress there is cut by its
//! NetworkPolicy, `gateway::objects::network_policy`.) Private and cluster-internal addresses stay
//! allowed: self-hosted backends live there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The IPv4 metadata address outside link-local (Alibaba Cloud).
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata address.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether the prober refuses to connect to `ip`.
pub fn denied(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4 == ALIBABA_METADATA,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => denied(IpAddr::V4(v4)),
            None => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6,
        },
    }
}

fn refusal(what: &str) -> String {
    format!(
        "the operator does not connect to {what}: link-local and cloud metadata addresses are refused"
    )
}

/// Err (why) when `url`'s host is an IP literal the prober refuses.
pub fn check_url(url: &str) -> Result<(), String> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(());
    };
    let host = parsed.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if denied(ip) {
        Err(refusal(&ip.to_string()))
    } else {
        Ok(())
    }
}

/// The system resolver, without the addresses [`denied`] names; a name that resolves only to
/// those is an error.
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allowed_addresses(&host, found)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses of `host` the prober may connect to; Err when it resolved to nothing else.
fn allowed_addresses(
    host: &str,
    found: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let total = found.len();
    let allowed: Vec<SocketAddr> = found.into_iter().filter(|a| !denied(a.ip())).collect();
    if allowed.is_empty() && total > 0 {
        return Err(refusal(&format!("{host} (it resolves only to such addresses)")).into());
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_addresses_are_refused_and_others_not() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(denied(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.10",
            "127.0.0.1",
            "100.100.100.201",
            "8.8.8.8",
            "::1",
            "fd00::1",
        ] {
            assert!(!denied(ip.parse().unwrap()), "{ip}");
        }
        assert!(check_url("http://169.254.169.254/latest/meta-data/").is_err());
        assert!(check_url("https://[fd00:ec2::254]/v1").is_err());
        assert!(check_url("https://api.deepseek.com/v1").is_ok());
        assert!(check_url("http://10.0.0.5:8000/v1").is_ok());
    }

    /// The gateway's NetworkPolicy keeps its egress off the addresses the prober refuses.
    #[test]
    fn the_gateway_policy_excepts_what_the_prober_refuses() {
        for (_, except) in crate::gateway::objects::METADATA_EXCEPT {
            for cidr in except {
                let ip = cidr.split('/').next().unwrap().parse().unwrap();
                assert!(denied(ip), "{cidr}");
            }
        }
    }

    #[test]
    fn a_name_resolving_only_to_metadata_addresses_is_an_error() {
        let metadata: SocketAddr = "169.254.169.254:0".parse().unwrap();
        let private: SocketAddr = "10.1.2.3:0".parse().unwrap();
        let err = allowed_addresses("metadata.internal", vec![metadata]).unwrap_err();
        assert!(err.to_string().contains("metadata.internal"), "{err}");
        assert_eq!(
            allowed_addresses("mixed", vec![metadata, private]).unwrap(),
            [private]
        );
        assert!(allowed_addresses("none", vec![]).unwrap().is_empty());
    }
}
