//! Which pgoutput protocol a session asks for, and the `START_REPLICATION` options that say so.
//!
//! Each Postgres major speaks pgoutput up to a version: 1 (all), 2 (14: transactions streamed
//! while in progress), 3 (15: two-phase), 4 (16: streaming `parallel`, whose Stream Abort
//! carries the abort's LSN and time). walsweep asks for the newest the server speaks unless
//! `source.protocol_version` pins one. It never asks for two-phase decoding (`two_phase`): it
//! acts on commits only, and a prepared transaction decoded at PREPARE would have to be held,
//! possibly for days, until its COMMIT PREPARED; without it, Postgres sends the transaction
//! whole at COMMIT PREPARED, like any other.

/// The newest protocol version the decoder (`super::pgoutput`) reads.
pub const NEWEST_PROTOCOL_VERSION: u32 = 4;

/// How the server sends transactions that are still in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Streaming {
    /// Not at all: Postgres keeps large transactions (spilled to disk) until they commit.
    Off,
    /// `streaming 'on'` (protocol 2 and 3).
    On,
    /// `streaming 'parallel'` (protocol 4): the same stream, with the abort's position in
    /// Stream Abort. walsweep applies nothing in parallel; it only reads those fields.
    Parallel,
}

/// The protocol of one replication session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Protocol {
    pub(crate) version: u32,
    pub(crate) streaming: Streaming,
}

/// The newest protocol a server of `server_version_num` (e.g. 160004) speaks.
pub(crate) fn newest_for_server(server_version_num: u32) -> u32 {
    match server_version_num {
        160_000.. => 4,
        150_000.. => 3,
        140_000.. => 2,
        _ => 1,
    }
}

/// The protocol to ask a server of `server_version_num` for: `configured` if it speaks it,
/// else the newest it speaks. The error says which server version the configured one needs.
pub(crate) fn negotiate(
    server_version_num: u32,
    configured: Option<u32>,
) -> Result<Protocol, String> {
    let newest = newest_for_server(server_version_num);
    let version = match configured {
        None => newest,
        Some(v) if (1..=newest).contains(&v) => v,
        Some(v) => {
            return Err(format!(
                "source.protocol_version = {v} needs Postgres {}, but the server is {} (it \
                 speaks pgoutput up to {newest}); lower source.protocol_version or leave it out",
                match v {
                    2 => "14 or newer",
                    3 => "15 or newer",
                    4 => "16 or newer",
                    _ => "a version walsweep does not know",
                },
                display_server_version(server_version_num),
            ))
        }
    };
    let streaming = match version {
        1 => Streaming::Off,
        2 | 3 => Streaming::On,
        _ => Streaming::Parallel,
    };
    Ok(Protocol { version, streaming })
}

impl Protocol {
    /// The `START_REPLICATION ... LOGICAL` options for `publication_names` (already quoted as
    /// pgoutput expects a list).
    pub(crate) fn start_options(&self, publication_names: String) -> Vec<(&'static str, String)> {
        let mut options = vec![
            ("proto_version", self.version.to_string()),
            ("publication_names", publication_names),
            ("messages", "true".to_string()),
        ];
        match self.streaming {
            Streaming::Off => {}
            Streaming::On => options.push(("streaming", "on".to_string())),
            Streaming::Parallel => options.push(("streaming", "parallel".to_string())),
        }
        options
    }
}

/// 160004 → "16.4", 90624 → "9.6.24".
fn display_server_version(num: u32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, num / 100 % 100, num % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_each_major_speaks_is_asked_for_by_default() {
        for (server, version, streaming) in [
            (130_012, 1, Streaming::Off),
            (140_023, 2, Streaming::On),
            (150_020, 3, Streaming::On),
            (160_014, 4, Streaming::Parallel),
            (170_010, 4, Streaming::Parallel),
            (180_004, 4, Streaming::Parallel),
        ] {
            assert_eq!(
                negotiate(server, None),
                Ok(Protocol { version, streaming }),
                "server {server}"
            );
        }
    }

    #[test]
    fn a_configured_version_is_used_when_the_server_speaks_it() {
        let v1 = negotiate(170_000, Some(1)).unwrap();
        assert_eq!(v1.streaming, Streaming::Off);
        assert!(!v1
            .start_options("\"p\"".into())
            .iter()
            .any(|(k, _)| *k == "streaming"));
        assert_eq!(
            negotiate(150_000, Some(2)).unwrap().streaming,
            Streaming::On
        );
    }

    #[test]
    fn a_version_the_server_does_not_speak_names_both_versions_and_the_fix() {
        let e = negotiate(150_020, Some(4)).unwrap_err();
        assert!(e.contains("needs Postgres 16 or newer"), "{e}");
        assert!(e.contains("the server is 15.20"), "{e}");
        assert!(e.contains("up to 3"), "{e}");
        assert!(e.contains("lower source.protocol_version"), "{e}");
    }

    #[test]
    fn options_carry_the_version_publications_and_streaming_mode() {
        let options = negotiate(160_000, None)
            .unwrap()
            .start_options("\"a\",\"b\"".into());
        assert_eq!(
            options,
            vec![
                ("proto_version", "4".to_string()),
                ("publication_names", "\"a\",\"b\"".to_string()),
                ("messages", "true".to_string()),
                ("streaming", "parallel".to_string()),
            ]
        );
    }
}
