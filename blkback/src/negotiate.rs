//! Option haggling (fixed newstyle) as a pure state machine.
//!
//! The connection layer reads one option header and its data, calls
//! [`Negotiation::handle_option`], writes the reply bytes it produced and acts on the
//! returned [`Outcome`]. No I/O happens here, so the handshake fuzz target runs this exact
//! code over arbitrary bytes.
//!
//! Policy: a socket serves only the exports it was bound with. `GO`/`INFO` for any other
//! name gets `NBD_REP_ERR_UNKNOWN` (so qube B's export name is unknown on qube A's socket);
//! `EXPORT_NAME` for an unknown name ends the session, as the protocol requires. The empty
//! (default) name selects the export only when the socket serves exactly one.

use crate::proto::*;

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// The session agreed at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub export: usize,
    pub transmission_flags: u16,
    pub params: SessionParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep reading options.
    Continue,
    /// The client aborted (the ACK is in the output); close.
    Abort,
    /// Enter transmission.
    Transmit(Agreed),
    /// Hard disconnect: the protocol gives no way to report this error.
    Disconnect(&'static str),
}

pub struct Negotiation<'a> {
    exports: &'a [ExportInfo],
    no_zeroes: bool,
    structured: bool,
    /// Export the last SET_META_CONTEXT selected `base:allocation` for.
    meta_export: Option<usize>,
}

/// A cursor over option data that refuses to read past the end.
struct Cursor<'b> {
    b: &'b [u8],
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed (u32) string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<&'b [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.take(n)
    }
}

impl<'a> Negotiation<'a> {
    pub fn new(exports: &'a [ExportInfo], flags: ClientFlags) -> Self {
        Negotiation {
            exports,
            no_zeroes: flags.no_zeroes,
            structured: false,
            meta_export: None,
        }
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() && self.exports.len() == 1 {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    fn transmission_flags(&self, e: &ExportInfo) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
        if e.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            f |= FLAG_SEND_DF;
        }
        f
    }

    fn agreed(&self, idx: usize) -> Agreed {
        let e = &self.exports[idx];
        let base_allocation = self.structured && self.meta_export == Some(idx);
        Agreed {
            export: idx,
            transmission_flags: self.transmission_flags(e),
            params: SessionParams {
                size: e.size,
                read_only: e.read_only,
                structured: self.structured,
                base_allocation,
            },
        }
    }

    /// An option whose declared length exceeds [`MAX_OPTION_LEN`]: reply TOO_BIG and end
    /// the session (its data is not read).
    pub fn oversized_option(&mut self, option: u32, out: &mut Vec<u8>) -> Outcome {
        put_option_reply(out, option, REP_ERR_TOO_BIG, &[b"option data too long"]);
        Outcome::Disconnect("option data too long")
    }

