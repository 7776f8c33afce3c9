//! PROXY protocol (HAProxy's, versions 2 and 1) on listeners with
//! `proxy_protocol = true`: a load balancer in front of the broker sends one
//! header before the client's bytes, naming the client's real address, which
//! then appears in logs and metrics instead of the balancer's.
//!
//! The header is read straight off the TCP socket (before TLS), under the
//! connection's connect deadline. On such a listener a connection without a
//! valid header is closed: accepting it would let anyone who reaches the port
//! directly claim any address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's figure).
const V1_MAX: usize = 107;
/// Longest v2 address block we accept (TLVs included).
const V2_MAX_BODY: usize = 2048;

/// What the header said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// The client's address as the proxy saw it.
    Client(SocketAddr),
    /// A connection made by the proxy itself (health check: v2 LOCAL or v1
    /// UNKNOWN); the socket's own address stands.
    Local,
}

/// Reads and removes the PROXY header at the start of `sock`.
pub async fn read_header(sock: &mut TcpStream, deadline: Instant) -> Result<Proxied, String> {
    tokio::time::timeout_at(deadline, read_inner(sock))
        .await
        .map_err(|_| "no PROXY protocol header within the connect timeout".to_string())?
}

async fn read_inner(sock: &mut TcpStream) -> Result<Proxied, String> {
    // Six bytes tell the versions apart ("PROXY " or the start of the v2
    // signature); reading exactly what the header holds leaves the client's
    // own bytes in the socket, and waiting in read never spins.
    let mut fixed = [0u8; 16];
    read_exact(sock, &mut fixed[..6]).await?;
    if &fixed[..6] == b"PROXY " {
        return read_v1(sock).await;
    }
    if fixed[..6] != V2_SIGNATURE[..6] {
        return Err("connection does not start with a PROXY protocol header".into());
    }
    read_exact(sock, &mut fixed[6..]).await?;
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if len > V2_MAX_BODY {
        return Err(format!("PROXY v2 header claims {len} bytes of addresses"));
    }
    let mut body = vec![0u8; len];
    read_exact(sock, &mut body).await?;
    parse_v2(&fixed, &body)
}

async fn read_exact(sock: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    sock.read_exact(buf).await.map(|_| ()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "closed before the end of the PROXY protocol header".to_string()
        } else {
            e.to_string()
        }
    })
}

/// Parses a v2 header: `fixed` is its first 16 bytes, `body` the rest.
pub fn parse_v2(fixed: &[u8; 16], body: &[u8]) -> Result<Proxied, String> {
    if fixed[..12] != V2_SIGNATURE {
        return Err("bad PROXY v2 signature".into());
    }
    let version = fixed[12] >> 4;
    let command = fixed[12] & 0x0f;
    if version != 2 {
        return Err(format!("PROXY protocol version {version} (expected 2)"));
    }
    match command {
        0 => return Ok(Proxied::Local),
        1 => {}
        c => return Err(format!("PROXY v2 command {c} is neither LOCAL nor PROXY")),
    }
    let family = fixed[13] >> 4;
    match family {
        // AF_INET: src addr, dst addr, src port, dst port.
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Proxied::Client(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Proxied::Client(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // AF_UNSPEC or AF_UNIX: no IP address to report.
        0 | 3 => Ok(Proxied::Local),
        1 | 2 => Err("PROXY v2 address block too short for its family".into()),
        f => Err(format!("PROXY v2 address family {f} is unknown")),
    }
}

/// The rest of a v1 line after "PROXY ", up to CRLF, a byte at a time (at
/// most 101 reads; only trusted balancers send these).
async fn read_v1(sock: &mut TcpStream) -> Result<Proxied, String> {
    let mut line = b"PROXY ".to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err("PROXY v1 header longer than 107 bytes".into());
        }
        let mut byte = [0u8; 1];
        read_exact(sock, &mut byte).await?;
        line.push(byte[0]);
    }
    parse_v1(&line[..line.len() - 2])
}

