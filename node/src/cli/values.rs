//! Values that flags, `RAMSTER_*` variables and the config file share:
//! one parser each, so a word that works in one place works in all three.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The words a boolean setting takes, for error messages.
pub const BOOL_WORDS: &str = "true/false, yes/no, on/off or 1/0";

/// A boolean as operators write it: true/false, yes/no, on/off, 1/0, in
/// any case.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean: use {BOOL_WORDS}")),
    }
}

/// A boolean in the config file: a TOML boolean, or any word
/// [`parse_bool`] takes (`mlock = "yes"`, `gso = 0`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FileBool(pub bool);

impl<'de> Deserialize<'de> for FileBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Words;
        impl Visitor<'_> for Words {
            type Value = FileBool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a boolean: {BOOL_WORDS}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FileBool, E> {
                Ok(FileBool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FileBool, E> {
                parse_bool(&v.to_string()).map(FileBool).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FileBool, E> {
                parse_bool(&v.to_string()).map(FileBool).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileBool, E> {
                parse_bool(v).map(FileBool).map_err(E::custom)
            }
        }
        d.deserialize_any(Words)
    }
}

/// An address to listen on: an IP literal with a port (`0.0.0.0:7800`,
/// `[::1]:7801`), or a host name with a port (`localhost:7801`), resolved
/// now. A name with both kinds of address listens on its IPv4 one, the
/// kind the tools' defaults (`127.0.0.1:7801`) dial.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let not_host_port = || format!("{s:?} is not HOST:PORT (an address or a name, and a port)");
    let (host, port) = t.rsplit_once(':').ok_or_else(not_host_port)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(not_host_port());
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let addrs: Vec<SocketAddr> = (host, port.parse::<u16>().expect("checked above"))
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?}: {host:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_take_the_usual_words_in_any_case() {
        for yes in ["true", "TRUE", "yes", "Yes", "on", "1", " on "] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "False", "no", "NO", "off", "0"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        for bad in ["", "2", "y", "maybe", "enabled"] {
            let e = parse_bool(bad).unwrap_err();
            assert!(e.contains(BOOL_WORDS), "{e}");
        }
    }

    #[test]
    fn file_booleans_are_toml_booleans_words_or_bits() {
        #[derive(Deserialize)]
        struct F {
            b: FileBool,
        }
        let b = |text: &str| toml::from_str::<F>(text).map(|f| f.b.0);
        assert!(b("b = true").unwrap());
        assert!(!b("b = false").unwrap());
        assert!(b("b = \"yes\"").unwrap());
        assert!(!b("b = \"off\"").unwrap());
        assert!(b("b = 1").unwrap());
        assert!(!b("b = 0").unwrap());
        for bad in ["b = 2", "b = \"maybe\"", "b = 1.5", "b = [true]"] {
            let e = b(bad).unwrap_err().to_string();
            assert!(e.contains(BOOL_WORDS), "{bad}: {e}");
        }
    }

    #[test]
    fn listen_addresses_take_ip_literals_and_names() {
        assert_eq!(
            parse_listen("127.0.0.1:7801"),
            Ok("127.0.0.1:7801".parse().unwrap())
        );
        assert_eq!(
            parse_listen("0.0.0.0:7800"),
            Ok("0.0.0.0:7800".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:7801"),
            Ok("[::1]:7801".parse().unwrap())
        );
        let local = parse_listen("localhost:7801").unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 7801);
        assert!(local.is_ipv4(), "IPv4 first: {local}");
        for bad in [
            "localhost",
            "127.0.0.1",
            ":7801",
            "localhost:http",
            "host:99999",
            "",
        ] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
