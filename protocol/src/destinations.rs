//! Which network destinations a service may be told to call (SSRF rules).
//!
//! The GCS POSTs notifications to any URL a subscriber names. Unless a site allows it, such
//! URLs may not point into loopback, link-local (cloud metadata at 169.254.169.254), private,
//! shared (CGNAT), unspecified, broadcast, multicast or documentation ranges, by IP literal,
//! by `localhost`, or by a name that resolves there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether an address is one a caller on the internet must not make us reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                // NAT64 and IPv4-compatible forms of internal IPv4 addresses
                || (s[0..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                    && is_internal_v4(Ipv4Addr::new(
                        (s[6] >> 8) as u8,
                        s[6] as u8,
                        (s[7] >> 8) as u8,
                        s[7] as u8,
                    )))
                || (s[0..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED)
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240 // reserved
}

/// Checks a URL's host without resolving it: an internal IP literal or a `localhost` name
/// is refused, with the reason.
pub fn check_url_host(url: &reqwest::Url) -> Result<(), String> {
    match url.host() {
        None => Err("it has no host".into()),
        Some(url::Host::Ipv4(ip)) if is_internal(IpAddr::V4(ip)) => Err(format!(
            "{ip} is a loopback, link-local, private or otherwise internal address"
        )),
        Some(url::Host::Ipv6(ip)) if is_internal(IpAddr::V6(ip)) => Err(format!(
            "{ip} is a loopback, link-local, private or otherwise internal address"
        )),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                Err(format!("{d} names this host"))
            } else {
                Ok(())
            }
        }
        Some(_) => Ok(()),
    }
}

/// [`check_url_host`], then resolves a host name and refuses it when any of its addresses is
/// internal (a name pointing at 127.0.0.1 is no better than the literal). The connection
/// resolves again, so a name whose answer changes in between (DNS rebinding) is not caught.
pub async fn check_url(url: &reqwest::Url) -> Result<(), String> {
    check_url_host(url)?;
    let Some(url::Host::Domain(d)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs = tokio::net::lookup_host((d, port))
        .await
        .map_err(|e| format!("{d} cannot be resolved: {e}"))?;
    for a in addrs {
        if is_internal(a.ip()) {
            return Err(format!(
                "{d} resolves to {}, a loopback, link-local, private or otherwise internal address",
                a.ip()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges() {
        for internal in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.1.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn urls() {
        let check = |u: &str| check_url_host(&reqwest::Url::parse(u).unwrap());
        assert!(check("http://127.0.0.1:9/n").is_err());
        assert!(check("http://[::1]/n").is_err());
        assert!(check("http://[::ffff:7f00:1]/n").is_err());
        assert!(check("http://2130706433/n").is_err(), "decimal 127.0.0.1");
        assert!(check("http://0x7f.1/n").is_err(), "hex 127.0.0.1");
        assert!(check("http://localhost:8080/n").is_err());
        assert!(check("http://LOCALHOST./n").is_err());
        assert!(check("http://a.localhost/n").is_err());
        assert!(check("https://consumer.example.org/n").is_ok());
        assert!(check("http://8.8.8.8/n").is_ok());
        let resolved = check_url(&reqwest::Url::parse("http://10.1.2.3/n").unwrap()).await;
        assert!(resolved.unwrap_err().contains("internal address"));
    }
}