    pub fn handle_option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let err = |out: &mut Vec<u8>, kind: u32, msg: &str| {
            put_option_reply(out, option, kind, &[msg.as_bytes()]);
            Outcome::Continue
        };
        match option {
            OPT_EXPORT_NAME => {
                let Some(idx) = self.find(data) else {
                    return Outcome::Disconnect(
                        "EXPORT_NAME for an export this socket does not serve",
                    );
                };
                let agreed = self.agreed(idx);
                out.extend_from_slice(&self.exports[idx].size.to_be_bytes());
                out.extend_from_slice(&agreed.transmission_flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Outcome::Transmit(agreed)
            }
            OPT_ABORT => {
                put_option_reply(out, option, REP_ACK, &[]);
                Outcome::Abort
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return err(out, REP_ERR_INVALID, "LIST takes no data");
                }
                for e in self.exports {
                    let name = e.name.as_bytes();
                    let len = (name.len() as u32).to_be_bytes();
                    put_option_reply(
                        out,
                        option,
                        REP_SERVER,
                        &[&len, name, e.description.as_bytes()],
                    );
                }
                put_option_reply(out, option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return err(out, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                }
                if self.structured {
                    return err(
                        out,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                }
                self.structured = true;
                put_option_reply(out, option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => err(out, REP_ERR_UNSUP, "option not supported by this server"),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let mut c = Cursor { b: data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()? as usize;
            let mut reqs = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            if !c.b.is_empty() {
                return None;
            }
            Some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            put_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                &[b"malformed INFO/GO request"],
            );
            return Outcome::Continue;
        };
        let Some(idx) = self.find(name) else {
            put_option_reply(
                out,
                option,
                REP_ERR_UNKNOWN,
                &[b"this socket serves no export of that name"],
            );
            return Outcome::Continue;
        };
        let agreed = self.agreed(idx);
        let e = &self.exports[idx];
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&e.size.to_be_bytes());
        export.extend_from_slice(&agreed.transmission_flags.to_be_bytes());
        put_option_reply(out, option, REP_INFO, &[&export]);
        // Block sizes go out unasked: min 1 is the protocol default, so no client is bound
        // by anything it did not ask for except the maximum, which every client honours.
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        put_option_reply(out, option, REP_INFO, &[&bs]);
        if reqs.contains(&INFO_NAME) {
            put_option_reply(
                out,
                option,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), e.name.as_bytes()],
            );
        }
        if reqs.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            put_option_reply(
                out,
                option,
                REP_INFO,
                &[&INFO_DESCRIPTION.to_be_bytes(), e.description.as_bytes()],
            );
        }
        put_option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Outcome::Transmit(agreed)
        } else {
            Outcome::Continue
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // Replaces the previous selection even when this request fails.
            self.meta_export = None;
        }
        if !self.structured {
            put_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                &[b"negotiate structured replies first"],
            );
            return Outcome::Continue;
        }
        let mut c = Cursor { b: data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()? as usize;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.string()?);
            }
            if !c.b.is_empty() {
                return None;
            }
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            put_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                &[b"malformed meta context request"],
            );
            return Outcome::Continue;
        };
        let Some(idx) = self.find(name) else {
            put_option_reply(
                out,
                option,
                REP_ERR_UNKNOWN,
                &[b"this socket serves no export of that name"],
            );
            return Outcome::Continue;
        };
        let selected = if set {
            queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
        } else {
            // LIST: no query lists everything; "base:" is the namespace wildcard.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == BASE_ALLOCATION.as_bytes() || *q == b"base:")
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            put_option_reply(
                out,
                option,
                REP_META_CONTEXT,
                &[&id.to_be_bytes(), BASE_ALLOCATION.as_bytes()],
            );
            if set {
                self.meta_export = Some(idx);
            }
        }
        put_option_reply(out, option, REP_ACK, &[]);
        Outcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "a/private".into(),
                description: "A".into(),
                size: 1 << 20,
                read_only: false,
            },
            ExportInfo {
                name: "a/root".into(),
                description: String::new(),
                size: 1 << 21,
                read_only: true,
            },
        ]
    }

    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[..8], &OPT_REPLY_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((opt, kind, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    #[test]
    fn unknown_export_and_option() {
        let ex = exports();
        let mut n = Negotiation::new(
            &ex,
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true,
            },
        );
        let mut out = Vec::new();
        assert_eq!(
            n.handle_option(OPT_GO, &go_data("b/private"), &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert_eq!(n.handle_option(77, b"xyz", &mut out), Outcome::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        out.clear();
        // Two exports: the default name is ambiguous.
        assert_eq!(
            n.handle_option(OPT_GO, &go_data(""), &mut out),
            Outcome::Continue
        );
        assert!(matches!(
            n.handle_option(OPT_EXPORT_NAME, b"nope", &mut out),
            Outcome::Disconnect(_)
        ));
    }

    #[test]
    fn go_with_meta_context() {
        let ex = exports();
        let mut n = Negotiation::new(
            &ex,
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true,
            },
        );
        let mut out = Vec::new();
        let mut meta = go_data("a/root");
        meta.truncate(meta.len() - 2);
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        n.handle_option(OPT_SET_META_CONTEXT, &meta, &mut out);
        assert_eq!(
            replies(&out)[0].1,
            REP_ERR_INVALID,
            "needs structured replies first"
        );
        out.clear();
        n.handle_option(OPT_STRUCTURED_REPLY, &[], &mut out);
        n.handle_option(OPT_SET_META_CONTEXT, &meta, &mut out);
        let r = replies(&out);
        assert_eq!(r[1].1, REP_META_CONTEXT);
        out.clear();
        let Outcome::Transmit(a) = n.handle_option(OPT_GO, &go_data("a/root"), &mut out) else {
            panic!()
        };
        assert_eq!(a.export, 1);
        assert!(a.params.base_allocation && a.params.structured && a.params.read_only);
        assert_ne!(a.transmission_flags & FLAG_READ_ONLY, 0);
    }
}
