//! Typed QMP commands and their replies.
//!
//! Field names follow QEMU's QAPI schema exactly (checked against QEMU 7.2's
//! `query-qmp-schema`). Replies are deliberately lenient: optional members are `Option`,
//! enums keep unknown values in an `Other(String)` variant and most structs keep unknown
//! members in `extra`, because Ferry must talk to QEMU versions older and newer than the
//! one it was written against without failing on a field it does not care about.

mod block;
mod migration;
mod misc;
mod run_state;

pub use block::*;
pub use migration::*;
pub use misc::*;
pub use run_state::*;

/// A QMP command with typed arguments and reply.
///
/// The implementing type serializes to the command's `arguments` object; a unit struct (or
/// a struct whose fields are all skipped) sends no `arguments` at all.
pub trait Command: serde::Serialize {
    /// The QMP command name, e.g. `query-status` (note some are spelled with `_`, like
    /// `migrate_cancel`).
    const NAME: &'static str;
    /// The type of the reply's `return` member. `()` accepts QEMU's `{}`.
    type Output: serde::de::DeserializeOwned;
}

/// Defines a string enum that serializes as QEMU's names and never fails to deserialize:
/// names this code does not know land in `Other(String)`.
macro_rules! lenient_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this version of Ferry does not know (newer QEMU); kept verbatim.
            Other(String),
        }

        impl $name {
            /// QEMU's name for this value.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $text, )*
                    $name::Other(s) => s,
                }
            }

            /// Parses QEMU's name; unknown names become `Other`, never an error.
            pub fn from_name(s: &str) -> Self {
                match s {
                    $( $text => $name::$variant, )*
                    other => $name::Other(other.to_string()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                Ok($name::from_name(&s))
            }
        }
    };
}
pub(crate) use lenient_enum;

/// Implements [`Command`] for a list of `Type => "name" -> Output` triples.
macro_rules! commands {
    ( $( $ty:ty => $name:literal -> $out:ty; )* ) => {
        $(
            impl $crate::commands::Command for $ty {
                const NAME: &'static str = $name;
                type Output = $out;
            }
        )*
    };
}
pub(crate) use commands;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The TLS arguments are spelled as QEMU 10's QAPI schema has them (qapi/qom.json,
    /// qapi/authz.json, qapi/block-export.json, qapi/block-core.json), and absent when unset.
    #[test]
    fn tls_arguments_follow_the_qapi_schema() {
        let creds = ObjectAddTlsCredsX509::new("c", "/run/x", "server");
        assert_eq!(
            serde_json::to_value(&creds).unwrap(),
            json!({"qom-type": "tls-creds-x509", "id": "c", "dir": "/run/x",
                   "endpoint": "server", "verify-peer": true})
        );
        assert_eq!(
            serde_json::to_value(ObjectAddAuthzSimple::new("a", "CN=s")).unwrap(),
            json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=s"})
        );
        let addr: std::net::SocketAddr = "10.0.0.2:49152".parse().unwrap();
        let mut start = NbdServerStart::new(addr);
        assert!(serde_json::to_value(&start)
            .unwrap()
            .get("tls-creds")
            .is_none());
        start.tls_creds = Some("c".into());
        start.tls_authz = Some("a".into());
        let v = serde_json::to_value(&start).unwrap();
        assert_eq!(
            (v["tls-creds"].clone(), v["tls-authz"].clone()),
            (json!("c"), json!("a"))
        );
        let mut add = BlockdevAddNbd::new("n", addr, "e");
        assert!(serde_json::to_value(&add)
            .unwrap()
            .get("tls-creds")
            .is_none());
        add.tls_creds = Some("c".into());
        add.tls_hostname = Some("10.0.0.2".into());
        let v = serde_json::to_value(&add).unwrap();
        assert_eq!(
            (v["tls-creds"].clone(), v["tls-hostname"].clone()),
            (json!("c"), json!("10.0.0.2"))
        );
    }

    #[test]
    fn lenient_enums_round_trip_and_keep_unknown_values() {
        let s: MigrationStatus = serde_json::from_value(json!("postcopy-active")).expect("ok");
        assert_eq!(s, MigrationStatus::PostcopyActive);
        let s: MigrationStatus = serde_json::from_value(json!("brand-new")).expect("ok");
        assert_eq!(s, MigrationStatus::Other("brand-new".into()));
        assert_eq!(serde_json::to_value(&s).expect("ser"), json!("brand-new"));
        let r: RunState = serde_json::from_value(json!("finish-migrate")).expect("ok");
        assert_eq!(r, RunState::FinishMigrate);
        assert_eq!(r.to_string(), "finish-migrate");
    }
}