/// Parses a v1 line without its CRLF: `PROXY TCP4 src dst sport dport`.
pub fn parse_v1(line: &[u8]) -> Result<Proxied, String> {
    let text = std::str::from_utf8(line).map_err(|_| "PROXY v1 header is not ASCII".to_string())?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Proxied::Local),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| format!("PROXY v1 source address {src:?} is not an IP address"))?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(format!("PROXY v1 {fam} with address {src}"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| format!("PROXY v1 source port {sport:?} is not a port"))?;
            Ok(Proxied::Client(SocketAddr::new(ip, port)))
        }
        _ => Err(format!("malformed PROXY v1 header {text:?}")),
    }
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address) that may
/// send PROXY headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Encodes a v2 PROXY header for a TCP connection from `src` to `dst` (used
/// by tests and by anyone testing a deployment).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(h: &[u8]) -> ([u8; 16], &[u8]) {
        let mut fixed = [0u8; 16];
        fixed.copy_from_slice(&h[..16]);
        (fixed, &h[16..])
    }

    #[test]
    fn v2_round_trips_ipv4_and_ipv6() {
        for (src, dst) in [
            ("203.0.113.7:40000", "10.0.0.1:443"),
            ("[2001:db8::5]:1234", "[2001:db8::1]:8883"),
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let h = encode_v2(src, dst.parse().unwrap());
            let (fixed, body) = split(&h);
            assert_eq!(parse_v2(&fixed, body), Ok(Proxied::Client(src)));
        }
    }

    #[test]
    fn v2_local_and_bad_headers() {
        let mut h = encode_v2("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        h[12] = 0x20; // LOCAL
        let (fixed, body) = split(&h);
        assert_eq!(parse_v2(&fixed, body), Ok(Proxied::Local));
        h[12] = 0x11; // version 1 in a v2 header
        let (fixed, body) = split(&h);
        assert!(parse_v2(&fixed, body).unwrap_err().contains("version 1"));
        h[12] = 0x21;
        let (fixed, body) = split(&h);
        assert!(parse_v2(&fixed, &body[..4])
            .unwrap_err()
            .contains("too short"));
        h[0] = b'X';
        let (fixed, body) = split(&h);
        assert!(parse_v2(&fixed, body).unwrap_err().contains("signature"));
    }

    #[test]
    fn trusted_ranges() {
        let lb = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(lb.contains("10.1.200.3".parse().unwrap()));
        assert!(!lb.contains("10.2.0.1".parse().unwrap()));
        assert!(lb.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped");
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8:1::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 198.51.100.22 10.0.0.1 35646 443"),
            Ok(Proxied::Client("198.51.100.22:35646".parse().unwrap()))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::9 2001:db8::1 1 2"),
            Ok(Proxied::Client("[2001:db8::9]:1".parse().unwrap()))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN"), Ok(Proxied::Local));
        assert!(parse_v1(b"PROXY TCP4 2001:db8::9 1.1.1.1 1 2").is_err());
        assert!(parse_v1(b"PROXY TCP4 1.1.1.1 1.1.1.1 99999 2").is_err());
        assert!(parse_v1(b"GET / HTTP/1.1").is_err());
    }

    #[tokio::test]
    async fn header_is_consumed_and_the_client_bytes_follow() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut h = encode_v2("192.0.2.1:1000".parse().unwrap(), addr);
            h.extend_from_slice(b"\x10MQTT");
            // Arrives in two pieces, the split inside the header.
            c.write_all(&h[..10]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.write_all(&h[10..]).await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let got = read_header(&mut s, Instant::now() + std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Proxied::Client("192.0.2.1:1000".parse().unwrap()));
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"\x10MQTT");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn plain_mqtt_without_header_is_refused() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd")
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let err = read_header(&mut s, Instant::now() + std::time::Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("does not start with a PROXY"), "{err}");
    }
}
